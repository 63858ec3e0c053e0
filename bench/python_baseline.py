"""The Python baseline of the benchmark: what a user would otherwise write instead of anomalyd.

    .venv/bin/python bench/python_baseline.py --brokers HOST:PORT --topic T --group G --records N \
        --model DIR --stride S [--batch 64]

confluent-kafka consumes the topic (key = series name, payload = one CSV line such as
`ts;f0;f1;...`); `WindowScorer` applies the bundle's preprocessing from model.json, keeps a numpy
ring buffer of the last W rows per series, collects every S-th full window of a series into a batch
and scores full batches with onnxruntime (anomaly_score = score / threshold). After N records it
scores the last partial batch and prints one JSON line on stdout:

    {"records": N, "windows": w, "seconds": t}

with t from the first record received to the last window scored. A summary for people goes to
stderr. CPU time and peak RSS are measured from outside (bench/run uses /usr/bin/time).

Plain Python, numpy and onnxruntime with default session options: no Rust, no numba, no
multiprocessing. It follows docs/model-contract.md where it is cheap to (event-time order, gap
segments, the NaN policy, log1p), so that it does the same work per record as the daemon and its
windows and scores match the trainer's golden vectors (bench/tests/test_python_baseline.py).
One-hot (categorical) columns are not supported: the benchmark's bundles are numeric.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Values the trainer reads as missing (anomalyd_trainer.data.MISSING_TEXT); Python's float() already
# reads nan/inf in any case.
MISSING_TEXT = {b"", b"null", b"NULL", b"None", b"NA", b"N/A"}

# Called after each scored batch with the batch's series names, window end times (unix seconds),
# scaled windows (B, W, F), raw scores (B,), feature scores (B, F) and anomaly scores (B,).
Sink = Callable[[list, list, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def timestamp_parser(fmt: str) -> Callable[[bytes], float]:
    """bytes → unix seconds, for model.json's `preprocess.timestamp.format`."""
    if fmt == "unix_s":
        return float
    if fmt in ("unix_ms", "unix_ns"):
        scale = 1e-3 if fmt == "unix_ms" else 1e-9
        return lambda b: float(b) * scale
    if fmt == "auto":
        def parse_auto(b: bytes) -> float:
            try:
                return float(b)
            except ValueError:
                d = datetime.fromisoformat(b.decode())
                return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
        return parse_auto

    # A strftime pattern; naive times are UTC, as in the trainer.
    def parse_pattern(b: bytes) -> float:
        d = datetime.strptime(b.decode(), fmt)
        return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
    return parse_pattern


class _Series:
    """One series' ring buffer and the times the order and gap rules compare against."""

    __slots__ = ("name", "ring", "next", "rows_in_segment", "last_seen_ts", "last_kept_ts", "last_valid", "seq")

    def __init__(self, name: str, length: int, width: int):
        self.name = name
        self.ring = np.zeros((length, width))  # (W, F) transformed, unscaled rows; `next` is the oldest
        self.next = 0
        self.rows_in_segment = 0
        # A record must be later than every earlier one, dropped or not; a gap is measured from the
        # last row actually kept (contract §2).
        self.last_seen_ts = -math.inf
        self.last_kept_ts = -math.inf
        self.last_valid = [math.nan] * width  # per feature, for nan_policy = "ffill"
        self.seq = 0  # record counter for bundles without a timestamp column


class WindowScorer:
    """Records (series key, CSV payload) → per-series windows → batched onnxruntime scores.

    Independent of Kafka: `push` one record at a time, `flush` at the end. Rows are buffered
    transformed but unscaled (float64); the scaling `(t - mean) / std` runs once per batch on the
    (B, W, F) array, in float64 then cast to float32, which gives the same numbers as scaling each
    row on arrival. Columns marked `"window": "center"` then lose their window's mean (contract §2.5).
    """

    def __init__(self, model_dir: str | Path, stride: int = 1, batch: int = 64, columns: list[str] | None = None,
                 delimiter: str | None = None, sink: Sink | None = None):
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "model.json").read_text())
        if meta.get("schema_version") != 1:
            raise ValueError(f"{model_dir}/model.json: schema_version {meta.get('schema_version')!r} is not 1")
        pre = meta["preprocess"]
        cols = pre["columns"]
        if any(c["transform"] == "one_hot" for c in cols):
            raise ValueError(f"{model_dir}: one-hot columns are not supported by the baseline")
        self.length = int(meta["window"]["length"])
        self.width = len(cols)
        self.stride = stride
        self.batch = batch
        self.max_gap_secs = float(meta["window"]["max_gap_secs"])
        self.nan_policy = meta["window"]["nan_policy"]
        self.mean = np.array([c["mean"] for c in cols])
        self.std = np.array([c["std"] for c in cols])
        self.log1p = [c["transform"] == "log1p" for c in cols]
        self.centered = [j for j, c in enumerate(cols) if c.get("window", "none") == "center"]
        self.any_log1p = any(self.log1p)
        self.threshold = float(meta["thresholds"]["value"])

        # Payload layout: the timestamp column, then the features' source fields, unless told otherwise.
        ts_spec = pre["timestamp"]
        if columns is None:
            columns = ([ts_spec["column"]] if ts_spec else []) + [c["source"] for c in cols]
        missing = [c for c in [*([ts_spec["column"]] if ts_spec else []), *(c["source"] for c in cols)]
                   if c not in columns]
        if missing:
            raise ValueError(f"payload columns {columns} lack {missing}")
        self.ts_index = columns.index(ts_spec["column"]) if ts_spec else None
        self.parse_ts = timestamp_parser(ts_spec["format"]) if ts_spec else None
        self.value_index = [columns.index(c["source"]) for c in cols]
        delimiter = delimiter or meta["training_config"]["data"]["csv_delimiter"]
        self.delimiter = delimiter.encode()

        self.session = ort.InferenceSession(str(model_dir / meta["onnx"]["file"]), providers=["CPUExecutionProvider"])
        self.input_name = meta["onnx"]["inputs"][0]["name"]
        outputs = {o["name"] for o in meta["onnx"]["outputs"]}
        if not {"score", "feature_scores"} <= outputs:
            raise ValueError(f"{model_dir}/model.json: outputs {sorted(outputs)} lack score or feature_scores")
        self.output_names = ["score", "feature_scores"]

        self.series: dict[bytes, _Series] = {}
        self.pending = np.empty((batch, self.length, self.width))  # raw windows waiting for the next run
        self.pending_series: list[str] = []
        self.pending_ts: list[float] = []
        self.sink = sink
        self.windows = 0
        self.anomalous = 0
        self.dropped: Counter = Counter()

    # === impl WindowScorer: records ===

    def push(self, key: bytes | None, payload: bytes) -> None:
        """One record; a full batch of windows is scored before this returns."""
        if key is None or payload is None:
            self.dropped["missing_key" if key is None else "empty_payload"] += 1
            return
        st = self.series.get(key)
        if st is None:
            st = self.series[key] = _Series(key.decode("utf-8", "replace"), self.length, self.width)
        fields = payload.split(self.delimiter)
        try:
            row = [float(fields[i]) for i in self.value_index]
            if self.ts_index is not None:
                ts = self.parse_ts(fields[self.ts_index])
            else:
                ts = float(st.seq)
                st.seq += 1
        except (ValueError, IndexError):
            # Slow path: an empty or "null" value is missing (the NaN policy decides); anything else
            # is a bad record, skipped.
            parsed = self._parse_slowly(fields, st)
            if parsed is None:
                return
            ts, row = parsed

        if ts <= st.last_seen_ts:
            self.dropped["out_of_order"] += 1
            return
        st.last_seen_ts = ts
        total = sum(row)
        if total - total != 0.0:  # NaN or ±inf somewhere in the row (or a sum that overflowed)
            row = self._apply_nan_policy(row, st)
            if row is None:
                return
        else:
            st.last_valid = row
        if self.max_gap_secs > 0 and ts - st.last_kept_ts > self.max_gap_secs:
            st.rows_in_segment = 0  # a new segment: warm up again
        st.last_kept_ts = ts
        if self.any_log1p:
            row = [math.log1p(max(v, 0.0)) if lg else v for v, lg in zip(row, self.log1p, strict=True)]

        W = self.length
        nxt = st.next
        st.ring[nxt] = row
        nxt = st.next = (nxt + 1) % W
        n = st.rows_in_segment = st.rows_in_segment + 1
        if n < W or (n - W) % self.stride:
            return
        # Oldest row first: the ring from `next` to the end, then from the start to `next`.
        b = len(self.pending_ts)
        self.pending[b, : W - nxt] = st.ring[nxt:]
        self.pending[b, W - nxt:] = st.ring[:nxt]
        self.pending_series.append(st.name)
        self.pending_ts.append(ts)
        if b + 1 == self.batch:
            self.flush()

    def _parse_slowly(self, fields: list[bytes], st: _Series) -> tuple[float, list[float]] | None:
        try:
            row = []
            for i in self.value_index:
                text = fields[i].strip()
                row.append(math.nan if text in MISSING_TEXT else float(text))
            ts = self.parse_ts(fields[self.ts_index]) if self.ts_index is not None else None
        except (ValueError, IndexError, UnicodeDecodeError):
            self.dropped["bad_record"] += 1
            return None
        if ts is None:
            ts = float(st.seq)
            st.seq += 1
        return ts, row

    def _apply_nan_policy(self, row: list[float], st: _Series) -> list[float] | None:
        """Contract §1: finite values are remembered for ffill first, even when the row is dropped."""
        last = [v if math.isfinite(v) else old for v, old in zip(row, st.last_valid, strict=True)]
        st.last_valid = last
        if all(math.isfinite(v) for v in row):
            return row  # only the sum overflowed
        if self.nan_policy == "ffill" and all(math.isfinite(v) for v in last):
            return last  # the row's own finite values, earlier ones in place of the rest
        self.dropped["nan"] += 1
        return None

    # === impl WindowScorer: scoring ===

    def flush(self) -> None:
        """Scores the pending windows (a full batch, or the rest at the end)."""
        n = len(self.pending_ts)
        if n == 0:
            return
        x = ((self.pending[:n] - self.mean) / self.std).astype(np.float32)  # (B, W, F)
        for j in self.centered:
            v = x[:, :, j].astype(np.float64)
            x[:, :, j] = v - v.mean(axis=1, keepdims=True)
        score, feature_scores = self.session.run(self.output_names, {self.input_name: x})
        anomaly = score.astype(np.float64) / self.threshold
        self.windows += n
        self.anomalous += int(np.count_nonzero(anomaly > 1.0))
        if self.sink is not None:
            self.sink(self.pending_series, self.pending_ts, x, score, feature_scores, anomaly)
        self.pending_series = []
        self.pending_ts = []


# === Kafka ===


def consume(args: argparse.Namespace) -> dict:
    # Imported here so that the scorer (and its tests) work without the Kafka client.
    from confluent_kafka import Consumer, KafkaException

    scorer = WindowScorer(args.model, stride=args.stride, batch=args.batch)
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,  # the client's default, spelled out: offsets commit every 5 s
        # bench/run passes anomalyd's fetch settings (src/source/kafka.rs), so both read alike.
        **dict(p.split("=", 1) for p in args.consumer_property),
    })
    consumer.subscribe([args.topic])
    push = scorer.push
    received = 0
    errors = 0
    first = None
    idle_since = time.monotonic()
    try:
        while received < args.records:
            msgs = consumer.consume(num_messages=min(args.poll_batch, args.records - received), timeout=1.0)
            if not msgs:
                if time.monotonic() - idle_since > args.idle_timeout:
                    raise SystemExit(f"python_baseline: no records for {args.idle_timeout:g} s after {received} "
                                     f"of {args.records}")
                continue
            idle_since = time.monotonic()
            if first is None:
                first = time.perf_counter()
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    errors += 1
                    continue
                push(msg.key(), msg.value())
                received += 1
        scorer.flush()
        seconds = time.perf_counter() - first if first is not None else 0.0
    finally:
        consumer.close()  # commits the offsets; not timed
    print(f"python_baseline: {received} records, {scorer.windows} windows ({scorer.anomalous} with anomaly_score > 1) "
          f"of {len(scorer.series)} series in {seconds:.2f} s = {received / max(seconds, 1e-9):.0f} records/s; "
          f"dropped {dict(scorer.dropped) or 'none'}; consumer errors {errors}", file=sys.stderr)
    return {"records": received, "windows": scorer.windows, "seconds": round(seconds, 6)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", required=True, help="bootstrap servers, HOST:PORT[,...]")
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True, help="consumer group id")
    p.add_argument("--records", required=True, type=int, help="stop after this many records")
    p.add_argument("--model", required=True, help="bundle folder (model.json + model.onnx)")
    p.add_argument("--stride", type=int, default=1, help="score every S-th window of a series")
    p.add_argument("--batch", type=int, default=64, help="windows per onnxruntime run")
    p.add_argument("--poll-batch", type=int, default=1000, help="messages per Consumer.consume call")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="give up after this many seconds without records")
    p.add_argument("--consumer-property", action="append", default=[], metavar="NAME=VALUE",
                   help="a librdkafka property for the consumer (repeatable)")
    args = p.parse_args(argv)
    if args.records < 1 or args.stride < 1 or args.batch < 1 or args.poll_batch < 1:
        p.error("--records, --stride, --batch and --poll-batch must be >= 1")
    print(json.dumps(consume(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

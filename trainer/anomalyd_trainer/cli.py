"""`anomalyd-train`: train, export and evaluate bundles.

    anomalyd-train train --config trainer/configs/skab-convae.toml      # → runs/<name>/ and models/<name>/
    anomalyd-train export --run runs/<name> [--golden RECORDS]          # bundle (and golden vectors) again
    anomalyd-train evaluate --model models/<name> --data FILE... [--label-column C] [--skip-rows N]
    anomalyd-train benchmark skab|nslkdd [--set ...] [--write docs/quality.md]   # public benchmarks
    anomalyd-train plot --model models/<name> --records FILE --scores SCORES [--alerts ALERTS] --output PNG

Bad input ends with one line on stderr naming file, place and column, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ExportError, InputError

EXIT_INPUT = 2
EXIT_EXPORT = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomalyd-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and export its bundle")
    t.add_argument("--config", required=True, help="training config (TOML)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=5")
    t.add_argument("--runs-dir", default="runs", help="where the run folder (checkpoint, config.json) goes")
    t.add_argument("--out-dir", help="bundle parent folder (default: [export].out_dir)")
    t.add_argument("--golden", metavar="RECORDS", help="also write golden vectors from these raw records")
    t.add_argument("--golden-dir", default="contracts", help="parent folder of golden vectors")
    t.add_argument("--no-export", action="store_true", help="train and save the run only")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="write the bundle of a finished run")
    e.add_argument("--run", required=True, help="run folder written by train")
    e.add_argument("--out-dir", help="bundle parent folder (default: [export].out_dir)")
    e.add_argument("--golden", metavar="RECORDS", help="also write golden vectors from these raw records")
    e.add_argument("--golden-dir", default="contracts", help="parent folder of golden vectors")

    v = sub.add_parser("evaluate", help="metrics of a bundle on labelled data, with baselines")
    v.add_argument("--model", required=True, help="bundle folder")
    v.add_argument("--data", required=True, nargs="+", help="labelled files in the bundle's input format")
    v.add_argument("--label-column", help="default: [data].label_column of the training config")
    v.add_argument("--labels", help="labels in a separate CSV, joined on the series columns and timestamp "
                   "(goflow2: host,bucket_start,label)")
    v.add_argument("--train-data", nargs="+", help="the bundle's training files, for the baselines "
                   "(default: the paths in its training_config)")
    v.add_argument("--skip-rows", type=int, default=0,
                   help="windows ending in the first N rows of each series are context only (SKAB: 400)")
    v.add_argument("--json", help="also write the metrics here")
    v.add_argument("--plot", metavar="PNG", help="VAE bundles: the test windows' latent means, normal and anomalous")

    b = sub.add_parser("benchmark", help="detection quality on a public benchmark, through exported bundles")
    b.add_argument("name", choices=["skab", "nslkdd"])
    b.add_argument("--data", help="the dataset folder (default: ../shared/datasets/<skab/data | nsl-kdd>)")
    b.add_argument("--config", help="training config (default: trainer/configs/skab-convae.toml | nslkdd-vae.toml)")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    b.add_argument("--folders", nargs="+", default=["valve1", "valve2", "other"],
                   help="skab: only these experiment folders")
    b.add_argument("--daemon", action="append", default=[], metavar="CONFIG.toml",
                   help="skab: also score each file with `anomalyd score --config CONFIG.toml` and report the "
                        "alerts of its thresholds and alert policy (repeatable)")
    b.add_argument("--bundles", metavar="DIR", help="skab: keep the per-file bundles here and reuse them")
    b.add_argument("--write", metavar="DOC", help="replace this benchmark's section of DOC (docs/quality.md)")
    b.add_argument("--json", help="also write the figures here")

    g = sub.add_parser("plot", help="draw a backtest: the records, `anomalyd score`'s anomaly scores and alerts")
    g.add_argument("--model", required=True, help="the bundle that scored them")
    g.add_argument("--records", required=True, help="the file given to `anomalyd score --input`")
    g.add_argument("--scores", required=True, help="its output (CSV or NDJSON)")
    g.add_argument("--alerts", help="its --alerts file: the alert intervals are shaded")
    g.add_argument("--output", required=True, help="PNG to write")
    g.add_argument("--max-series", type=int, default=6, help="panels for this many series, the most anomalous first")
    g.add_argument("--features", type=int, default=3, help="features drawn per series, those blamed most first")
    return p


def _export(run_dir: Path, out_dir: str | None, golden: str | None, golden_dir: str) -> None:
    from .bundle import Bundle, write_bundle, write_golden
    from .report import write_report
    from .run import load_run

    result = load_run(run_dir)
    bundle_dir = Path(out_dir or result.cfg.export.out_dir) / result.cfg.export.name
    meta = write_bundle(result, bundle_dir)
    write_report(result, bundle_dir / "report.png")
    print(f"bundle {bundle_dir}: {meta['model_kind']}, W={meta['window']['length']}, F={len(meta['features'])}, "
          f"{meta['validation']['multiply_adds']:,} multiply-adds per window, {result.thresholds.describe()}, "
          f"onnx error {meta['validation']['onnx_max_error']:.2e} of the scores' scale, "
          f"{(bundle_dir / 'model.onnx').stat().st_size} bytes")
    if golden:
        g = write_golden(Bundle(bundle_dir), Path(golden), Path(golden_dir) / result.cfg.export.name, {})
        print(f"golden vectors {Path(golden_dir) / result.cfg.export.name}: {len(g['windows'])} of "
              f"{g['windows_total']} windows")


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        from .config import load_config
        from .run import save_run
        from .train import train

        cfg = load_config(args.config, args.set)
        result = train(cfg, progress=not args.quiet)
        run_dir = save_run(result, Path(args.runs_dir), argv)
        v = result.history[result.best_epoch - 1]
        print(f"trained {cfg.export.name} in {result.seconds:.1f} s: best epoch {result.best_epoch}/"
              f"{len(result.history)}, train loss {v['train_loss']:.5g}, val loss {v['val_loss']:.5g}; run {run_dir}")
        if not args.no_export:
            _export(run_dir, args.out_dir, args.golden, args.golden_dir)
    elif args.command == "export":
        _export(Path(args.run), args.out_dir, args.golden, args.golden_dir)
    elif args.command == "evaluate":
        from .bundle import Bundle
        from .evaluate import format_table, score_detectors
        from .evaluate import report as make_report

        bundle = Bundle(args.model)
        scored = score_detectors(bundle, args.data, args.label_column, args.skip_rows, args.labels, args.train_data)
        report = make_report(scored, bundle.meta["name"])
        print(format_table(report))
        if args.plot:
            if scored.mu is None:
                raise InputError("--plot needs a VAE bundle (its graph outputs the latent means)", file=args.model)
            from .report import write_latent_plot

            write_latent_plot(scored.mu, scored.labels, Path(args.plot), f"{bundle.meta['name']}: latent means of "
                              f"{len(scored.labels):,} test windows")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    elif args.command == "plot":
        from .plot import write_plot

        n = write_plot(args.model, args.records, Path(args.scores), Path(args.alerts) if args.alerts else None,
                       Path(args.output), args.max_series, args.features)
        print(f"plot {args.output}: {n} series")
    elif args.command == "benchmark":
        from . import benchmark

        default = {"skab": ("skab/data", "skab-convae.toml"), "nslkdd": ("nsl-kdd", "nslkdd-vae.toml")}[args.name]
        data = Path(args.data) if args.data else benchmark.DATASETS / default[0]
        config = Path(args.config) if args.config else benchmark.REPO / "trainer/configs" / default[1]
        if not data.is_dir():
            raise InputError("dataset folder not found", file=data)
        if args.name == "skab":
            result = benchmark.skab(config, data, args.set, tuple(args.folders),
                                    daemon_configs=tuple(Path(c) for c in args.daemon),
                                    bundles=Path(args.bundles) if args.bundles else None)
        else:
            result = benchmark.nslkdd(config, data, args.set)
        print(benchmark.printable(result))
        if args.write:
            benchmark.write_section(Path(args.write), args.name, benchmark.markdown(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except InputError as e:
        print(f"anomalyd-train: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except ExportError as e:
        print(f"anomalyd-train: error: {e}", file=sys.stderr)
        return EXIT_EXPORT
    except KeyboardInterrupt:
        print("anomalyd-train: interrupted", file=sys.stderr)
        return 130

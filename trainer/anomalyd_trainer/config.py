"""Training configuration: dataclasses with commented defaults, loaded from TOML.

Each section owns its defaults. `load_config` reads a TOML file, applies `--set section.key=value`
overrides from the command line, and rejects unknown keys and wrong types with an `InputError`
naming the key. Relative data paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .flows import FLOW_FEATURES


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # input files; globs allowed
    format: str = "auto"  # auto | csv | parquet | ndjson | goflow2 (raw flows → per-host buckets)
    csv_delimiter: str = ","
    csv_header: bool = True  # False: the file has no header; names come from column_names
    column_names: list[str] = field(default_factory=list)  # for headerless CSV
    timestamp_column: str = ""  # "" = no timestamps: file order is time order
    timestamp_format: str = "auto"  # auto | unix_s | unix_ms | unix_ns | a strftime pattern
    series_columns: list[str] = field(default_factory=list)  # series key; [] = one series per file
    feature_columns: list[str] = field(default_factory=list)  # numeric features, in model order
    categorical_columns: list[str] = field(default_factory=list)  # one-hot encoded after numerics
    log1p_columns: list[str] = field(default_factory=list)  # numeric features taken as ln(1+x)
    # Numeric features taken relative to their window's mean (W > 1): the model sees their shape, not
    # their level, so slow level drift (temperatures, fill levels) raises no alarm; docs/trainer.md.
    center_columns: list[str] = field(default_factory=list)
    label_column: str = ""  # evaluation only: 1/true/anything but the normal_labels = anomalous
    labels_file: str = ""  # evaluation only: labels in a separate CSV, joined on series columns + timestamp
    normal_labels: list[str] = field(default_factory=lambda: ["0", "0.0", "normal", "false", "False"])
    filter_column: str = ""  # keep only rows whose value is in filter_values (e.g. normal traffic)
    filter_values: list[str] = field(default_factory=list)
    head_rows: int = 0  # >0: use only the first N rows of each file (SKAB's training protocol)
    flow_bucket_secs: int = 60  # format = goflow2: bucket width of the per-host features


@dataclass
class WindowConfig:
    length: int = 32  # W, rows per window; 1 = per-record scoring
    stride: int = 1  # S, rows between window ends in training (the daemon scores every window)
    max_gap_secs: float = 0.0  # a larger step in time starts a new segment; 0 = never split
    nan_policy: str = "error"  # error | drop | ffill (see docs/model-contract.md)
    # A feature constant in training: error | keep (scaled so that a departure by 1% of the constant counts
    # as one standard deviation) | auto: keep for goflow2 flow features (a network without ICMP is
    # normal, and ICMP then is news), error otherwise
    constant_features: str = "auto"


@dataclass
class ModelConfig:
    kind: str = "conv_ae"  # conv_ae | vae
    channels: list[int] = field(default_factory=lambda: [32, 16])  # conv layers (W > 1)
    kernel_size: int = 5  # odd
    hidden: list[int] = field(default_factory=lambda: [64, 32])  # MLP layers (W = 1)
    latent_dim: int = 8  # the autoencoder's bottleneck (numbers per window); the VAE's latent size
    dropout: float = 0.1
    beta: float = 1.0  # VAE: weight of the KL term
    # VAE latent term (docs/model-contract.md §3): density: −log p(mu) under a Gaussian mixture fitted to
    # the latent means of normal training windows | nll: −log N(mu; 0, I) | kl: KL(q(z|x) ‖ N(0, I))
    vae_score: str = "density"
    vae_reconstruction: bool = True  # add ½·Σ(x − decode(mu))²: sees inputs the encoder maps to ordinary codes


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 8  # epochs without validation improvement before stopping
    val_fraction: float = 0.15  # tail of each series (in time) for early stopping
    calib_fraction: float = 0.15  # tail after that, for thresholds only
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_train_windows: int = 200_000  # subsample (seeded) above this, to bound epoch time


@dataclass
class CalibrationConfig:
    quantile: float = 0.999
    pot_initial_quantile: float = 0.98  # lowered (down to 0.9) when fewer scores would leave < min_excesses above it
    false_alarm_rate: float = 1e-3
    min_excesses: int = 20
    method: str = "pot"  # pot | quantile: which threshold maps to anomaly_score 1.0
    # Where the calibration scores come from (docs/model-contract.md §4): "holdout" = the calibration
    # tail of each series; "cross_fit" = out-of-fold scores of models trained on the other time blocks,
    # then one model trained on every row; "auto" = cross_fit when the holdout holds < min_holdout_windows.
    source: str = "auto"  # auto | holdout | cross_fit
    min_holdout_windows: int = 1000  # POT at 0.98 needs 1,000 scores for its 20 excesses
    folds: int = 5  # at most; fewer when a series is short (every block keeps >= 4 * W rows)


@dataclass
class ExportConfig:
    name: str = "model"
    out_dir: str = "models"
    opset: int = 17
    parity_batches: int = 5  # random batch sizes checked torch vs onnxruntime


def constant_policy(cfg: Config) -> str:
    """[window].constant_features with "auto" resolved."""
    if cfg.window.constant_features == "auto":
        return "keep" if cfg.data.format == "goflow2" else "error"
    return cfg.window.constant_features


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("data", "format"): {"auto", "csv", "parquet", "ndjson", "goflow2"},
    ("window", "nan_policy"): {"error", "drop", "ffill"},
    ("window", "constant_features"): {"auto", "error", "keep"},
    ("model", "kind"): {"conv_ae", "vae"},
    ("model", "vae_score"): {"density", "kl", "nll"},
    ("train", "device"): {"auto", "cpu", "cuda"},
    ("calibration", "method"): {"pot", "quantile"},
    ("calibration", "source"): {"auto", "holdout", "cross_fit"},
}


def _coerce(section: str, key: str, value, default, source: str):
    """Check `value` against the type of the default; return it converted where lossless."""
    where = f"[{section}].{key}"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise InputError(f"expected {type(default).__name__}, got {value!r}", file=source, location=where)
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise InputError(f"{value!r} is not one of {sorted(choices)}", file=source, location=where)
    return value


def _parse_override(text: str):
    """`section.key=value`; the value is TOML (`4`, `"x"`, `[1, 2]`) or else a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise InputError(f"override {text!r} is not section.key=value", location="--set")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults ← TOML file ← `--set` overrides; validated."""
    raw: dict = {}
    source = "defaults"
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        source = str(path)
        base = path.resolve().parent
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as e:
            raise InputError(f"cannot read config: {e.strerror}", file=path) from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"not valid TOML: {e}", file=path) from None
    # Paths in the file are relative to the file; paths given with --set, to the working directory.
    # Both are stored relative to the working directory (the repository root for the documented
    # commands), so a bundle's training_config stays meaningful on another machine.
    paths = raw.get("data", {}).get("paths")
    if isinstance(paths, list):
        raw["data"]["paths"] = [p if not isinstance(p, str) or Path(p).is_absolute() else os.path.relpath(base / p)
                                for p in paths]
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, source)


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """A validated Config from nested dicts (a parsed TOML file, or a bundle's training_config)."""
    cfg = Config()
    for section, values in raw.items():
        if not hasattr(cfg, section) or not isinstance(values, dict):
            raise InputError("unknown section", file=source, location=f"[{section}]")
        obj = getattr(cfg, section)
        for key, value in values.items():
            if not hasattr(obj, key):
                raise InputError("unknown key", file=source, location=f"[{section}].{key}")
            setattr(obj, key, _coerce(section, key, value, getattr(obj, key), source))
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Cross-field checks, before any data is read."""

    def bad(where: str, message: str):
        raise InputError(message, file=source, location=where)

    w = cfg.window
    if w.length < 1:
        bad("[window].length", "must be >= 1")
    if w.stride < 1:
        bad("[window].stride", "must be >= 1")
    if cfg.model.kernel_size % 2 == 0 or cfg.model.kernel_size < 1:
        bad("[model].kernel_size", "must be odd and >= 1")
    if not cfg.model.channels or min(cfg.model.channels) < 1:
        bad("[model].channels", "needs at least one positive channel count")
    if cfg.model.latent_dim < 1:
        bad("[model].latent_dim", "must be >= 1")
    t = cfg.train
    if not (0 < t.val_fraction < 1 and 0 < t.calib_fraction < 1 and t.val_fraction + t.calib_fraction < 0.9):
        bad("[train].val_fraction", "val_fraction and calib_fraction must be in (0, 1) and sum below 0.9")
    c = cfg.calibration
    if not 0.5 < c.quantile < 1:
        bad("[calibration].quantile", "must be in (0.5, 1)")
    if not 0.5 < c.pot_initial_quantile < 1:
        bad("[calibration].pot_initial_quantile", "must be in (0.5, 1)")
    if not 0 < c.false_alarm_rate < 1 - c.pot_initial_quantile:
        bad("[calibration].false_alarm_rate", "must be in (0, 1 - pot_initial_quantile)")
    if c.folds < 2:
        bad("[calibration].folds", "must be >= 2")
    d = cfg.data
    if d.format != "goflow2" and not d.feature_columns and not d.categorical_columns:
        bad("[data].feature_columns", "name at least one feature column")
    features = d.feature_columns or (FLOW_FEATURES if d.format == "goflow2" else [])
    for key in ("log1p_columns", "center_columns"):
        unknown = set(getattr(d, key)) - set(features)
        if unknown:
            bad(f"[data].{key}", f"not in feature_columns: {sorted(unknown)}")
    if d.center_columns and w.length < 2:
        bad("[data].center_columns", "centering needs windows of W >= 2 rows")
    if not d.csv_header and not d.column_names:
        bad("[data].column_names", "a headerless CSV needs column_names")
    if d.flow_bucket_secs < 1:
        bad("[data].flow_bucket_secs", "must be >= 1")

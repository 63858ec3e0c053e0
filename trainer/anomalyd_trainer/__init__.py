"""anomalyd's trainer: windows of metric or flow records → conv autoencoder or VAE → ONNX bundle.

Layout, in pipeline order:
  config.py     TOML training config (dataclasses, commented defaults)
  data.py       read and validate records, NaN policy, scaler, windows (the daemon's contract)
  flows.py      goflow2 flow records → per-host, time-bucketed features
  model.py      ConvAE, VAE and the scorer wrappers that are exported
  train.py      the training loop
  calibrate.py  quantile and Peaks-Over-Threshold thresholds on held-out normal data
  bundle.py     ONNX export, parity check, model.json; loading a bundle; golden vectors
  report.py     report.png
  evaluate.py   metrics on labelled data next to random and PCA baselines
  cli.py        `anomalyd-train train|export|evaluate`
"""

__version__ = "0.1.0"

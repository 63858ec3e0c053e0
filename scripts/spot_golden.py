"""Golden vectors for the daemon's SPOT/DSPOT thresholds, from the reference implementation.

libspot 3.1.0 (PyPI; Siffer et al.'s SPOT) is fitted on the first scores of each stream and
stepped through the rest; every step's verdict and anomaly threshold is recorded, with the state
after the fit (level and peaks) that the daemon's detector starts from. `tests/thresholds.rs`
replays the streams through the daemon's code; `trainer/tests/test_spot_golden.py` checks that
the committed file is what libspot gives now.

    .venv/bin/python scripts/spot_golden.py contracts/spot/golden.json
"""

import json
import sys

import libspot
import numpy as np

VERDICTS = {libspot.NORMAL: "normal", libspot.EXCESS: "peak", libspot.ANOMALY: "anomaly"}


def _streams():
    rng = np.random.default_rng(20261202)

    def spiked(x, every, size):
        x = x.copy()
        x[every::every] += size
        return x

    yield "exponential", spiked(rng.exponential(1.0, 4000), 250, 16.0), 2000, 1e-3, 0.98, 200, 0
    yield "pareto", rng.pareto(3.0, 5000) + 1.0, 3000, 1e-4, 0.99, 500, 0
    yield "bounded", spiked(rng.uniform(0.0, 1.0, 3000), 400, 1.5), 1000, 1e-3, 0.98, 200, 0
    # Fewer kept peaks than arrive: the oldest leave the fit.
    yield "ring", rng.gamma(2.0, 1.0, 3500), 1000, 1e-3, 0.95, 32, 0
    # DSPOT: a level drifting by 6 over the stream, spikes on top; baseline of the last 32 normal scores.
    drift = np.linspace(0.0, 6.0, 3000) + rng.normal(0.0, 0.3, 3000)
    yield "dspot_drift", spiked(drift, 300, 4.0), 1000, 1e-3, 0.98, 200, 32


def golden() -> dict:
    out = []
    for name, x, n_init, q, level, max_excess, depth in _streams():
        spot = libspot.Spot(q=q, level=level, max_excess=max_excess)
        recent: list[float] = []
        if depth:
            recent = list(x[:depth])
            init = []
            for v in x[depth:depth + n_init]:
                init.append(v - np.mean(recent))
                recent = recent[1:] + [v]
            init = np.array(init)
            stream = x[depth + n_init:]
        else:
            init, stream = x[:n_init], x[n_init:]
        spot.fit(init)
        t = spot.excess_threshold
        case = {
            "name": name, "q": q, "level": level, "max_excess": max_excess, "depth": depth,
            "init": {"n": int(len(init)), "level": t, "peaks": [float(v - t) for v in init if v - t > 0]},
            "recent": [float(v) for v in recent],
            "initial_threshold": spot.anomaly_threshold,
            "stream": [float(v) for v in stream], "verdicts": [], "thresholds": [],
        }
        for v in stream:
            baseline = float(np.mean(recent)) if depth else 0.0
            verdict = spot.step(float(v) - baseline)
            if depth and verdict != libspot.ANOMALY:
                recent = recent[1:] + [float(v)]
            case["verdicts"].append(VERDICTS[verdict])
            case["thresholds"].append(spot.anomaly_threshold + (float(np.mean(recent)) if depth else 0.0))
        out.append(case)
    return {"reference": f"libspot {libspot.__version__}", "streams": out}


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(golden(), f)
        f.write("\n")

"""The daemon's SPOT golden vectors (contracts/spot/golden.json) are what libspot gives now."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_committed_golden_vectors_are_libspots_output():
    spec = importlib.util.spec_from_file_location("spot_golden", REPO / "scripts/spot_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = json.loads((REPO / "contracts/spot/golden.json").read_text())
    assert json.loads(json.dumps(module.golden())) == committed

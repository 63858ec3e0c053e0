"""Writes bundles that load but break the model contract (docs/model-contract.md §3), for the
daemon's tests: each is models/skab-convae's model.json over a small hand-built graph.

- score-shape-1: `score` has shape [1] whatever the batch size (the mean over the whole batch),
  so a one-window test run passes and a batch of more windows does not.
- score-first-3: `score` holds the scores of the batch's first 3 windows only, so test runs of
  1 and 3 windows pass and a batch of 4 or more fails at run time.

Run from the repository root: .venv/bin/python contracts/bundles/make.py
"""

import hashlib
import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT.parent.parent / "models" / "skab-convae" / "model.json"


def graph(name: str, window: int, features: int, score_nodes: list, constants: list) -> onnx.ModelProto:
    """feature_scores = the mean of squares over time, [batch, F]; `score_nodes` make `score` of
    the per-window mean `window_score`, [batch]."""
    x = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", window, features])
    per_feature = helper.make_tensor_value_info("feature_scores", TensorProto.FLOAT, ["batch", features])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("Mul", ["window", "window"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "time_axis"], ["feature_scores"], keepdims=0),
        helper.make_node("ReduceMean", ["feature_scores", "feature_axis"], ["window_score"], keepdims=0),
        *score_nodes,
    ]
    constants = [
        helper.make_tensor("time_axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("feature_axis", TensorProto.INT64, [1], [1]),
        *constants,
    ]
    g = helper.make_graph(nodes, name, [x], [score, per_feature], initializer=constants)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def score_shape_1(window: int, features: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["window_score"], ["batch_mean"], keepdims=0),
        helper.make_node("Reshape", ["batch_mean", "one"], ["score"]),
    ]
    return graph("score_shape_1", window, features, nodes, [helper.make_tensor("one", TensorProto.INT64, [1], [1])])


def score_first_3(window: int, features: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Slice", ["window_score", "zero", "three"], ["score"])]
    constants = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("three", TensorProto.INT64, [1], [3])]
    return graph("score_first_3", window, features, nodes, constants)


def write(name: str, model: onnx.ModelProto) -> None:
    meta = json.loads(SOURCE.read_text())
    out = ROOT / name
    out.mkdir(exist_ok=True)
    data = model.SerializeToString()
    (out / "model.onnx").write_bytes(data)
    meta["name"] = name
    meta["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    meta["onnx"]["opset"] = 18
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    meta = json.loads(SOURCE.read_text())
    for name, make in [("score-shape-1", score_shape_1), ("score-first-3", score_first_3)]:
        write(name, make(meta["window"]["length"], len(meta["features"])))

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from python_backend.onnx_runner import OnnxRunner

WEIGHTS = np.array([[0.5, -0.5], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)


def save_softmax_model(path: Path, n_features: int | str = 3, extra_output: bool = False) -> Path:
    """x [batch, n] -> softmax(x @ W) [batch, 2]."""
    w = numpy_helper.from_array(WEIGHTS, name="W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2]))
    graph = helper.make_graph(
        nodes,
        "softmax_regression",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_features])],
        outputs,
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_runs_the_model(tmp_path: Path) -> None:
    runner = OnnxRunner(save_softmax_model(tmp_path / "model.onnx"))
    assert (runner.input_name, runner.output_name, runner.n_features) == ("x", "probabilities", 3)
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 0.2]], dtype=np.float32)
    logits = x @ WEIGHTS
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = runner.run(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5)


def test_rejects_wrong_feature_count(tmp_path: Path) -> None:
    runner = OnnxRunner(save_softmax_model(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match=r"x must have shape \[rows, 3\], got \[2, 4\]"):
        runner.run(np.zeros((2, 4), np.float32))


def test_rejects_models_with_two_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one input and one output"):
        OnnxRunner(save_softmax_model(tmp_path / "model.onnx", extra_output=True))


def test_rejects_symbolic_feature_dimension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fixed n_features"):
        OnnxRunner(save_softmax_model(tmp_path / "model.onnx", n_features="n"))


def test_skl2onnx_logistic_regression(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    clf = LogisticRegression().fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}})
    # the converter also outputs the label; serving keeps only the probabilities
    graph = onx.graph
    keep = [o for o in graph.output if o.name == "probabilities"]
    del graph.output[:]
    graph.output.extend(keep)
    path = tmp_path / "lr.onnx"
    onnx.save(onx, path)
    runner = OnnxRunner(path)
    assert runner.n_features == 4
    np.testing.assert_allclose(runner.run(x[:5]), clf.predict_proba(x[:5]), rtol=1e-4, atol=1e-5)

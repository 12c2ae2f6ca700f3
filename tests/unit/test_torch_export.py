"""The optional PyTorch variant of fraud_nn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from rtinfer.demo.torch_mlp import TorchUnavailable
from rtinfer.demo.train import build_demo_models, load_onnx_session

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(HAS_TORCH, reason="checks the message shown when torch is missing")
def test_missing_torch_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TorchUnavailable, match="pip install torch"):
        build_demo_models(tmp_path, n_rows=5_000, nn_framework="torch")


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is optional and not installed")
def test_torch_mlp_exports_the_serving_interface(tmp_path: Path) -> None:
    build_demo_models(tmp_path, n_rows=5_000, nn_framework="torch")
    sess = load_onnx_session(tmp_path / "fraud_nn" / "1" / "model.onnx")
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape[1], out.name) == ("input__0", 50, "output__0")
    p = sess.run(None, {"input__0": np.zeros((3, 50), dtype=np.float32)})[0]
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)

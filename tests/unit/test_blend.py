import numpy as np
import pytest

from python_backend.blend import Blender


def test_weights_are_normalized() -> None:
    assert Blender([1.0, 3.0]).weights == pytest.approx([0.25, 0.75])


def test_blend_is_the_weighted_average() -> None:
    a = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    b = np.array([[0.5, 0.5], [0.6, 0.4]], dtype=np.float32)
    out = Blender([1.0, 3.0]).blend([a, b])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25 * a + 0.75 * b, rtol=1e-6)


def test_zero_weight_ignores_that_model() -> None:
    a = np.array([[0.9, 0.1]], dtype=np.float32)
    b = np.array([[0.3, 0.7]], dtype=np.float32)
    np.testing.assert_allclose(Blender([0.0, 2.0]).blend([a, b]), b)


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0]])
def test_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        Blender(weights)


def test_rejects_wrong_number_of_inputs() -> None:
    with pytest.raises(ValueError, match="expected 2 probability arrays, got 1"):
        Blender([0.5, 0.5]).blend([np.zeros((1, 2), np.float32)])


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="probabilities_1 has shape"):
        Blender([0.5, 0.5]).blend([np.zeros((2, 2), np.float32), np.zeros((3, 2), np.float32)])


def test_rejects_non_matrix_input() -> None:
    with pytest.raises(ValueError, match="rows, classes"):
        Blender([1.0]).blend([np.zeros(2, np.float32)])

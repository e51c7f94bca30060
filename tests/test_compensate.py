"""Error-compensated LUT indices (quant.compensate): the tables stay, the indices change so that the
layer's output error, not the weight's, is small."""

from __future__ import annotations

import numpy as np
import pytest

from anemll_mlx.quant.compensate import compensated_indices
from anemll_mlx.quant.lut import LUTSpec, LUTWeight, fit_lut

SPEC = LUTSpec(4, 4)


def _case(seed: int = 0, cout: int = 32, cin: int = 96, tokens: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A weight, correlated inputs (a few strong directions, as real activations have) and their E[x x^T]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin)).astype(np.float32)
    mixing = rng.standard_normal((cin, cin)) * np.exp(-np.arange(cin) / 8.0)[:, None]
    x = rng.standard_normal((tokens, cin)) @ mixing + 0.1 * rng.standard_normal((tokens, cin))
    return w, x, (x.T @ x / tokens).astype(np.float32)


def _output_error(w: np.ndarray, lw: LUTWeight, x: np.ndarray) -> float:
    """Mean squared error of the layer's output x W^T over the inputs ``x``."""
    diff = lw.dequantize().astype(np.float64).reshape(w.shape) - w
    return float(np.mean((x @ diff.T) ** 2))


def _nearest(w: np.ndarray, lw: LUTWeight) -> np.ndarray:
    tables = np.repeat(lw.lut.astype(np.float64), w.shape[0] // lw.lut.shape[0], axis=0)
    return np.argmin(np.abs(tables[:, None, :] - w.astype(np.float64)[:, :, None]), axis=2)


def test_compensation_lowers_the_output_error_with_the_same_tables() -> None:
    w, x, moment = _case()
    fitted = fit_lut(w, SPEC, importance=np.diag(moment))
    compensated = fit_lut(w, SPEC, importance=np.diag(moment), second_moment=moment)
    assert compensated.lut.tobytes() == fitted.lut.tobytes()
    assert not np.array_equal(compensated.indices, fitted.indices)
    before, after = _output_error(w, fitted, x), _output_error(w, compensated, x)
    # measured: 0.071x the nearest assignment's output error on this case
    assert after < 0.2 * before, (before, after)
    # while each weight is further from its entry: the errors now cancel rather than shrink
    assert np.mean((compensated.dequantize() - w) ** 2) > np.mean((fitted.dequantize() - w) ** 2)


def test_uncorrelated_inputs_give_the_nearest_entries() -> None:
    """A diagonal second moment couples no columns: nothing to compensate, every element keeps its
    nearest entry."""
    w, _, _ = _case(seed=1)
    fitted = fit_lut(w, SPEC)
    moment = np.diag(np.random.default_rng(2).uniform(0.5, 2.0, w.shape[1])).astype(np.float32)
    out = compensated_indices(w, fitted, moment)
    np.testing.assert_array_equal(out.indices.astype(np.int64), _nearest(w, fitted))


def test_deterministic_and_shaped_like_the_fit() -> None:
    w, _, moment = _case(seed=3)
    fitted = fit_lut(w, SPEC)
    a, b = compensated_indices(w, fitted, moment), compensated_indices(w.copy(), fitted, moment.copy())
    assert a.indices.tobytes() == b.indices.tobytes()
    assert a.indices.shape == fitted.indices.shape and a.indices.dtype == np.uint8 and a.spec == SPEC


def test_a_singular_moment_is_damped_and_a_wrong_shape_refused() -> None:
    w, _, _ = _case(seed=4)
    fitted = fit_lut(w, SPEC)
    dead = np.zeros((w.shape[1], w.shape[1]), dtype=np.float32)
    dead[:10, :10] = 1.0  # rank one, and most inputs never seen
    out = compensated_indices(w, fitted, dead)
    assert out.indices.shape == fitted.indices.shape
    with pytest.raises(ValueError, match="does not fit a weight of 96 inputs"):
        compensated_indices(w, fitted, np.eye(5, dtype=np.float32))

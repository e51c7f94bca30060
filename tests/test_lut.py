"""LUT fitting and emission: spec parsing, fit quality, determinism, and bit-exact Core ML reload."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from anemll_mlx.errors import BadArgumentError, UnsupportedError
from anemll_mlx.quant.lut import LUTSpec, LUTWeight, fit_lut, lut_group_error, lut_to_mil, parse_lut_spec

# Lloyd-Max quantiser of a unit gaussian, mean squared error for 16 levels (Max, 1960).
LLOYD_MAX_GAUSSIAN_16 = 0.009497


def _gaussian(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --- spec parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", LUTSpec(4, 8)),
        ("6", LUTSpec(6, 8)),
        ("4,4", LUTSpec(4, 4)),
        (" 6, 16 ", LUTSpec(6, 16)),
        ("4,0", LUTSpec(4, None)),
        ("4,t", LUTSpec(4, None)),
        ("2,Tensor", LUTSpec(2, None)),
        ("8,1", LUTSpec(8, 1)),
        ("none", None),
        ("None", None),
        ("", None),
    ],
)
def test_parse_good_specs(text: str, expected: LUTSpec | None) -> None:
    assert parse_lut_spec(text) == expected


@pytest.mark.parametrize("text", ["x", "9", "5", "7", "0", "4,-1", "4,x", "4,4,4", "4.5", "-4", "4,", ",4"])
def test_parse_bad_specs(text: str) -> None:
    with pytest.raises(BadArgumentError) as info:
        parse_lut_spec(text)
    message = str(info.value)
    assert "\n" not in message and repr(text) in message and "BITS,GROUP" in message


def test_spec_round_trips_through_str() -> None:
    for spec in (LUTSpec(4, 8), LUTSpec(6, 4), LUTSpec(2, None)):
        assert parse_lut_spec(str(spec)) == spec


def test_group_must_divide_output_channels() -> None:
    with pytest.raises(BadArgumentError, match="does not divide 10 output channels"):
        fit_lut(_gaussian((10, 16)), LUTSpec(4, 4))


def test_non_finite_weights_are_refused() -> None:
    w = _gaussian((8, 16))
    w[3, 5] = np.nan
    with pytest.raises(UnsupportedError):
        fit_lut(w, LUTSpec(4, 8))


# --- fit quality


def test_error_decreases_with_bits() -> None:
    w = _gaussian((64, 256), seed=1)
    errors = [lut_group_error(w, fit_lut(w, LUTSpec(bits, 8))).mean() for bits in (1, 2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_4bit_group8_gaussian_is_near_lloyd_max() -> None:
    sigma = 0.02
    w = _gaussian((512, 1024), seed=2, scale=sigma)
    mse = lut_group_error(w, fit_lut(w, LUTSpec(4, 8))).mean() / sigma**2
    # Per-group fits on 8192 samples may even beat the population optimum slightly.
    assert abs(mse - LLOYD_MAX_GAUSSIAN_16) / LLOYD_MAX_GAUSSIAN_16 < 0.03, mse


def test_per_tensor_gaussian_matches_lloyd_max() -> None:
    w = _gaussian((256, 1024), seed=3)
    mse = lut_group_error(w, fit_lut(w, LUTSpec(4, None))).mean()
    assert abs(mse - LLOYD_MAX_GAUSSIAN_16) / LLOYD_MAX_GAUSSIAN_16 < 0.01, mse


def _optimal_mse(w: np.ndarray, spec: LUTSpec) -> float:
    """Exact 1-D k-means per group (the kmeans1d copy bundled with coremltools), fp16 tables."""
    kmeans1d = pytest.importorskip("coremltools._deps.kmeans1d")
    rows = w.astype(np.float64).reshape(spec.num_groups(w.shape[0]), -1)
    total = 0.0
    for row in rows:
        values, counts = np.unique(row, return_counts=True)
        found = kmeans1d.cluster(values, min(len(values), spec.entries), weights=counts)
        table = np.sort(np.asarray(found.centroids).astype(np.float16).astype(np.float64))
        total += float(np.sum(np.min(np.abs(row[:, None] - table[None, :]), axis=1) ** 2))
    return total / w.size


@pytest.mark.parametrize("spec", [LUTSpec(4, 4), LUTSpec(6, 4)])
def test_refinement_reaches_the_optimum_on_heavy_tails(spec: LUTSpec) -> None:
    # Student-t weights with few values per table entry: plain Lloyd stalls in local optima here.
    rng = np.random.default_rng(8)
    w = (rng.standard_t(4, size=(32, 256)) * 0.02).astype(np.float16).astype(np.float32)
    plain = lut_group_error(w, fit_lut(w, spec, refine_rounds=0)).mean()
    refined = lut_group_error(w, fit_lut(w, spec)).mean()
    best = _optimal_mse(w, spec)
    assert refined <= plain
    assert refined <= best * 1.005, (refined / best, plain / best)


@pytest.mark.parametrize("spec", [LUTSpec(4, 8), LUTSpec(2, 4), LUTSpec(8, None), LUTSpec(3, 2)])
def test_layout_and_nearest_assignment(spec: LUTSpec) -> None:
    w = _gaussian((16, 48), seed=4, scale=0.05)
    lw = fit_lut(w, spec)
    groups = 1 if spec.group_size is None else 16 // spec.group_size
    assert lw.indices.shape == w.shape and lw.indices.dtype == np.uint8
    assert int(lw.indices.max()) < 2**spec.bits
    assert lw.lut.shape == (groups, 2**spec.bits) and lw.lut.dtype == np.float16
    assert np.all(np.diff(lw.lut.astype(np.float64), axis=1) >= 0)
    # Every element is reconstructed by a nearest entry of its own group's fp16 table.
    deq = lw.dequantize()
    assert deq.dtype == np.float16 and deq.shape == w.shape
    table = np.repeat(lw.lut, 16 // groups, axis=0).astype(np.float64)
    best = np.min(np.abs(w.astype(np.float64)[:, :, None] - table[:, None, :]), axis=2)
    assert np.array_equal(np.abs(w.astype(np.float64) - deq.astype(np.float64)), best)


def test_few_distinct_values_are_reproduced_exactly() -> None:
    w = np.tile(np.array([-0.5, 0.0, 0.25, 1.0], dtype=np.float32), (8, 5))
    lw = fit_lut(w, LUTSpec(4, 4))
    assert np.array_equal(lw.dequantize().astype(np.float32), w)
    const = np.full((4, 8), 0.125, dtype=np.float32)
    assert np.array_equal(fit_lut(const, LUTSpec(2, None)).dequantize().astype(np.float32), const)


def test_accepts_mlx_arrays_including_bfloat16() -> None:
    w = _gaussian((16, 32), seed=5)
    expected = fit_lut(w.astype(np.float16), LUTSpec(4, 8))
    got = fit_lut(mx.array(w).astype(mx.float16), LUTSpec(4, 8))
    assert np.array_equal(got.indices, expected.indices) and np.array_equal(got.lut, expected.lut)
    fit_lut(mx.array(w).astype(mx.bfloat16), LUTSpec(4, 8))


def test_deterministic() -> None:
    w = _gaussian((128, 96), seed=6)
    a, b = fit_lut(w, LUTSpec(6, 4)), fit_lut(w.copy(), LUTSpec(6, 4))
    assert a.indices.tobytes() == b.indices.tobytes() and a.lut.tobytes() == b.lut.tobytes()


def test_batching_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import anemll_mlx.quant.lut as lut

    w = _gaussian((64, 40), seed=7)
    whole = fit_lut(w, LUTSpec(4, 4))
    monkeypatch.setattr(lut, "_BATCH_ELEMENTS", 3 * 160)
    batched = fit_lut(w, LUTSpec(4, 4))
    assert np.array_equal(whole.indices, batched.indices) and np.array_equal(whole.lut, batched.lut)


# --- sensitivity-weighted fits (importance per input column)


@pytest.mark.parametrize(
    ("spec", "shape"), [(LUTSpec(4, 4), (16, 48)), (LUTSpec(2, 8), (16, 48)), (LUTSpec(6, None), (8, 40, 1, 1))]
)
def test_equal_importance_is_the_unweighted_fit(spec: LUTSpec, shape: tuple[int, ...]) -> None:
    w = _gaussian(shape, seed=11, scale=0.05)
    plain = fit_lut(w, spec)
    for importance in (np.full(shape[1], 2.5), np.full(shape, 0.3)):
        weighted = fit_lut(w, spec, importance=importance)
        assert plain.indices.tobytes() == weighted.indices.tobytes()
        assert plain.lut.tobytes() == weighted.lut.tobytes()


def _optimal_weighted_mse(w: np.ndarray, spec: LUTSpec, importance: np.ndarray) -> float:
    """Exact weighted 1-D k-means per group (coremltools' bundled kmeans1d), fp16 tables, nearest
    assignment: the mean importance-weighted squared error."""
    kmeans1d = pytest.importorskip("coremltools._deps.kmeans1d")
    groups = spec.num_groups(w.shape[0])
    rows = w.astype(np.float64).reshape(groups, -1)
    weights = np.broadcast_to(importance, w.shape).reshape(groups, -1)
    total = 0.0
    for row, weight in zip(rows, weights):
        values, inverse = np.unique(row, return_inverse=True)
        found = kmeans1d.cluster(values, min(len(values), spec.entries), weights=np.bincount(inverse, weight))
        table = np.sort(np.asarray(found.centroids).astype(np.float16).astype(np.float64))
        nearest = np.min(np.abs(row[:, None] - table[None, :]), axis=1)
        total += float(np.sum(weight * nearest**2))
    return total / w.size


def _skewed_case() -> tuple[np.ndarray, np.ndarray]:
    """Columns 0-7 carry fine detail and matter 1000x more than the wide, unimportant rest: a fit
    that ignores importance spends its entries on the wide columns."""
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((8, 64)) * 0.5).astype(np.float32)
    w[:, :8] = (rng.standard_normal((8, 8)) * 0.01).astype(np.float32)
    importance = np.full(64, 0.01)
    importance[:8] = 10.0
    return w, importance


@pytest.mark.parametrize("spec", [LUTSpec(3, 4), LUTSpec(4, 8)])
def test_importance_lowers_the_weighted_error_to_the_optimum(spec: LUTSpec) -> None:
    w, importance = _skewed_case()
    plain = lut_group_error(w, fit_lut(w, spec), importance).mean()
    weighted = lut_group_error(w, fit_lut(w, spec, importance=importance), importance).mean()
    best = _optimal_weighted_mse(w, spec, importance)
    assert weighted < 0.5 * plain, (weighted, plain)
    assert weighted <= best * 1.005, (weighted / best, plain / best)


def test_weighted_fit_keeps_nearest_assignment_and_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    import anemll_mlx.quant.lut as lut

    w = _gaussian((64, 40), seed=13, scale=0.05)
    importance = np.exp(np.random.default_rng(14).standard_normal(40) * 2)
    spec = LUTSpec(4, 4)
    whole = fit_lut(w, spec, importance=importance)
    table = np.repeat(whole.lut, 4, axis=0).astype(np.float64)
    nearest = np.min(np.abs(w.astype(np.float64)[:, :, None] - table[:, None, :]), axis=2)
    assert np.array_equal(np.abs(w.astype(np.float64) - whole.dequantize().astype(np.float64)), nearest)
    monkeypatch.setattr(lut, "_BATCH_ELEMENTS", 3 * 160)  # three groups of 4 x 40 a batch, the last short
    batched = fit_lut(w, spec, importance=importance)
    assert whole.indices.tobytes() == batched.indices.tobytes() and whole.lut.tobytes() == batched.lut.tobytes()


@pytest.mark.parametrize("importance", [np.ones(7), np.full(40, np.nan), -np.ones(40)])
def test_bad_importance_is_refused(importance: np.ndarray) -> None:
    with pytest.raises(ValueError, match="importance"):
        fit_lut(_gaussian((8, 40)), LUTSpec(4, 4), importance=importance)


# --- exact emission through Core ML


def _reloaded_lut_value(tmp_path, lw: LUTWeight, shape: tuple[int, ...], weight_id: str | None = None) -> np.ndarray:
    """Build, convert, save and reload a one-op program; return the constexpr's materialised value."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import types

    cin = shape[1]
    x_shape = (1, cin) if len(shape) == 2 else (1, cin, 1, 1)

    @mb.program(input_specs=[mb.TensorSpec(x_shape, dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        w = lut_to_mil(lw, shape, "w_lut", weight_id=weight_id)
        return mb.linear(x=x, weight=w) if len(shape) == 2 else mb.conv(x=x, weight=w)

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
    )
    pkg = str(tmp_path / "lut.mlpackage")
    model.save(pkg)
    spec = ct.utils.load_spec(pkg)
    reloaded = load(spec, spec.specificationVersion, pkg + "/Data/com.apple.CoreML/weights")
    ops = [op for op in reloaded.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == 1
    return ops[0].materialized_val_inference()


@pytest.mark.parametrize("shape", [(16, 24), (16, 24, 1, 1)])
@pytest.mark.parametrize("group", [4, None])
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_core_ml_reload_is_bit_exact(tmp_path, bits: int, group: int | None, shape: tuple[int, ...]) -> None:
    w = _gaussian(shape, seed=bits, scale=0.03)
    lw = fit_lut(w, LUTSpec(bits, group))
    value = _reloaded_lut_value(tmp_path, lw, shape)
    expected = lw.dequantize().reshape(shape)
    assert value.dtype == np.float16 and value.shape == shape
    assert value.tobytes() == expected.tobytes()


def test_emission_with_a_weight_id_is_bit_exact(tmp_path) -> None:
    """The export's form: indices and table as consts with a weight id (shared across functions)."""
    shape = (16, 24, 1, 1)
    lw = fit_lut(_gaussian(shape, seed=9, scale=0.03), LUTSpec(4, 4))
    value = _reloaded_lut_value(tmp_path, lw, shape, weight_id="model.layers.0.mlp.up_proj")
    assert value.tobytes() == lw.dequantize().reshape(shape).tobytes()


def test_fits_in_worker_processes_are_the_serial_fits() -> None:
    from anemll_mlx.export.weights import fit_luts

    weights = [_gaussian((8 * (i + 1), 24), seed=20 + i, scale=0.02) for i in range(5)]
    serial = [fit_lut(w, LUTSpec(4, 4)) for w in weights]
    for got, expected in zip(fit_luts(weights, LUTSpec(4, 4), workers=2), serial, strict=True):
        assert got.indices.tobytes() == expected.indices.tobytes() and got.lut.tobytes() == expected.lut.tobytes()


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_fits_held_packed_unpack_to_the_same_indices(bits: int) -> None:
    """Fits waiting for their trace are held two indices to a byte (bits <= 4), and in the workers'
    replies too; an odd count of indices keeps its last one."""
    from anemll_mlx.export.weights import PackedLUT, fit_luts

    weights = [_gaussian((8, 13), seed=40, scale=0.02), _gaussian((16, 9, 1, 1), seed=41, scale=0.02)]
    spec = LUTSpec(bits, 4)
    for packed, expected in zip(fit_luts(weights, spec, workers=2, packed=True), [fit_lut(w, spec) for w in weights]):
        assert isinstance(packed, PackedLUT)
        assert packed.data.nbytes == ((expected.indices.size + 1) // 2 if bits <= 4 else expected.indices.size)
        got = packed.unpack()
        assert got.indices.shape == expected.indices.shape and got.indices.dtype == np.uint8
        assert got.indices.tobytes() == expected.indices.tobytes() and got.lut.tobytes() == expected.lut.tobytes()


def test_emission_rejects_a_wrong_shape() -> None:
    lw = fit_lut(_gaussian((8, 12)), LUTSpec(4, 4))
    with pytest.raises(ValueError):
        lut_to_mil(lw, (12, 8), "w")

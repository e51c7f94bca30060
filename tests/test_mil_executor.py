"""The off-Mac Core ML executor against coremltools' own op semantics and numpy references.

Op semantics are checked on pymil programs built with ``mb.*`` and run directly
(``MILExecutor.from_program``): the reference is the op's numpy ``value_inference`` (obtained by
building the same op on constants) where coremltools defines one, numpy otherwise.  Whole-package
behaviour (loading, states, multifunction, LUT weights, fp16 rounding) goes through
``ct.convert`` + save + ``MILExecutor.load``, as an export would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import coremltools as ct
import mlx.core as mx
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types

from anemll_mlx.errors import BadArgumentError, CorruptModelError, UnsupportedError
from anemll_mlx.runtime.mil_executor import MILExecutor

IOS18 = ct.target.iOS18
RNG = np.random.default_rng(0)
MIL_DTYPE = {
    np.dtype(np.float32): types.fp32,
    np.dtype(np.float16): types.fp16,
    np.dtype(np.int32): types.int32,
    np.dtype(np.bool_): types.bool,
    np.dtype(np.int8): types.int8,
}


# ------------------------------------------------------------------------------------------------
# helpers


def _as_list(out: object) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def build_program(make: Callable, inputs: dict[str, np.ndarray]) -> Program:
    """A one-function program whose inputs are placeholders, so the op really executes."""
    specs = {k: mb.placeholder(shape=v.shape, dtype=MIL_DTYPE[v.dtype]) for k, v in inputs.items()}
    with Function(specs, opset_version=IOS18) as func:
        func.set_outputs(_as_list(make(**func.inputs)))
    prog = Program()
    prog.add_function("main", func)
    return prog


def value_inference(make: Callable, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """coremltools' numpy semantics: the same op built on constants is folded by pymil."""
    with Function({}, opset_version=IOS18):
        outs = _as_list(make(**{k: mb.const(val=v) for k, v in inputs.items()}))
        vals = [o.val for o in outs]
    assert all(v is not None for v in vals), "op has no value_inference"
    return [np.asarray(v) for v in vals]


def execute(make: Callable, inputs: dict[str, np.ndarray], **kw: object) -> list[np.ndarray]:
    ex = MILExecutor.from_program(build_program(make, inputs), **kw)
    out = ex.run("main", inputs)
    return [np.array(out[name]) for name in ex.outputs("main")]


def assert_close(got: list[np.ndarray], want: list[np.ndarray], rtol: float = 1e-5, atol: float = 1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == np.shape(w), (g.shape, np.shape(w))
        np.testing.assert_allclose(g.astype(np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol)


def f32(*shape: int, positive: bool = False) -> np.ndarray:
    x = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(x) + 0.1 if positive else x


def convert_and_load(prog: Program, path: Path, **kw: object) -> MILExecutor:
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=IOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    model.save(str(path))
    return MILExecutor.load(path, **kw)


# ------------------------------------------------------------------------------------------------
# ops with a coremltools value_inference

X = f32(2, 3, 4)
Y = f32(3, 4)
P = f32(2, 3, 4, positive=True)
XI = RNG.integers(-5, 6, (2, 3, 4)).astype(np.int32)
YI = RNG.integers(1, 4, (3, 4)).astype(np.int32)
XR = np.round(RNG.standard_normal((2, 3, 4))).astype(np.float32)
YR = np.round(RNG.standard_normal((3, 4))).astype(np.float32)
B1 = RNG.random((2, 3, 4)) > 0.5
B2 = RNG.random((3, 4)) > 0.5

BINARY = ["add", "sub", "mul", "real_div", "maximum", "minimum"]
COMPARE = ["equal", "not_equal", "greater", "greater_equal", "less", "less_equal"]
UNARY = ["exp", "tanh", "erf", "sigmoid", "abs", "square", "sin", "cos"]
POSITIVE_UNARY = ["sqrt", "rsqrt", "log", "inverse"]


def _case(name: str, make: Callable, **inputs: np.ndarray):
    return pytest.param(make, inputs, id=name)


CASES = [
    *[_case(n, lambda x, y, n=n: getattr(mb, n)(x=x, y=y), x=X, y=Y + 2.0) for n in BINARY],
    *[_case(f"{n}-int", lambda x, y, n=n: getattr(mb, n)(x=x, y=y), x=XI, y=YI) for n in BINARY],
    _case("pow", lambda x, y: mb.pow(x=x, y=y), x=P, y=Y),
    *[_case(n, lambda x, y, n=n: getattr(mb, n)(x=x, y=y), x=XR, y=YR) for n in COMPARE],
    *[
        _case(n, lambda x, y, n=n: getattr(mb, n)(x=x, y=y), x=B1, y=B2)
        for n in ["logical_and", "logical_or"]
    ],
    _case("logical_not", lambda x: mb.logical_not(x=x), x=B1),
    *[_case(n, lambda x, n=n: getattr(mb, n)(x=x), x=X) for n in UNARY],
    *[_case(n, lambda x, n=n: getattr(mb, n)(x=x), x=P) for n in POSITIVE_UNARY],
    _case("rsqrt-eps", lambda x: mb.rsqrt(x=x, epsilon=0.5), x=P),
    _case("log-eps", lambda x: mb.log(x=x, epsilon=0.25), x=P),
    *[
        _case(f"gelu-{m}", lambda x, m=m: mb.gelu(x=x, mode=m), x=X)
        for m in ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"]
    ],  # fmt: skip
    _case("clip", lambda x: mb.clip(x=x, alpha=-0.5, beta=0.5), x=X),
    *[
        _case(f"{n}-{i}", lambda x, n=n, kw=kw: getattr(mb, n)(x=x, **kw), x=X)
        for n in [
            "reduce_sum",
            "reduce_mean",
            "reduce_max",
            "reduce_min",
            "reduce_sum_square",
        ]
        for i, kw in enumerate([{"axes": [1]}, {"axes": [-1, 0], "keep_dims": True}, {}])
    ],  # fmt: skip
    _case("reduce_argmax", lambda x: mb.reduce_argmax(x=x, axis=1), x=X),
    _case("reduce_argmax-keep", lambda x: mb.reduce_argmax(x=x, axis=-1, keep_dims=True), x=X),
    _case("reduce_argmin", lambda x: mb.reduce_argmin(x=x, axis=0), x=X),
    _case("softmax", lambda x: mb.softmax(x=x, axis=-1), x=X * 3),
    _case("softmax-axis1", lambda x: mb.softmax(x=x, axis=1), x=X * 3),
    _case(
        "layer_norm",
        lambda x: mb.layer_norm(
            x=x, axes=[-1], gamma=np.arange(1, 5, dtype=np.float32), beta=np.ones(4, np.float32)
        ),
        x=X,
    ),
    _case("layer_norm-2axes", lambda x: mb.layer_norm(x=x, axes=[-2, -1], epsilon=1e-3), x=X),
    _case("reshape", lambda x: mb.reshape(x=x, shape=[4, -1]), x=X),
    _case("reshape-zero", lambda x: mb.reshape(x=x, shape=[1, 0, -1, 0]), x=X),
    _case("transpose", lambda x: mb.transpose(x=x, perm=[2, 0, 1]), x=X),
    _case("expand_dims", lambda x: mb.expand_dims(x=x, axes=[0, -1]), x=X),
    _case("squeeze", lambda x: mb.squeeze(x=x, axes=[1]), x=f32(2, 1, 3)),
    _case("squeeze-all", lambda x: mb.squeeze(x=x), x=f32(1, 3, 1)),
    _case("concat", lambda x, y: mb.concat(values=[x, y, x], axis=1), x=f32(2, 3, 4), y=f32(2, 1, 4)),
    _case("split-num", lambda x: mb.split(x=x, num_splits=2, axis=1), x=f32(2, 4, 3)),
    _case("split-sizes", lambda x: mb.split(x=x, split_sizes=[1, 3], axis=-2), x=f32(2, 4, 3)),
    _case(
        "slice_by_index",
        lambda x: mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 3, 4], stride=[1, 1, 2]),
        x=X,
    ),
    _case(
        "slice_by_index-masks",
        lambda x: mb.slice_by_index(
            x=x,
            begin=[1, -2, 0],
            end=[0, 3, -1],
            begin_mask=[False, False, True],
            end_mask=[True, False, False],
            squeeze_mask=[False, False, False],
        ),
        x=X,
    ),  # fmt: skip
    _case(
        "slice_by_index-squeeze",
        lambda x: mb.slice_by_index(x=x, begin=[1, 0, 2], end=[2, 3, 3], squeeze_mask=[True, False, True]),
        x=X,
    ),
    _case(
        "slice_by_index-neg-stride",
        lambda x: mb.slice_by_index(x=x, begin=[0, 2, 3], end=[2, 0, 0], stride=[1, -1, -2]),
        x=X,
    ),
    _case("slice_by_size", lambda x: mb.slice_by_size(x=x, begin=[0, 1, 1], size=[2, -1, 2]), x=X),
    _case(
        "slice_update",
        lambda x, u: mb.slice_update(x=x, update=u, begin=[1, 1, 0], end=[2, 3, 6]),
        x=f32(2, 4, 6),
        u=f32(1, 2, 6),
    ),
    _case(
        "slice_update-stride",
        lambda x, u: mb.slice_update(x=x, update=u, begin=[0, 0, 1], end=[2, 4, 6], stride=[1, 2, 2]),
        x=f32(2, 4, 6),
        u=f32(2, 2, 3),
    ),
    _case(
        "slice_update-squeeze",
        lambda x, u: mb.slice_update(
            x=x, update=u, begin=[1, 0, 2], end=[2, 4, 3], squeeze_mask=[True, False, True]
        ),
        x=f32(2, 4, 6),
        u=f32(4),
    ),
    _case(
        "gather", lambda x, i: mb.gather(x=x, indices=i, axis=1), x=X, i=np.array([[2, 0], [1, 1]], np.int32)
    ),
    _case(
        "gather-axis0",
        lambda x, i: mb.gather(x=x, indices=i, axis=0),
        x=f32(6, 4),
        i=np.array([5, 0, 3], np.int32),
    ),
    _case(
        "gather-batch_dims",
        lambda x, i: mb.gather(x=x, indices=i, axis=1, batch_dims=1),
        x=X,
        i=np.array([[2, 0], [1, 1]], np.int32),
    ),
    _case(
        "gather_along_axis",
        lambda x, i: mb.gather_along_axis(x=x, indices=i, axis=1),
        x=X,
        i=RNG.integers(0, 3, (2, 5, 4)).astype(np.int32),
    ),
    _case("select", lambda c, a, b: mb.select(cond=c, a=a, b=b), c=B2, a=X, b=Y),
    _case("cast-int32", lambda x: mb.cast(x=x, dtype="int32"), x=X * 4),
    _case("cast-fp16", lambda x: mb.cast(x=x, dtype="fp16"), x=X),
    _case("cast-bool", lambda x: mb.cast(x=x, dtype="bool"), x=XR),
    _case("topk", lambda x: mb.topk(x=x, k=2, axis=-1), x=X),
    _case("topk-ascending", lambda x: mb.topk(x=x, k=3, axis=1, ascending=True), x=f32(2, 5, 3)),
    _case("linear", lambda x, w=f32(6, 4), b=f32(6): mb.linear(x=x, weight=w, bias=b), x=X),
    _case("matmul", lambda x, y: mb.matmul(x=x, y=y), x=f32(2, 3, 4), y=f32(4, 5)),
    _case(
        "matmul-transposed",
        lambda x, y: mb.matmul(x=x, y=y, transpose_x=True, transpose_y=True),
        x=f32(2, 4, 3),
        y=f32(2, 5, 4),
    ),
    _case(
        "sdpa",
        lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v),
        q=f32(1, 2, 3, 8),
        k=f32(1, 2, 5, 8),
        v=f32(1, 2, 5, 4),
    ),
    _case(
        "sdpa-bool-mask",
        lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
        q=f32(1, 2, 3, 8),
        k=f32(1, 2, 5, 8),
        v=f32(1, 2, 5, 4),
        m=np.tril(np.ones((3, 5), bool), 2),
    ),  # fmt: skip
    _case(
        "sdpa-float-mask",
        lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
        q=f32(1, 2, 3, 8),
        k=f32(1, 2, 5, 8),
        v=f32(1, 2, 5, 4),
        m=f32(1, 1, 3, 5),
    ),  # fmt: skip
]


@pytest.mark.parametrize("make, inputs", CASES)
def test_op_matches_value_inference(make: Callable, inputs: dict[str, np.ndarray]):
    want = value_inference(make, inputs)
    got = execute(make, inputs)
    assert [g.dtype.kind for g in got] == [np.asarray(w).dtype.kind for w in want]
    assert_close(got, want)


# ------------------------------------------------------------------------------------------------
# ops without value_inference (or with a buggy one): numpy references


def np_conv(x, w, b=None, strides=None, pads=None, dilations=None, groups=1):
    """Direct convolution in float64: x (N, C, *S), w (Co, C/groups, *K), pads [(lo, hi), ...]."""
    nd = x.ndim - 2
    strides, dilations = strides or [1] * nd, dilations or [1] * nd
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *(pads or [(0, 0)] * nd)])
    k = w.shape[2:]
    out_sp = [(x.shape[2 + i] - (k[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    co, cig = w.shape[0], w.shape[1]
    out = np.zeros((x.shape[0], co, *out_sp))
    for g in range(groups):
        xs = x[:, g * cig : (g + 1) * cig]
        ws = w[g * co // groups : (g + 1) * co // groups].astype(np.float64)
        for off in np.ndindex(*k):
            idx = tuple(
                slice(
                    off[i] * dilations[i],
                    off[i] * dilations[i] + strides[i] * (out_sp[i] - 1) + 1,
                    strides[i],
                )
                for i in range(nd)
            )
            patch = xs[(slice(None), slice(None), *idx)]
            out[:, g * co // groups : (g + 1) * co // groups] += np.einsum(
                "nc...,oc->no...", patch, ws[(slice(None), slice(None), *off)]
            )
    if b is not None:
        out += b.reshape(1, -1, *[1] * nd)
    return out


W1x1 = f32(6, 4, 1, 1)
W33 = f32(6, 2, 3, 3)
BIAS6 = f32(6)


NUMPY_CASES = [
    pytest.param(  # coremltools' value_inference ignores interleave; this is the documented layout
        lambda x, y: mb.concat(values=[x, y], axis=1, interleave=True),
        {"x": X, "y": X + 1},
        lambda x, y: np.stack([x, y], axis=2).reshape(2, 6, 4),
        id="concat-interleave",
    ),
    pytest.param(lambda x: mb.silu(x=x), {"x": X}, lambda x: x / (1 + np.exp(-x)), id="silu"),
    pytest.param(
        lambda x: mb.conv(x=x, weight=W1x1, bias=BIAS6),
        {"x": f32(2, 4, 1, 5)},
        lambda x: np_conv(x, W1x1, BIAS6),
        id="conv-1x1",
    ),  # fmt: skip
    pytest.param(  # the experts of a mixture-of-experts layer: each group reads its own channels
        lambda x: mb.conv(x=x, weight=W1x1[:, :2], bias=BIAS6, groups=2),
        {"x": f32(2, 4, 1, 5)},
        lambda x: np_conv(x, W1x1[:, :2], BIAS6, groups=2),
        id="conv-1x1-groups",
    ),  # fmt: skip
    pytest.param(
        lambda x: mb.conv(x=x, weight=W1x1[:, :, 0], bias=BIAS6),
        {"x": f32(2, 4, 5)},
        lambda x: np_conv(x, W1x1[:, :, 0], BIAS6),
        id="conv1d-1x1",
    ),  # fmt: skip
]


@pytest.mark.parametrize("make, inputs, ref", NUMPY_CASES)
def test_op_matches_numpy(make: Callable, inputs: dict[str, np.ndarray], ref: Callable):
    assert_close(execute(make, inputs), [ref(*inputs.values())], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# run-time (dynamic) slicing, shapes and creation


def test_dynamic_slices_follow_a_runtime_position():
    x = f32(2, 8, 4)
    u = f32(2, 1, 4)

    def make(x, u, pos):
        begin = mb.concat(values=[np.array([0], np.int32), pos, np.array([0], np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([2, 3, 4], np.int32))
        window = mb.slice_by_index(x=x, begin=begin, end=end)  # size known at load: end = begin + c
        updated = mb.slice_update(
            x=x, update=u, begin=begin, end=mb.add(x=begin, y=np.array([2, 1, 4], np.int32))
        )
        sized = mb.slice_by_size(x=x, begin=begin, size=[1, 2, -1])
        return window, updated, sized

    prog = build_program(make, {"x": x, "u": u, "pos": np.array([0], np.int32)})
    ex = MILExecutor.from_program(prog)
    for pos in [0, 3, 5]:
        window, updated, sized = (
            np.array(v) for v in ex.run("main", {"x": x, "u": u, "pos": np.array([pos], np.int32)}).values()
        )
        np.testing.assert_array_equal(window, x[:, pos : pos + 3])
        want = x.copy()
        want[:, pos : pos + 1] = u
        np.testing.assert_array_equal(updated, want)
        np.testing.assert_array_equal(sized, x[:1, pos : pos + 2])


def test_slice_with_runtime_bounds():
    def make(x, b, e):
        return mb.slice_by_index(x=x, begin=b, end=e)

    inputs = {"x": f32(4, 6), "b": np.array([1, 2], np.int32), "e": np.array([3, 6], np.int32)}
    (window,) = execute(make, inputs)
    np.testing.assert_array_equal(window, inputs["x"][1:3, 2:6])


def test_ops_no_export_emits_are_refused_by_name():
    """A general convolution is not an LLM op: a clear error, not a silent slow path."""
    with pytest.raises(UnsupportedError, match=r"op conv .*only 1x1 convolutions"):
        execute(lambda x: mb.conv(x=x, weight=W33, groups=2), {"x": f32(1, 4, 7, 6)})


# ------------------------------------------------------------------------------------------------
# fp16 numerics


def test_fp16_ops_round_once_per_op_and_overflow_to_inf(tmp_path: Path):
    x = (RNG.standard_normal((4, 64)) * 3).astype(np.float16)
    w = (RNG.standard_normal((64, 32)) / 8).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((4, 64), dtype=types.fp16)], opset_version=IOS18)
    def prog(x):
        big = mb.mul(x=x, y=np.float16(30000.0), name="big")
        soft = mb.softmax(x=x, axis=-1, name="soft")
        mm = mb.matmul(x=x, y=w, name="mm")
        chain = mb.add(x=mb.mul(x=x, y=np.float16(1.1)), y=np.float16(0.3), name="chain")
        return big, soft, mm, chain

    ex = convert_and_load(prog, tmp_path / "fp16.mlpackage")
    out = {k: np.array(v) for k, v in ex.run("main", {"x": x}).items()}
    xf = x.astype(np.float32)
    assert out["big"].dtype == np.float16
    big_ref = xf * np.float32(np.float16(30000.0))
    assert np.isinf(out["big"][np.abs(big_ref) > 65520]).all()
    assert (np.abs(big_ref) > 65520).any()
    e = np.exp(xf - xf.max(-1, keepdims=True))
    ulp = lambda a: np.spacing(np.abs(a).astype(np.float16)).astype(np.float32)  # noqa: E731
    soft_ref = (e / e.sum(-1, keepdims=True)).astype(np.float16)
    assert (np.abs(out["soft"].astype(np.float32) - soft_ref) <= ulp(soft_ref)).all()
    mm_ref = (xf.astype(np.float64) @ w.astype(np.float64)).astype(np.float16)
    assert (np.abs(out["mm"].astype(np.float32) - mm_ref) <= ulp(mm_ref)).all()
    # two fp16 ops: each result rounded to fp16 (numpy's fp16 arithmetic does the same)
    np.testing.assert_array_equal(out["chain"], x * np.float16(1.1) + np.float16(0.3))


# ------------------------------------------------------------------------------------------------
# states


def test_merged_read_state_returns_the_pre_write_value(tmp_path: Path):
    """coremltools' remove_redundant_ops merges two read_state across a write (#2786)."""

    @mb.program(
        input_specs=[mb.TensorSpec((1, 4), dtype=types.fp16), mb.StateTensorSpec((1, 4), dtype=types.fp16)],
        opset_version=IOS18,
    )
    def prog(x, cache):
        before = mb.read_state(input=cache)
        mb.coreml_update_state(state=cache, value=mb.add(x=before, y=x))
        after = mb.read_state(input=cache)  # on device this is `before`, not the new value
        return mb.mul(x=after, y=np.float16(1.0), name="after")

    ex = convert_and_load(prog, tmp_path / "stale.mlpackage")
    states: dict[str, mx.array] = {}
    x = np.ones((1, 4), np.float16)
    first = np.array(ex.run("main", {"x": x}, states)["after"])
    np.testing.assert_array_equal(first, np.zeros((1, 4)))  # stale: pre-write value
    np.testing.assert_array_equal(np.array(states["cache"]), x)  # but the write happened
    second = np.array(ex.run("main", {"x": x}, states)["after"])
    np.testing.assert_array_equal(second, x)
    np.testing.assert_array_equal(np.array(states["cache"]), 2 * x)


H, NH, HD, CTX, FF, LAYERS = 16, 2, 8, 16, 32, 2


def _block_weights() -> list[dict[str, np.ndarray]]:
    def w(*shape):
        return (RNG.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float16)

    return [
        {"q": w(H, H), "k": w(H, H), "v": w(H, H), "o": w(H, H), "g": w(FF, H), "u": w(FF, H), "d": w(H, FF),
         "n1": (1 + RNG.random(H) / 4).astype(np.float16), "n2": (1 + RNG.random(H) / 4).astype(np.float16)}
        for _ in range(LAYERS)
    ]  # fmt: skip


WEIGHTS = _block_weights()


def _rms(x, gamma):
    ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
    return mb.mul(x=mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=ms, y=np.float16(1e-5)))), y=gamma)


def _heads(x):  # (1, 1, H) -> (1, NH, 1, HD)
    return mb.transpose(x=mb.reshape(x=x, shape=[1, 1, NH, HD]), perm=[0, 2, 1, 3])


@mb.program(
    input_specs=[
        mb.TensorSpec((1, 1, H), dtype=types.fp16),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.TensorSpec((1, 1, 1, CTX), dtype=types.fp16),
        mb.StateTensorSpec((2 * LAYERS, NH, CTX, HD), dtype=types.fp16),
    ],
    opset_version=IOS18,
)
def _transformer(hidden_states, current_pos, causal_mask, kv_cache):
    h = hidden_states
    kv = mb.read_state(input=kv_cache)
    zero = np.array([0], np.int32)
    for layer, w in enumerate(WEIGHTS):
        n = _rms(h, w["n1"])
        q, k, v = (_heads(mb.linear(x=n, weight=w[name])) for name in "qkv")
        for row, value in ((layer, k), (LAYERS + layer, v)):
            begin = mb.concat(values=[np.array([row], np.int32), zero, current_pos, zero], axis=0)
            end = mb.add(x=begin, y=np.array([1, NH, 1, HD], np.int32))
            kv = mb.slice_update(x=kv, update=value, begin=begin, end=end)
            kv = mb.coreml_update_state(state=kv_cache, value=kv)  # then use the returned value
        keys = mb.slice_by_index(x=kv, begin=[layer, 0, 0, 0], end=[layer + 1, NH, CTX, HD])
        values = mb.slice_by_index(
            x=kv, begin=[LAYERS + layer, 0, 0, 0], end=[LAYERS + layer + 1, NH, CTX, HD]
        )
        if layer == 0:
            att = mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=causal_mask)
        else:  # the explicit form, as ANEMLL writes it
            scores = mb.matmul(x=mb.mul(x=q, y=np.float16(1 / math.sqrt(HD))), y=keys, transpose_y=True)
            att = mb.matmul(x=mb.softmax(x=mb.add(x=scores, y=causal_mask), axis=-1), y=values)
        att = mb.reshape(x=mb.transpose(x=att, perm=[0, 2, 1, 3]), shape=[1, 1, H])
        h = mb.add(x=h, y=mb.linear(x=att, weight=w["o"]))
        n = _rms(h, w["n2"])
        mlp = mb.mul(x=mb.silu(x=mb.linear(x=n, weight=w["g"])), y=mb.linear(x=n, weight=w["u"]))
        h = mb.add(x=h, y=mb.linear(x=mlp, weight=w["d"]))
    return mb.identity(x=h, name="output_hidden_states")


def _np_transformer(h: np.ndarray, pos: int, cache: np.ndarray) -> np.ndarray:
    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    h = h.astype(np.float32)
    for layer, w in enumerate({k: v.astype(np.float32) for k, v in ws.items()} for ws in WEIGHTS):
        n = rms(h, w["n1"])
        q, k, v = ((n @ w[name].T).reshape(NH, HD) for name in "qkv")
        cache[layer, :, pos], cache[LAYERS + layer, :, pos] = k, v
        scores = np.einsum("hd,hsd->hs", q, cache[layer]) / math.sqrt(HD)
        scores[:, pos + 1 :] = -np.inf
        p = np.exp(scores - scores.max(-1, keepdims=True))
        att = np.einsum("hs,hsd->hd", p / p.sum(-1, keepdims=True), cache[LAYERS + layer])
        h = h + att.reshape(1, 1, H) @ w["o"].T
        n = rms(h, w["n2"])
        g = n @ w["g"].T
        h = h + (g / (1 + np.exp(-g)) * (n @ w["u"].T)) @ w["d"].T
    return h


@pytest.fixture(scope="module")
def transformer_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("block") / "block.mlpackage"
    convert_and_load(_transformer, path)
    return path


def test_two_layer_transformer_with_kv_state_matches_numpy(transformer_package: Path):
    ex = MILExecutor.load(transformer_package)
    assert ex.functions == ["main"]
    assert ex.states("main") == {"kv_cache": ((2 * LAYERS, NH, CTX, HD), np.dtype(np.float16))}
    assert ex.inputs("main")["current_pos"] == ((1,), np.dtype(np.int32))
    states: dict[str, mx.array] = {}
    ref_cache = np.zeros((2 * LAYERS, NH, CTX, HD), np.float32)
    for pos in range(4):
        h = RNG.standard_normal((1, 1, H)).astype(np.float16)
        mask = np.where(np.arange(CTX) <= pos, 0, -np.inf).astype(np.float16).reshape(1, 1, 1, CTX)
        out = ex.run(
            "main",
            {"hidden_states": h, "current_pos": np.array([pos], np.int32), "causal_mask": mask},
            states,
        )
        want = _np_transformer(h, pos, ref_cache)
        got = np.array(out["output_hidden_states"])
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(np.array(states["kv_cache"]).astype(np.float32), ref_cache, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# packages: multifunction, LUT weights, errors


def test_multifunction_package_runs_both_functions_sharing_weights(tmp_path: Path):
    w = (RNG.standard_normal((64, 32)) / 6).astype(np.float16)

    def program(tokens: int) -> Program:
        @mb.program(input_specs=[mb.TensorSpec((1, tokens, 32), dtype=types.fp16)], opset_version=IOS18)
        def prog(x):
            return mb.silu(x=mb.linear(x=x, weight=w), name="y")

        return prog

    paths = {}
    for name, tokens in (("infer", 1), ("prefill", 4)):
        paths[name] = tmp_path / f"{name}.mlpackage"
        convert_and_load(program(tokens), paths[name])
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in paths.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = "infer"
    ct.utils.save_multifunction(desc, str(tmp_path / "multi.mlpackage"))

    ex = MILExecutor.load(tmp_path / "multi.mlpackage")
    assert ex.functions == ["infer", "prefill"]  # the default function first
    assert ex.weight_bytes == w.astype(np.float32).nbytes  # one (fp32, BLAS-ready) copy for both
    for name, tokens in (("infer", 1), ("prefill", 4)):
        x = RNG.standard_normal((1, tokens, 32)).astype(np.float16)
        got = np.array(ex.run(name, {"x": x})["y"]).astype(np.float32)
        z = x.astype(np.float32) @ w.astype(np.float32).T
        np.testing.assert_allclose(got, z / (1 + np.exp(-z)), rtol=1e-2, atol=1e-2)


def test_lut_compressed_conv_matches_numpy(tmp_path: Path):
    cout, cin, group = 8, 16, 4
    lut = RNG.standard_normal((cout // group, 1, 1, 1, 16, 1)).astype(np.float16)
    indices = RNG.integers(0, 16, (cout, cin, 1, 1)).astype(np.uint8)

    @mb.program(input_specs=[mb.TensorSpec((1, cin, 1, 5), dtype=types.fp16)], opset_version=IOS18)
    def prog(x):
        weight = mb.constexpr_lut_to_dense(indices=indices.astype(types.np_uint4_dtype), lut=lut)
        return mb.conv(x=x, weight=weight, name="y")

    ex = convert_and_load(prog, tmp_path / "lut.mlpackage")
    dense = lut[np.arange(cout)[:, None] // group, 0, 0, 0, indices[:, :, 0, 0], 0]  # (cout, cin)
    x = RNG.standard_normal((1, cin, 1, 5)).astype(np.float16)
    got = np.array(ex.run("main", {"x": x})["y"]).astype(np.float32)
    want = np.einsum("oc,ncs->nos", dense.astype(np.float32), x[:, :, 0].astype(np.float32))[:, :, None]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_unknown_op_is_a_clear_error():
    prog = build_program(lambda x: mb.space_to_depth(x=x, block_size=2), {"x": f32(1, 2, 4, 4)})
    with pytest.raises(UnsupportedError, match=r"space_to_depth.*function main"):
        MILExecutor.from_program(prog)


def test_unreadable_package_is_corrupt(tmp_path: Path):
    bad = tmp_path / "bad.mlpackage"
    bad.mkdir()
    (bad / "Manifest.json").write_text("{not json")
    with pytest.raises(CorruptModelError):
        MILExecutor.load(bad)
    with pytest.raises(CorruptModelError):
        MILExecutor.load(tmp_path / "missing.mlpackage")


def test_bad_inputs_are_reported():
    ex = MILExecutor.from_program(build_program(lambda x: mb.silu(x=x), {"x": f32(2, 3)}))
    with pytest.raises(BadArgumentError, match="missing inputs"):
        ex.run("main", {})
    with pytest.raises(BadArgumentError, match="shape"):
        ex.run("main", {"x": f32(3, 2)})
    with pytest.raises(BadArgumentError, match="no function"):
        ex.run("prefill", {"x": f32(2, 3)})

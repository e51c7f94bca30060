"""MIL op implementations on MLX, for the off-Mac executor (see ``mil_executor``).

Each supported MIL op type has a *builder*: called once at load time with the pymil ``Operation``,
it reads the op's constant attributes (axes, perm, strides, epsilon, ...) and returns a ``Kernel``,
a plain closure over ``mx.array`` values plus the list of vars it reads at run time.  Doing all
attribute parsing here, at load, is what keeps a decode step cheap: running a function is a flat
loop of closure calls.

Numerics, per op (the executor then rounds every output to the op's declared dtype):

* data movement (reshape, slice, gather, concat, ...) is exact;
* ``add/sub/mul/real_div/maximum/...`` run natively in fp16: IEEE fp16 arithmetic is correctly
  rounded, which equals computing in fp32 and rounding once;
* matmul / linear / einsum / 1x1 conv run on fp16 operands: MLX accumulates fp16 matmuls in fp32
  and rounds once (bias included via ``addmm``), verified against a float64 reference;
* everything with a transcendental or a reduction inside (exp, rsqrt, erf, silu, gelu, softmax,
  layer_norm, reduce_*, cumsum, scaled_dot_product_attention, general conv) is computed in fp32 and
  rounded once at the end; MLX's native fp16 versions of these are not correctly rounded.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from coremltools.converters.mil.mil import Operation, Var, types

from anemll_mlx.errors import UnsupportedError

Array = mx.array
KernelFn = Callable[..., Any]

F32 = mx.float32

_MX_BY_NAME: dict[str, mx.Dtype] = {
    "fp16": mx.float16,
    "fp32": mx.float32,
    "fp64": mx.float32,  # Core ML programs have no fp64 tensors; treat stray ones as fp32
    "int8": mx.int8,
    "int16": mx.int16,
    "int32": mx.int32,
    "int64": mx.int64,
    "uint8": mx.uint8,
    "uint16": mx.uint16,
    "uint32": mx.uint32,
    "bool": mx.bool_,
}

_NP_BY_MX: dict[mx.Dtype, np.dtype] = {
    mx.float16: np.dtype(np.float16),
    mx.float32: np.dtype(np.float32),
    mx.int8: np.dtype(np.int8),
    mx.int16: np.dtype(np.int16),
    mx.int32: np.dtype(np.int32),
    mx.int64: np.dtype(np.int64),
    mx.uint8: np.dtype(np.uint8),
    mx.uint16: np.dtype(np.uint16),
    mx.uint32: np.dtype(np.uint32),
    mx.bool_: np.dtype(np.bool_),
}


def mx_dtype(builtin: type) -> mx.Dtype:
    """The MLX dtype for a MIL builtin scalar type (``types.fp16`` -> ``mx.float16``)."""
    name = types.builtin_to_string(builtin)
    if name not in _MX_BY_NAME:
        raise UnsupportedError(f"MIL dtype {name} has no MLX equivalent")
    return _MX_BY_NAME[name]


def np_dtype(dtype: mx.Dtype) -> np.dtype:
    """The numpy dtype matching an MLX dtype (for building inputs and describing functions)."""
    return _NP_BY_MX[dtype]


def static_shape(var: Var) -> tuple[int | None, ...]:
    """The declared shape of ``var`` with symbolic (run-time) dims as ``None``."""
    return tuple(d if isinstance(d, (int, np.integer)) else None for d in var.shape)


def is_fully_static(shape: Sequence[int | None]) -> bool:
    return all(d is not None for d in shape)


# --------------------------------------------------------------------------------------------
# Kernels and the build context


@dataclass(frozen=True)
class Kernel:
    """A load-time compiled op: ``fn(*values of args)`` returns one array or a tuple of arrays."""

    fn: KernelFn
    args: tuple[Var, ...]


class ConstPool:
    """Materialises constants as MLX arrays once, shared across functions.

    Multifunction packages (infer + prefill) carry byte-identical weights once per function in
    the loaded pymil program; deduplicating by content keeps one copy in memory.
    """

    _DEDUPE_MIN_BYTES = 4096

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, str, tuple[int, ...], bytes], Any] = {}

    def array(self, value: np.ndarray) -> Array:
        return self._shared(value, "mlx", mx.array)

    def host_matrix(self, value: np.ndarray) -> np.ndarray:
        """A weight as a float32 numpy array, for products on the host's BLAS (see ``host_matmul``)."""
        return self._shared(value, "host", lambda v: np.ascontiguousarray(v, dtype=np.float32))

    def _shared(self, value: np.ndarray, kind: str, make: Callable[[np.ndarray], Any]) -> Any:
        value = np.ascontiguousarray(value)
        if value.nbytes < self._DEDUPE_MIN_BYTES:
            return make(value)
        digest = hashlib.blake2b(memoryview(value).cast("B"), digest_size=16).digest()
        key = (kind, value.dtype.str, value.shape, digest)
        if key not in self._arrays:
            self._arrays[key] = make(value)
        return self._arrays[key]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())


class BuildContext:
    """What a builder may ask about its op's inputs while compiling one function."""

    def __init__(self, function: str, pool: ConstPool) -> None:
        self.function = function
        self.pool = pool
        self._constexpr: dict[int, np.ndarray] = {}

    # -- static values -------------------------------------------------------------------------

    def static(self, var: Var | None) -> Any:
        """The load-time value of ``var`` (const, constexpr_* or folded by pymil), else None."""
        if var is None:
            return None
        if var.val is not None:
            return var.val
        op = var.op
        if op is not None and op.op_type.startswith("constexpr_"):
            return self._materialize(op)
        if op is not None and op.op_type == "dequantize" and op.can_materialize_val():
            return self._materialize(op)  # a weight stored quantized, like a constexpr
        return None

    def array(self, var: Var) -> Array:
        """The static value of ``var`` as an MLX array of its declared dtype (deduplicated)."""
        return self.pool.array(self._declared(var))

    def host_matrix(self, var: Var) -> np.ndarray:
        """The static value of ``var``, rounded to its declared dtype, as float32 numpy (deduplicated)."""
        return self.pool.host_matrix(self._declared(var))

    def _declared(self, var: Var) -> np.ndarray:
        value = self.static(var)
        if value is None:
            raise ValueError(f"{var.name} is not a load-time constant")
        return np.asarray(value).astype(np_dtype(mx_dtype(var.dtype)), copy=False)

    def param(self, op: Operation, name: str, default: Any = None) -> Any:
        """A constant attribute of ``op`` (numpy value), ``default`` when the input is absent."""
        var = op.inputs.get(name)
        if var is None:
            return default
        value = self.static(var)
        if value is None:
            raise UnsupportedError(
                f"op {op.op_type} ({op.name}) in function {self.function}: "
                f"input '{name}' must be a load-time constant"
            )
        return value

    # -- constexpr materialisation ---------------------------------------------------------------

    def _materialize(self, op: Operation) -> np.ndarray:
        key = id(op)
        if key not in self._constexpr:
            self._constexpr[key] = self._decompress(op)
        return self._constexpr[key]

    def _decompress(self, op: Operation) -> np.ndarray:
        inputs = {name: self.static(var) for name, var in op.inputs.items()}
        if op.op_type == "constexpr_lut_to_dense" and "shape" not in inputs:  # the iOS18 form
            if inputs["lut"].shape[-1] == 1:
                return lut_to_dense(inputs["indices"], inputs["lut"])
            return type(op).decompress(inputs["indices"], inputs["lut"], inputs.get("vector_axis"))
        if op.op_type == "constexpr_blockwise_shift_scale":
            return type(op).decompress(inputs["data"], inputs["scale"], inputs.get("offset"))
        try:
            return op.materialized_val_inference()
        except Exception as exc:  # unknown or chained compression op we cannot expand
            raise UnsupportedError(
                f"op {op.op_type} ({op.name}) in function {self.function} cannot be materialised: {exc}"
            ) from exc


def lut_to_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Scalar (vector size 1) iOS18 palettization: ``out[i] = lut[group(i), indices[i], 0]``.

    Written here instead of using coremltools' helper because that one first repeats the LUT to
    the full weight shape (16x the weight size for 4 bits), which is too much for an LM head.
    """
    rank = indices.ndim
    groups = lut.shape[:rank]
    blocks = [d // g for d, g in zip(indices.shape, groups)]
    split_shape = [n for pair in zip(groups, blocks) for n in pair]
    idx = indices.astype(np.intp).reshape(split_shape + [1])
    table = lut[..., 0].reshape([n for g in groups for n in (g, 1)] + [lut.shape[-2]])
    return np.take_along_axis(table, idx, axis=-1).reshape(indices.shape)


# --------------------------------------------------------------------------------------------
# Registry

Builder = Callable[[Operation, BuildContext], Kernel]
_BUILDERS: dict[str, Builder] = {}


def register(*op_types: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for op_type in op_types:
            _BUILDERS[op_type] = fn
        return fn

    return deco


def builder_for(op_type: str) -> Builder | None:
    return _BUILDERS.get(op_type)


def supported_ops() -> list[str]:
    """Op types the executor runs (const and constexpr_* are materialised, not run)."""
    return sorted(_BUILDERS)


# --------------------------------------------------------------------------------------------
# Small helpers


def up(x: Array) -> Array:
    """fp16 -> fp32 for ops computed wide; other dtypes unchanged."""
    return x.astype(F32) if x.dtype == mx.float16 else x


def _axis(axis: Any, rank: int) -> int:
    axis = int(axis)
    return axis + rank if axis < 0 else axis


def _axes(axes: Any, rank: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(_axis(a, rank) for a in np.atleast_1d(axes))


def _scalar(value: Any) -> Any:
    return np.asarray(value).item()


# --------------------------------------------------------------------------------------------
# Elementwise


_NATIVE_BINARY: dict[str, KernelFn] = {
    "add": mx.add,
    "sub": mx.subtract,
    "mul": mx.multiply,
    "real_div": mx.divide,
    "maximum": mx.maximum,
    "minimum": mx.minimum,
    "floor_div": mx.floor_divide,
    "mod": mx.remainder,
    "equal": mx.equal,
    "not_equal": mx.not_equal,
    "greater": mx.greater,
    "greater_equal": mx.greater_equal,
    "less": mx.less,
    "less_equal": mx.less_equal,
    "logical_and": mx.logical_and,
    "logical_or": mx.logical_or,
    "logical_xor": lambda x, y: mx.not_equal(x.astype(mx.bool_), y.astype(mx.bool_)),
}


@register(*_NATIVE_BINARY)
def _binary(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(_NATIVE_BINARY[op.op_type], (op.x, op.y))


@register("pow")
def _pow(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(lambda x, y: mx.power(up(x), up(y)), (op.x, op.y))


_NATIVE_UNARY: dict[str, KernelFn] = {
    "identity": lambda x: x,
    "abs": mx.abs,
    "square": mx.square,
    "sign": mx.sign,
    "floor": mx.floor,
    "ceil": mx.ceil,
    "round": mx.round,
    "relu": lambda x: mx.maximum(x, 0),
    "relu6": lambda x: mx.clip(x, 0, 6),
    "logical_not": mx.logical_not,
}


@register(*_NATIVE_UNARY)
def _native_unary(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(_NATIVE_UNARY[op.op_type], (op.x,))


def _gelu_exact(x: Array) -> Array:
    return 0.5 * x * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _gelu_sigmoid(x: Array) -> Array:
    return x * mx.sigmoid(1.702 * x)


_WIDE_UNARY: dict[str, KernelFn] = {
    "sqrt": mx.sqrt,
    "exp": mx.exp,
    "exp2": lambda x: mx.power(2.0, x),
    "tanh": mx.tanh,
    "erf": mx.erf,
    "sigmoid": mx.sigmoid,
    "silu": lambda x: x * mx.sigmoid(x),
    "softplus": lambda x: mx.logaddexp(x, 0.0),
    "softsign": lambda x: x / (1.0 + mx.abs(x)),
    "sin": mx.sin,
    "cos": mx.cos,
    "tan": mx.tan,
    "asin": mx.arcsin,
    "acos": mx.arccos,
    "atan": mx.arctan,
    "sinh": mx.sinh,
    "cosh": mx.cosh,
    "atanh": mx.arctanh,
}


@register(*_WIDE_UNARY)
def _wide_unary(op: Operation, ctx: BuildContext) -> Kernel:
    fn = _WIDE_UNARY[op.op_type]
    return Kernel(lambda x: fn(up(x)), (op.x,))


@register("gelu")
def _gelu(op: Operation, ctx: BuildContext) -> Kernel:
    mode = str(ctx.param(op, "mode", "EXACT"))
    fns = {"EXACT": _gelu_exact, "TANH_APPROXIMATION": _gelu_tanh, "SIGMOID_APPROXIMATION": _gelu_sigmoid}
    if mode not in fns:
        raise UnsupportedError(f"gelu mode {mode} in function {ctx.function}")
    fn = fns[mode]
    return Kernel(lambda x: fn(up(x)), (op.x,))


@register("rsqrt", "inverse", "log")
def _with_epsilon(op: Operation, ctx: BuildContext) -> Kernel:
    eps = float(_scalar(ctx.param(op, "epsilon", 0.0)))
    fns: dict[str, KernelFn] = {
        "rsqrt": lambda x: mx.rsqrt(up(x) + eps),
        "inverse": lambda x: mx.reciprocal(up(x) + eps),
        "log": lambda x: mx.log(up(x) + eps),
    }
    return Kernel(fns[op.op_type], (op.x,))


@register("clip")
def _clip(op: Operation, ctx: BuildContext) -> Kernel:
    lo, hi = _scalar(ctx.param(op, "alpha")), _scalar(ctx.param(op, "beta"))
    return Kernel(lambda x: mx.minimum(mx.maximum(x, lo), hi), (op.x,))


@register("threshold")
def _threshold(op: Operation, ctx: BuildContext) -> Kernel:
    alpha = _scalar(ctx.param(op, "alpha"))
    return Kernel(lambda x: mx.maximum(x, alpha), (op.x,))


@register("leaky_relu", "elu", "thresholded_relu")
def _alpha_activation(op: Operation, ctx: BuildContext) -> Kernel:
    alpha = float(_scalar(ctx.param(op, "alpha")))
    fns: dict[str, KernelFn] = {
        "leaky_relu": lambda x: mx.where(x < 0, up(x) * alpha, x),
        "elu": lambda x: mx.where(x < 0, alpha * (mx.exp(up(x)) - 1.0), x),
        "thresholded_relu": lambda x: mx.where(x < alpha, mx.zeros_like(x), x),
    }
    return Kernel(fns[op.op_type], (op.x,))


@register("linear_activation", "scaled_tanh", "sigmoid_hard", "clamped_relu")
def _alpha_beta_activation(op: Operation, ctx: BuildContext) -> Kernel:
    a, b = float(_scalar(ctx.param(op, "alpha"))), float(_scalar(ctx.param(op, "beta")))
    fns: dict[str, KernelFn] = {
        "linear_activation": lambda x: a * up(x) + b,
        "scaled_tanh": lambda x: a * mx.tanh(b * up(x)),
        "sigmoid_hard": lambda x: mx.clip(a * up(x) + b, 0.0, 1.0),
        "clamped_relu": lambda x: mx.minimum(mx.where(x < 0, a * up(x), up(x)), b),
    }
    return Kernel(fns[op.op_type], (op.x,))


@register("prelu")
def _prelu(op: Operation, ctx: BuildContext) -> Kernel:
    shape = [1, -1] + [1] * (op.x.rank - 2)
    alpha = mx.array(np.asarray(ctx.param(op, "alpha"), np.float32).reshape(shape))
    return Kernel(lambda x: mx.where(x < 0, up(x) * alpha, x), (op.x,))


@register("dequantize")
def _dequantize(op: Operation, ctx: BuildContext) -> Kernel:
    """Run-time dequantize (a const input is materialised at load instead, see BuildContext)."""
    axis = ctx.param(op, "axis")
    shape = [1] * op.input.rank
    if axis is not None:
        shape[_axis(axis, op.input.rank)] = -1

    def per_axis(name: str, default: float) -> Array:
        value = np.asarray(ctx.param(op, name, default), np.float32)
        return mx.array(value.reshape(shape) if value.ndim else value)

    scale, zero = per_axis("scale", 1.0), per_axis("zero_point", 0.0)
    return Kernel(lambda x: (x.astype(F32) - zero) * scale, (op.input,))


@register("select")
def _select(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(lambda c, a, b: mx.where(c.astype(mx.bool_), a, b), (op.cond, op.a, op.b))


@register("cast")
def _cast(op: Operation, ctx: BuildContext) -> Kernel:
    target = mx_dtype(op.outputs[0].dtype)
    if target == mx.bool_:
        return Kernel(lambda x: mx.not_equal(x, 0), (op.x,))
    return Kernel(lambda x: x.astype(target), (op.x,))


# --------------------------------------------------------------------------------------------
# Reductions and normalisation


def _reduce_fn(op_type: str) -> KernelFn:
    table: dict[str, KernelFn] = {
        "reduce_sum": lambda x, ax, kd: mx.sum(up(x), axis=ax, keepdims=kd),
        "reduce_mean": lambda x, ax, kd: mx.mean(up(x), axis=ax, keepdims=kd),
        "reduce_prod": lambda x, ax, kd: mx.prod(up(x), axis=ax, keepdims=kd),
        "reduce_max": lambda x, ax, kd: mx.max(x, axis=ax, keepdims=kd),
        "reduce_min": lambda x, ax, kd: mx.min(x, axis=ax, keepdims=kd),
        "reduce_l1_norm": lambda x, ax, kd: mx.sum(mx.abs(up(x)), axis=ax, keepdims=kd),
        "reduce_l2_norm": lambda x, ax, kd: mx.sqrt(mx.sum(mx.square(up(x)), axis=ax, keepdims=kd)),
        "reduce_sum_square": lambda x, ax, kd: mx.sum(mx.square(up(x)), axis=ax, keepdims=kd),
        "reduce_log_sum": lambda x, ax, kd: mx.log(mx.sum(up(x), axis=ax, keepdims=kd)),
        "reduce_log_sum_exp": lambda x, ax, kd: mx.logsumexp(up(x), axis=ax, keepdims=kd),
    }
    return table[op_type]


@register(
    "reduce_sum",
    "reduce_mean",
    "reduce_prod",
    "reduce_max",
    "reduce_min",
    "reduce_l1_norm",
    "reduce_l2_norm",
    "reduce_sum_square",
    "reduce_log_sum",
    "reduce_log_sum_exp",
)
def _reduce(op: Operation, ctx: BuildContext) -> Kernel:
    axes = _axes(ctx.param(op, "axes"), op.x.rank)
    keep = bool(ctx.param(op, "keep_dims", False))
    fn = _reduce_fn(op.op_type)
    return Kernel(lambda x: fn(x, axes, keep), (op.x,))


@register("reduce_argmax", "reduce_argmin")
def _arg_reduce(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", -1), op.x.rank)
    keep = bool(ctx.param(op, "keep_dims", False))
    fn = mx.argmax if op.op_type == "reduce_argmax" else mx.argmin
    return Kernel(lambda x: fn(x, axis=axis, keepdims=keep), (op.x,))


@register("softmax")
def _softmax(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", -1), op.x.rank)
    return Kernel(lambda x: mx.softmax(up(x), axis=axis), (op.x,))


@register("layer_norm")
def _layer_norm(op: Operation, ctx: BuildContext) -> Kernel:
    rank = op.x.rank
    axes = _axes(ctx.param(op, "axes"), rank) or tuple(range(rank))
    eps = float(_scalar(ctx.param(op, "epsilon", 1e-5)))
    norm_shape = [op.x.shape[i] if i in axes else 1 for i in range(rank)]
    gamma = _static_f32(ctx, op.inputs.get("gamma"), norm_shape)
    beta = _static_f32(ctx, op.inputs.get("beta"), norm_shape)

    def kernel(x: Array) -> Array:
        x = up(x)
        centered = x - mx.mean(x, axis=axes, keepdims=True)
        y = centered * mx.rsqrt(mx.mean(mx.square(centered), axis=axes, keepdims=True) + eps)
        if gamma is not None:
            y = y * gamma
        if beta is not None:
            y = y + beta
        return y

    return Kernel(kernel, (op.x,))


def _static_f32(ctx: BuildContext, var: Var | None, shape: Sequence[int]) -> Array | None:
    value = ctx.static(var)
    if value is None:
        return None
    return mx.array(np.asarray(value, dtype=np.float32).reshape(shape))


@register("l2_norm")
def _l2_norm(op: Operation, ctx: BuildContext) -> Kernel:
    eps = float(_scalar(ctx.param(op, "epsilon", 1e-6)))
    # MIL normalises over the last three dims (all dims for rank <= 3)
    axes = tuple(range(max(0, op.x.rank - 3), op.x.rank))

    def kernel(x: Array) -> Array:
        x = up(x)
        return x * mx.rsqrt(mx.sum(mx.square(x), axis=axes, keepdims=True) + eps)

    return Kernel(kernel, (op.x,))


@register("batch_norm", "instance_norm")
def _channel_norm(op: Operation, ctx: BuildContext) -> Kernel:
    rank = op.x.rank
    channel_shape = [1, -1] + [1] * (rank - 2)
    eps = float(_scalar(ctx.param(op, "epsilon", 1e-5)))
    gamma = ctx.static(op.inputs.get("gamma"))
    beta = ctx.static(op.inputs.get("beta"))
    g = None if gamma is None else mx.array(np.asarray(gamma, np.float32).reshape(channel_shape))
    b = None if beta is None else mx.array(np.asarray(beta, np.float32).reshape(channel_shape))
    if op.op_type == "batch_norm":
        mean = mx.array(np.asarray(ctx.param(op, "mean"), np.float32).reshape(channel_shape))
        var = mx.array(np.asarray(ctx.param(op, "variance"), np.float32).reshape(channel_shape))

        def stats(x: Array) -> tuple[Array, Array]:
            return mean, var
    else:
        spatial = tuple(range(2, rank))

        def stats(x: Array) -> tuple[Array, Array]:
            m = mx.mean(x, axis=spatial, keepdims=True)
            return m, mx.mean(mx.square(x - m), axis=spatial, keepdims=True)

    def kernel(x: Array) -> Array:
        x = up(x)
        m, v = stats(x)
        y = (x - m) * mx.rsqrt(v + eps)
        y = y if g is None else y * g
        return y if b is None else y + b

    return Kernel(kernel, (op.x,))


@register("cumsum")
def _cumsum(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", 0), op.x.rank)
    exclusive = bool(ctx.param(op, "exclusive", False))
    reverse = bool(ctx.param(op, "reverse", False))
    return Kernel(lambda x: mx.cumsum(up(x), axis=axis, reverse=reverse, inclusive=not exclusive), (op.x,))


# --------------------------------------------------------------------------------------------
# Matrix products and attention


def host_matmul(a: Array | np.ndarray, b: Array | np.ndarray, bias: np.ndarray | None = None) -> Array:
    """``a @ b (+ bias)`` in float32 on numpy's BLAS, returned as an MLX array (rounded later, once).

    Why not MLX: the Linux ``mlx[cpu]`` wheel links the reference netlib BLAS, which measured
    30-50x slower than numpy's OpenBLAS for these shapes (576x1536 by 64 columns: 20 ms vs
    0.65 ms), and weight products are nearly all of an export's compute.  fp16 operands widen to
    fp32 exactly, so this is the same arithmetic as an fp32-accumulating fp16 matmul.  It needs the
    operands on the host, so it evaluates them (MLX is lazy) before it runs.
    """
    y = np.matmul(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
    if bias is not None:
        y += bias
    return mx.array(y)


@register("linear")
def _linear(op: Operation, ctx: BuildContext) -> Kernel:
    w_t = ctx.host_matrix(op.weight).T  # a strided view; BLAS reads it transposed, no copy
    bias = op.inputs.get("bias")
    b = None if bias is None else ctx.host_matrix(bias)
    return Kernel(lambda x: host_matmul(x, w_t, b), (op.x,))


@register("matmul")
def _matmul(op: Operation, ctx: BuildContext) -> Kernel:
    tx = bool(ctx.param(op, "transpose_x", False)) and op.x.rank >= 2
    ty = bool(ctx.param(op, "transpose_y", False)) and op.y.rank >= 2

    def kernel(x: Array, y: Array) -> Array:
        if tx:
            x = mx.swapaxes(x, -1, -2)
        if ty:
            y = mx.swapaxes(y, -1, -2)
        if x.dtype in (mx.float16, F32) and y.dtype in (mx.float16, F32):
            return host_matmul(x, y)
        return mx.matmul(x, y)

    return Kernel(kernel, (op.x, op.y))


@register("einsum")
def _einsum(op: Operation, ctx: BuildContext) -> Kernel:
    equation = str(ctx.param(op, "equation"))
    values = tuple(op.values)
    return Kernel(lambda *xs: mx.einsum(equation, *xs), values)


@register("scaled_dot_product_attention")
def _sdpa(op: Operation, ctx: BuildContext) -> Kernel:
    scale = 1.0 / math.sqrt(op.query.shape[-1])
    mask_var = op.inputs.get("attn_mask")
    args: tuple[Var, ...] = (op.query, op.key, op.value)
    if mask_var is not None:
        args = args + (mask_var,)
    bool_mask = mask_var is not None and mask_var.dtype == types.bool

    def kernel(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
        scores = mx.matmul(up(q), mx.swapaxes(up(k), -1, -2)) * scale
        if mask is not None:
            scores = mx.where(mask, scores, -mx.inf) if bool_mask else scores + up(mask)
        return mx.matmul(mx.softmax(scores, axis=-1), up(v))

    return Kernel(kernel, args)


# --------------------------------------------------------------------------------------------
# Convolution


def _same_padding(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    lower: bool,
) -> tuple[list[int], list[int]]:
    lo, hi = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        eff = (k - 1) * d + 1
        total = max(0, s * math.ceil(size / s) - size + eff - s)
        small, big = total // 2, total - total // 2
        lo.append(big if lower else small)
        hi.append(small if lower else big)
    return lo, hi


@register("conv")
def _conv(op: Operation, ctx: BuildContext) -> Kernel:
    n_spatial = op.x.rank - 2
    strides = [int(s) for s in ctx.param(op, "strides", [1] * n_spatial)]
    dilations = [int(d) for d in ctx.param(op, "dilations", [1] * n_spatial)]
    groups = int(_scalar(ctx.param(op, "groups", 1)))
    pad_type = str(ctx.param(op, "pad_type", "valid"))
    pad = [int(p) for p in ctx.param(op, "pad", [0] * 2 * n_spatial)]
    weight = ctx.static(op.weight)
    kernel_size = list(op.weight.shape[2:])
    pointwise = all(k == 1 for k in kernel_size) and all(s == 1 for s in strides)
    if pad_type == "custom" and any(pad):
        pointwise = False
    if pointwise and weight is not None:
        return _pointwise_conv(op, ctx, groups)
    return _general_conv(op, ctx, strides, dilations, groups, pad_type, pad)


def _pointwise_conv(op: Operation, ctx: BuildContext, groups: int) -> Kernel:
    """1x1 conv (the ANE's Linear) as one matmul in NC* layout: no layout transposes."""
    if groups == 1:  # the common case, on the host's BLAS (see host_matmul)
        w32 = ctx.host_matrix(op.weight)
        w32 = w32.reshape(w32.shape[0], -1)
        bias = op.inputs.get("bias")
        b32 = None if bias is None else ctx.host_matrix(bias).reshape(-1, 1)

        def blas_kernel(x: Array) -> Array:
            n, spatial = x.shape[0], x.shape[2:]
            y = host_matmul(w32, x.reshape(n, x.shape[1], -1), b32)
            return y.reshape(n, w32.shape[0], *spatial)

        return Kernel(blas_kernel, (op.x,))
    w = ctx.array(op.weight)
    c_out, c_in_g = w.shape[0], w.shape[1]
    w = w.reshape(groups, c_out // groups, c_in_g) if groups > 1 else w.reshape(c_out, c_in_g)
    bias = op.inputs.get("bias")
    b = None
    if bias is not None:
        b = ctx.array(bias).reshape((groups, c_out // groups, 1) if groups > 1 else (c_out, 1))

    def kernel(x: Array) -> Array:
        n, spatial = x.shape[0], x.shape[2:]
        xs = x.reshape(n, groups, c_in_g, -1) if groups > 1 else x.reshape(n, c_in_g * groups, -1)
        y = mx.matmul(w, xs) if b is None else mx.addmm(b, w, xs)
        return y.reshape(n, c_out, *spatial)

    return Kernel(kernel, (op.x,))


def _general_conv(
    op: Operation,
    ctx: BuildContext,
    strides: list[int],
    dilations: list[int],
    groups: int,
    pad_type: str,
    pad: list[int],
) -> Kernel:
    """Any conv via MLX's channels-last conv_general, computed in fp32."""
    n_spatial = op.x.rank - 2
    to_last = (0, *range(2, n_spatial + 2), 1)
    to_first = (0, n_spatial + 1, *range(1, n_spatial + 1))
    kernel_size = list(op.weight.shape[2:])
    static_w = ctx.static(op.weight)
    w_last = None if static_w is None else mx.array(np.asarray(static_w, np.float32).transpose(to_last))
    bias = ctx.static(op.inputs.get("bias"))
    b = None if bias is None else mx.array(np.asarray(bias, np.float32))

    def padding(spatial: Sequence[int]) -> tuple[list[int], list[int]]:
        if pad_type in ("same", "same_lower"):
            return _same_padding(spatial, kernel_size, strides, dilations, pad_type == "same_lower")
        if pad_type == "custom":
            return pad[0::2], pad[1::2]
        return [0] * n_spatial, [0] * n_spatial

    def run(x: Array, w: Array) -> Array:
        y = mx.conv_general(
            up(x).transpose(to_last),
            w,
            stride=strides,
            padding=padding(x.shape[2:]),
            kernel_dilation=dilations,
            groups=groups,
        )
        if b is not None:
            y = y + b
        return y.transpose(to_first)

    if w_last is not None:
        return Kernel(lambda x: run(x, w_last), (op.x,))
    return Kernel(lambda x, w: run(x, up(w).transpose(to_last)), (op.x, op.weight))


# --------------------------------------------------------------------------------------------
# Shape manipulation


@register("reshape")
def _reshape(op: Operation, ctx: BuildContext) -> Kernel:
    declared = static_shape(op.outputs[0])
    if is_fully_static(declared):
        return Kernel(lambda x: x.reshape(declared), (op.x,))
    shape = ctx.static(op.shape)
    if shape is None:
        return Kernel(lambda x, s: x.reshape(_resolve_reshape(x.shape, np.array(s))), (op.x, op.shape))
    target = [int(s) for s in shape]
    return Kernel(lambda x: x.reshape(_resolve_reshape(x.shape, target)), (op.x,))


def _resolve_reshape(in_shape: Sequence[int], shape: Sequence[int]) -> list[int]:
    """iOS17 reshape: a 0 copies the input dim aligned from the right (1 if none), -1 is inferred."""
    out = []
    for i, s in enumerate(shape):
        if int(s) == 0:
            j = len(in_shape) - (len(shape) - i)
            out.append(in_shape[j] if j >= 0 else 1)
        else:
            out.append(int(s))
    return out


@register("transpose")
def _transpose(op: Operation, ctx: BuildContext) -> Kernel:
    perm = [int(p) for p in ctx.param(op, "perm")]
    return Kernel(lambda x: mx.transpose(x, perm), (op.x,))


@register("expand_dims")
def _expand_dims(op: Operation, ctx: BuildContext) -> Kernel:
    out_rank = op.x.rank + len(np.atleast_1d(ctx.param(op, "axes")))
    axes = sorted(_axis(a, out_rank) for a in np.atleast_1d(ctx.param(op, "axes")))
    return Kernel(lambda x: mx.expand_dims(x, axes), (op.x,))


@register("squeeze")
def _squeeze(op: Operation, ctx: BuildContext) -> Kernel:
    axes = _axes(ctx.param(op, "axes"), op.x.rank)
    if axes is None:
        return Kernel(mx.squeeze, (op.x,))
    return Kernel(lambda x: mx.squeeze(x, axes), (op.x,))


@register("flatten2d")
def _flatten2d(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", 1), op.x.rank)
    return Kernel(lambda x: x.reshape(math.prod(x.shape[:axis]), -1), (op.x,))


@register("concat")
def _concat(op: Operation, ctx: BuildContext) -> Kernel:
    values = tuple(op.values)
    axis = _axis(ctx.param(op, "axis"), values[0].rank)
    if bool(ctx.param(op, "interleave", False)):

        def interleave(*xs: Array) -> Array:
            stacked = mx.stack(xs, axis=axis + 1)
            shape = list(xs[0].shape)
            shape[axis] *= len(xs)
            return stacked.reshape(shape)

        return Kernel(interleave, values)
    return Kernel(lambda *xs: mx.concatenate(xs, axis=axis), values)


@register("stack")
def _stack(op: Operation, ctx: BuildContext) -> Kernel:
    values = tuple(op.values)
    axis = _axis(ctx.param(op, "axis"), values[0].rank + 1)
    return Kernel(lambda *xs: mx.stack(xs, axis=axis), values)


@register("split")
def _split(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis"), op.x.rank)
    sizes = [int(o.shape[axis]) for o in op.outputs]
    bounds = np.cumsum(sizes)[:-1].tolist()
    return Kernel(lambda x: tuple(mx.split(x, bounds, axis=axis)), (op.x,))


@register("tile")
def _tile(op: Operation, ctx: BuildContext) -> Kernel:
    reps = ctx.static(op.reps)
    if reps is None:
        return Kernel(lambda x, r: mx.tile(x, np.array(r).tolist()), (op.x, op.reps))
    reps_list = [int(r) for r in reps]
    return Kernel(lambda x: mx.tile(x, reps_list), (op.x,))


@register("reverse")
def _reverse(op: Operation, ctx: BuildContext) -> Kernel:
    axes = _axes(ctx.param(op, "axes"), op.x.rank)
    axes = tuple(range(op.x.rank)) if axes is None else axes
    index = tuple(slice(None, None, -1) if i in axes else slice(None) for i in range(op.x.rank))
    return Kernel(lambda x: x[index], (op.x,))


@register("shape")
def _shape(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(lambda x: mx.array(x.shape, dtype=mx.int32), (op.x,))


@register("pad")
def _pad(op: Operation, ctx: BuildContext) -> Kernel:
    mode = str(ctx.param(op, "mode", "constant"))
    value = _scalar(ctx.param(op, "constant_val", 0.0))
    rank = op.x.rank
    pads = ctx.static(op.pad)

    def widths(p: Sequence[int]) -> list[tuple[int, int]]:
        p = [int(v) for v in p]
        lead = rank - len(p) // 2
        return [(0, 0)] * lead + [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]

    def run(x: Array, w: list[tuple[int, int]]) -> Array:
        if mode == "constant":
            return mx.pad(x, w, constant_values=value)
        np_mode = {"reflect": "reflect", "replicate": "edge"}[mode]
        for axis, (lo, hi) in enumerate(w):
            if lo or hi:
                idx = np.pad(np.arange(x.shape[axis]), (lo, hi), mode=np_mode)
                x = mx.take(x, mx.array(idx.astype(np.int32)), axis=axis)
        return x

    if mode not in ("constant", "reflect", "replicate"):
        raise UnsupportedError(f"pad mode {mode} in function {ctx.function}")
    if pads is None:
        return Kernel(lambda x, p: run(x, widths(np.array(p))), (op.x, op.pad))
    static_widths = widths(pads)
    return Kernel(lambda x: run(x, static_widths), (op.x,))


@register("band_part")
def _band_part(op: Operation, ctx: BuildContext) -> Kernel:
    lower = int(_scalar(ctx.param(op, "lower", -1)))
    upper = int(_scalar(ctx.param(op, "upper", -1)))

    def kernel(x: Array) -> Array:
        m, n = x.shape[-2], x.shape[-1]
        rows = mx.arange(m).reshape(m, 1)
        cols = mx.arange(n).reshape(1, n)
        keep = mx.ones((m, n), dtype=mx.bool_)
        if lower >= 0:
            keep = keep & (rows - cols <= lower)
        if upper >= 0:
            keep = keep & (cols - rows <= upper)
        return mx.where(keep, x, mx.zeros_like(x))

    return Kernel(kernel, (op.x,))


# --------------------------------------------------------------------------------------------
# Creation


@register("fill")
def _fill(op: Operation, ctx: BuildContext) -> Kernel:
    dtype = mx_dtype(op.outputs[0].dtype)
    value = _scalar(ctx.param(op, "value", 0.0))
    shape = ctx.static(op.shape)
    if shape is None:
        return Kernel(lambda s: mx.full(np.array(s).tolist(), value, dtype=dtype), (op.shape,))
    dims = [int(d) for d in shape]
    return Kernel(lambda: mx.full(dims, value, dtype=dtype), ())


@register("fill_like")
def _fill_like(op: Operation, ctx: BuildContext) -> Kernel:
    dtype = mx_dtype(op.outputs[0].dtype)
    value = _scalar(ctx.param(op, "value", 0.0))
    return Kernel(lambda ref: mx.full(ref.shape, value, dtype=dtype), (op.ref_tensor,))


@register("range_1d")
def _range_1d(op: Operation, ctx: BuildContext) -> Kernel:
    dtype = mx_dtype(op.outputs[0].dtype)

    def kernel(end: Array, start: Array, step: Array) -> Array:
        return mx.arange(start.item(), end.item(), step.item(), dtype=dtype)

    return Kernel(kernel, (op.end, op.start, op.step))


# --------------------------------------------------------------------------------------------
# Gather and sort


@register("gather")
def _gather(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", 0), op.x.rank)
    batch_dims = int(_scalar(ctx.param(op, "batch_dims", 0)))
    if batch_dims == 0:
        return Kernel(lambda x, i: mx.take(x, i.astype(mx.int32), axis=axis), (op.x, op.indices))

    def batched(x: Array, i: Array) -> Array:
        lead = x.shape[:batch_dims]
        xb = x.reshape(-1, *x.shape[batch_dims:])
        ib = i.astype(mx.int32).reshape(-1, *i.shape[batch_dims:])
        parts = [mx.take(xb[b], ib[b], axis=axis - batch_dims) for b in range(xb.shape[0])]
        out = mx.stack(parts)
        return out.reshape(*lead, *out.shape[1:])

    return Kernel(batched, (op.x, op.indices))


@register("gather_along_axis")
def _gather_along_axis(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", 0), op.x.rank)
    return Kernel(lambda x, i: mx.take_along_axis(x, i.astype(mx.int32), axis=axis), (op.x, op.indices))


@register("gather_nd")
def _gather_nd(op: Operation, ctx: BuildContext) -> Kernel:
    if int(_scalar(ctx.param(op, "batch_dims", 0))) != 0:
        raise UnsupportedError(f"gather_nd with batch_dims in function {ctx.function}")

    def kernel(x: Array, i: Array) -> Array:
        i = i.astype(mx.int32)
        return x[tuple(i[..., k] for k in range(i.shape[-1]))]

    return Kernel(kernel, (op.x, op.indices))


def _descending_order(x: Array, axis: int, ascending: bool) -> Array:
    """argsort, descending unless ``ascending`` (negated keys; unsigned ints widened first)."""
    if ascending:
        return mx.argsort(x, axis=axis)
    keys = up(x) if x.dtype in (mx.float16, F32) else x.astype(mx.int32)
    return mx.argsort(-keys, axis=axis)


@register("topk")
def _topk(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", -1), op.x.rank)
    k = int(_scalar(ctx.param(op, "k", 1)))
    ascending = bool(ctx.param(op, "ascending", False))
    with_indices = bool(ctx.param(op, "return_indices", True))
    k = op.x.shape[axis] if k == -1 else k
    index = tuple(slice(0, k) if i == axis else slice(None) for i in range(op.x.rank))

    def kernel(x: Array) -> Array | tuple[Array, Array]:
        order = _descending_order(x, axis, ascending)[index]
        values = mx.take_along_axis(x, order, axis=axis)
        return (values, order) if with_indices else values

    return Kernel(kernel, (op.x,))


@register("argsort")
def _argsort(op: Operation, ctx: BuildContext) -> Kernel:
    axis = _axis(ctx.param(op, "axis", -1), op.x.rank)
    ascending = bool(ctx.param(op, "ascending", False))
    return Kernel(lambda x: _descending_order(x, axis, ascending), (op.x,))


# --------------------------------------------------------------------------------------------
# Slicing


@dataclass(frozen=True)
class _SliceSpec:
    """The constant part of a slice_by_index / slice_update."""

    rank: int
    stride: tuple[int, ...]
    begin_mask: tuple[bool, ...]
    end_mask: tuple[bool, ...]
    squeeze_mask: tuple[bool, ...]

    @classmethod
    def of(cls, op: Operation, ctx: BuildContext) -> _SliceSpec:
        rank = op.x.rank

        def flags(name: str) -> tuple[bool, ...]:
            return tuple(bool(v) for v in ctx.param(op, name, [False] * rank))

        stride = tuple(int(s) for s in ctx.param(op, "stride", [1] * rank))
        return cls(rank, stride, flags("begin_mask"), flags("end_mask"), flags("squeeze_mask"))

    @property
    def unit_stride(self) -> bool:
        return all(s == 1 or sq for s, sq in zip(self.stride, self.squeeze_mask))

    def slices(self, begin: Sequence[int], end: Sequence[int]) -> tuple[slice, ...]:
        """numpy slices for concrete begin/end (pure indexing kept as length-1 slices)."""
        out = []
        for i in range(self.rank):
            b = None if self.begin_mask[i] else int(begin[i])
            if self.squeeze_mask[i]:
                b = b or 0
                out.append(slice(b, b + 1 if b != -1 else None))
                continue
            e = None if self.end_mask[i] else int(end[i])
            out.append(slice(b, e, self.stride[i]))
        return tuple(out)

    def squeeze_axes(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.squeeze_mask) if s)


class _Starts:
    """Builds run-time start indices for MLX's dynamic slice / slice_update.

    Masked dims start at 0, negative begins wrap, and starts are clamped so the region stays
    inside ``x`` (MLX does not bounds-check dynamic slices; Core ML's behaviour out of range is
    undefined anyway).  The constant index arrays are made once, at load.
    """

    def __init__(self, spec: _SliceSpec, dims: Sequence[int], sizes: Sequence[int]) -> None:
        self.dims = mx.array(list(dims), dtype=mx.int32)
        self.masked = mx.array(list(spec.begin_mask))
        self.limit = mx.array([d - s for d, s in zip(dims, sizes)], dtype=mx.int32)

    def __call__(self, begin: Array) -> Array:
        begin = begin.astype(mx.int32)
        begin = mx.where(begin < 0, begin + self.dims, begin)
        begin = mx.where(self.masked, 0, begin)
        return mx.clip(begin, 0, self.limit)


def _static_extent(op: Operation, ctx: BuildContext) -> list[int] | None:
    """Slice sizes known at load although begin is not: ``end = add(begin, const)``."""
    end_op = op.end.op
    if end_op is None or end_op.op_type != "add":
        return None
    for a, b in ((end_op.x, end_op.y), (end_op.y, end_op.x)):
        if a is op.begin and ctx.static(b) is not None:
            return [int(v) for v in np.broadcast_to(ctx.static(b), (op.x.rank,))]
    return None


def _dynamic_sizes(op: Operation, ctx: BuildContext, spec: _SliceSpec) -> list[int] | None:
    """Per-dim sizes of a slice whose begin is only known at run time, when fixed at load."""
    dims = static_shape(op.x)
    extent = _static_extent(op, ctx)
    declared = list(static_shape(op.outputs[0]))
    for axis in spec.squeeze_axes():
        declared.insert(axis, 1)
    sizes: list[int | None] = []
    for i in range(spec.rank):
        if spec.squeeze_mask[i]:
            sizes.append(1)
        elif spec.begin_mask[i] and spec.end_mask[i]:
            sizes.append(dims[i])
        elif extent is not None and not spec.begin_mask[i] and not spec.end_mask[i]:
            sizes.append(extent[i])
        else:
            sizes.append(declared[i])
    return sizes if is_fully_static(sizes) else None  # type: ignore[return-value]


@register("slice_by_index")
def _slice_by_index(op: Operation, ctx: BuildContext) -> Kernel:
    spec = _SliceSpec.of(op, ctx)
    squeeze = spec.squeeze_axes()
    begin, end = ctx.static(op.begin), ctx.static(op.end)

    def take(x: Array, b: Sequence[int], e: Sequence[int]) -> Array:
        y = x[spec.slices(b, e)]
        return mx.squeeze(y, squeeze) if squeeze else y

    if begin is not None and end is not None:
        index = spec.slices(begin, end)
        if squeeze:
            return Kernel(lambda x: mx.squeeze(x[index], squeeze), (op.x,))
        return Kernel(lambda x: x[index], (op.x,))

    dims = static_shape(op.x)
    sizes = _dynamic_sizes(op, ctx, spec)
    if sizes is not None and spec.unit_stride and is_fully_static(dims):
        starts = _Starts(spec, dims, sizes)
        axes = tuple(range(spec.rank))
        out_shape = [s for i, s in enumerate(sizes) if i not in squeeze]
        return Kernel(lambda x, b: mx.slice(x, starts(b), axes, sizes).reshape(out_shape), (op.x, op.begin))
    return Kernel(
        lambda x, b, e: take(x, np.array(b).tolist(), np.array(e).tolist()), (op.x, op.begin, op.end)
    )


@register("slice_by_size")
def _slice_by_size(op: Operation, ctx: BuildContext) -> Kernel:
    size = ctx.static(op.size)
    begin = ctx.static(op.begin)
    rank = op.x.rank

    def index(b: Sequence[int], s: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(int(bi), None if int(si) == -1 else int(bi) + int(si)) for bi, si in zip(b, s))

    if begin is not None and size is not None:
        idx = index(begin, size)
        return Kernel(lambda x: x[idx], (op.x,))
    dims = static_shape(op.x)
    if size is not None and -1 not in [int(s) for s in size] and is_fully_static(dims):
        sizes = [int(s) for s in size]
        no = (False,) * rank
        starts = _Starts(_SliceSpec(rank, (1,) * rank, no, no, no), dims, sizes)
        axes = tuple(range(rank))
        return Kernel(lambda x, b: mx.slice(x, starts(b), axes, sizes), (op.x, op.begin))
    return Kernel(
        lambda x, b, s: x[index(np.array(b).tolist(), np.array(s).tolist())], (op.x, op.begin, op.size)
    )


@register("slice_update")
def _slice_update(op: Operation, ctx: BuildContext) -> Kernel:
    spec = _SliceSpec.of(op, ctx)
    squeeze = spec.squeeze_axes()
    begin, end = ctx.static(op.begin), ctx.static(op.end)
    dims = static_shape(op.x)
    axes = tuple(range(spec.rank))
    region = list(static_shape(op.update))
    for axis in squeeze:
        region.insert(axis, 1)

    def assign(x: Array, update: Array, b: Sequence[int], e: Sequence[int]) -> Array:
        out = mx.array(x)  # a fresh handle: item assignment must not alter x's other users
        index = spec.slices(b, e)
        out[index] = update.reshape(out[index].shape)
        return out

    if spec.unit_stride and is_fully_static(dims) and is_fully_static(region):
        # the usual KV-cache write: a fixed-size region at a (possibly run-time) start
        starts = _Starts(spec, dims, region)
        if begin is not None:
            start = starts(mx.array(np.asarray(begin, dtype=np.int32)))
            return Kernel(lambda x, u: mx.slice_update(x, u.reshape(region), start, axes), (op.x, op.update))
        return Kernel(
            lambda x, u, b: mx.slice_update(x, u.reshape(region), starts(b), axes),
            (op.x, op.update, op.begin),
        )
    if begin is not None and end is not None:
        b_static, e_static = [int(v) for v in begin], [int(v) for v in end]
        return Kernel(lambda x, u: assign(x, u, b_static, e_static), (op.x, op.update))
    return Kernel(
        lambda x, u, b, e: assign(x, u, np.array(b).tolist(), np.array(e).tolist()),
        (op.x, op.update, op.begin, op.end),
    )


# --------------------------------------------------------------------------------------------
# States


class StateCell:
    """One state during a run: reads and writes go to a dict keyed by the state's name.

    Reads see the latest write in program order, which is what the runtime does with the
    post-pass program (where a merged second read_state already points at the first read).
    """

    __slots__ = ("store", "name", "shape", "dtype")

    def __init__(self, store: dict[str, Array], name: str, shape: tuple[int, ...], dtype: mx.Dtype):
        self.store, self.name, self.shape, self.dtype = store, name, shape, dtype

    def read(self) -> Array:
        if self.name not in self.store:
            self.store[self.name] = mx.zeros(self.shape, dtype=self.dtype)
        return self.store[self.name]

    def write(self, value: Array) -> Array:
        value = value.astype(self.dtype) if value.dtype != self.dtype else value
        self.store[self.name] = value
        return value


@register("read_state")
def _read_state(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(lambda cell: cell.read(), (op.input,))


@register("coreml_update_state")
def _update_state(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(lambda cell, value: cell.write(value), (op.state, op.value))

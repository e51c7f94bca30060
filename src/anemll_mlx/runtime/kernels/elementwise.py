"""Elementwise kernels.

Numerics: ``add/sub/mul/real_div/maximum/...`` run natively in fp16 (IEEE fp16 arithmetic is
correctly rounded, which equals computing in fp32 and rounding once); everything with a
transcendental inside (exp, rsqrt, erf, silu, gelu, ...) is computed in fp32 and rounded once by
the executor, since MLX's native fp16 versions are not correctly rounded.
"""

from __future__ import annotations

import math

import mlx.core as mx
from coremltools.converters.mil.mil import Operation

from ...errors import UnsupportedError
from .core import Array, BuildContext, Kernel, KernelFn, mx_dtype, register, scalar, up

_NATIVE_BINARY: dict[str, KernelFn] = {
    "add": mx.add,
    "sub": mx.subtract,
    "mul": mx.multiply,
    "real_div": mx.divide,
    "maximum": mx.maximum,
    "minimum": mx.minimum,
    "equal": mx.equal,
    "not_equal": mx.not_equal,
    "greater": mx.greater,
    "greater_equal": mx.greater_equal,
    "less": mx.less,
    "less_equal": mx.less_equal,
    "logical_and": mx.logical_and,
    "logical_or": mx.logical_or,
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
    "tanh": mx.tanh,
    "erf": mx.erf,
    "sigmoid": mx.sigmoid,
    "silu": lambda x: x * mx.sigmoid(x),
    "sin": mx.sin,
    "cos": mx.cos,
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
    eps = float(scalar(ctx.param(op, "epsilon", 0.0)))
    fns: dict[str, KernelFn] = {
        "rsqrt": lambda x: mx.rsqrt(up(x) + eps),
        "inverse": lambda x: mx.reciprocal(up(x) + eps),
        "log": lambda x: mx.log(up(x) + eps),
    }
    return Kernel(fns[op.op_type], (op.x,))


@register("clip")
def _clip(op: Operation, ctx: BuildContext) -> Kernel:
    lo, hi = scalar(ctx.param(op, "alpha")), scalar(ctx.param(op, "beta"))
    return Kernel(lambda x: mx.minimum(mx.maximum(x, lo), hi), (op.x,))


@register("select")
def _select(op: Operation, ctx: BuildContext) -> Kernel:
    return Kernel(lambda c, a, b: mx.where(c.astype(mx.bool_), a, b), (op.cond, op.a, op.b))


@register("cast")
def _cast(op: Operation, ctx: BuildContext) -> Kernel:
    target = mx_dtype(op.outputs[0].dtype)
    if target == mx.bool_:
        return Kernel(lambda x: mx.not_equal(x, 0), (op.x,))
    return Kernel(lambda x: x.astype(target), (op.x,))



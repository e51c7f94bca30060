"""Reductions, softmax and layer_norm: computed in fp32, rounded once by the executor."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from coremltools.converters.mil.mil import Operation, Var

from .core import Array, BuildContext, Kernel, KernelFn, axes_of, axis_of, register, scalar, up


def _reduce_fn(op_type: str) -> KernelFn:
    table: dict[str, KernelFn] = {
        "reduce_sum": lambda x, ax, kd: mx.sum(up(x), axis=ax, keepdims=kd),
        "reduce_mean": lambda x, ax, kd: mx.mean(up(x), axis=ax, keepdims=kd),
        "reduce_max": lambda x, ax, kd: mx.max(x, axis=ax, keepdims=kd),
        "reduce_min": lambda x, ax, kd: mx.min(x, axis=ax, keepdims=kd),
        "reduce_sum_square": lambda x, ax, kd: mx.sum(mx.square(up(x)), axis=ax, keepdims=kd),
    }
    return table[op_type]


@register(
    "reduce_sum",
    "reduce_mean",
    "reduce_max",
    "reduce_min",
    "reduce_sum_square",
)
def _reduce(op: Operation, ctx: BuildContext) -> Kernel:
    axes = axes_of(ctx.param(op, "axes"), op.x.rank)
    keep = bool(ctx.param(op, "keep_dims", False))
    fn = _reduce_fn(op.op_type)
    return Kernel(lambda x: fn(x, axes, keep), (op.x,))


@register("reduce_argmax", "reduce_argmin")
def _arg_reduce(op: Operation, ctx: BuildContext) -> Kernel:
    axis = axis_of(ctx.param(op, "axis", -1), op.x.rank)
    keep = bool(ctx.param(op, "keep_dims", False))
    fn = mx.argmax if op.op_type == "reduce_argmax" else mx.argmin
    return Kernel(lambda x: fn(x, axis=axis, keepdims=keep), (op.x,))


@register("softmax")
def _softmax(op: Operation, ctx: BuildContext) -> Kernel:
    axis = axis_of(ctx.param(op, "axis", -1), op.x.rank)
    return Kernel(lambda x: mx.softmax(up(x), axis=axis), (op.x,))


@register("layer_norm")
def _layer_norm(op: Operation, ctx: BuildContext) -> Kernel:
    rank = op.x.rank
    axes = axes_of(ctx.param(op, "axes"), rank) or tuple(range(rank))
    eps = float(scalar(ctx.param(op, "epsilon", 1e-5)))
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

"""Weight products and attention: linear, matmul, 1x1 conv and scaled_dot_product_attention.

Weight products run in fp32 on a fast BLAS (``core.host_matmul``): fp16 operands widen exactly,
so this is the arithmetic of an fp32-accumulating fp16 matmul, rounded once by the executor.
"""

from __future__ import annotations

import math

import mlx.core as mx
from coremltools.converters.mil.mil import Operation, Var, types

from ...errors import UnsupportedError
from .core import F32, Array, BuildContext, Kernel, host_matmul, register, scalar, settled, up


@register("linear")
def _linear(op: Operation, ctx: BuildContext) -> Kernel:
    w_t = settled(ctx.host_matrix(op.weight).T)  # a strided view; BLAS reads it transposed, no copy
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


@register("conv")
def _conv(op: Operation, ctx: BuildContext) -> Kernel:
    """1x1 convolutions only (the ANE's Linear over (B, C, 1, T) or (B, C, T)), in ``groups``
    independent blocks of channels (the experts of a mixture-of-experts layer): nothing an LLM
    export emits needs more, and a general conv would be code no export exercises."""
    n_spatial = op.x.rank - 2
    strides = [int(s) for s in ctx.param(op, "strides", [1] * n_spatial)]
    groups = int(scalar(ctx.param(op, "groups", 1)))
    pad = [int(p) for p in ctx.param(op, "pad", [0] * 2 * n_spatial)]
    kernel_size = [int(k) for k in op.weight.shape[2:]]
    if any(k != 1 for k in kernel_size) or any(s != 1 for s in strides) or any(pad):
        raise UnsupportedError(
            f"op conv ({op.name}) in function {ctx.function}: only 1x1 convolutions with stride 1 run here "
            f"(kernel {kernel_size}, strides {strides})"
        )
    w32 = ctx.host_matrix(op.weight)
    out_channels = w32.shape[0]
    # (groups, out / groups, in / groups): group g maps its input channels to its output channels
    w32 = settled(w32.reshape(groups, out_channels // groups, -1) if groups > 1 else w32.reshape(out_channels, -1))
    bias = op.inputs.get("bias")
    b32 = None if bias is None else settled(ctx.host_matrix(bias).reshape(w32.shape[:-1] + (1,)))

    def kernel(x: Array) -> Array:
        n, spatial = x.shape[0], x.shape[2:]
        if groups == 1:
            y = host_matmul(w32, x.reshape(n, x.shape[1], -1), b32)
        else:
            y = host_matmul(w32, x.reshape(n, groups, x.shape[1] // groups, -1), b32)
        return y.reshape(n, out_channels, *spatial)

    return Kernel(kernel, (op.x,))

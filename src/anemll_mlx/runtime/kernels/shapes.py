"""Data movement: reshapes, concatenation and splits, gathers and top-k, slices and slice updates.

All exact.  Slices whose start is only known at run time (a KV-cache write at ``current_pos``)
compile to MLX's dynamic slice / slice_update with sizes fixed at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from coremltools.converters.mil.mil import Operation

from .core import (
    F32,
    Array,
    BuildContext,
    Kernel,
    axes_of,
    axis_of,
    is_fully_static,
    register,
    scalar,
    static_shape,
    up,
)


@register("reshape")
def _reshape(op: Operation, ctx: BuildContext) -> Kernel:
    declared = static_shape(op.outputs[0])
    if is_fully_static(declared):
        return Kernel(lambda x: x.reshape(declared), (op.x,))
    shape = ctx.static(op.shape)
    if shape is None:
        return Kernel(lambda x, s: x.reshape(_resolve_reshape(x.shape, np.array(s).tolist())), (op.x, op.shape))
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
    axes = sorted(axis_of(a, out_rank) for a in np.atleast_1d(ctx.param(op, "axes")))
    return Kernel(lambda x: mx.expand_dims(x, axes), (op.x,))


@register("squeeze")
def _squeeze(op: Operation, ctx: BuildContext) -> Kernel:
    axes = axes_of(ctx.param(op, "axes"), op.x.rank)
    if axes is None:
        return Kernel(mx.squeeze, (op.x,))
    return Kernel(lambda x: mx.squeeze(x, axes), (op.x,))


@register("concat")
def _concat(op: Operation, ctx: BuildContext) -> Kernel:
    values = tuple(op.values)
    axis = axis_of(ctx.param(op, "axis"), values[0].rank)
    if bool(ctx.param(op, "interleave", False)):

        def interleave(*xs: Array) -> Array:
            stacked = mx.stack(list(xs), axis=axis + 1)
            shape = list(xs[0].shape)
            shape[axis] *= len(xs)
            return stacked.reshape(shape)

        return Kernel(interleave, values)
    return Kernel(lambda *xs: mx.concatenate(list(xs), axis=axis), values)


@register("split")
def _split(op: Operation, ctx: BuildContext) -> Kernel:
    axis = axis_of(ctx.param(op, "axis"), op.x.rank)
    sizes = [int(o.shape[axis]) for o in op.outputs]
    bounds = np.cumsum(sizes)[:-1].tolist()
    return Kernel(lambda x: tuple(mx.split(x, bounds, axis=axis)), (op.x,))


# --------------------------------------------------------------------------------------------
# Gather and sort


@register("gather")
def _gather(op: Operation, ctx: BuildContext) -> Kernel:
    axis = axis_of(ctx.param(op, "axis", 0), op.x.rank)
    batch_dims = int(scalar(ctx.param(op, "batch_dims", 0)))
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
    axis = axis_of(ctx.param(op, "axis", 0), op.x.rank)
    return Kernel(lambda x, i: mx.take_along_axis(x, i.astype(mx.int32), axis=axis), (op.x, op.indices))


def _descending_order(x: Array, axis: int, ascending: bool) -> Array:
    """argsort, descending unless ``ascending`` (negated keys; unsigned ints widened first)."""
    if ascending:
        return mx.argsort(x, axis=axis)
    keys = up(x) if x.dtype in (mx.float16, F32) else x.astype(mx.int32)
    return mx.argsort(-keys, axis=axis)


@register("topk")
def _topk(op: Operation, ctx: BuildContext) -> Kernel:
    axis = axis_of(ctx.param(op, "axis", -1), op.x.rank)
    k = int(scalar(ctx.param(op, "k", 1)))
    ascending = bool(ctx.param(op, "ascending", False))
    with_indices = bool(ctx.param(op, "return_indices", True))
    k = op.x.shape[axis] if k == -1 else k
    index = tuple(slice(0, k) if i == axis else slice(None) for i in range(op.x.rank))

    def kernel(x: Array) -> Array | tuple[Array, Array]:
        order = _descending_order(x, axis, ascending)[index]
        values = mx.take_along_axis(x, order, axis=axis)
        return (values, order) if with_indices else values

    return Kernel(kernel, (op.x,))


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

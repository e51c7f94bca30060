"""States: ``read_state`` and ``coreml_update_state`` over a store the caller keeps across calls."""

from __future__ import annotations

import mlx.core as mx
from coremltools.converters.mil.mil import Operation

from .core import Array, BuildContext, Kernel, register


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

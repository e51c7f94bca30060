"""The executor's kernel machinery: dtypes, the constant pool, the build context, the registry.

Each supported MIL op type has a *builder*, registered by op type: called once at load time with
the pymil ``Operation``, it reads the op's constant attributes (axes, perm, epsilon, ...) and
returns a ``Kernel``, a plain closure over ``mx.array`` values plus the list of vars it reads at
run time.  Doing all attribute parsing at load is what keeps a decode step cheap: running a
function is a flat loop of closure calls.  The builders live in this package's other modules, one
per op family.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import mlx.core as mx
import numpy as np
from coremltools.converters.mil.mil import Operation, Var, types

from ... import blas
from ...errors import UnsupportedError

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
    return tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)


def is_fully_static(shape: Sequence[int | None]) -> TypeGuard[Sequence[int]]:
    return all(d is not None for d in shape)


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

    def host_matrix(self, value: np.ndarray) -> Any:
        """A weight in float32 where ``host_matmul`` computes: an MLX array with a fast BLAS under
        MLX, else a numpy array."""
        if PRODUCTS_ON_MLX:
            return self._shared(value, "host", lambda v: mx.array(v.astype(np.float32)))
        return self._shared(value, "host", lambda v: np.ascontiguousarray(v, dtype=np.float32))

    def _shared(self, value: np.ndarray, kind: str, make: Callable[[np.ndarray], Any]) -> Any:
        value = np.ascontiguousarray(value)
        if value.nbytes < self._DEDUPE_MIN_BYTES:
            return make(value)
        digest = hashlib.blake2b(value.view(np.uint8).data, digest_size=16).digest()
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
        """The load-time value of ``var`` (const, constexpr_* or folded by pymil), else None.

        A reshape of a static value is static too: coremltools' ``compose_conv1d`` pass squeezes
        a palettized conv weight at run time, and folding it here keeps that conv on the BLAS path.
        """
        if var is None:
            return None
        if var.val is not None:
            return var.val
        op = var.op
        if op is None:
            return None
        if op.op_type.startswith("constexpr_"):
            return self._materialize(op)
        if op.op_type == "dequantize" and op.can_materialize_val():
            return self._materialize(op)  # a weight stored quantized, like a constexpr
        if op.op_type in ("squeeze", "expand_dims", "reshape") and is_fully_static(static_shape(var)):
            source = self.static(op.x)
            return None if source is None else np.asarray(source).reshape(static_shape(var))
        return None

    def array(self, var: Var) -> Array:
        """The static value of ``var`` as an MLX array of its declared dtype (deduplicated)."""
        return self.pool.array(self._declared(var))

    def host_matrix(self, var: Var) -> Any:
        """The static value of ``var``, rounded to its declared dtype, in float32 where
        ``host_matmul`` computes (deduplicated)."""
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


def up(x: Array) -> Array:
    """fp16 -> fp32 for ops computed wide; other dtypes unchanged."""
    return x.astype(F32) if x.dtype == mx.float16 else x


def axis_of(axis: Any, rank: int) -> int:
    axis = int(axis)
    return axis + rank if axis < 0 else axis


def axes_of(axes: Any, rank: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(axis_of(a, rank) for a in np.atleast_1d(axes))


def scalar(value: Any) -> Any:
    return np.asarray(value).item()


# Where weight products run: on MLX when a fast BLAS is under it (macOS, or Linux with the OpenBLAS
# of ``blas.py``), else on numpy's BLAS (the Linux wheel's reference BLAS measured 30-50x slower
# than numpy's for these shapes, and weight products are nearly all of an export's compute).
PRODUCTS_ON_MLX = sys.platform != "linux" or blas.status().library is not None


def settled(value: Any) -> Any:
    """``value`` evaluated, if it is an MLX array a builder derived at load (a transposed or
    reshaped weight).  Left lazy it would belong to the loading thread's stream, and a driver may
    run on another thread than the one that opened it (compare runs its reference on a worker)."""
    if isinstance(value, mx.array):
        mx.eval(value)
    return value


def host_matmul(a: Any, b: Any, bias: Any = None) -> Array:
    """``a @ b (+ bias)`` in float32 (rounded later, once, by the executor).

    fp16 operands widen to fp32 exactly, so this is the same arithmetic as an fp32-accumulating
    fp16 matmul.  On MLX it stays lazy; on numpy it needs the operands on the host, so it
    evaluates them first.
    """
    if PRODUCTS_ON_MLX:
        y = mx.matmul(a.astype(F32) if a.dtype != F32 else a, b.astype(F32) if b.dtype != F32 else b)
        return y if bias is None else y + bias
    out = np.matmul(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
    if bias is not None:
        out += bias
    return mx.array(out)

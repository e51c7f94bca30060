"""Run a saved Core ML program (.mlpackage) off-Mac, on MLX.

Core ML cannot load or predict on Linux, so exports are verified by executing the package
ourselves.  We load it with coremltools' milproto loader, which gives the *post-pass* MIL program
that Core ML compiles (after ``ct.convert``'s graph passes, e.g. ``common::remove_redundant_ops``),
and run that program op by op on MLX.  Graph-level surprises from those passes therefore show up
here exactly as on device: two ``read_state`` ops of one state that the pass merged across a write
make the second read return the pre-write value, as the real runtime does.

Numeric model
-------------
* Every op's output is rounded to the op's declared dtype (fp16: round to nearest even, ``inf``
  on overflow), one rounding per op.  The executor casts after every op.
* Inside one op, arithmetic is at least fp32: matmul, linear and 1x1 convolutions accumulate in
  fp32 (fp16 operands widen exactly; bias is added before the single rounding), and reductions,
  softmax, layer_norm, transcendental functions (exp, rsqrt, erf, silu, gelu, ...) and
  scaled_dot_product_attention are computed in fp32 and rounded once.  Plain fp16 add/sub/mul/div
  run natively, which is bit-identical to computing in fp32 and rounding.
* Weights (``const``, ``constexpr_lut_to_dense``, ``constexpr_blockwise_shift_scale``, ...) are
  materialised once at load, in their declared dtype.

What it cannot know: the ANE's real accumulation width and transcendental approximations, which
ops Core ML places on the ANE, GPU or CPU (and the numerics of each), ops Core ML fuses or splits,
and programs that fail to compile or run on device.  Agreement here means the graph is right,
not that the ANE computes it to the last bit.

Every op's output shape is also checked against the shape the program declares (static dims),
so an executor bug or a malformed program fails at the op that caused it, not downstream.

Speed: each function is compiled at load into a flat list of closures over ``mx.array`` values
(no graph walking or attribute parsing per call), each slot released after its last reader.
Weight products (linear, 1x1 conv, matmul) run on numpy's BLAS in fp32 (see
``kernels.host_matmul``: the Linux MLX CPU wheel's reference BLAS is 30-50x slower), and KV-cache
writes reuse the state's buffer in place (``MILExecutor.run``), so a 135M-parameter decode step
is dominated by real arithmetic, not copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from coremltools.converters.mil.mil import Function, Operation, Var, types

from anemll_mlx.errors import BadArgumentError, CorruptModelError, UnsupportedError
from anemll_mlx.runtime.kernels import (
    BuildContext,
    ConstPool,
    Kernel,
    StateCell,
    builder_for,
    mx_dtype,
    np_dtype,
    static_shape,
)

Shape = tuple[int | None, ...]
Array = mx.array


@dataclass(frozen=True)
class _Step:
    """One compiled op: ``fn`` reads env slots ``args`` and writes ``outs`` (cast to ``dtypes``)."""

    fn: Any
    args: tuple[int, ...]
    outs: tuple[int, ...]
    dtypes: tuple[mx.Dtype, ...]
    shapes: tuple[Shape, ...]
    label: str
    frees: tuple[int, ...] = ()  # slots read for the last time here, released after the step


@dataclass
class _Program:
    """A function lowered to slots and steps: everything ``run`` needs, nothing pymil."""

    name: str
    inputs: dict[str, tuple[Shape, mx.Dtype, int]]  # name -> (shape, dtype, slot)
    states: dict[str, tuple[tuple[int, ...], mx.Dtype, int]]
    outputs: list[tuple[str, int]]
    base_env: list[Any]
    steps: list[_Step]


class MILExecutor:
    """Executes the functions of one Core ML package on MLX (see the module docstring)."""

    def __init__(self, programs: dict[str, _Program], pool: ConstPool) -> None:
        self._programs = programs
        self._pool = pool

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, package: str | Path) -> MILExecutor:
        """Load ``package`` and compile each function into closures; weights materialised once."""
        program, default = _load_pymil(Path(package))
        executor = cls.from_program(program)
        if default in executor._programs:  # the default function first, as Core ML picks it
            executor._programs = {default: executor._programs[default], **executor._programs}
        return executor

    @classmethod
    def from_program(cls, program: Any) -> MILExecutor:
        """Run a pymil ``Program`` directly (no save/load round trip).

        Handy for checking op semantics or a program before ``ct.convert``; note that it then
        runs the program *before* coremltools' passes, unlike ``load``.
        """
        pool = ConstPool()
        programs = {name: _lower(name, fn, pool) for name, fn in program.functions.items()}
        return cls(programs, pool)

    # -- description ----------------------------------------------------------------------------

    @property
    def functions(self) -> list[str]:
        """Function names: ``["main"]`` or the multifunction names (``infer``, ``prefill``...);
        a loaded package lists its default function first."""
        return list(self._programs)

    def inputs(self, function: str) -> dict[str, tuple[Shape, np.dtype]]:
        """Tensor inputs (states excluded): name -> (shape, numpy dtype); run-time dims are None."""
        prog = self._program(function)
        return {n: (shape, np_dtype(dt)) for n, (shape, dt, _) in prog.inputs.items()}

    @property
    def weight_bytes(self) -> int:
        """Bytes of materialised constants of 4 KiB or more (weights), deduplicated across
        functions: a multifunction package's shared weights count once.  Weights of matrix
        products are held in fp32 for the BLAS, so an fp16 package takes twice its file size."""
        return self._pool.nbytes

    def outputs(self, function: str) -> list[str]:
        return [name for name, _ in self._program(function).outputs]

    def states(self, function: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        prog = self._program(function)
        return {n: (shape, np_dtype(dt)) for n, (shape, dt, _) in prog.states.items()}

    # -- running --------------------------------------------------------------------------------

    def run(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray | Array],
        states: dict[str, Array] | None = None,
    ) -> dict[str, Array]:
        """Run ``function`` once; returns its outputs (evaluated) by name.

        ``states`` belongs to the caller and may be shared by several packages and functions
        (ANEMLL shares one KV cache across all chunks): reads come from ``states[name]``,
        ``coreml_update_state`` stores the new value back, and a missing state is created
        zero-filled.
        """
        prog = self._program(function)
        states = {} if states is None else states
        args = _prepare_inputs(prog, inputs)
        for name, (shape, dtype, _) in prog.states.items():
            if name not in states:
                states[name] = mx.zeros(shape, dtype=dtype)
            elif tuple(states[name].shape) != shape:
                raise BadArgumentError(
                    f"state {name} has shape {tuple(states[name].shape)}, function {function} "
                    f"declares {shape}"
                )
        # The states move into this run's own store and back at the end, so that nothing else
        # holds them while the program runs: MLX then writes a KV-cache slice_update into the
        # buffer in place (it donates an array no one else references) instead of copying the
        # whole cache for every layer.
        store = {name: states.pop(name) for name in prog.states}
        try:
            outs = _execute(prog, args, store)
            mx.eval(outs, list(store.values()))
        finally:
            states.update(store)
        return {name: value for (name, _), value in zip(prog.outputs, outs)}

    def _program(self, function: str) -> _Program:
        if function not in self._programs:
            raise BadArgumentError(f"no function {function!r}; the package has {self.functions}")
        return self._programs[function]


# ------------------------------------------------------------------------------------------------
# Loading and lowering


def _load_pymil(package: Path) -> tuple[Any, str]:
    """The post-pass pymil program of a saved package (what Core ML would compile), and the
    name of its default function."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    weights = package / "Data" / "com.apple.CoreML" / "weights"
    if not package.exists():
        raise CorruptModelError(f"{package}: no such package")
    try:
        spec = ct.utils.load_spec(str(package))
        program = milproto_load(spec, spec.specificationVersion, str(weights))
        return program, spec.description.defaultFunctionName or "main"
    except Exception as exc:  # protobuf, blob-reader and pymil type errors all mean "unreadable"
        raise CorruptModelError(f"{package}: cannot load the Core ML program ({exc})") from exc


def _lower(name: str, fn: Function, pool: ConstPool) -> _Program:
    """Turn one pymil function into slots + steps, materialising the constants it reads."""
    ctx = BuildContext(name, pool)
    slots: dict[int, int] = {}
    base_env: list[Any] = []

    def new_slot(var: Var, value: Any = None) -> int:
        slots[id(var)] = len(base_env)
        base_env.append(value)
        return slots[id(var)]

    inputs: dict[str, tuple[Shape, mx.Dtype, int]] = {}
    states: dict[str, tuple[tuple[int, ...], mx.Dtype, int]] = {}
    for input_name, var in fn.inputs.items():
        if types.is_state(var.sym_type):
            wrapped = var.sym_type.wrapped_type()
            shape = tuple(int(d) for d in wrapped.get_shape())
            states[input_name] = (shape, mx_dtype(wrapped.get_primitive()), new_slot(var))
        else:
            inputs[input_name] = (static_shape(var), mx_dtype(var.dtype), new_slot(var))

    def slot_of(var: Var) -> int:
        if id(var) not in slots:
            if ctx.static(var) is None:
                raise CorruptModelError(f"function {name}: {var.name} is used before it is defined")
            new_slot(var, ctx.array(var))
        return slots[id(var)]

    steps: list[_Step] = []
    for op in _live_ops(fn, ctx):
        kernel = _build(op, ctx)
        args = tuple(slot_of(v) for v in kernel.args)
        outs = tuple(new_slot(v) for v in op.outputs)
        steps.append(
            _Step(
                fn=kernel.fn,
                args=args,
                outs=outs,
                dtypes=tuple(mx_dtype(v.dtype) for v in op.outputs),
                shapes=tuple(static_shape(v) for v in op.outputs),
                label=f"{op.op_type} {op.name!r} in function {name}",
            )
        )
    outputs = [(var.name, slot_of(var)) for var in fn.outputs]
    return _Program(name, inputs, states, outputs, base_env, _with_frees(steps, outputs))


def _with_frees(steps: list[_Step], outputs: list[tuple[str, int]]) -> list[_Step]:
    """Mark in each step the slots it reads for the last time (outputs are kept to the end)."""
    last: dict[int, int] = {}
    for index, step in enumerate(steps):
        for slot in step.args:
            last[slot] = index
    keep = {slot for _, slot in outputs}
    frees: dict[int, list[int]] = {}
    for slot, index in last.items():
        if slot not in keep:
            frees.setdefault(index, []).append(slot)
    return [replace(step, frees=tuple(frees.get(i, ()))) for i, step in enumerate(steps)]


def _is_static(op: Operation, ctx: BuildContext) -> bool:
    """Ops whose outputs are known at load (const, constexpr, pymil-folded): never run."""
    if op.op_type in ("read_state", "coreml_update_state"):
        return False
    return all(ctx.static(v) is not None for v in op.outputs) if op.outputs else False


def _live_ops(fn: Function, ctx: BuildContext) -> list[Operation]:
    """The ops to execute, in program order: those feeding an output or a state write."""
    ops = [op for op in fn.operations if not _is_static(op, ctx)]
    needed = {id(v) for v in fn.outputs}
    live: list[Operation] = []
    for op in reversed(ops):
        if op.op_type == "coreml_update_state" or any(id(v) in needed for v in op.outputs):
            live.append(op)
            for var in op.get_flattened_inputs():
                needed.add(id(var))
    return live[::-1]


def _build(op: Operation, ctx: BuildContext) -> Kernel:
    builder = builder_for(op.op_type)
    if builder is None or op.blocks:
        raise UnsupportedError(
            f"MIL op {op.op_type!r} ({op.name}) in function {ctx.function} is not supported by "
            "the off-Mac executor"
        )
    return builder(op, ctx)


# ------------------------------------------------------------------------------------------------
# Running


def _prepare_inputs(prog: _Program, inputs: Mapping[str, np.ndarray | Array]) -> list[Array]:
    """Inputs as MLX arrays of the declared dtype, checked against the declared shapes."""
    missing = [n for n in prog.inputs if n not in inputs]
    extra = [n for n in inputs if n not in prog.inputs]
    if missing or extra:
        raise BadArgumentError(
            f"function {prog.name}: missing inputs {missing}, unknown inputs {extra}; "
            f"expected {list(prog.inputs)}"
        )
    arrays = []
    for name, (shape, dtype, _) in prog.inputs.items():
        value = inputs[name]
        array = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
        if array.dtype != dtype:
            array = array.astype(dtype)
        if not _shape_matches(tuple(array.shape), shape):
            raise BadArgumentError(
                f"function {prog.name}: input {name} has shape {tuple(array.shape)}, expected {shape}"
            )
        arrays.append(array)
    return arrays


def _shape_matches(actual: tuple[int, ...], declared: Shape) -> bool:
    return len(actual) == len(declared) and all(d is None or d == a for a, d in zip(actual, declared))


def _execute(prog: _Program, args: list[Array], store: dict[str, Array]) -> list[Array]:
    """One pass over the steps; ``store`` holds the states and receives their new values.

    Each slot is released after its last reader, so intermediate arrays (and old KV-cache
    values) are not kept alive longer than the program needs them.
    """
    env = list(prog.base_env)
    for (_, _, slot), value in zip(prog.inputs.values(), args):
        env[slot] = value
    for name, (shape, dtype, slot) in prog.states.items():
        env[slot] = StateCell(store, name, shape, dtype)
    step = None
    try:
        for step in prog.steps:
            result = step.fn(*[env[i] for i in step.args])
            if len(step.outs) == 1:
                result = (result,)
            for slot, value, dtype, declared in zip(step.outs, result, step.dtypes, step.shapes):
                if value.dtype != dtype:
                    value = value.astype(dtype)
                shape = tuple(value.shape)
                if shape != declared and not _shape_matches(shape, declared):  # equal: the common case
                    raise RuntimeError(f"produced shape {shape}, declared {declared}")
                env[slot] = value
            del result
            for slot in step.frees:
                env[slot] = None
    except Exception as exc:
        if step is not None:
            exc.add_note(f"while running MIL op {step.label}")
        raise
    return [env[slot] for _, slot in prog.outputs]

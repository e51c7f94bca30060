"""The three drivers and the command-line specs that name them.

    mlx:MODEL[@fp32|fp16|bf16][+scale=ALPHA][+lut=SPEC]
                                               our MLX model (the reference); +lut= with the
                                               decoder projections palettized as export --lut SPEC
    mil:EXPORT_DIR[+moe=dense|routed]          an export, executed by our MIL executor (anywhere)
    coreml:EXPORT_DIR[+moe=dense|routed]       an export, executed by Core ML (macOS only);
                                               +moe= picks how an export with expert packs runs
                                               (default: the mode its meta.yaml names)

All share one interface (runtime.base.Driver): reset, prefill -> logits after the prompt, decode.
"""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .. import format as fmt
from ..errors import BadArgumentError, UnsupportedError
from ..quant.lut import LUTConfig, parse_lut_spec
from .export_host import ExportHost

if TYPE_CHECKING:
    from .mil_executor import MILExecutor

MLX_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SPEC_FORMS = "mlx:MODEL[@fp32|fp16|bf16][+scale=A][+lut=SPEC], mil:DIR[+moe=MODE] or coreml:DIR[+moe=MODE]"
KINDS = ("mlx", "mil", "coreml")
MLX_CONTEXT = 2048


@dataclass(frozen=True)
class DriverSpec:
    """A parsed driver spec: checked in full before anything is loaded."""

    text: str
    kind: str  # mlx | mil | coreml
    target: str  # the model (mlx) or the export folder
    dtype: str = "fp32"
    scale: float | None = None
    lut: LUTConfig | None = None
    moe_mode: str | None = None  # an export's mixture-of-experts execution (dense | routed)


def parse_spec(spec: str) -> DriverSpec:
    """Read ``kind:target`` with the mlx options; every mistake is one BadArgumentError line."""
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS or not target:
        raise BadArgumentError(f"bad driver spec '{spec}' (use {SPEC_FORMS})")
    if kind != "mlx":
        m = re.search(r"\+moe=([^+]*)$", target)
        if m and not Path(target).expanduser().exists():
            if m[1] not in fmt.MOE_MODES:
                raise BadArgumentError(f"bad +moe={m[1]} in driver spec '{spec}' (choose dense or routed)")
            return DriverSpec(spec, kind, target[: m.start()], moe_mode=m[1])
        return DriverSpec(spec, kind, target)
    options: dict[str, str] = {}
    while not Path(target).expanduser().exists() and (m := re.search(r"\+([a-z]+)=([^+]*)$", target)):
        if m[1] not in ("scale", "lut") or m[1] in options:
            raise BadArgumentError(f"bad option '+{m[1]}=' in driver spec '{spec}' (use {SPEC_FORMS})")
        options[m[1]] = m[2]
        target = target[: m.start()]
    dtype = "fp32"
    head, at, tail = target.rpartition("@")
    if at and "/" not in tail and not Path(target).expanduser().exists():
        if tail not in MLX_DTYPES:
            raise BadArgumentError(f"unknown dtype '{tail}' in driver spec '{spec}' (choose fp32, fp16 or bf16)")
        target, dtype = head, tail
    if not target:
        raise BadArgumentError(f"driver spec '{spec}' names no model")
    scale = None
    if "scale" in options:
        try:
            scale = float(options["scale"])
        except ValueError:
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise BadArgumentError(f"bad scale '{options['scale']}' in driver spec '{spec}': a number > 0")
    ffn = parse_lut_spec(options["lut"]) if "lut" in options else None
    return DriverSpec(spec, kind, target, dtype, scale, LUTConfig(ffn=ffn) if ffn else None)


def export_kind() -> str:
    """Where an export folder runs when a bare path names it: Core ML on macOS, our executor elsewhere."""
    return "coreml" if platform.system() == "Darwin" else "mil"


def resolve_spec(text: str) -> tuple[DriverSpec, str | None]:
    """A driver spec (``kind:target``), or a bare path: an export folder (it holds meta.yaml) runs on
    ``export_kind()``, anything else is a model for mlx.  Returns the spec and, for a bare path, a
    sentence saying which driver was chosen (the CLI prints it once)."""
    kind, sep, _ = text.partition(":")
    if sep and kind in KINDS:
        return parse_spec(text), None
    path = Path(text).expanduser()
    if path.is_dir() and (path / fmt.META).is_file():
        kind = export_kind()
        why = "Core ML" if kind == "coreml" else "our MIL executor; Core ML needs macOS"
        return parse_spec(f"{kind}:{text}"), f"{text} is an export: running it as {kind}:{text} ({why})"
    return parse_spec(f"mlx:{text}"), None


class MLXDriver:
    """Our MLX model behind the driver interface, with a fixed-size cache of up to ``context`` tokens."""

    def __init__(self, lm, name: str, context: int | None = None):
        self.lm = lm
        self.name = name
        self.tokenizer = lm.tokenizer
        self.vocab_size = lm.model.args.vocab_size
        self.context_length = min(context or MLX_CONTEXT, lm.model.args.max_position_embeddings)
        # Weights a transform left lazy (a scale, a LUT, a dtype) are computed now, once, and on
        # this thread: left lazy they would belong to this thread's stream (compare runs its
        # reference on a worker thread, which could not evaluate them).
        mx.eval(lm.model.parameters())
        self.reset()

    def reset(self, capacity: int | None = None) -> None:
        """Start over with an empty cache of ``capacity`` positions (at most the context; all of it by default)."""
        self.cache = self.lm.model.make_cache(min(capacity or self.context_length, self.context_length))
        self.position = 0

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.lm.model(mx.array(list(ids))[None], self.cache, self.position, last_only=True)[0, -1]
        self.position += len(ids)
        return np.array(logits.astype(mx.float32))

    def rewind(self, position: int) -> None:
        """Keep the first ``position`` tokens: the cache attends only up to the filled position."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: the cache holds {self.position} tokens")
        self.position = position

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        if self.position + len(token_ids) > self.cache.context:
            raise BadArgumentError(
                f"{self.position + len(token_ids)} tokens do not fit the context of {self.cache.context}"
            )
        return self._run(token_ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([token_id])


class MILRunner:
    """Runs export programs with our executor; one state dict shared by every program and function."""

    def __init__(self) -> None:
        self.programs: dict[str, MILExecutor] = {}
        self.states: dict[str, mx.array] = {}

    def _executor(self, program: str) -> MILExecutor:
        if program not in self.programs:
            from .mil_executor import MILExecutor  # coremltools is imported only when an export runs

            self.programs[program] = MILExecutor.load(program)
        return self.programs[program]

    def run(
        self, program: str, function: str | None, inputs: dict[str, np.ndarray], stateful: bool = True
    ) -> dict[str, np.ndarray]:
        executor = self._executor(program)
        name = function or executor.functions[0]
        out = executor.run(name, inputs, self.states)
        return {k: np.array(v) for k, v in out.items()}

    def reset_state(self) -> None:
        self.states.clear()

    def input_shape(self, program: str, function: str, name: str) -> tuple[int, ...] | None:
        executor = self._executor(program)
        if function not in executor.functions:
            return None
        shape = executor.inputs(function).get(name, (None, None))[0]
        if shape is None:
            return None
        dims = [d for d in shape if d is not None]
        return tuple(dims) if len(dims) == len(shape) else None


class CoreMLRunner:
    """Runs export programs with Core ML on the Neural Engine, as ANEMLL's runtimes do (macOS 15+)."""

    def __init__(self) -> None:
        if platform.system() != "Darwin":
            raise UnsupportedError(
                f"the coreml driver needs macOS with Core ML (this is {platform.system()}): use mil:EXPORT_DIR here"
            )
        import coremltools as ct

        self.ct = ct
        self.models: dict[tuple[str, str | None], Any] = {}
        self.state: Any = None

    def _model(self, program: str, function: str | None):
        key = (program, function)
        if key not in self.models:
            ct = self.ct
            units = ct.ComputeUnit.CPU_AND_NE
            kwargs = {"function_name": function} if function else {}
            if program.endswith(".mlmodelc"):
                self.models[key] = ct.models.CompiledMLModel(program, compute_units=units, **kwargs)
            else:
                self.models[key] = ct.models.MLModel(program, compute_units=units, **kwargs)
        return self.models[key]

    def run(
        self, program: str, function: str | None, inputs: dict[str, np.ndarray], stateful: bool = True
    ) -> dict[str, np.ndarray]:
        model = self._model(program, function)
        if function is None or not stateful:
            return model.predict(inputs)
        if self.state is None:  # one state, made by the first chunk function, shared by all
            self.state = model.make_state()
        return model.predict(inputs, state=self.state)

    def reset_state(self) -> None:
        self.state = None

    def input_shape(self, program: str, function: str, name: str) -> tuple[int, ...] | None:
        """From the package's spec; a compiled .mlmodelc carries none (the host then assumes the context)."""
        if program.endswith(".mlmodelc"):
            return None
        spec = self._model(program, function).get_spec()
        for f in spec.description.functions:
            if f.name == function:
                for i in f.input:
                    if i.name == name:
                        return tuple(int(d) for d in i.type.multiArrayType.shape)
        return None


def open_driver(spec: str | DriverSpec, context: int | None = None):
    """A driver from its spec; bad specs raise BadArgumentError naming the forms."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "mlx":
        from ..loading import load
        from ..transforms import apply_fp16_scale, apply_lut

        lm = load(spec.target, MLX_DTYPES[spec.dtype])
        if spec.scale is not None:
            apply_fp16_scale(lm.model, spec.scale)
        if spec.lut is not None:
            apply_lut(lm.model, spec.lut)
        return MLXDriver(lm, spec.text, context)
    export = fmt.read_export(Path(spec.target), prefer_compiled=spec.kind == "coreml")
    runner = MILRunner() if spec.kind == "mil" else CoreMLRunner()
    return ExportHost(export, runner, spec.text, spec.moe_mode)

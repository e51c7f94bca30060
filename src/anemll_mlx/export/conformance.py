"""``inspect``: check an export folder against the format ANEMLL's runtimes load.

Reads only what is on disk (meta.yaml, each package's interface, its LUT ops and sizes) and
lists every deviation; an empty list means the folder is good.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import coremltools as ct
import numpy as np

from ..errors import CorruptModelError
from ..runtime.export_folder import read_export
from .plan import ANE_MAX_CHANNELS, MB
from .programs import GLOBAL_STATE, LOCAL_STATE

FP16, INT32 = 65552, 131104  # Core ML ArrayFeatureType data type codes
MODEL_INFO_KEYS = ("name", "version", "architecture", "parameters")
STATE_NAMES = ("model_model_kv_cache_0", "model.model.kv_cache_0")


@dataclass
class PartReport:
    name: str
    functions: list[str]
    mb: float
    lut: str  # e.g. "4-bit, group 4 (210 weights)" or "fp16"
    problems: list[str] = field(default_factory=list)


def _arrays(features) -> dict[str, tuple[list[int], int]]:
    return {f.name: (list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in features}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MB


def lut_summary(path: Path) -> str:
    """Bits and group sizes of the constexpr_lut_to_dense weights in a package."""
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(path))
    program = load(spec, spec.specificationVersion, str(path / "Data/com.apple.CoreML/weights"))
    kinds: Counter = Counter()
    for function in program.functions.values():
        for op in function.find_ops(op_type="constexpr_lut_to_dense"):
            indices, lut = op.indices.val, op.lut.val
            bits = int(np.log2(lut.shape[-2]))
            group = indices.shape[0] // lut.shape[0]
            kinds[(bits, group if lut.shape[0] > 1 else 0)] += 1
        break  # functions share weights: one is enough
    if not kinds:
        return "fp16"
    return ", ".join(f"{b}-bit {'per tensor' if g == 0 else f'group {g}'} ({n})" for (b, g), n in sorted(kinds.items()))


def _check_chunk(
    spec,
    context: int,
    batch: int,
    hidden: int | None,
    state_shape: list[int] | None,
    split_states: dict[str, list[int] | None] | None = None,
) -> list[str]:
    """Problems of one FFN chunk.  ``split_states`` (name -> expected shape or None) marks a Gemma3
    export past its sliding window: two more functions and those states instead of ANEMLL's one."""
    problems = []
    functions = {f.name: f for f in spec.description.functions}
    kinds = [("infer", 1), ("prefill", batch)]
    if split_states is not None:
        kinds += [("infer_rotate", 1), ("prefill_rotate", batch)]
    for name, tokens in kinds:
        if name not in functions:
            problems.append(f"no function '{name}'")
            continue
        f = functions[name]
        inputs = _arrays(f.input)
        want = {
            "hidden_states": ([1, tokens, hidden] if hidden else None, FP16),
            "position_ids": ([tokens], INT32),
            "causal_mask": ([1, 1, tokens, context], FP16),
            "current_pos": ([1], INT32),
        }
        for key, (shape, dtype) in want.items():
            if key not in inputs:
                problems.append(f"{name}: no input '{key}'")
            elif (shape and inputs[key][0] != shape) or inputs[key][1] != dtype:
                problems.append(f"{name}: input '{key}' is {inputs[key][0]}, expected {shape}")
        if [o.name for o in f.output] != ["output_hidden_states"]:
            problems.append(f"{name}: outputs {[o.name for o in f.output]}, expected ['output_hidden_states']")
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in f.state}
        if split_states is not None:
            problems += _check_split_states(name, states, split_states)
            continue
        found = [s for s in STATE_NAMES if s in states]
        if not found:
            problems.append(f"{name}: no KV state (have {list(states)})")
        elif state_shape and states[found[0]] != state_shape:
            problems.append(f"{name}: KV state shape {states[found[0]]}, expected {state_shape}")
        elif states[found[0]][2] != context:
            problems.append(f"{name}: KV state holds {states[found[0]][2]} positions, context is {context}")
    return problems


def _check_split_states(
    function: str, states: dict[str, list[int]], expected: dict[str, list[int] | None]
) -> list[str]:
    if sorted(states) != sorted(expected):
        return [f"{function}: KV states {sorted(states)}, expected {sorted(expected)}"]
    problems = []
    for name, shape in expected.items():
        if shape and states[name] != list(shape):
            problems.append(f"{function}: KV state {name} shape {states[name]}, expected {list(shape)}")
    return problems


def _split_states(export, problems: list[str]) -> dict[str, list[int] | None] | None:
    """The states a Gemma3 export past its sliding window must declare (None: not such an export)."""
    window = export.params.get("sliding_window")
    if not window or int(window) >= export.context:
        return None
    listed = export.ours.get("kv_states")
    if listed:
        return {s["name"]: s.get("shape") for s in listed}
    if export.ours:
        problems.append("meta.yaml anemll_mlx lacks kv_states (context exceeds the sliding window)")
    return {LOCAL_STATE: None, GLOBAL_STATE: None}


def _read_part(path: Path, functions: bool = False) -> tuple[PartReport, object | None]:
    """A part's report and its spec, or a report of why it cannot be read (spec None)."""
    if not path.exists():
        return PartReport(path.name, [], 0.0, "-", ["missing (named in meta.yaml)"]), None
    try:
        spec = ct.utils.load_spec(str(path))
        names = [f.name for f in spec.description.functions] if functions else ["main"]
        return PartReport(path.name, names, _size_mb(path), lut_summary(path)), spec
    except Exception as e:  # coremltools raises RuntimeError, protobuf DecodeError, OSError...
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        return PartReport(path.name, [], _size_mb(path), "-", [f"cannot be read ({reason})"]), None


def inspect_export(folder: str | Path, budget_mb: float = 950.0) -> tuple[list[PartReport], list[str]]:
    """Per-part reports and folder-level problems (empty lists of problems = conforms).

    Everything that can be checked is checked: a missing or damaged package is one problem among
    the others, not the end of the inspection.  Only a folder that is not an export at all (no
    meta.yaml) raises.
    """
    try:
        export = read_export(folder, must_exist=False)
    except CorruptModelError as e:
        return [], [str(e)]
    meta, params = export.meta, export.params
    problems = [f"meta.yaml model_info lacks '{k}'" for k in MODEL_INFO_KEYS if k not in meta["model_info"]]
    ours = export.ours
    hidden = ours.get("hidden_size")
    state_shape = (ours.get("kv_state") or {}).get("shape")
    split_states = _split_states(export, problems)
    parts: list[PartReport] = []

    part, spec = _read_part(export.embeddings)
    if spec is not None:
        inputs = spec.description.input
        shapes = {tuple(s.shape) for s in inputs[0].type.multiArrayType.enumeratedShapes.shapes} if inputs else set()
        if not inputs or inputs[0].name != "input_ids" or not {(1, 1), (1, export.batch)} <= shapes:
            part.problems.append(f"input_ids must accept (1, 1) and (1, {export.batch})")
        if [o.name for o in spec.description.output] != ["hidden_states"]:
            part.problems.append("output must be 'hidden_states'")
    parts.append(part)

    for chunk in export.chunks:
        part, spec = _read_part(chunk, functions=True)
        if spec is not None:
            part.problems = _check_chunk(spec, export.context, export.batch, hidden, state_shape, split_states)
        parts.append(part)

    part, spec = _read_part(export.lm_head)
    if spec is not None:
        part.problems += _check_lm_head(spec, export, params)
    parts.append(part)

    for part in parts:
        if part.mb > budget_mb:
            part.problems.append(f"{part.mb:.0f} MB is over the {budget_mb:g} MB budget")
    return parts, problems


def _check_lm_head(spec, export, params: dict) -> list[str]:
    problems = []
    outputs = _arrays(spec.description.output)
    split = int(params.get("split_lm_head", 1))
    if export.argmax_in_model:
        if set(outputs) != {"argmax_idx", "argmax_val"}:
            problems.append(f"argmax_in_model: outputs {sorted(outputs)}, expected argmax_idx and argmax_val")
        return problems
    expected = [f"logits{i + 1}" for i in range(split)]
    if sorted(outputs) != sorted(expected):
        problems.append(f"outputs {sorted(outputs)}, expected {expected} (split_lm_head {split})")
    sizes = [outputs[k][0][-1] for k in expected if k in outputs and outputs[k][0]]
    if export.head_sizes and sizes and sizes != export.head_sizes:
        problems.append(f"piece sizes {sizes} differ from lm_head_chunk_sizes {export.head_sizes}")
    if sizes and max(sizes) > ANE_MAX_CHANNELS:
        problems.append(f"a piece has {max(sizes)} outputs, over the ANE's {ANE_MAX_CHANNELS}")
    return problems

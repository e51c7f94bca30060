"""``inspect``: check an export folder against the format ANEMLL's runtimes load.

Reads only what is on disk (meta.yaml, each package's interface, its LUT ops and sizes) and lists
every deviation from ``anemll_mlx.format``; an empty list means the folder is good.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import coremltools as ct
import numpy as np

from .. import format as fmt
from ..errors import CorruptModelError
from .plan import ANE_MAX_CHANNELS, DEFAULT_BUDGET_MB, MB, Estimate, Speed, estimate_parts

FP16, INT32 = 65552, 131104  # Core ML ArrayFeatureType data type codes


@dataclass
class PartReport:
    name: str
    functions: list[str]
    mb: float
    lut: str  # e.g. "4-bit, group 4 (210 weights)" or "fp16"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth knowing, not a failure


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


def _expected_states(meta: fmt.ExportMeta, problems: list[str]) -> dict[str, list[int] | None]:
    """Stored state name -> expected shape (None: any shape) that every chunk function declares."""
    if meta.window is None:
        states = meta.kv_states or []
        shape = list(states[0].shape) if len(states) == 1 else None
        return {fmt.stored_state_name(fmt.KV_STATE): shape}
    if meta.kv_states and len(meta.kv_states) > 1:
        return {s.name: list(s.shape) for s in meta.kv_states}
    if meta.ours:
        problems.append("meta.yaml anemll_mlx lacks kv_states (context exceeds the sliding window)")
    return {fmt.LOCAL_STATE: None, fmt.GLOBAL_STATE: None}


def _check_chunk(
    spec, meta: fmt.ExportMeta, states: dict[str, list[int] | None], role: fmt.ChunkRole | None = None
) -> list[str]:
    """Problems of one FFN chunk: its functions, their inputs, output and state(s); an expert pack
    or attention part (``role``, from meta.yaml's ``anemll_mlx.moe``) by its own interface."""
    if role is not None and role.kind == fmt.EXPERTS:
        return _check_pack(spec, meta)
    if role is not None and role.kind == fmt.GATHER:
        return _check_gather(spec, meta)
    problems = []
    functions = {f.name: f for f in spec.description.functions}
    for kind in fmt.chunk_functions(meta.batch, rotate=meta.window is not None):
        name, tokens = kind.name, kind.tokens
        if name not in functions:
            problems.append(f"no function '{name}'")
            continue
        f = functions[name]
        inputs = _arrays(f.input)
        want = {
            fmt.HIDDEN_STATES: ([1, tokens, meta.hidden_size] if meta.hidden_size else None, FP16),
            fmt.POSITION_IDS: ([tokens], INT32),
            fmt.CAUSAL_MASK: ([1, 1, tokens, meta.context], FP16),
            fmt.CURRENT_POS: ([1], INT32),
        }
        problems += _check_inputs(name, inputs, want)
        outputs = [o.name for o in f.output]
        expected = [fmt.OUTPUT_HIDDEN_STATES]
        if role is not None and role.kind == fmt.ATTENTION:
            assert meta.moe is not None
            expected += [fmt.MOE_RESIDUAL, fmt.EXPERT_WEIGHTS] + ([fmt.MOE_SHARED] if meta.moe.shared_branch else [])
            expected += [fmt.EXPERT_SUM] if role.experts is not None else []
        if outputs != expected:
            problems.append(f"{name}: outputs {outputs}, expected {expected}")
        declared = {fmt.stored_state_name(s.name): list(s.type.stateType.arrayType.shape) for s in f.state}
        problems += _check_states(name, declared, states, meta.context)
    return problems


def _check_states(function: str, declared: dict[str, list[int]], expected: dict[str, list[int] | None], context: int) -> list[str]:
    if sorted(declared) != sorted(expected):
        if len(expected) == 1:
            return [f"{function}: no KV state (have {list(declared)})"]
        return [f"{function}: KV states {sorted(declared)}, expected {sorted(expected)}"]
    problems = []
    for name, shape in expected.items():
        if shape and declared[name] != list(shape):
            problems.append(f"{function}: KV state {name} shape {declared[name]}, expected {list(shape)}")
        elif len(expected) == 1 and declared[name][2] < context:
            # more positions than the context is fine: ANEMLL's own state holds at least 512
            problems.append(f"{function}: KV state holds {declared[name][2]} positions, context is {context}")
    return problems


def _check_embeddings(spec, meta: fmt.ExportMeta) -> list[str]:
    problems = []
    inputs = spec.description.input
    shapes = {tuple(s.shape) for s in inputs[0].type.multiArrayType.enumeratedShapes.shapes} if inputs else set()
    if not inputs or inputs[0].name != fmt.INPUT_IDS or not {(1, 1), (1, meta.batch)} <= shapes:
        problems.append(f"{fmt.INPUT_IDS} must accept (1, 1) and (1, {meta.batch})")
    if [o.name for o in spec.description.output] != [fmt.HIDDEN_STATES]:
        problems.append(f"output must be '{fmt.HIDDEN_STATES}'")
    return problems


def _check_lm_head(spec, meta: fmt.ExportMeta, pieces: range) -> list[str]:
    """Problems of an LM-head program holding the pieces ``pieces`` (all of them unless split)."""
    problems = []
    outputs = _arrays(spec.description.output)
    if meta.argmax_in_model:
        expected_argmax = {fmt.ARGMAX_IDX, fmt.ARGMAX_VAL}
        if set(outputs) != expected_argmax:
            problems.append(f"argmax_in_model: outputs {sorted(outputs)}, expected {sorted(expected_argmax)}")
        return problems
    expected = [fmt.logits_name(i) for i in pieces]
    if sorted(outputs) != sorted(expected):
        problems.append(f"outputs {sorted(outputs)}, expected {expected} (split_lm_head {meta.split_lm_head})")
    sizes = [outputs[k][0][-1] for k in expected if k in outputs and outputs[k][0]]
    if meta.head_sizes and sizes and sizes != meta.head_sizes[pieces.start : pieces.stop]:
        problems.append(f"piece sizes {sizes} differ from lm_head_chunk_sizes {meta.head_sizes}")
    if sizes and max(sizes) > ANE_MAX_CHANNELS:
        problems.append(f"a piece has {max(sizes)} outputs, over the ANE's {ANE_MAX_CHANNELS}")
    return problems


def _read_part(path: Path, functions: bool = False) -> tuple[PartReport, object | None]:
    """A part's report and its spec, or a report of why it cannot be read (spec None)."""
    if not path.exists():
        return PartReport(path.name, [], 0.0, "-", [f"missing (named in {fmt.META})"]), None
    try:
        spec = ct.utils.load_spec(str(path))
        names = ([f.name for f in spec.description.functions] if functions else []) or ["main"]
        return PartReport(path.name, names, _size_mb(path), lut_summary(path)), spec
    except Exception as e:  # coremltools raises RuntimeError, protobuf DecodeError, OSError...
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        return PartReport(path.name, [], _size_mb(path), "-", [f"cannot be read ({reason})"]), None


Want = dict[str, tuple[list[int] | None, Any]]  # input name -> (shape or None: any, dtype)


def _moe_inputs(meta: fmt.ExportMeta, tokens: int) -> Want:
    """The inputs every later part of a split layer takes (``format``: the chain)."""
    hidden = ([1, tokens, meta.hidden_size] if meta.hidden_size else None, FP16)
    shared = {fmt.MOE_SHARED: hidden} if meta.moe and meta.moe.shared_branch else {}
    return {fmt.HIDDEN_STATES: hidden, **shared}


def _check_inputs(function: str, inputs: dict, want: Want) -> list[str]:
    problems = []
    for key, (shape, dtype) in want.items():
        if key not in inputs:
            problems.append(f"{function}: no input '{key}'")
        elif (shape and inputs[key][0] != shape) or inputs[key][1] != dtype:
            problems.append(f"{function}: input '{key}' is {inputs[key][0]}, expected {shape}")
    return problems


def _check_pack(spec, meta: fmt.ExportMeta) -> list[str]:
    """An expert pack: infer and prefill without a state; the residual, routing weights and
    running sum (and shared branch) in, the layer's output and the running sum out."""
    problems = []
    functions = {f.name: f for f in spec.description.functions}
    experts = meta.moe.num_experts if meta.moe else None
    for kind in fmt.chunk_functions(meta.batch, rotate=False):
        name, tokens = kind.name, kind.tokens
        if name not in functions:
            problems.append(f"no function '{name}'")
            continue
        f = functions[name]
        want = {
            **_moe_inputs(meta, tokens),
            fmt.EXPERT_WEIGHTS: ([1, tokens, experts] if experts else None, FP16),
            fmt.EXPERT_SUM_IN: ([1, tokens, meta.hidden_size] if meta.hidden_size else None, FP16),
        }
        problems += _check_inputs(name, _arrays(f.input), want)
        outputs = [o.name for o in f.output]
        if outputs != [fmt.OUTPUT_HIDDEN_STATES, fmt.EXPERT_SUM]:
            problems.append(f"{name}: outputs {outputs}, expected ['{fmt.OUTPUT_HIDDEN_STATES}', '{fmt.EXPERT_SUM}']")
        if len(f.state):
            problems.append(f"{name}: an expert pack declares a state")
    return problems


def export_estimates(folder: str | Path, parts: list[PartReport], speed: Speed = Speed()) -> list[Estimate]:
    """Per decoded token and execution mode, the calls, weight bytes and time of an export, from
    its parts' sizes on disk (``parts`` as ``inspect_export`` gives them, in program order)."""
    meta = fmt.read_export(folder, must_exist=False).meta
    files = meta.files
    sizes = [int(p.mb * MB) for p in parts]
    n_embed, n_chunks = len(files.embeddings), len(files.chunks)
    if len(sizes) != n_embed + n_chunks + len(files.lm_head):
        return []
    bits = meta.lut.get("embeddings")
    row = math.ceil((meta.hidden_size or 0) * (bits.bits if bits else 16) / 8)
    moe = meta.moe
    if moe is None:
        return [estimate_parts(n_embed, row, sizes[n_embed : n_embed + n_chunks], sizes[n_embed + n_chunks :], None, 0, 0, "dense", speed)]
    gather = [r.kind == fmt.GATHER for r in moe.roles]
    modes = ["dense", "routed"] + (["gathered"] if any(gather) else [])
    expert_bytes = [
        sum(_file_size(Path(folder) / fmt.expert_file(meta.prefix, r.layers.start, p)) for p in ("gate", "up", "down"))
        // moe.num_experts if g else 0
        for r, g in zip(moe.roles, gather)
    ]
    return [
        estimate_parts(
            n_embed, row, sizes[n_embed : n_embed + n_chunks], sizes[n_embed + n_chunks :],
            moe.roles, moe.num_experts, moe.top_k, mode, speed, expert_bytes,
        )  # fmt: skip
        for mode in modes
    ]


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _check_gather(spec, meta: fmt.ExportMeta) -> list[str]:
    """A gather program (one function, one token): the residual (and shared branch) and the
    chosen experts' weights in, the layer's output out, no state."""
    description = spec.description
    if len(description.functions):
        return [f"a gather program has functions {[f.name for f in description.functions]}, expected one"]
    inputs = _arrays(description.input)
    problems = _check_inputs("main", inputs, _moe_inputs(meta, 1))
    for key in (fmt.EXPERT_WEIGHTS, fmt.EXPERTS_GATE, fmt.EXPERTS_UP, fmt.EXPERTS_DOWN):
        if key not in inputs:
            problems.append(f"no input '{key}'")
    outputs = [o.name for o in description.output]
    if outputs != [fmt.OUTPUT_HIDDEN_STATES]:
        problems.append(f"outputs {outputs}, expected ['{fmt.OUTPUT_HIDDEN_STATES}']")
    if len(description.state):
        problems.append("a gather program declares a state")
    return problems


def head_pieces(meta: fmt.ExportMeta, programs: int) -> list[range]:
    """Which LM-head pieces each of ``programs`` LM-head programs holds."""
    counts = meta.head_part_pieces or [meta.split_lm_head] * programs
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(a, a + n) for a, n in zip(starts, counts)]


def inspect_export(folder: str | Path, warn_mb: float = DEFAULT_BUDGET_MB) -> tuple[list[PartReport], list[str]]:
    """Per-part reports and folder-level problems (empty lists of problems = conforms).

    Everything that can be checked is checked: a missing or damaged package is one problem among
    the others, not the end of the inspection.  Only a folder that is not an export at all (no
    meta.yaml) raises.  A part larger than ``warn_mb`` gets a warning, not a problem: Core ML may
    run it off the Neural Engine without saying so (see ``export/plan.py``).
    """
    try:
        export = fmt.read_export(folder, must_exist=False)
    except CorruptModelError as e:
        return [], [str(e)]
    meta = export.meta
    problems = [f"{fmt.META} model_info lacks '{k}'" for k in meta.missing_info]
    states = _expected_states(meta, problems)
    parts: list[PartReport] = []
    checks: list[tuple[Path, bool, Callable[[Any], list[str]]]] = [
        (path, False, lambda spec: _check_embeddings(spec, meta)) for path in export.embeddings
    ]
    roles: list[fmt.ChunkRole | None] = list(meta.moe.roles) if meta.moe else [None] * len(export.chunks)
    checks += [
        (chunk, True, partial(_check_chunk, meta=meta, states=states, role=role))
        for chunk, role in zip(export.chunks, roles)
    ]
    checks += [
        (path, False, partial(_check_lm_head, meta=meta, pieces=pieces))
        for path, pieces in zip(export.lm_head, head_pieces(meta, len(export.lm_head)))
    ]
    for path, functions, check in checks:
        part, spec = _read_part(path, functions)
        if spec is not None:
            part.problems += check(spec)
        if part.mb > warn_mb:
            part.warnings.append(
                f"{part.mb:.0f} MB is over {warn_mb:g} MB: Core ML may run it on the GPU or CPU instead of the "
                "Neural Engine without a word (re-export with a smaller --max-chunk-mb or a LUT)"
            )
        parts.append(part)
    return parts, problems

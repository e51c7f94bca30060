"""``export``: a loaded model to a folder of chunked, stateful Core ML programs in ANEMLL's layout.

The folder is built through ``output.OutputFolder``: beside the destination under a temporary name,
renamed only when complete, so an interrupted export leaves the destination as it was.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import coremltools as ct
import mlx.core as mx
import numpy as np
from coremltools.converters.mil.mil import Program
from mlx.utils import tree_map

from .. import format as fmt
from .. import interrupts
from ..errors import BadArgumentError, UnsupportedError, UserError
from ..loading import LoadedModel
from ..models.base import DecoderModel
from ..ops.mil_ops import MILOps
from ..output import OutputFolder
from ..quant.lut import LUTConfig
from ..transforms import apply_fp16_scale
from . import package, programs
from .meta import export_meta, write_tokenizer_files
from .plan import DEFAULT_BUDGET_MB, MOE_MODES, ExportPlan, Speed, plan_export
from .weights import WeightStore

if TYPE_CHECKING:
    from ..probe.calibrate import InputMoments

Progress = Callable[[str, int, int], None]  # (part, steps done, steps total)
LUT_FLAGS = {"ffn": "--lut", "lm_head": "--lut-lm-head", "embeddings": "--lut-embeddings"}


@dataclass
class ExportOptions:
    context: int = 512
    batch: int = 64
    chunk: int | str = "auto"
    max_chunk_mb: float = DEFAULT_BUDGET_MB
    lut: LUTConfig = field(default_factory=LUTConfig)
    fp16_scale: float | str | None = None  # a number, None (no scaling) or "auto" (recipe, else probe)
    prefix: str | None = None
    split_lm_head: int | str = "auto"
    moe_mode: str = "auto"  # mixture-of-experts execution: auto (by the estimate), dense or routed
    attention_chunk: int | None = None  # None: batch // 2
    argmax_in_model: bool = False
    compile: str = "auto"  # auto | yes | no
    force: bool = False
    # sensitivity-weighted LUT fits: statistics from the built-in calibration prompts, or from
    # calibration_files (.txt / .jsonl, see probe.calibrate) when given
    calibrate: bool = False
    calibration_files: list[Path] = field(default_factory=list)
    # the LUT config of the LUT checkpoint being exported: its parts' tables are emitted as they are
    # (set by ``adopt_checkpoint``; ``lut`` then holds its specs for those parts)
    checkpoint_lut: LUTConfig | None = None

    def adopt_checkpoint(self, checkpoint: LUTConfig, explicit: Collection[str] = ()) -> None:
        """Export a LUT checkpoint: each part it quantized takes its spec (and its tables, as they
        are); a part it did not may still take a fitted LUT.  A spec asked for a quantized part
        that differs from the checkpoint's is refused; so is an explicit none (``explicit``: the
        parts whose flags were given, so that a flag left out is not read as none)."""
        merged = {}
        for part, spec in checkpoint.items():
            asked = self.lut[part]
            if spec is not None and asked != spec and (asked is not None or part in explicit):
                raise BadArgumentError(
                    f"{LUT_FLAGS[part]} {asked or 'none'} differs from the checkpoint's {part} LUT {spec}: its "
                    "tables are exported as they are (leave the flag out)"
                )
            merged[part] = spec if spec is not None else asked
        self.lut = LUTConfig(**merged)
        self.checkpoint_lut = checkpoint

    def check_flags(self) -> None:
        """Every check that needs no model, so bad flags fail before anything is loaded."""
        if self.context < 1:
            raise BadArgumentError(f"--context must be >= 1, got {self.context}")
        if self.batch < 1:
            raise BadArgumentError(f"--batch must be >= 1, got {self.batch}")
        if self.context % self.batch:
            raise BadArgumentError(f"--context {self.context} must be a multiple of --batch {self.batch}")
        if self.attention_chunk is not None and not 1 <= self.attention_chunk <= self.batch:
            raise BadArgumentError(
                f"--attention-chunk must be between 1 and --batch {self.batch}, got {self.attention_chunk}"
            )
        for flag, value in (("--chunk", self.chunk), ("--split-lm-head", self.split_lm_head)):
            if value != "auto" and (not isinstance(value, int) or value < 1):
                raise BadArgumentError(f"{flag} must be auto or a whole number >= 1, got {value}")
        if self.moe_mode not in MOE_MODES:
            raise BadArgumentError(f"--moe-mode must be one of {', '.join(MOE_MODES)}, not '{self.moe_mode}'")
        if not self.max_chunk_mb > 0:
            raise BadArgumentError(f"--max-chunk-mb must be > 0, got {self.max_chunk_mb}")
        scale = self.fp16_scale
        if scale != "auto" and scale is not None and not (isinstance(scale, float | int) and 0 < scale <= 1):
            raise BadArgumentError(f"--fp16-scale must be auto, none or a number in (0, 1], got {scale}")
        if self.compile not in ("auto", "yes", "no"):
            raise BadArgumentError(f"--compile must be auto, yes or no, not '{self.compile}'")
        if self.calibration_files and not self.calibrate:
            raise BadArgumentError("calibration files were given without --calibrate")
        if self.calibrate and self.lut.ffn is None and self.lut.lm_head is None:
            raise BadArgumentError(  # embedding tables are lookups: no inputs to weight their fits by
                "--calibrate weights the LUT fits of the FFN and the LM head, but neither is quantized: "
                "add --lut or --lut-lm-head"
            )
        if self.calibrate and self.checkpoint_lut is not None:
            fitted = [p for p in ("ffn", "lm_head") if self.lut[p] is not None and self.checkpoint_lut[p] is None]
            if not fitted:
                raise BadArgumentError(
                    "--calibrate weights LUT fits, but the checkpoint's LUTs are exported as they are: "
                    "nothing is left to fit (drop --calibrate)"
                )
        if self.calibrate:
            from ..probe.calibrate import calibration_set

            calibration_set(self.calibration_files)  # every file read and parsed: errors before the model loads
        if self.compile == "yes" and not can_compile():
            raise UserError("--compile yes needs macOS with Xcode's coremlcompiler (xcrun); use --compile no")

    def check_model(self, model: DecoderModel) -> None:
        """Checks against the model's hyper-parameters (a skeleton from its config is enough)."""
        refusal = model.export_refusal()
        if refusal is not None:
            raise UnsupportedError(refusal)
        limit = model.args.max_position_embeddings
        if self.context > limit:
            raise BadArgumentError(f"--context {self.context} exceeds the model's max_position_embeddings {limit}")
        window = programs.split_window(model, self.context)
        if window is not None and window % self.batch:
            # a prefill batch must never straddle the window: batches before it use `prefill`, the
            # rest `prefill_rotate` (then window + batch <= context follows from context % batch == 0)
            raise UserError(
                f"Gemma3 export with --context {self.context} larger than its sliding window {window} "
                f"needs the window to be a multiple of --batch {self.batch}; pick a --batch that divides "
                f"{window}, or --context <= {window}"
            )

    def validate(self, model: DecoderModel) -> None:
        if model.lut_weights:  # a LUT checkpoint (loading/checkpoint.py)
            assert model.lut is not None
            self.adopt_checkpoint(model.lut)
        self.check_flags()
        self.check_model(model)

    def check_plan(self, plan: ExportPlan) -> None:
        """A checkpoint's LUT weight split in row pieces (embeddings over the budget, LM-head
        pieces) keeps whole groups of its table in each piece; a plan that cuts one is refused."""
        if self.checkpoint_lut is None:
            return
        head_rows, start = [], 0
        for sizes in plan.head_parts:
            for size in sizes:
                head_rows.append(range(start, start + size))
                start += size
        for name, pieces in (("embeddings", plan.embed_parts), ("lm_head", head_rows)):
            spec = self.checkpoint_lut[name]
            if spec is None or spec.group_size is None or len(pieces) < 2:
                continue
            bad = [r for r in pieces[:-1] if r.stop % spec.group_size]
            if bad:
                raise BadArgumentError(
                    f"the {name} pieces of this export (one ends at row {bad[0].stop}) cut the checkpoint's LUT "
                    f"groups of {spec.group_size} rows: choose --split-lm-head or --max-chunk-mb so every piece holds whole groups"
                )

    def plan(self, model: DecoderModel, speed: Speed = Speed()) -> ExportPlan:
        """Chunks and LM-head pieces for ``model`` (shapes only: a skeleton from config.json plans
        the same); ``speed``: what the estimate that picks the mixture-of-experts mode assumes."""
        return plan_export(model, self.chunk, self.max_chunk_mb, self.lut, self.split_lm_head, self.moe_mode, speed)


@dataclass
class ExportResult:
    out: Path
    plan: ExportPlan
    files: dict[str, int] = field(default_factory=dict)  # package name -> bytes
    seconds: float = 0.0
    compiled: bool = False


def part_files(prefix: str, options: ExportOptions, plan: ExportPlan) -> fmt.PartFiles:
    """File stems as ANEMLL names them (``format.PartFiles``)."""
    return fmt.PartFiles.named(
        prefix, options.lut.bits(), len(plan.chunks), len(plan.embed_parts), len(plan.head_parts)
    )


def check_output(out: str | Path, force: bool, source: Path | None) -> OutputFolder:
    """The export's destination, checked before any work (see ``anemll_mlx.output``)."""
    return OutputFolder.check(out, kind="export", force=force, protect=[source])


def can_compile() -> bool:
    return platform.system() == "Darwin" and shutil.which("xcrun") is not None


def resolve_fp16_scale(lm: LoadedModel, options: ExportOptions, progress: Progress | None = None) -> None:
    """Turn ``fp16_scale="auto"`` into a number or None: the model's recipe, else the probe."""
    if options.fp16_scale == "auto":
        from ..probe.decision import decide_fp16_scale

        options.fp16_scale = decide_fp16_scale(lm, "auto", progress=progress).value


def collect_moments(lm: LoadedModel, options: ExportOptions, progress: Progress | None = None) -> InputMoments:
    """The calibration statistics ``options`` asks for (``probe.calibrate``), measured on ``lm``."""
    from ..probe.calibrate import calibration_set, collect_input_moments

    return collect_input_moments(lm, calibration_set(options.calibration_files), progress=progress)


def export_model(
    lm: LoadedModel,
    out: Path | OutputFolder,
    options: ExportOptions,
    progress: Progress | None = None,
    plan: ExportPlan | None = None,
    moments: InputMoments | None = None,
) -> ExportResult:
    """Write the export of ``lm`` to ``out``.  Applies the fp16 scale to ``lm.model`` in place
    (``"auto"`` is resolved first: the model's recipe, else the probe); a lazily loaded model
    (``load(..., lazy=True)``) is consumed, part by part, to bound memory.

    With ``options.calibrate`` the LUTs are fitted weighted by calibration statistics: ``moments``
    if given (the CLI measures them first, then reloads the model lazily), else measured here on
    the unscaled model (the fp16 scale leaves every LUT target's input unchanged).

    ``out`` may be a folder already checked with ``OutputFolder.check`` (the CLI checks it before
    loading the model); a plain path is checked here.  Nothing appears under ``out`` until the
    export is complete.
    """
    started = time.perf_counter()
    options.validate(lm.model)
    target = out if isinstance(out, OutputFolder) else check_output(out, options.force, lm.path)
    model = lm.model
    if options.calibrate and moments is None:
        moments = collect_moments(lm, options, progress)
    resolve_fp16_scale(lm, options)
    if isinstance(options.fp16_scale, float | int):
        apply_fp16_scale(model, options.fp16_scale)
    plan = plan or options.plan(model)
    options.check_plan(plan)
    prefix = options.prefix or fmt.ARCHITECTURES[lm.architecture]
    files = part_files(prefix, options, plan)

    def report(part: str, done: int, total: int) -> None:
        interrupts.check()
        if progress is not None:
            progress(part, done, total)

    with target.build() as scratch:
        tied = model.head is model.model.embed_tokens  # the LM head reads the table again at the end
        keep = (model.model.embed_tokens,) if tied else ()
        store = WeightStore(model, options.lut, consume=lm.lazy, keep=keep, moments=moments if options.calibrate else None)
        ops = MILOps(options.attention_chunk or max(1, options.batch // 2), store, options.context)
        result = ExportResult(out=target.path, plan=plan)

        def build(
            part: str, program: Callable[[], Program], stem: str, inputs: list | None = None, used: list | None = None
        ) -> None:
            """Trace, convert (every function at once) and save one package, then let go of its
            program, model and weights before the next (with a lazily loaded model, the source
            weights it ``used`` too: peak memory follows the largest part, not the model)."""
            report(part, 0, 1)
            model_ = package.convert(program(), inputs)
            package.save(model_, scratch / f"{stem}.mlpackage")
            del model_
            ops.release()
            store.release()
            if lm.lazy:
                for module in used or []:
                    _forget(module)
            report(part, 1, 1)

        shapes = ct.EnumeratedShapes(shapes=[(1, 1), (1, options.batch)], default=(1, options.batch))
        inputs = [ct.TensorType(name=fmt.INPUT_IDS, shape=shapes, dtype=np.int32)]
        store.prefit("embeddings")
        for i, (rows, stem) in enumerate(zip(plan.embed_parts, files.embeddings)):
            done = i == len(plan.embed_parts) - 1 and not tied
            embeddings = partial(programs.embeddings_program, model, ops, rows)
            build(_numbered("embeddings", i, len(files.embeddings)), embeddings, stem, inputs, [model.model.embed_tokens] if done else [])

        functions = programs.chunk_functions(model, options.context, options.batch)
        for i, (layers, stem) in enumerate(zip(plan.chunks, files.chunks)):
            last = i == len(plan.chunks) - 1
            role = plan.roles[i] if plan.split_experts else None
            if role is None:  # an expert pack fits its own rows' LUTs as it is traced
                store.prefit("ffn", layers)
            chunk = partial(programs.chunk_program, model, ops, layers, functions, options.context, last, role)
            # a split layer's weights are let go with its last part
            done_layer = role is None or i == len(plan.chunks) - 1 or plan.roles[i + 1].layers.start != layers.start
            used = [model.model.layers[n] for n in layers] if done_layer else []
            if role is not None and role.kind == fmt.GATHER:  # what the host gathers the chosen experts from
                _write_experts(model, layers.start, prefix, scratch)
            build(f"chunk {i + 1:02d}of{len(plan.chunks):02d}", chunk, stem, used=used)

        first_piece = first_row = 0
        for i, (sizes, stem) in enumerate(zip(plan.head_parts, files.lm_head)):
            head = partial(
                programs.lm_head_program, model, ops, sizes, options.argmax_in_model, first_piece, first_row,
                plan.final_norm_in_head,
            )
            last = i == len(plan.head_parts) - 1
            build(_numbered("lm_head", i, len(files.lm_head)), head, stem, used=[model.head] if last else [])
            first_piece, first_row = first_piece + len(sizes), first_row + sum(sizes)

        write_tokenizer_files(lm, scratch)
        fmt.write_meta(scratch, export_meta(lm, options, plan, files, prefix, store.moments))
        if options.compile == "yes" or (options.compile == "auto" and can_compile()):
            for stem in files.all():
                compile_package(scratch / f"{stem}.mlpackage", scratch)
            result.compiled = True
    result.files = {stem: _size(target.path / f"{stem}.mlpackage") for stem in files.all()}
    result.seconds = time.perf_counter() - started
    return result


def _write_experts(model: DecoderModel, layer: int, prefix: str, dest: Path) -> None:
    """The stacked fp16 weights of ``layer``'s experts, one .npy per projection (``format.expert_file``)."""
    experts = model.experts_in(layer)
    assert experts is not None
    for name, holder in (("gate", experts.gate_proj), ("up", experts.up_proj), ("down", experts.down_proj)):
        np.save(dest / fmt.expert_file(prefix, layer, name), np.array(holder.weight.astype(mx.float16)))


def _numbered(part: str, index: int, count: int) -> str:
    """A progress label: the part, numbered when the budget split it."""
    return part if count == 1 else f"{part} {index + 1:02d}of{count:02d}"


def _forget(module) -> None:
    """Replace ``module``'s (evaluated) weights by unevaluated zeros of the same shapes, which hold
    no memory: the export of a lazily loaded model consumes it, part by part."""
    module.update(tree_map(lambda a: mx.zeros(a.shape, a.dtype), module.parameters()))


def compile_package(path: Path, dest: Path) -> None:
    """``xcrun coremlcompiler compile`` (macOS): the runtimes load the compiled .mlmodelc."""
    done = subprocess.run(
        ["xcrun", "coremlcompiler", "compile", str(path), str(dest)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise UserError(f"coremlcompiler failed on {path.name}: {done.stderr.strip().splitlines()[-1:]}")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

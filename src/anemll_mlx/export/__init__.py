"""``export``: a loaded model to a folder of chunked, stateful Core ML programs in ANEMLL's layout.

The folder is built beside the destination under a temporary name and renamed only when complete,
so an interrupted export leaves the destination as it was.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import coremltools as ct
import numpy as np

from .. import interrupts
from ..errors import BadArgumentError, UserError
from ..loading import LoadedModel
from ..ops.mil_ops import MILOps
from ..output import OutputFolder
from ..quant.lut import LUTSpec
from . import package, programs
from .meta import write_meta, write_tokenizer_files
from .plan import ExportPlan, plan_export
from .weights import WeightStore

Progress = Callable[[str, int, int], None]  # (part, steps done, steps total)


@dataclass
class ExportOptions:
    context: int = 512
    batch: int = 64
    chunk: int | str = "auto"
    max_chunk_mb: float = 950.0
    lut_ffn: LUTSpec | None = None
    lut_lm_head: LUTSpec | None = None
    lut_embed: LUTSpec | None = None
    fp16_scale: float | None = None  # already resolved: None = no scaling
    prefix: str | None = None
    split_lm_head: int | str = "auto"
    attention_chunk: int | None = None  # None: batch // 2
    argmax_in_model: bool = False
    compile: str = "auto"  # auto | yes | no
    force: bool = False

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
        if not self.max_chunk_mb > 0:
            raise BadArgumentError(f"--max-chunk-mb must be > 0, got {self.max_chunk_mb}")
        if self.fp16_scale is not None and not 0 < self.fp16_scale <= 1:
            raise BadArgumentError(f"--fp16-scale must be in (0, 1], got {self.fp16_scale}")
        if self.compile not in ("auto", "yes", "no"):
            raise BadArgumentError(f"--compile must be auto, yes or no, not '{self.compile}'")
        if self.compile == "yes" and not can_compile():
            raise UserError("--compile yes needs macOS with Xcode's coremlcompiler (xcrun); use --compile no")

    def check_model(self, model) -> None:
        """Checks against the model's hyper-parameters (a skeleton from its config is enough)."""
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

    def validate(self, model) -> None:
        self.check_flags()
        self.check_model(model)


@dataclass
class ExportResult:
    out: Path
    plan: ExportPlan
    files: dict[str, int] = field(default_factory=dict)  # package name -> bytes
    seconds: float = 0.0
    compiled: bool = False


ARCH_NAMES = {"llama": "llama", "qwen3": "qwen", "qwen2": "qwen25", "gemma3_text": "gemma3"}


def part_names(prefix: str, options: ExportOptions, chunks: int) -> dict[str, str]:
    """File stems as ANEMLL names them: prefix, part, `_lut{bits}` when palettized, chunk NNofMM."""

    def lut(spec: LUTSpec | None) -> str:
        return f"_lut{spec.bits}" if spec else ""

    names = {
        "embeddings": f"{prefix}_embeddings{lut(options.lut_embed)}",
        "lm_head": f"{prefix}_lm_head{lut(options.lut_lm_head)}",
    }
    for i in range(chunks):
        names[f"chunk{i}"] = f"{prefix}_FFN_PF{lut(options.lut_ffn)}_chunk_{i + 1:02d}of{chunks:02d}"
    return names


def check_output(out: str | Path, force: bool, source: Path | None) -> OutputFolder:
    """The export's destination, checked before any work (see ``anemll_mlx.output``)."""
    return OutputFolder.check(out, kind="export", force=force, protect=[source])


def can_compile() -> bool:
    return platform.system() == "Darwin" and shutil.which("xcrun") is not None


def export_model(
    lm: LoadedModel,
    out: Path | OutputFolder,
    options: ExportOptions,
    progress: Progress | None = None,
    plan: ExportPlan | None = None,
) -> ExportResult:
    """Write the export of ``lm`` to ``out``.  Applies ``options.fp16_scale`` to ``lm.model`` in place.

    ``out`` may be a folder already checked with ``OutputFolder.check`` (the CLI checks it before
    loading the model); a plain path is checked here.  Nothing appears under ``out`` until the
    export is complete.
    """
    started = time.perf_counter()
    options.validate(lm.model)
    target = out if isinstance(out, OutputFolder) else check_output(out, options.force, lm.path)
    model = lm.model
    if options.fp16_scale is not None:
        from ..probe.scale import apply_fp16_scale

        apply_fp16_scale(model, options.fp16_scale)
    plan = plan or plan_export(
        model, options.chunk, options.max_chunk_mb, options.lut_ffn, options.lut_lm_head, options.lut_embed,
        options.split_lm_head,
    )
    prefix = options.prefix or ARCH_NAMES[lm.architecture]
    names = part_names(prefix, options, len(plan.chunks))

    def report(part: str, done: int, total: int) -> None:
        interrupts.check()
        if progress is not None:
            progress(part, done, total)

    with target.build() as scratch:
        module_names = {id(m): name for name, m in model.named_modules()}
        store = WeightStore(module_names, options.lut_ffn, options.lut_lm_head, options.lut_embed)
        ops = MILOps(options.attention_chunk or max(1, options.batch // 2), store, options.context)
        result = ExportResult(out=target.path, plan=plan)

        report("embeddings", 0, 1)
        shapes = ct.EnumeratedShapes(shapes=[(1, 1), (1, options.batch)], default=(1, options.batch))
        embed = package.convert(
            programs.embeddings_program(model, ops), [ct.TensorType(name="input_ids", shape=shapes, dtype=np.int32)]
        )
        package.save(embed, scratch / f"{names['embeddings']}.mlpackage")
        report("embeddings", 1, 1)

        for i, layers in enumerate(plan.chunks):
            part = f"chunk {i + 1:02d}of{len(plan.chunks):02d}"
            last = i == len(plan.chunks) - 1
            functions = {}
            kinds = programs.function_kinds(model, options.context, options.batch)
            for n, (function, tokens, rotate) in enumerate(kinds):
                report(part, n, len(kinds))
                program = programs.chunk_program(model, ops, layers, tokens, options.context, last, rotate)
                functions[function] = package.convert(program)
            package.save_functions(functions, scratch / f"{names[f'chunk{i}']}.mlpackage", scratch, "infer")
            report(part, len(kinds), len(kinds))

        report("lm_head", 0, 1)
        head = package.convert(programs.lm_head_program(model, ops, plan.head_sizes, options.argmax_in_model))
        package.save(head, scratch / f"{names['lm_head']}.mlpackage")
        report("lm_head", 1, 1)

        write_tokenizer_files(lm, scratch)
        write_meta(lm, scratch, options, plan, names, prefix)
        if options.compile == "yes" or (options.compile == "auto" and can_compile()):
            for stem in names.values():
                compile_package(scratch / f"{stem}.mlpackage", scratch)
            result.compiled = True
    result.files = {stem: _size(target.path / f"{stem}.mlpackage") for stem in names.values()}
    result.seconds = time.perf_counter() - started
    return result


def compile_package(path: Path, dest: Path) -> None:
    """``xcrun coremlcompiler compile`` (macOS): the runtimes load the compiled .mlmodelc."""
    done = subprocess.run(
        ["xcrun", "coremlcompiler", "compile", str(path), str(dest)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise UserError(f"coremlcompiler failed on {path.name}: {done.stderr.strip().splitlines()[-1:]}")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

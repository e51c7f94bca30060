"""``export``: a loaded model to a folder of chunked, stateful Core ML programs in ANEMLL's layout.

The folder is built beside the destination under a temporary name and renamed only when complete,
so an interrupted export leaves the destination as it was.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import coremltools as ct
import numpy as np

from ..errors import BadArgumentError, UserError
from ..loading import LoadedModel
from ..ops.mil_ops import MILOps
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

    def validate(self, lm: LoadedModel) -> None:
        limit = lm.model.args.max_position_embeddings
        if self.context < 1 or self.batch < 1:
            raise BadArgumentError("--context and --batch must be positive")
        if self.context % self.batch:
            raise BadArgumentError(f"--context {self.context} must be a multiple of --batch {self.batch}")
        if self.context > limit:
            raise BadArgumentError(f"--context {self.context} exceeds the model's max_position_embeddings {limit}")
        chunk = self.attention_chunk or max(1, self.batch // 2)
        if not 1 <= chunk <= self.batch:
            raise BadArgumentError(f"--attention-chunk {chunk} must be between 1 and --batch {self.batch}")
        if self.compile not in ("auto", "yes", "no"):
            raise BadArgumentError(f"--compile must be auto, yes or no, not '{self.compile}'")
        if self.compile == "yes" and not can_compile():
            raise UserError("--compile yes needs macOS with Xcode's coremlcompiler (xcrun); use --compile no")
        window = programs.split_window(lm.model, self.context)
        if window is not None and window % self.batch:
            # a prefill batch must never straddle the window: batches before it use `prefill`, the
            # rest `prefill_rotate` (then window + batch <= context follows from context % batch == 0)
            raise UserError(
                f"Gemma3 export with --context {self.context} larger than its sliding window {window} "
                f"needs the window to be a multiple of --batch {self.batch}; pick a --batch that divides "
                f"{window}, or --context <= {window}"
            )


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


def can_compile() -> bool:
    return platform.system() == "Darwin" and shutil.which("xcrun") is not None


def prepare_output(out: Path, force: bool) -> Path:
    """Check the destination and return a fresh scratch folder beside it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    return scratch


def export_model(
    lm: LoadedModel, out: Path, options: ExportOptions, progress: Progress | None = None, plan: ExportPlan | None = None
) -> ExportResult:
    """Write the export of ``lm`` to ``out``.  Applies ``options.fp16_scale`` to ``lm.model`` in place."""
    started = time.perf_counter()
    options.validate(lm)
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
    scratch = prepare_output(out, options.force)
    report = progress or (lambda part, done, total: None)
    try:
        module_names = {id(m): name for name, m in model.named_modules()}
        store = WeightStore(module_names, options.lut_ffn, options.lut_lm_head, options.lut_embed)
        ops = MILOps(options.attention_chunk or max(1, options.batch // 2), store, options.context)
        result = ExportResult(out=out, plan=plan)

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
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    result.files = {stem: _size(out / f"{stem}.mlpackage") for stem in names.values()}
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

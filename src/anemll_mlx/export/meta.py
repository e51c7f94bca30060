"""meta.yaml's contents and the files beside the programs that ANEMLL's runtimes read.

Every key ANEMLL reads is written under model_info.parameters; ours (provenance, fp16 scale,
attention chunk, KV state layout) sit under an ``anemll_mlx`` section they ignore.  The keys
themselves are ``anemll_mlx.format``'s; this module supplies the values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .. import format as fmt
from ..loading import LoadedModel, files_sha256
from ..loading.checkpoint import QAT_FILE
from ..loading.tokenizer import write_tokenizer
from .plan import ExportPlan
from .programs import kv_states

if TYPE_CHECKING:
    from ..probe.calibrate import InputMoments


def write_tokenizer_files(lm: LoadedModel, dest: Path) -> None:
    """The source's tokenizer files (rebuilt from the metadata of a GGUF source) and its config."""
    write_tokenizer(lm.tokenizer, lm.folder, dest)
    (dest / "config.json").write_text(json.dumps(lm.config, indent=2, sort_keys=True))


def export_meta(
    lm: LoadedModel,
    options,
    plan: ExportPlan,
    files: fmt.PartFiles,
    prefix: str,
    moments: InputMoments | None = None,
) -> fmt.ExportMeta:
    """What meta.yaml says of this export (``format.ExportMeta`` spells it out in keys); ``moments``:
    the calibration statistics the LUTs were weighted by (``probe.calibrate.InputMoments``), if any."""
    model, args = lm.model, lm.model.args
    name = Path(lm.source).stem if lm.gguf_path else Path(lm.source.rstrip("/")).name
    lut = {
        part: fmt.LUTSetting(spec.bits, spec.group_size) if spec else None for part, spec in options.lut.items()
    }
    return fmt.ExportMeta(
        name=f"anemll-{name}",
        version=__version__,
        description=f"{name} exported by anemll-mlx for the Apple Neural Engine",
        license=lm.config.get("license", "see the source model"),
        architecture=fmt.ARCHITECTURES[lm.architecture],
        context=options.context,
        batch=options.batch,
        lut=lut,
        prefix=prefix,
        files=files,
        head_sizes=plan.head_sizes,
        head_part_pieces=[len(part) for part in plan.head_parts] if len(plan.head_parts) > 1 else None,
        vocab_size=args.vocab_size,
        argmax_in_model=options.argmax_in_model,
        sliding_window=model.sliding_window,
        source=lm.source,
        source_sha256=lm.content_sha256,
        model_type=lm.architecture,
        fp16_scale=model.fp16_scale,
        attention_chunk=options.attention_chunk or max(1, options.batch // 2),
        hidden_size=args.hidden_size,
        num_layers=args.num_hidden_layers,
        chunk_layers=plan.chunks,
        kv_states=kv_states(model, options.context),
        calibration=fmt.Calibration(moments.source, moments.tokens) if moments is not None else None,
        lut_source=_lut_source(lm, options),
        moe=plan.moe_layout(),
        embeddings_rows=plan.embed_parts if len(plan.embed_parts) > 1 else None,
    )


def _lut_source(lm: LoadedModel, options) -> dict | None:
    """Where the LUTs of a checkpoint's parts came from: the folder and its qat.json's hash."""
    checkpoint = options.checkpoint_lut
    if checkpoint is None or lm.folder is None:
        return None
    return {
        "checkpoint": str(lm.folder),
        "qat_json_sha256": files_sha256([lm.folder / QAT_FILE]),
        "parts": [part for part, spec in checkpoint.items() if spec is not None],
    }

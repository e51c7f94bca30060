"""meta.yaml's contents and the files beside the programs that ANEMLL's runtimes read.

Every key ANEMLL reads is written under model_info.parameters; ours (provenance, fp16 scale,
attention chunk, KV state layout) sit under an ``anemll_mlx`` section they ignore.  The keys
themselves are ``anemll_mlx.format``'s; this module supplies the values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .. import format as fmt
from ..loading import LoadedModel
from .plan import ExportPlan
from .programs import kv_states

if TYPE_CHECKING:
    from ..probe.calibrate import InputMoments

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def write_tokenizer_files(lm: LoadedModel, dest: Path) -> None:
    """Copy the source's tokenizer files; a GGUF source gets them rebuilt from its metadata."""
    if lm.folder is not None:
        for name in TOKENIZER_FILES:
            if (lm.folder / name).exists():
                shutil.copy2(lm.folder / name, dest / name)
    else:
        tok = lm.tokenizer
        (dest / "tokenizer.json").write_text(tok.backend.to_str(pretty=True))
        (dest / "tokenizer_config.json").write_text(json.dumps(tok.config, indent=2, sort_keys=True))
        eos = sorted(tok.eos_token_ids)
        gen = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))
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
    )

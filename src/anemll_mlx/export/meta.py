"""meta.yaml and the files beside the programs that ANEMLL's runtimes read.

Every key ANEMLL reads is written under model_info.parameters; ours (provenance, fp16 scale,
attention chunk, KV state layout) sit under an ``anemll_mlx`` section they ignore.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from .. import __version__
from ..loading import LoadedModel
from ..loading.safetensors import checkpoint_files
from .plan import ExportPlan
from .programs import GLOBAL_STATE, LOCAL_STATE, STATE_NAME, kv_state_shape, kv_state_shapes, split_window

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


def source_sha256(lm: LoadedModel) -> str:
    """sha256 over the weight files, in name order: identifies exactly what was exported."""
    files = [lm.gguf_path] if lm.gguf_path else checkpoint_files(lm.folder)
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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


def _lut_keys(name: str, spec) -> dict:
    if spec is None:
        return {f"lut_{name}": "none"}
    out: dict = {f"lut_{name}": spec.bits}
    out[f"lut_{name}_per_channel"] = spec.group_size if spec.group_size is not None else 0
    return out


def write_meta(lm: LoadedModel, dest: Path, options, plan: ExportPlan, names: dict[str, str], prefix: str) -> None:
    from . import ARCH_NAMES

    args = lm.model.args
    name = Path(lm.source).stem if lm.gguf_path else Path(lm.source.rstrip("/")).name
    params: dict = {
        "context_length": options.context,
        "batch_size": options.batch,
        **_lut_keys("embeddings", options.lut_embed),
        **_lut_keys("ffn", options.lut_ffn),
        **_lut_keys("lmhead", options.lut_lm_head),
        "num_chunks": len(plan.chunks),
        "model_prefix": prefix,
        "embeddings": names["embeddings"],
        "lm_head": names["lm_head"],
        "ffn": names["chunk0"],
        "split_lm_head": len(plan.head_sizes),
        "vocab_size": args.vocab_size,
        "lm_head_chunk_sizes": plan.head_sizes,
        "argmax_in_model": options.argmax_in_model,
    }
    if getattr(args, "sliding_window", None):
        params["sliding_window"] = args.sliding_window
    meta = {
        "model_info": {
            "name": f"anemll-{name}",
            "version": __version__,
            "description": f"{name} exported by anemll-mlx for the Apple Neural Engine",
            "license": lm.config.get("license", "see the source model"),
            "author": "anemll-mlx",
            "framework": "Core ML",
            "language": "Python",
            "architecture": ARCH_NAMES[lm.architecture],
            "parameters": params,
        },
        "anemll_mlx": {
            "version": __version__,
            "source": lm.source,
            "source_sha256": source_sha256(lm),
            "model_type": lm.architecture,
            "fp16_scale": options.fp16_scale,
            "attention_chunk": options.attention_chunk or max(1, options.batch // 2),
            "hidden_size": args.hidden_size,
            "num_layers": args.num_hidden_layers,
            "chunk_layers": [[r.start, r.stop] for r in plan.chunks],
        },
    }
    ours = meta["anemll_mlx"]
    if split_window(lm.model, options.context) is None:
        ours["kv_state"] = {"name": STATE_NAME, "shape": list(kv_state_shape(lm.model, options.context))}
    else:
        # Gemma3 past its window: two states, and functions infer_rotate/prefill_rotate that hosts
        # call once current_pos >= sliding_window (positions are absolute in both states)
        layers = {
            LOCAL_STATE: [i for i in range(args.num_hidden_layers) if args.is_sliding(i)],
            GLOBAL_STATE: [i for i in range(args.num_hidden_layers) if not args.is_sliding(i)],
        }
        ours["kv_states"] = [
            {"name": name, "shape": list(shape), "layers": layers[name]}
            for name, shape in kv_state_shapes(lm.model, options.context).items()
        ]
    (dest / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))

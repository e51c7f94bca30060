"""From a source (Hugging Face folder, hub id, or GGUF file) to a ready MLX model and tokenizer.

One entry point, ``load``.  Weights are safetensors or GGUF only: pickles are never opened and no
code from the model repository is ever run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import BadArgumentError, CorruptModelError, ModelNotFoundError
from ..models import build_model
from ..models.base import DecoderModel, parameter_arrays
from . import hub
from .checkpoint import split_checkpoint
from .safetensors import checkpoint_files, load_safetensors
from .tokenizer import Tokenizer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from (export copies tokenizer files from ``folder``)."""

    model: DecoderModel
    tokenizer: Tokenizer
    config: dict  # the text config the model was built from
    source: str
    folder: Path | None  # Hugging Face folder, None for GGUF
    gguf_path: Path | None
    dtype: mx.Dtype
    lazy: bool = False  # weights read when first used (see ``load``)

    @property
    def architecture(self) -> str:
        return self.config["model_type"]

    @property
    def path(self) -> Path:
        """The GGUF file or the folder the weights came from (a hub id's snapshot folder)."""
        path = self.gguf_path or self.folder
        if path is None:
            raise ValueError("a loaded model has a folder or a GGUF file")
        return path

    @property
    def weight_files(self) -> list[Path]:
        return [self.gguf_path] if self.gguf_path else checkpoint_files(self.path)

    @property
    def content_sha256(self) -> str:
        """sha256 over the weight files in name order: what a model is, whatever its name or path."""
        return files_sha256(self.weight_files)

    @property
    def num_parameters(self) -> int:
        return sum(v.size for v in parameter_arrays(self.model))

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in parameter_arrays(self.model))


def parse_dtype(name: str) -> mx.Dtype:
    if name not in DTYPES:
        raise BadArgumentError(f"unknown dtype '{name}' (choose one of {', '.join(DTYPES)})")
    return DTYPES[name]


def load(source: str | Path, dtype: str | mx.Dtype = "float32", lazy: bool = False) -> LoadedModel:
    """Load a model from a local HF folder, a GGUF file or a hub id ``org/name``.

    ``lazy`` leaves every weight unread until it is first used: safetensors are read tensor by
    tensor from disk, GGUF tensors dequantized one at a time, and a caller that drops what it has
    used (export, part by part) holds one part's weights at a time instead of the whole model.
    """
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype, lazy)
    if path.is_dir():
        return _load_folder(path, dtype, text, lazy)
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    if hub.looks_like_hub_id(text):
        return _load_folder(hub.download(text), dtype, text, lazy)
    raise ModelNotFoundError(f"no such file or folder: {text}")


def read_config(source: str | Path) -> tuple[dict, Path]:
    """The text config of a model and the file or folder it lives in, without reading any weights.

    Enough to check flags against the model and to plan an export before loading gigabytes; an
    unsupported architecture fails here too.  A hub id fetches config.json alone.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import hf_config, read_header

        config = hf_config(path, read_header(path))
    elif path.is_dir():
        config = _folder_config(path)
    elif path.is_file() and path.suffix.lower() == ".json":  # a config.json alone: enough to plan
        config = _config_file(path)
    elif path.exists():
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    elif hub.looks_like_hub_id(text):
        path = hub.download_config(text)
        config = _folder_config(path)
    else:
        raise ModelNotFoundError(f"no such file or folder: {text}")
    build_model(config)  # an unsupported architecture or a config missing keys fails here
    return config, path


def _folder_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    return _config_file(config_path)


def _config_file(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CorruptModelError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CorruptModelError(f"{config_path} is not a JSON object")
    return text_config(config)


def _load_folder(folder: Path, dtype: mx.Dtype, source: str, lazy: bool) -> LoadedModel:
    config = _folder_config(folder)
    build_model(config)  # fail on an unsupported architecture before reading gigabytes
    weights = load_safetensors(folder)  # lazy: mx.load reads a tensor when it is evaluated
    # a LUT checkpoint (loading/checkpoint.py): its tables become dense weights, kept for the export
    checkpoint = split_checkpoint(folder, config, weights)
    model = _assemble(config, weights, dtype, lazy)
    if checkpoint is not None:
        model.lut = checkpoint.lut
        model.lut_weights.update(checkpoint.luts)
    return LoadedModel(model, Tokenizer.from_folder(folder), config, source, folder, None, dtype, lazy)


def _load_gguf(path: Path, dtype: mx.Dtype, lazy: bool) -> LoadedModel:
    from .gguf import read_gguf

    gguf = read_gguf(path, dtype, lazy)
    model = _assemble(gguf.config, gguf.weights, dtype, lazy)
    tokenizer = Tokenizer(gguf.tokenizer, gguf.tokenizer_config, {"eos_token_id": gguf.config.get("eos_token_id")})
    return LoadedModel(model, tokenizer, gguf.config, str(path), None, path, dtype, lazy)


def text_config(config: dict) -> dict:
    """The language-model part of a config: a multimodal ``gemma3`` or ``gemma4`` keeps it under text_config."""
    wrapped = _WRAPPERS.get(config.get("model_type"))  # type: ignore[arg-type]
    if wrapped is not None:
        text_type, default_vocab = wrapped
        inner = dict(config.get("text_config") or {})
        inner.setdefault("model_type", text_type)
        for key in ("vocab_size", "tie_word_embeddings", "eos_token_id", "bos_token_id"):
            if key in config and key not in inner:
                inner[key] = config[key]
        inner.setdefault("vocab_size", default_vocab)
        return inner
    return config


# multimodal model_type -> (its text model's model_type, the vocabulary size when none is given)
_WRAPPERS = {"gemma3": ("gemma3_text", 262208), "gemma4": ("gemma4_text", 262144)}


def _assemble(config: dict, weights: dict[str, mx.array], dtype: mx.Dtype, lazy: bool) -> DecoderModel:
    """Build the model and load ``weights`` (HF names) into it, strictly, in ``dtype``; evaluated
    now unless ``lazy``."""
    weights = _language_model_weights(weights)
    config = dict(config)
    if "lm_head.weight" not in weights:
        config["tie_word_embeddings"] = True
    elif config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight")
    model = build_model(config)
    weights = model.sanitize(weights)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CorruptModelError(f"weights do not match the {config['model_type']} config: {_short(e)}") from None
    if not lazy:
        mx.eval(model.parameters())
    return model


def _language_model_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Drop rotary buffers and vision towers; strip multimodal prefixes to the text model's names."""
    out = {}
    for name, value in weights.items():
        for prefix in ("language_model.model.", "model.language_model."):
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :]
        if name.startswith("language_model.lm_head."):
            name = name[len("language_model.") :]
        if name.startswith(("model.", "lm_head.")) and "rotary_emb" not in name:
            out[name] = value
    return out


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) < 300 else text[:300] + "..."


__all__ = ["LoadedModel", "load", "read_config", "parse_dtype", "DTYPES", "BadArgumentError"]


_HASHES: dict[str, str] = {}  # the files' paths, sizes and mtimes -> sha256, for this process


def files_sha256(files: list[Path]) -> str:
    """sha256 over the contents of ``files`` in order (memoised per file state within a process)."""
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]

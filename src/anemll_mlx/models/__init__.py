"""Architectures by Hugging Face ``model_type``: one file per family, one registry here.

A new family is its model file plus a line in ``ARCHITECTURES`` (plus a GGUF name table in
loading/gguf.py if it loads from GGUF).
"""

from __future__ import annotations

from ..errors import UnsupportedError
from . import gemma3, gemma4, llama, qwen3_moe
from .base import BaseArgs, DecoderModel

# model_type -> (hyper-parameter class, model class)
ARCHITECTURES: dict[str, tuple[type[BaseArgs], type[DecoderModel]]] = {
    "llama": (llama.LlamaArgs, llama.Model),
    "qwen2": (llama.Qwen2Args, llama.Model),
    "qwen3": (llama.Qwen3Args, llama.Model),
    "qwen3_moe": (qwen3_moe.Qwen3MoeArgs, qwen3_moe.Model),
    "gemma3_text": (gemma3.Gemma3Args, gemma3.Model),
    "gemma4_text": (gemma4.Gemma4Args, gemma4.Model),
}
SUPPORTED = tuple(ARCHITECTURES) + ("gemma3", "gemma4")


def build_model(config: dict) -> DecoderModel:
    """An uninitialised model for a text config (a ``gemma3``/``gemma4`` config must be unwrapped first).

    Its weights are lazy zeros: shapes are known (enough to plan an export) and nothing is
    computed or allocated until they are evaluated or replaced by loaded weights.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedError(f"unsupported model_type '{model_type}' (supported: {', '.join(SUPPORTED)})")
    args_class, model_class = ARCHITECTURES[model_type]
    return model_class(args_class.from_config(config))  # type: ignore[call-arg]

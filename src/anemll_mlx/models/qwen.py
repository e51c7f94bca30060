"""Qwen2 / Qwen2.5 and Qwen3: LLaMA blocks with two differences, so they reuse ``llama.Model``.

Qwen2 puts biases on q/k/v (never on o); Qwen3 drops the biases and normalises q and k per head.
"""

from __future__ import annotations

from dataclasses import dataclass

from .llama import LlamaArgs


@dataclass
class Qwen2Args(LlamaArgs):
    tie_word_embeddings: bool = True

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False


@dataclass
class Qwen3Args(LlamaArgs):
    qk_norm: bool = True

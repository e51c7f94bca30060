"""The LLaMA family: Llama 2/3.x (llama3 RoPE scaling), SmolLM/SmolLM2, DeepSeek-R1 LLaMA distills,
and, through two switches, Qwen2 (q/k/v biases) and Qwen3 (RMSNorm on q and k per head).

Pre-norm blocks: h = x + attn(norm(x)); out = h + mlp(norm(h)).  Every method takes the ``ops``
backend first, so this one definition is both the MLX reference and the traced export.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from ..ops.vocabulary import Linear, Norm, Ops, RoPE, Step, Tensor, rope_inv_freq
from .base import MLP, Attention, BaseArgs, DecoderModel


@dataclass
class LlamaArgs(BaseArgs):
    attention_bias: bool = False  # Qwen2 sets q/k/v biases (o_proj never has one there)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


@dataclass
class Qwen2Args(LlamaArgs):
    """Qwen2 / Qwen2.5: biases on q, k and v (never on o), tied embeddings by default."""

    tie_word_embeddings: bool = True

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False


@dataclass
class Qwen3Args(LlamaArgs):
    """Qwen3: no biases, RMSNorm on q and k per head."""

    qk_norm: bool = True


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        scale = args.head_dim**-0.5
        self.self_attn = Attention(args, scale, args.qkv_bias, args.o_bias, args.qk_norm)
        self.mlp: nn.Module = MLP(args, "silu", args.mlp_bias)  # a family may put a mixture of experts here
        self.input_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = Norm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step) -> Tensor:
        attn = ops.tap("attn_out", layer, self.self_attn(ops, ops.rms_norm(x, self.input_layernorm), layer, rope, step))
        h = ops.add(x, attn)
        mlp = ops.tap("mlp_out", layer, self.mlp(ops, ops.rms_norm(h, self.post_attention_layernorm), layer))
        return ops.tap("residual", layer, ops.add(h, mlp))

    def branch_outputs(self) -> list[Linear | Norm]:
        return [self.self_attn.o_proj, self.mlp.down_proj]

    def stream_norms(self) -> list[Norm]:
        return [self.input_layernorm, self.post_attention_layernorm]


class Model(DecoderModel):
    """Token ids -> logits for every LLaMA-shaped config (llama, qwen2, qwen3)."""

    def __init__(self, args: LlamaArgs):
        super().__init__(args, [Block(args) for _ in range(args.num_hidden_layers)])
        self.rope = RoPE(
            rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), args.max_position_embeddings
        )

    def rope_for(self, layer: int) -> RoPE:
        return self.rope

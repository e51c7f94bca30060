"""Gemma 3 (text): ``gemma3_text`` and the language half of ``gemma3``.

Differs from LLaMA in ways that matter on the ANE: four norms per block (post-norms on both
branches, with (1 + w) gains folded into ``Norm.weight`` at load), embeddings scaled by
sqrt(hidden), q/k norms, attention scaled by query_pre_attn_scalar, gelu(tanh) MLP, and most
layers attending over a sliding window with their own RoPE base.  The post-norm gains let the
residual stream grow past fp16's 65504: see ``anemll-mlx probe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.nn as nn

from ..errors import UnsupportedError
from .base import BaseArgs, DecoderModel, Linear, Norm, RoPE, Step, rope_inv_freq


@dataclass
class Gemma3Args(BaseArgs):
    query_pre_attn_scalar: float | None = None
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    rope_local_base_freq: float = 10000.0
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = [
                "full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if self.final_logit_softcapping or self.attn_logit_softcapping:
            raise UnsupportedError("Gemma3 with logit soft-capping is not supported (Gemma3 checkpoints set it to null)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedError(f"Gemma3 hidden_activation '{self.hidden_activation}' is not supported")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


class Attention(nn.Module):
    def __init__(self, args: Gemma3Args, sliding: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.sliding = sliding
        self.scale = args.query_pre_attn_scalar**-0.5
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size)
        self.q_norm = Norm(self.head_dim, args.rms_norm_eps)
        self.k_norm = Norm(self.head_dim, args.rms_norm_eps)

    def __call__(self, ops, x, layer: int, rope: RoPE, step: Step):
        q = ops.split_heads(ops.linear(x, self.q_proj), self.n_heads, self.head_dim)
        k = ops.split_heads(ops.linear(x, self.k_proj), self.n_kv_heads, self.head_dim)
        v = ops.split_heads(ops.linear(x, self.v_proj), self.n_kv_heads, self.head_dim)
        q, k = ops.rms_norm(q, self.q_norm), ops.rms_norm(k, self.k_norm)
        q, k = ops.rope(q, rope, step), ops.rope(k, rope, step)
        k, v = step.cache.update(layer, k, v, step)
        out = ops.attention(q, k, v, step.mask(self.sliding), self.scale)
        return ops.linear(ops.merge_heads(out), self.o_proj)


class MLP(nn.Module):
    def __init__(self, args: Gemma3Args):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size)

    def __call__(self, ops, x, layer: int):
        hidden = ops.mul(ops.gelu_tanh(ops.linear(x, self.gate_proj)), ops.linear(x, self.up_proj))
        hidden = ops.tap("mlp_hidden", layer, hidden)
        return ops.linear(hidden, self.down_proj)


class Block(nn.Module):
    def __init__(self, args: Gemma3Args, layer: int):
        super().__init__()
        self.self_attn = Attention(args, args.is_sliding(layer))
        self.mlp = MLP(args)
        self.input_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = Norm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, ops, x, layer: int, rope: RoPE, step: Step):
        attn = self.self_attn(ops, ops.rms_norm(x, self.input_layernorm), layer, rope, step)
        attn = ops.tap("attn_out", layer, ops.rms_norm(attn, self.post_attention_layernorm))
        h = ops.add(x, attn)
        mlp = self.mlp(ops, ops.rms_norm(h, self.pre_feedforward_layernorm), layer)
        mlp = ops.tap("mlp_out", layer, ops.rms_norm(mlp, self.post_feedforward_layernorm))
        return ops.tap("residual", layer, ops.add(h, mlp))


class Model(DecoderModel):
    """Token ids -> logits for Gemma 3 text models."""

    # Norm gains are stored as (1 + w): see loading.weights.fold_gemma_norms.
    norm_offset = 1.0

    def __init__(self, args: Gemma3Args):
        super().__init__(args, [Block(args, i) for i in range(args.num_hidden_layers)])
        self.embed_scale = math.sqrt(args.hidden_size)
        self.sliding_window = args.sliding_window
        length = args.max_position_embeddings
        self.global_rope = RoPE(rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), length)
        self.local_rope = RoPE(rope_inv_freq(args.head_dim, args.rope_local_base_freq, None), length)

    def rope_for(self, layer: int) -> RoPE:
        return self.local_rope if self.args.is_sliding(layer) else self.global_rope

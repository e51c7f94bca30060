"""The LLaMA family: Llama 2/3.x (llama3 RoPE scaling), SmolLM/SmolLM2, DeepSeek-R1 LLaMA distills,
and, through two switches, Qwen2 (q/k/v biases) and Qwen3 (RMSNorm on q and k per head).

Pre-norm blocks: h = x + attn(norm(x)); out = h + mlp(norm(h)).  Every method takes the ``ops``
backend first, so this one definition is both the MLX reference and the traced export.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from .base import BaseArgs, DecoderModel, Linear, Norm, RoPE, Step, rope_inv_freq


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


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        bias = args.qkv_bias
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, args.o_bias)
        if args.qk_norm:
            self.q_norm = Norm(self.head_dim, args.rms_norm_eps)
            self.k_norm = Norm(self.head_dim, args.rms_norm_eps)

    def __call__(self, ops, x, layer: int, rope: RoPE, step: Step):
        q = ops.split_heads(ops.linear(x, self.q_proj), self.n_heads, self.head_dim)
        k = ops.split_heads(ops.linear(x, self.k_proj), self.n_kv_heads, self.head_dim)
        v = ops.split_heads(ops.linear(x, self.v_proj), self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = ops.rms_norm(q, self.q_norm), ops.rms_norm(k, self.k_norm)
        q, k = ops.rope(q, rope, step), ops.rope(k, rope, step)
        k, v = step.cache.update(layer, k, v, step)
        out = ops.attention(q, k, v, step.mask(sliding=False), self.scale)
        return ops.linear(ops.merge_heads(out), self.o_proj)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, args.mlp_bias)

    def __call__(self, ops, x, layer: int):
        hidden = ops.mul(ops.silu(ops.linear(x, self.gate_proj)), ops.linear(x, self.up_proj))
        hidden = ops.tap("mlp_hidden", layer, hidden)
        return ops.linear(hidden, self.down_proj)


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = Norm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, ops, x, layer: int, rope: RoPE, step: Step):
        attn = ops.tap("attn_out", layer, self.self_attn(ops, ops.rms_norm(x, self.input_layernorm), layer, rope, step))
        h = ops.add(x, attn)
        mlp = ops.tap("mlp_out", layer, self.mlp(ops, ops.rms_norm(h, self.post_attention_layernorm), layer))
        return ops.tap("residual", layer, ops.add(h, mlp))


class Model(DecoderModel):
    """Token ids -> logits for every LLaMA-shaped config (llama, qwen2, qwen3)."""

    def __init__(self, args: LlamaArgs):
        super().__init__(args, [Block(args) for _ in range(args.num_hidden_layers)])
        self.rope = RoPE(
            rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), args.max_position_embeddings
        )

    def rope_for(self, layer: int) -> RoPE:
        return self.rope

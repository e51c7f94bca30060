"""Gemma 3 (text): ``gemma3_text`` and the language half of ``gemma3``.

Differs from LLaMA in ways that matter on the ANE: four norms per block (post-norms on both
branches, with (1 + w) gains folded into ``Norm.weight`` at load by ``sanitize``), embeddings
scaled by sqrt(hidden), q/k norms, attention scaled by query_pre_attn_scalar, gelu(tanh) MLP, and
most layers attending over a sliding window with their own RoPE base.  The post-norm gains let the
residual stream grow past fp16's 65504: see ``anemll-mlx probe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import UnsupportedError
from ..ops.vocabulary import Linear, Norm, Ops, RoPE, Step, Tensor, rope_inv_freq
from .base import MLP, Attention, BaseArgs, DecoderModel


@dataclass
class Gemma3Args(BaseArgs):
    query_pre_attn_scalar: float = 0.0  # 0: head_dim
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
        self.query_pre_attn_scalar = self.query_pre_attn_scalar or self.head_dim
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
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"


class Block(nn.Module):
    def __init__(self, args: Gemma3Args, layer: int):
        super().__init__()
        scale = args.query_pre_attn_scalar**-0.5
        self.self_attn = Attention(args, scale, qk_norm=True, sliding=args.is_sliding(layer))
        self.mlp = MLP(args, "gelu_tanh")
        self.input_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = Norm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = Norm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step) -> Tensor:
        attn = self.self_attn(ops, ops.rms_norm(x, self.input_layernorm), layer, rope, step)
        attn = ops.tap("attn_out", layer, ops.rms_norm(attn, self.post_attention_layernorm))
        h = ops.add(x, attn)
        mlp = self.mlp(ops, ops.rms_norm(h, self.pre_feedforward_layernorm), layer)
        mlp = ops.tap("mlp_out", layer, ops.rms_norm(mlp, self.post_feedforward_layernorm))
        return ops.tap("residual", layer, ops.add(h, mlp))

    def branch_outputs(self) -> list[Linear | Norm]:
        # post-norm branches end in their own norm: its gain is the branch's output scale
        return [self.post_attention_layernorm, self.post_feedforward_layernorm]

    def stream_norms(self) -> list[Norm]:
        return [self.input_layernorm, self.pre_feedforward_layernorm]


class Model(DecoderModel):
    """Token ids -> logits for Gemma 3 text models."""

    def __init__(self, args: Gemma3Args):
        super().__init__(args, [Block(args, i) for i in range(args.num_hidden_layers)])
        self.embed_scale = math.sqrt(args.hidden_size)
        self.sliding_window = args.sliding_window
        length = args.max_position_embeddings
        self.global_rope = RoPE(rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), length)
        self.local_rope = RoPE(rope_inv_freq(args.head_dim, args.rope_local_base_freq, None), length)

    def rope_for(self, layer: int) -> RoPE:
        return self.local_rope if self.args.is_sliding(layer) else self.global_rope

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Gemma's RMSNorm multiplies by (1 + w): store 1 + w (in float32) so one ``Norm`` serves all."""
        return {k: (v.astype(mx.float32) + 1.0 if k.endswith("norm.weight") else v) for k, v in weights.items()}

    def unsanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Back to HF's w from the folded 1 + w, in the array's own dtype.  Exact for any gain
        that came from ``sanitize`` (a float32 1 + w minus 1 is w again); the checkpoint writer
        checks the round trip, bit for bit, for gains changed since."""
        return {
            k: ((v.astype(mx.float32) - 1.0).astype(v.dtype) if k.endswith("norm.weight") else v)
            for k, v in weights.items()
        }

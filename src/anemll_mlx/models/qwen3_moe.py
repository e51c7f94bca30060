"""Qwen3 mixture of experts (``qwen3_moe``: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention,
and in the sparse layers a router picking ``num_experts_per_tok`` of ``num_experts`` gated MLPs.

A layer is sparse when it is not in ``mlp_only_layers`` and (layer + 1) is a multiple of
``decoder_sparse_step``; the others keep Qwen3's dense MLP.  Execution is dense: every expert runs
on every token and the unselected ones are weighted by zero (``Ops.route``, ``Ops.experts``):
static shapes, the same program for every token.  The export splits a layer too large for one
program into an attention part and expert packs (``Block.attention_part``, ``Block.experts_part``),
which the export host runs dense or routed (docs/ARCHITECTURE.md).  Expert weights are held stacked per projection,
(experts, out, in), under mlx-lm's names (``mlp.switch_mlp.{gate,up,down}_proj``); ``sanitize``
stacks a Hugging Face checkpoint's per-expert ``mlp.experts.N.*`` tensors into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import CorruptModelError, UnsupportedError
from ..ops.vocabulary import Experts, Linear, Norm, Ops, RoPE, Step, Tensor, rope_inv_freq
from . import llama
from .base import DecoderModel
from .llama import Qwen3Args

# Mixture-of-experts knobs of neighbouring families that this one does not implement: a config
# setting one of them to anything but its neutral value is refused, naming the key.
UNSUPPORTED_KEYS = {
    "shared_expert_intermediate_size": 0,  # Qwen2-MoE's shared expert
    "n_shared_experts": 0,  # DeepSeek-style shared experts
    "num_shared_experts": 0,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "n_group": 1,  # grouped (DeepSeek-V3) routing
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
}


@dataclass
class Qwen3MoeArgs(Qwen3Args):
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # HF's default; Qwen3-MoE checkpoints set true
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise CorruptModelError(
                    f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and num_experts {self.num_experts}"
                )
            if self.moe_intermediate_size <= 0:
                raise CorruptModelError("a qwen3_moe config with experts needs moe_intermediate_size > 0")
            if self.decoder_sparse_step < 1:
                raise CorruptModelError(f"decoder_sparse_step {self.decoder_sparse_step} must be >= 1")

    @classmethod
    def from_config(cls, config: dict) -> Qwen3MoeArgs:
        for key, neutral in UNSUPPORTED_KEYS.items():
            if config.get(key) not in (None, neutral):
                raise UnsupportedError(f"qwen3_moe config key '{key}' = {config[key]!r} is not supported")
        if config.get("use_sliding_window"):
            raise UnsupportedError("qwen3_moe config key 'use_sliding_window' = true is not supported")
        args = super().from_config(config)
        assert isinstance(args, Qwen3MoeArgs)
        return args

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` routes over experts (mlx-lm's and Hugging Face's rule)."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class SparseMoE(nn.Module):
    """The router (``gate``) and the stacked experts (``switch_mlp``)."""

    def __init__(self, args: Qwen3MoeArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = Linear(args.hidden_size, args.num_experts)
        self.switch_mlp = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size)

    def __call__(self, ops: Ops, x: Tensor, layer: int) -> Tensor:
        weights = ops.route(ops.linear(x, self.gate), self.top_k, self.norm_topk_prob)
        return ops.experts(x, self.switch_mlp, weights, layer)

    @property
    def down_proj(self) -> Linear:
        return self.switch_mlp.down_proj


class Block(llama.Block):
    """Qwen3's block (pre-norm attention, q/k norms) whose MLP is the sparse mixture in sparse layers."""

    has_shared_branch = False  # no branch beside the experts (models/base.py: forward_attention)

    def __init__(self, args: Qwen3MoeArgs, layer: int):
        super().__init__(args)
        if args.is_sparse(layer):
            self.mlp = SparseMoE(args)

    def attention_part(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step) -> tuple[Tensor, Tensor, None]:
        """A sparse layer's first export part: the attention and its residual ``h``, and the
        router's weights (B, T, experts; zero outside the top k) over the normed ``h``; no shared branch."""
        attn = self.self_attn(ops, ops.rms_norm(x, self.input_layernorm), layer, rope, step)
        h = ops.add(x, attn)
        moe = self.mlp
        assert isinstance(moe, SparseMoE)
        logits = ops.linear(self.experts_input(ops, h), moe.gate)
        return h, ops.route(logits, moe.top_k, moe.norm_topk_prob), None

    def experts_input(self, ops: Ops, h: Tensor) -> Tensor:
        return ops.rms_norm(h, self.post_attention_layernorm)

    def experts_part(self, ops: Ops, h: Tensor, weights: Tensor, layer: int, experts: range) -> Tensor:
        """An expert pack: the weighted sum of experts ``experts`` on the normed ``h``."""
        moe = self.mlp
        assert isinstance(moe, SparseMoE)
        return ops.experts(self.experts_input(ops, h), moe.switch_mlp, weights, layer, experts)

    def finish_experts(self, ops: Ops, h: Tensor, shared: None, total: Tensor | None, layer: int) -> Tensor:
        """The layer's output: the residual plus the experts' sum."""
        return h if total is None else ops.add(h, total)

    def pack_norms(self) -> list[Norm]:
        return [self.post_attention_layernorm]

    # branch_outputs: llama's [o_proj, mlp.down_proj]; in a sparse layer ``SparseMoE.down_proj``
    # is every expert's down_proj (one stacked holder)


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class Model(DecoderModel):
    """Token ids -> logits for ``qwen3_moe`` configs."""

    def __init__(self, args: Qwen3MoeArgs):
        super().__init__(args, [Block(args, i) for i in range(args.num_hidden_layers)])
        self.num_experts = args.num_experts
        self.rope = RoPE(
            rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), args.max_position_embeddings
        )

    def rope_for(self, layer: int) -> RoPE:
        return self.rope

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Stack a Hugging Face checkpoint's per-expert projections into (experts, out, in) tensors
        ``mlp.switch_mlp.{gate,up,down}_proj.weight``, as mlx-lm does (an already stacked
        checkpoint is kept as it is)."""
        found: dict[tuple[str, str], dict[int, mx.array]] = {}
        out = {}
        for name, value in weights.items():
            m = _EXPERT.match(name)
            if m is None:
                out[name] = value
            else:
                found.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
        count = self.num_experts
        for (prefix, projection), experts in sorted(found.items()):
            if sorted(experts) != list(range(count)):
                missing = sorted(set(range(count)) - set(experts))
                raise CorruptModelError(f"{prefix}.experts lacks {projection} of experts {missing[:8]} (of {count})")
            out[f"{prefix}.switch_mlp.{projection}.weight"] = mx.stack([experts[e] for e in range(count)])
        return out

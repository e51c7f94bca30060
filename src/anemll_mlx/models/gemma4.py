"""Gemma 4 (text): ``gemma4_text`` and the language half of ``gemma4``, dense and mixture of experts.

What differs from Gemma 3, following mlx-lm's ``gemma4_text``:
- norms multiply by their stored gain (no 1 + w); q/k norms, plus a gain-less norm on the values;
  attention is unscaled (scale 1: the q/k norms set the logit scale);
- global ("full_attention") layers may have their own head dim (``global_head_dim``), their own KV
  head count and keys used as values (``attention_k_eq_v``, ``num_global_key_value_heads``), and a
  rotary embedding over a fraction of the head (``rope_type`` "proportional": the first
  ``partial_rotary_factor`` of the frequency pairs rotate, the others stay as they are);
- the last ``num_kv_shared_layers`` layers compute no keys/values and attend over those of the last
  earlier layer of the same kind (their MLPs are twice as wide with ``use_double_wide_mlp``);
- per-layer inputs (``hidden_size_per_layer_input``): a second embedding table gives every token a
  small vector per layer, mixed with a projection of the embeddings; each layer gates it by its
  stream and adds it back through a projection and a norm;
- every layer ends by multiplying the stream by a learned scalar (``layer_scalar``, ``Ops.gain``);
- ``enable_moe_block``: the FFN branch is the dense MLP plus routed experts (a router reading the
  stream through its own norm, top-k softmax times a per-expert scale, gelu experts), each with
  its post-norm, summed before the branch's post-norm;
- logits soft-capped: cap * tanh(logits / cap).

Per-layer inputs ride along the hidden states on MLX: ``embed`` returns the stream and the inputs
concatenated on the last axis, ``forward_layers`` passes them through, ``final_norm`` drops them.
The export refuses per-layer inputs and KV-shared layers (``export_refusal``): chunks take hidden
states only, and a shared layer's source may sit in another chunk.  A MoE layer too large for one
program exports as an attention part (attention, dense MLP, router) and expert packs, each pack
finishing the layer from the experts' running sum (``Block.finish_experts``; format.py: the chain).  Global layers of another KV
shape export: each KV state is as large as its largest layer (``kv_shape``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CorruptModelError, UnsupportedError
from ..ops.mlx_ops import MLXKVCache
from ..ops.vocabulary import Embedding, Experts, Linear, Norm, Ops, RoPE, Step, Tensor
from .base import MLP, BaseArgs, DecoderModel

DEFAULT_ROPE = {
    "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
    "sliding_attention": {"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"},
}


@dataclass
class Gemma4Args(BaseArgs):
    # defaults as mlx-lm's gemma4_text, so a config that omits a key means the same to both
    head_dim: int = 256
    global_head_dim: int = 0  # 0: head_dim
    num_global_key_value_heads: int | None = None
    num_kv_shared_layers: int = 20
    hidden_size_per_layer_input: int = 256
    vocab_size_per_layer_input: int = 0  # 0: vocab_size
    rope_parameters: dict | None = None
    sliding_window: int = 512
    sliding_window_pattern: int = 5
    layer_types: list[str] | None = None
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = 30.0
    use_double_wide_mlp: bool = True
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.global_head_dim = self.global_head_dim or self.head_dim
        self.vocab_size_per_layer_input = self.vocab_size_per_layer_input or self.vocab_size
        self.rope_parameters = self.rope_parameters or DEFAULT_ROPE
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = [
                "full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise CorruptModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for kind in set(self.layer_types):
            if kind not in ("full_attention", "sliding_attention"):
                raise UnsupportedError(f"gemma4 config key 'layer_types': '{kind}' is not supported")
        if self.num_kv_shared_layers and not 0 < self.num_kv_shared_layers < self.num_hidden_layers:
            raise UnsupportedError(
                f"gemma4 config key 'num_kv_shared_layers' = {self.num_kv_shared_layers} leaves no layer computing keys"
            )
        for layer in range(self.first_shared(), self.num_hidden_layers):
            self.kv_source(layer)  # a shared layer without a source is refused now, not at the first call
        if self.enable_moe_block:
            if not (self.num_experts > 0 and 1 <= self.top_k_experts <= self.num_experts and self.moe_intermediate_size > 0):
                raise CorruptModelError(
                    "a gemma4 config with enable_moe_block needs num_experts > 0, 1 <= top_k_experts <= num_experts "
                    "and moe_intermediate_size > 0"
                )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Gemma4Args:
        for key in ("attn_logit_softcapping", "rope_scaling"):
            if config.get(key):
                raise UnsupportedError(f"gemma4 config key '{key}' = {config[key]!r} is not supported")
        if config.get("rope_traditional"):
            raise UnsupportedError("gemma4 config key 'rope_traditional' = true is not supported")
        if config.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedError(f"gemma4 config key 'hidden_activation' = {config['hidden_activation']!r} is not supported")
        args = super().from_config(config)
        assert isinstance(args, Gemma4Args)
        if "final_logit_softcapping" in config and config["final_logit_softcapping"] is None:
            args.final_logit_softcapping = None  # from_config skips None values: null means no capping
        return args

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def k_eq_v(self, layer: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(layer)

    def layer_kv_heads(self, layer: int) -> int:
        if self.k_eq_v(layer) and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def first_shared(self) -> int:
        """The first layer that reuses another's keys and values (num_hidden_layers when none does)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values ``layer`` attends over: itself, or for a KV-shared layer
        the last layer before the shared ones of the same kind."""
        if layer < self.first_shared():
            return layer
        assert self.layer_types is not None
        same = [i for i in range(self.first_shared()) if self.layer_types[i] == self.layer_types[layer]]
        if not same:
            raise UnsupportedError(
                f"gemma4 config key 'num_kv_shared_layers': layer {layer} ({self.layer_types[layer]}) "
                "has no earlier layer of its kind to share keys with"
            )
        return same[-1]

    def rope(self, kind: str, head_dim: int) -> RoPE:
        """The rotary embedding of ``kind`` layers ("default" or "proportional", as mlx-lm builds them)."""
        assert self.rope_parameters is not None
        params = self.rope_parameters.get(kind, {})
        rope_type = params.get("rope_type", "default")
        base = params.get("rope_theta", 10000.0)
        if rope_type == "default":
            inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        elif rope_type == "proportional":
            # exponents over the whole head, only the first pairs rotated (zero frequency: unrotated)
            rotated = int(head_dim * params.get("partial_rotary_factor", 1.0))
            exponents = np.arange(0, rotated, 2, dtype=np.float64) / head_dim
            periods = params.get("factor", 1.0) * base**exponents
            inv_freq = np.concatenate([1.0 / periods, np.zeros((head_dim - rotated) // 2)])
        else:
            raise UnsupportedError(
                f"gemma4 config key 'rope_parameters': rope_type '{rope_type}' of {kind} is not supported "
                "(supported: default, proportional)"
            )
        return RoPE(inv_freq, self.max_position_embeddings)


# --- blocks -------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Attention of one layer: q/k norms, gain-less v norm, unscaled; keys/values of its own or shared."""

    def __init__(self, args: Gemma4Args, layer: int):
        super().__init__()
        self.sliding = args.is_sliding(layer)
        self.n_heads, self.head_dim = args.num_attention_heads, args.layer_head_dim(layer)
        self.n_kv_heads = args.layer_kv_heads(layer)
        self.k_eq_v = args.k_eq_v(layer)
        H, eps = args.hidden_size, args.rms_norm_eps
        self.q_proj = Linear(H, self.n_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, H)
        self.q_norm = Norm(self.head_dim, eps)
        if layer < args.first_shared():
            self.k_proj = Linear(H, self.n_kv_heads * self.head_dim)
            if not self.k_eq_v:
                self.v_proj = Linear(H, self.n_kv_heads * self.head_dim)
            self.k_norm = Norm(self.head_dim, eps)
            self.v_norm = Norm(self.head_dim, eps, gain=False)

    def __call__(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step, shared: Any) -> tuple[Tensor, Any]:
        """The branch output and the (keys, values) attended over; ``shared`` gives them instead."""
        q = ops.rope(ops.rms_norm(ops.split_heads(ops.linear(x, self.q_proj), self.n_heads, self.head_dim), self.q_norm), rope, step)
        if shared is None:
            k = ops.split_heads(ops.linear(x, self.k_proj), self.n_kv_heads, self.head_dim)
            v = k if self.k_eq_v else ops.split_heads(ops.linear(x, self.v_proj), self.n_kv_heads, self.head_dim)
            k, v = ops.rope(ops.rms_norm(k, self.k_norm), rope, step), ops.rms_norm(v, self.v_norm)
            shared = step.cache.update(layer, k, v, step)
        out = ops.attention(q, shared[0], shared[1], step.mask(self.sliding), 1.0)
        return ops.linear(ops.merge_heads(out), self.o_proj), shared


class Router(nn.Module):
    """Expert weights: a gain-less norm, the gain ``scale`` times 1/sqrt(hidden), the projection,
    softmax over the top k, times ``per_expert_scale`` (the gains under the checkpoint's names)."""

    def __init__(self, args: Gemma4Args):
        super().__init__()
        self.top_k = args.top_k_experts
        self.root = args.hidden_size**-0.5
        self.proj = Linear(args.hidden_size, args.num_experts)
        self.norm = Norm(args.hidden_size, args.rms_norm_eps, gain=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, ops: Ops, x: Tensor) -> Tensor:
        normed = ops.gain(ops.rms_norm(x, self.norm), self, "scale", self.root)
        weights = ops.route(ops.linear(normed, self.proj), self.top_k, True)
        return ops.gain(weights, self, "per_expert_scale")


class MoE(nn.Module):
    """Holds the stacked experts under mlx-lm's name ``experts.switch_glu``."""

    def __init__(self, args: Gemma4Args):
        super().__init__()
        self.switch_glu = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size, "gelu_tanh")


class Block(nn.Module):
    def __init__(self, args: Gemma4Args, layer: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        wide = args.use_double_wide_mlp and layer >= args.first_shared()
        self.mlp = MLP(dataclasses.replace(args, intermediate_size=args.intermediate_size * (2 if wide else 1)), "gelu_tanh")
        self.input_layernorm = Norm(H, eps)
        self.post_attention_layernorm = Norm(H, eps)
        self.pre_feedforward_layernorm = Norm(H, eps)
        self.post_feedforward_layernorm = Norm(H, eps)
        if args.enable_moe_block:
            self.router = Router(args)
            self.experts = MoE(args)
            self.post_feedforward_layernorm_1 = Norm(H, eps)
            self.post_feedforward_layernorm_2 = Norm(H, eps)
            self.pre_feedforward_layernorm_2 = Norm(H, eps)
        if args.hidden_size_per_layer_input:
            self.per_layer_input_gate = Linear(H, args.hidden_size_per_layer_input)
            self.per_layer_projection = Linear(args.hidden_size_per_layer_input, H)
            self.post_per_layer_input_norm = Norm(H, eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(
        self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step, per_layer: Tensor = None, shared: Any = None
    ) -> tuple[Tensor, Any]:
        h, kv = self.attend(ops, x, layer, rope, step, shared)
        ffn = self.mlp(ops, ops.rms_norm(h, self.pre_feedforward_layernorm), layer)
        if "router" in self:
            dense = ops.rms_norm(ffn, self.post_feedforward_layernorm_1)
            routed = ops.experts(self.experts_input(ops, h), self.experts.switch_glu, self.router(ops, h), layer)
            ffn = self.join_experts(ops, dense, routed)
        return self.ffn_end(ops, h, ffn, layer, per_layer), kv

    def attend(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step, shared: Any) -> tuple[Tensor, Any]:
        """The stream after the attention branch, and the keys and values attended over."""
        attn, kv = self.self_attn(ops, ops.rms_norm(x, self.input_layernorm), layer, rope, step, shared)
        return ops.add(x, ops.tap("attn_out", layer, ops.rms_norm(attn, self.post_attention_layernorm))), kv

    def join_experts(self, ops: Ops, dense: Tensor, routed: Tensor | None) -> Tensor:
        """The FFN branch of a MoE layer: the normed dense MLP plus the normed experts' sum."""
        return dense if routed is None else ops.add(dense, ops.rms_norm(routed, self.post_feedforward_layernorm_2))

    def ffn_end(self, ops: Ops, h: Tensor, ffn: Tensor, layer: int, per_layer: Tensor = None) -> Tensor:
        """The FFN branch's post-norm and residual, the per-layer input, and the layer scalar."""
        h = ops.add(h, ops.tap("mlp_out", layer, ops.rms_norm(ffn, self.post_feedforward_layernorm)))
        if per_layer is not None:
            gate = ops.mul(ops.gelu_tanh(ops.linear(h, self.per_layer_input_gate)), per_layer)
            h = ops.add(h, ops.rms_norm(ops.linear(gate, self.per_layer_projection), self.post_per_layer_input_norm))
        # the stream before and after the layer scalar: the probe keeps the larger of the two
        h = ops.tap("residual", layer, h)
        return ops.tap("residual", layer, ops.gain(h, self, "layer_scalar"))

    # --- the export's parts of a MoE layer (models/base.py: forward_attention ...); the export
    # refuses per-layer inputs and KV sharing, so the parts have neither

    @property
    def has_shared_branch(self) -> bool:
        return "router" in self

    def attention_part(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step) -> tuple[Tensor, Tensor, Tensor]:
        """The stream after attention, the router's weights, and the dense MLP beside the experts (normed)."""
        h, _ = self.attend(ops, x, layer, rope, step, None)
        dense = self.mlp(ops, ops.rms_norm(h, self.pre_feedforward_layernorm), layer)
        return h, self.router(ops, h), ops.rms_norm(dense, self.post_feedforward_layernorm_1)

    def experts_input(self, ops: Ops, h: Tensor) -> Tensor:
        return ops.rms_norm(h, self.pre_feedforward_layernorm_2)

    def experts_part(self, ops: Ops, h: Tensor, weights: Tensor, layer: int, experts: range) -> Tensor:
        return ops.experts(self.experts_input(ops, h), self.experts.switch_glu, weights, layer, experts)

    def finish_experts(self, ops: Ops, h: Tensor, shared: Tensor, total: Tensor | None, layer: int) -> Tensor:
        return self.ffn_end(ops, h, self.join_experts(ops, shared, total), layer)

    def pack_norms(self) -> list[Norm]:
        return [self.pre_feedforward_layernorm_2, self.post_feedforward_layernorm_2, self.post_feedforward_layernorm]

    def branch_outputs(self) -> list[Linear | Norm]:
        # every branch ends in its post-norm; the routed experts join the dense MLP before the last
        ends: list[Linear | Norm] = [self.post_attention_layernorm, self.post_feedforward_layernorm]
        return ends + ([self.post_per_layer_input_norm] if "per_layer_input_gate" in self else [])

    def stream_norms(self) -> list[Norm]:
        norms = [self.input_layernorm, self.pre_feedforward_layernorm]
        return norms + ([self.pre_feedforward_layernorm_2, self.router.norm] if "router" in self else [])

    def stream_linears(self) -> list[Linear]:
        """Projections reading the stream without a norm: the per-layer input gate."""
        return [self.per_layer_input_gate] if "per_layer_input_gate" in self else []


# --- the model ----------------------------------------------------------------------------------

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DROPPED = ("input_max", "input_min", "output_max", "output_min")
_TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "multi_modal_projector", "vision_embedder")


class Model(DecoderModel):
    """Token ids -> logits for Gemma 4 text models."""

    def __init__(self, args: Gemma4Args):
        super().__init__(args, [Block(args, i) for i in range(args.num_hidden_layers)])
        self.args: Gemma4Args = args
        self.embed_scale = math.sqrt(args.hidden_size)
        self.sliding_window = args.sliding_window
        self.ropes = {
            kind: args.rope(kind, args.head_dim if kind == "sliding_attention" else args.global_head_dim)
            for kind in ("sliding_attention", "full_attention")
        }
        P = args.hidden_size_per_layer_input
        if P:
            L = args.num_hidden_layers
            self.model.embed_tokens_per_layer = Embedding(args.vocab_size_per_layer_input, L * P)
            self.model.per_layer_model_projection = Linear(args.hidden_size, L * P)
            self.model.per_layer_projection_norm = Norm(P, args.rms_norm_eps)


    def experts_per_token(self) -> int:
        """Gemma 4 names the router's top-k ``top_k_experts``."""
        return self.args.top_k_experts if self.args.enable_moe_block else 0
    def rope_for(self, layer: int) -> RoPE:
        return self.ropes["sliding_attention" if self.args.is_sliding(layer) else "full_attention"]

    def stream_norms(self) -> list[Norm]:
        extra = [self.model.per_layer_projection_norm] if self.args.hidden_size_per_layer_input else []
        return [self.model.norm, *extra]

    def export_refusal(self) -> str | None:
        a = self.args
        if a.hidden_size_per_layer_input:
            return (
                f"gemma4 export: per-layer inputs (config key 'hidden_size_per_layer_input' = "
                f"{a.hidden_size_per_layer_input}) are not exported yet"
            )
        if a.num_kv_shared_layers:
            return f"gemma4 export: KV-shared layers (config key 'num_kv_shared_layers' = {a.num_kv_shared_layers}) are not exported yet"
        return None

    def kv_shape(self, layer: int) -> tuple[int, int]:
        return self.args.layer_kv_heads(layer), self.args.layer_head_dim(layer)

    # --- per-layer inputs ride along the hidden states (MLX only: see the module docstring)

    def embed(self, ops: Ops, ids: Tensor, rows: range | None = None) -> Tensor:
        h = super().embed(ops, ids, rows)
        P = self.args.hidden_size_per_layer_input
        if not P:
            return h
        body = self.model
        tokens = ops.embed(ids, body.embed_tokens_per_layer, math.sqrt(P))
        projected = ops.linear(h, body.per_layer_model_projection) * (self.args.hidden_size**-0.5)
        projected = ops.rms_norm(projected.reshape(*projected.shape[:-1], -1, P), body.per_layer_projection_norm)
        mixed = (projected + tokens.reshape(projected.shape)) * (2.0**-0.5)
        return mx.concatenate([h, mixed.reshape(*h.shape[:-1], -1).astype(h.dtype)], axis=-1)

    def forward_layers(self, ops: Ops, h: Tensor, step: Step, layers: range | None = None) -> Tensor:
        a, H, P = self.args, self.args.hidden_size, self.args.hidden_size_per_layer_input
        per_layer = None
        if P:
            per_layer = h[..., H:].reshape(*h.shape[:-1], a.num_hidden_layers, P)
            h = h[..., :H]
        # keys and values of the layers shared ones read, kept on the step across calls of a forward
        kv: dict[int, Any] = step.__dict__.setdefault("_gemma4_kv", {})
        for i in layers if layers is not None else range(a.num_hidden_layers):
            source = a.kv_source(i)
            if source != i and source not in kv:
                raise UnsupportedError(f"gemma4: KV-shared layer {i} runs without its source layer {source} in this call")
            inputs = per_layer[..., i, :] if per_layer is not None else None
            h, kv[i] = self.model.layers[i](ops, h, i, self.rope_for(i), step, inputs, kv.get(source) if source != i else None)
        return h if per_layer is None else mx.concatenate([h, per_layer.reshape(*h.shape[:-1], -1)], axis=-1)

    def final_norm(self, ops: Ops, h: Tensor) -> Tensor:
        return super().final_norm(ops, h[..., : self.args.hidden_size] if self.args.hidden_size_per_layer_input else h)

    def logits(self, ops: Ops, h: Tensor, sizes: list[int] | None = None, first_row: int = 0) -> list[Tensor]:
        pieces = super().logits(ops, h, sizes, first_row)
        cap = self.args.final_logit_softcapping
        return [ops.softcap(p, cap) for p in pieces] if cap else pieces

    def make_cache(self, context: int, dtype: mx.Dtype | None = None) -> MLXKVCache:
        a = self.args
        dtype = dtype or self.model.embed_tokens.weight.dtype
        cache = MLXKVCache(0, 1, 1, context, dtype)
        for i in range(a.num_hidden_layers):
            length = context if i < a.first_shared() else 0  # shared layers read their source's
            shape = (1, a.layer_kv_heads(i), length, a.layer_head_dim(i))
            cache.keys.append(mx.zeros(shape, dtype=dtype))
            cache.values.append(mx.zeros(shape, dtype=dtype))
        return cache

    # --- checkpoint names

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF's names to ours: the experts' fused gate_up_proj split and stacked, with down_proj,
        under mlx-lm's ``experts.switch_glu`` (a checkpoint stacked so already loads as it is);
        KV-shared layers' k/v projections and the multimodal towers dropped."""
        a, out = self.args, {}
        for name, value in weights.items():
            if any(s in name for s in _DROPPED) or name.split(".")[1] in _TOWERS:
                continue
            m = _LAYER.match(name)
            layer = int(m.group(1)) if m else -1
            if layer >= a.first_shared() and re.search(r"\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.", name):
                continue
            if name.endswith(".experts.gate_up_proj"):
                gate, up = mx.split(value, 2, axis=-2)
                base = name[: -len("gate_up_proj")] + "switch_glu."
                out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate, up
            elif name.endswith(".experts.down_proj"):
                out[name[: -len("down_proj")] + "switch_glu.down_proj.weight"] = value
            else:
                out[name] = value
        return out

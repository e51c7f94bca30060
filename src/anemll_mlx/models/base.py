"""What every family shares: hyper-parameter parsing, the attention and MLP blocks, and the decoder.

The forward of each family is written against the op vocabulary (``ops.vocabulary.Ops``), so the
same code runs eagerly on MLX and is traced into MIL for export.  A family file declares what is
specific to it (see ``DecoderModel`` and ``Block``): its blocks, weight fix-ups at load time,
where its residual branches end (for the fp16 scale) and, by default, which weights a LUT may
replace under which export part.
"""

from __future__ import annotations

import dataclasses
from collections import UserDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CorruptModelError
from ..format import causal_mask
from ..ops.mlx_ops import MLXKVCache, MLXOps
from ..ops.vocabulary import Embedding, Experts, Linear, Norm, Ops, RoPE, Step, Tensor

if TYPE_CHECKING:
    from ..quant.lut import LUTConfig, LUTWeight


@dataclass
class BaseArgs:
    """Hyper-parameters shared by all families, read from a Hugging Face config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int = 0  # 0: as many as attention heads
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseArgs:
        """Keep the keys this family knows (HF configs carry many we do not need); a missing
        required key is reported by name."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in config]
        if missing:
            raise CorruptModelError(f"config.json lacks {', '.join(missing)} for model_type '{config.get('model_type')}'")
        known = {f.name for f in fields}
        return cls(**{k: v for k, v in config.items() if k in known and v is not None})

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends over a sliding window (families with such layers override)."""
        return False


# --- blocks shared by the families --------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and an optional RMSNorm on q and k per head."""

    def __init__(
        self,
        args: BaseArgs,
        scale: float,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        sliding: bool = False,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = scale
        self.sliding = sliding
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, qkv_bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, qkv_bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, o_bias)
        if qk_norm:
            self.q_norm = Norm(self.head_dim, args.rms_norm_eps)
            self.k_norm = Norm(self.head_dim, args.rms_norm_eps)

    def __call__(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step) -> Tensor:
        q = ops.split_heads(ops.linear(x, self.q_proj), self.n_heads, self.head_dim)
        k = ops.split_heads(ops.linear(x, self.k_proj), self.n_kv_heads, self.head_dim)
        v = ops.split_heads(ops.linear(x, self.v_proj), self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = ops.rms_norm(q, self.q_norm), ops.rms_norm(k, self.k_norm)
        q, k = ops.rope(q, rope, step), ops.rope(k, rope, step)
        k, v = step.cache.update(layer, k, v, step)
        out = ops.attention(q, k, v, step.mask(self.sliding), self.scale)
        return ops.linear(ops.merge_heads(out), self.o_proj)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act silu (LLaMA, Qwen) or tanh-approximated gelu (Gemma)."""

    def __init__(self, args: BaseArgs, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.activation = activation
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias)

    def __call__(self, ops: Ops, x: Tensor, layer: int) -> Tensor:
        gate = ops.linear(x, self.gate_proj)
        gate = ops.silu(gate) if self.activation == "silu" else ops.gelu_tanh(gate)
        hidden = ops.tap("mlp_hidden", layer, ops.mul(gate, ops.linear(x, self.up_proj)))
        return ops.linear(hidden, self.down_proj)


class Block(Protocol):
    """What a family's decoder block declares besides its forward."""

    def __call__(self, ops: Ops, x: Tensor, layer: int, rope: RoPE, step: Step) -> Tensor: ...

    def branch_outputs(self) -> list[Linear | Norm]:
        """The last weight of each residual branch: scaling it scales what the branch adds."""
        ...

    def stream_norms(self) -> list[Norm]:
        """The norms whose input is the residual stream itself."""
        ...


# --- the decoder --------------------------------------------------------------------------------


class Body(nn.Module):
    """Holds HF's ``model.*`` tensors under HF's names, so checkpoints load without renaming."""

    def __init__(self, args: BaseArgs, layers: list[Any]):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = Norm(args.hidden_size, args.rms_norm_eps)


def parameter_arrays(module: nn.Module) -> list[mx.array]:
    """Every parameter array of ``module`` (nested modules included)."""
    return [cast(mx.array, item[1]) for item in tree_flatten(module.parameters())]


class LUTTarget(NamedTuple):
    """A weight a LUT may replace: its export part, its Hugging Face name and its holder."""

    part: str  # one of format.PARTS
    name: str
    holder: Linear | Embedding
    layer: int | None = None  # the decoder layer of an "ffn" weight

    @property
    def rows(self) -> int:
        """The output channels a LUT groups: the rows of the weight as a matrix (for stacked
        experts, experts x out: LUTs fit ``lut_matrix`` of the weight)."""
        shape = self.holder.weight.shape
        return self.holder.weight.size // shape[-1]


def lut_matrix(weight: Any) -> Any:
    """A LUT target's weight as the matrix a LUT is fitted to: a stack of experts (E, out, in)
    becomes its E * out rows; a Linear or an Embedding is already one."""
    return weight if weight.ndim == 2 else weight.reshape(-1, weight.shape[-1])


class DecoderModel(nn.Module):
    """Embedding, a stack of blocks, final norm and LM head, callable piecewise.

    Export slices this into programs: ``embed`` alone, ``forward_layers`` over a layer range per
    chunk (the last chunk adds ``final_norm``), and ``logits`` split along the vocabulary.
    ``__call__`` chains them eagerly on MLX for generation and as the reference.

    ``fp16_scale`` and ``lut`` record the transforms applied to the weights (``transforms.py``).
    ``lut_weights``: the LUT tables and indices of a model loaded from a LUT checkpoint
    (``loading/checkpoint.py``), by LUT target name; each holder carries exactly their
    ``dequantize()``, and the export emits them as they are instead of fitting (``lut`` is then the
    checkpoint's config).  Empty for every other model.
    """

    def __init__(self, args: BaseArgs, layers: list[Any]):
        super().__init__()
        self.args = args
        self.model = Body(args, layers)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size)
        self.embed_scale = 1.0
        self.sliding_window: int | None = None
        self.fp16_scale: float | None = None
        self.lut: LUTConfig | None = None
        # a UserDict, not a dict: an MLX Module would take a dict for a tree of parameters
        self.lut_weights: UserDict[str, LUTWeight] = UserDict()

    @property
    def blocks(self) -> list[Block]:
        return self.model.layers

    def sliding(self) -> list[bool]:
        """Which layers attend over the sliding window."""
        return [self.args.is_sliding(i) for i in range(self.args.num_hidden_layers)]

    # --- what a family declares (defaults fit a decoder of Linear projections)

    def rope_for(self, layer: int) -> RoPE:
        raise NotImplementedError

    def stream_norms(self) -> list[Norm]:
        """Norms outside the blocks that read the residual stream (or the scaled embeddings)."""
        return [self.model.norm]

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(KV heads, head dim) of ``layer``'s keys and values (the same for every layer by default)."""
        return self.args.num_key_value_heads, self.args.head_dim

    def export_refusal(self) -> str | None:
        """Why this model cannot be exported yet (a feature the export would get wrong), or None."""
        return None

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Fix-ups of checkpoint weights at load time (a family whose norms store 1 + w folds them)."""
        return weights

    def unsanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The inverse of ``sanitize``: the model's weights in the checkpoint's convention, as a LUT
        checkpoint stores them (``sanitize`` of the result gives back the model's arrays)."""
        return weights

    def lut_targets(self) -> list[LUTTarget]:
        """The weights a LUT may replace, by export part: every projection of the decoder layers
        ("ffn"), the embedding table ("embeddings") and the LM head ("lm_head", the embedding table
        again when tied: the head program gets its own copy)."""
        targets = [LUTTarget("embeddings", "model.embed_tokens", self.model.embed_tokens)]
        for i, block in enumerate(self.model.layers):
            for name, module in block.named_modules():
                if isinstance(module, Linear):
                    targets.append(LUTTarget("ffn", f"model.layers.{i}.{name}", module, i))
        targets.append(LUTTarget("lm_head", "lm_head" if "lm_head" in self else "model.embed_tokens", self.head))
        return targets

    # --- pieces, each taking the backend ``ops`` first

    def embed(self, ops: Ops, ids: Tensor, rows: range | None = None) -> Tensor:
        """Embeddings of ``ids`` (only of those in ``rows`` of the table, zeros for the others)."""
        return ops.tap("embedding", -1, ops.embed(ids, self.model.embed_tokens, self.embed_scale, rows))

    def forward_layers(self, ops: Ops, h: Tensor, step: Step, layers: range | None = None) -> Tensor:
        for i in layers if layers is not None else range(len(self.model.layers)):
            h = self.model.layers[i](ops, h, i, self.rope_for(i), step)
        return h

    def experts_in(self, layer: int) -> Experts | None:
        """The routed experts of ``layer`` (a mixture-of-experts layer), else None."""
        return next((m for _, m in self.model.layers[layer].named_modules() if isinstance(m, Experts)), None)

    def experts_per_token(self) -> int:
        """How many experts the router picks per token (families naming it otherwise override)."""
        return int(getattr(self.args, "num_experts_per_tok", 0))

    def forward_attention(self, ops: Ops, h: Tensor, step: Step, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """A mixture-of-experts layer up to its router (the export's attention part): the
        residual after attention, the routing weights (B, T, experts) and the shared branch's
        output (Gemma 4's dense MLP beside the experts; None for a family without one)."""
        return self.model.layers[layer].attention_part(ops, h, layer, self.rope_for(layer), step)

    def forward_experts(self, ops: Ops, h: Tensor, weights: Tensor, layer: int, experts: range) -> Tensor:
        """The weighted sum of ``experts`` of ``layer`` (an expert pack), from the residual and
        the routing weights ``forward_attention`` gave; ``finish_experts`` makes the layer's
        output of the packs' sum."""
        return self.model.layers[layer].experts_part(ops, h, weights, layer, experts)

    def finish_experts(self, ops: Ops, h: Tensor, shared: Tensor | None, total: Tensor | None, layer: int) -> Tensor:
        """The output of mixture-of-experts ``layer`` from the residual ``h``, the shared branch
        and ``total``, the sum of its experts' outputs (None: no expert ran)."""
        return self.model.layers[layer].finish_experts(ops, h, shared, total, layer)

    def has_shared_branch(self, layer: int) -> bool:
        """Whether ``forward_attention`` gives a shared branch for ``layer`` (see there)."""
        return bool(self.model.layers[layer].has_shared_branch)

    def experts_input(self, ops: Ops, h: Tensor, layer: int) -> Tensor:
        """What the experts of ``layer`` read: the residual ``h`` after attention, normed."""
        return self.model.layers[layer].experts_input(ops, h)

    def pack_norms(self, layer: int) -> list[Norm]:
        """The norms every expert pack of ``layer`` holds (its experts' input and the finish)."""
        return self.model.layers[layer].pack_norms()

    def final_norm(self, ops: Ops, h: Tensor) -> Tensor:
        return ops.rms_norm(h, self.model.norm)

    @property
    def head(self) -> Linear | Embedding:
        """The LM head's holder: ``lm_head``, or the embedding table when tied."""
        return self.lm_head if "lm_head" in self else self.model.embed_tokens

    def logits(self, ops: Ops, h: Tensor, sizes: list[int] | None = None, first_row: int = 0) -> list[Tensor]:
        """Logits in pieces of ``sizes`` vocabulary rows from ``first_row`` (the rest, in one piece, when None)."""
        return ops.lm_head(h, self.head, sizes, first_row)

    # --- eager MLX use

    def make_cache(self, context: int, dtype: mx.Dtype | None = None) -> MLXKVCache:
        a = self.args
        dtype = dtype or self.model.embed_tokens.weight.dtype
        return MLXKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, context, dtype)

    def mlx_step(self, start: int, length: int, cache: MLXKVCache) -> Step:
        """Positions and masks for tokens start..start+length on MLX (masks as wide as the filled cache).

        The global mask is MLX's own ``"causal"`` mode (the queries are the last ``length`` of the
        filled cache, exactly what it assumes), which spares building and adding a (T, T) mask.
        """
        dtype = self.model.embed_tokens.weight.dtype
        end = start + length

        def mask(window: int | None) -> mx.array:
            return mx.array(causal_mask(start, length, end, window)).astype(dtype)

        masks: dict[str, Any] = {"global": None if length == 1 else "causal"}
        if self.sliding_window is not None:
            needs = length > 1 or end > self.sliding_window
            masks["sliding"] = mask(self.sliding_window) if needs else None
        return Step(positions=mx.arange(start, end), masks=masks, cache=cache, start=start)

    def __call__(
        self, ids: mx.array, cache: MLXKVCache, start: int, ops: Ops | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits (B, T, vocab) for ``ids`` (B, T) placed at positions start..start+T.

        ``last_only`` gives (B, 1, vocab), the last position's: a prompt's other positions would
        cost a full LM-head matmul each for logits nobody reads.
        """
        ops = ops or MLXOps()
        if start + ids.shape[1] > cache.context:
            raise ValueError(f"positions up to {start + ids.shape[1]} exceed the cache context {cache.context}")
        h = self.embed(ops, ids)
        h = self.forward_layers(ops, h, self.mlx_step(start, ids.shape[1], cache))
        if last_only:
            h = h[:, -1:]
        return self.logits(ops, self.final_norm(ops, h))[0]

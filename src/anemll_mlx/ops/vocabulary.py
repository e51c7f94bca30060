"""The op vocabulary: everything a model file may call, and the types those calls pass around.

Model files are written against ``Ops`` only.  ``MLXOps`` (the reference) implements it on MLX
arrays and ``MILOps`` (the export) emits coremltools builder calls for it, so one forward serves
both; a type checker holds the model files to this Protocol.  Tensors are ``Tensor`` (an MLX
array or a MIL variable, depending on the backend), so the Protocol types the calls, not the
values.

The weight holders (``Linear``, ``Norm``, ``Embedding``) only hold tensors under Hugging Face's
names; how they are computed is the backend's business.  ``RoPE`` and ``Step`` carry the
position-dependent parts of a call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UnsupportedError

Tensor = Any  # mx.array on MLX, a MIL Var when tracing


# --- weight holders -----------------------------------------------------------------------------


class Linear(nn.Module):
    """A projection ``y = x W^T + b``; only holds the weight (out, in) and optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))
        if bias:
            self.bias = mx.zeros((out_features,))


class Norm(nn.Module):
    """RMSNorm gain: the effective multiplier (a family that stores 1 + w folds it at load).
    ``gain=False``: a norm without a learned gain (no weight at all)."""

    def __init__(self, dims: int, eps: float, gain: bool = True):
        super().__init__()
        if gain:
            self.weight = mx.ones((dims,))
        self.eps = eps


class ExpertLinear(Linear):
    """The same projection of every expert, stacked: weight (experts, out, in), as mlx-lm's
    ``SwitchLinear`` holds it.  A ``Linear`` so that what walks projections (LUT targets, the fp16
    scale) finds the experts too; only the ``experts`` op reads it.  A LUT fits it as a matrix of
    experts * out rows, so a group of output channels never spans two experts when the group size
    divides ``out``."""

    def __init__(self, experts: int, in_features: int, out_features: int):
        nn.Module.__init__(self)
        self.weight = mx.zeros((experts, out_features, in_features))


class Experts(nn.Module):
    """Routed experts, each a gated MLP down(act(gate(x)) * up(x)), under mlx-lm's names
    (``switch_mlp.{gate,up,down}_proj``); ``activation`` "silu" (Qwen) or "gelu_tanh" (Gemma)."""

    def __init__(self, experts: int, dims: int, hidden: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.gate_proj = ExpertLinear(experts, dims, hidden)
        self.up_proj = ExpertLinear(experts, dims, hidden)
        self.down_proj = ExpertLinear(experts, hidden, dims)

    @property
    def count(self) -> int:
        return self.gate_proj.weight.shape[0]


class Embedding(nn.Module):
    """The token table (vocab, hidden)."""

    def __init__(self, vocab: int, dims: int):
        super().__init__()
        self.weight = mx.zeros((vocab, dims))


# --- rotary embeddings --------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, float64, with HF's scaling rules.

    ``llama3`` blends low and high frequencies as Hugging Face's ``_compute_llama3_parameters``
    does: long wavelengths are divided by ``factor``, short ones kept, the band between smoothly
    interpolated.  ``linear`` divides all frequencies by ``factor``.
    """
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    assert scaling is not None
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, blended, scaled)
    raise UnsupportedError(f"rope_scaling type '{kind}' is not supported (supported: default, linear, llama3)")


@dataclass(frozen=True)
class RoPE:
    """One rotary embedding: its inverse frequencies (half of head_dim) and the table size.

    The MLX backend feeds ``periods`` to ``mx.fast.rope``; the MIL backend bakes cos/sin tables
    of ``length`` rows into the program and gathers rows by position.
    """

    inv_freq: np.ndarray
    length: int

    @property
    def periods(self) -> mx.array:
        """1 / inv_freq; a zero frequency (a pair left unrotated by partial rotary) is an infinite period."""
        with np.errstate(divide="ignore"):
            return mx.array((1.0 / self.inv_freq).astype(np.float32))

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of shape (length, head_dim), halves repeated as HF's rotate_half expects."""
        angles = np.outer(np.arange(self.length, dtype=np.float64), self.inv_freq)
        angles = np.concatenate([angles, angles], axis=-1)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# --- one call of the model ----------------------------------------------------------------------


class KVCache(Protocol):
    """The backend's KV cache: writes a layer's new keys/values, returns what attention reads."""

    def update(self, layer: int, k: Tensor, v: Tensor, step: Step) -> tuple[Tensor, Tensor]: ...


@dataclass
class Step:
    """What a forward call needs besides hidden states.

    ``positions`` are the absolute positions of the T tokens; ``start`` is the first of them when
    the backend knows it as a number (MLX), which lets MLX attend only over the filled part of the
    fixed-size cache.  ``masks`` maps "global" (and "sliding" for sliding-window layers) to an
    additive mask of shape (1, 1, T, context), or None when nothing needs masking.
    """

    positions: Tensor
    masks: dict[str, Tensor]
    cache: KVCache
    start: int | None = None

    def mask(self, sliding: bool) -> Tensor:
        return self.masks["sliding" if sliding else "global"]


# --- the ops --------------------------------------------------------------------------------------


class Ops(Protocol):
    """Every op a model file may call.  Shapes: hidden states (B, T, C); attention tensors
    (B, heads, T, head_dim).  A new op is added here and in both backends (and, if the MIL side
    emits a new MIL op, in the executor's kernels)."""

    def linear(self, x: Tensor, layer: Linear) -> Tensor: ...

    def rms_norm(self, x: Tensor, norm: Norm) -> Tensor: ...

    def embed(self, ids: Tensor, table: Embedding, scale: float, rows: range | None = None) -> Tensor:
        """Rows of ``table`` for ``ids``, times ``scale``; with ``rows``, only ids in that range of
        the table are looked up and the others give zeros (one program of a split table)."""
        ...

    def lm_head(
        self, x: Tensor, head: Linear | Embedding, sizes: list[int] | None = None, first_row: int = 0
    ) -> list[Tensor]:
        """Logits in pieces of ``sizes`` consecutive vocabulary rows starting at ``first_row``."""
        ...

    def add(self, a: Tensor, b: Tensor) -> Tensor: ...

    def mul(self, a: Tensor, b: Tensor) -> Tensor: ...

    def silu(self, x: Tensor) -> Tensor: ...

    def gelu_tanh(self, x: Tensor) -> Tensor: ...

    def gain(self, x: Tensor, holder: nn.Module, name: str, factor: float = 1.0) -> Tensor:
        """``x`` times the learned vector ``holder.<name>`` (times ``factor``), broadcast over the
        last axis: a gain stored under a checkpoint's own name (Gemma 4's ``layer_scalar``)."""
        ...

    def softcap(self, x: Tensor, cap: float) -> Tensor:
        """cap * tanh(x / cap): logit soft-capping."""
        ...

    def split_heads(self, x: Tensor, heads: int, head_dim: int) -> Tensor: ...

    def merge_heads(self, x: Tensor) -> Tensor: ...

    def rope(self, x: Tensor, rope: RoPE, step: Step) -> Tensor: ...

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor: ...

    def route(self, logits: Tensor, top_k: int, renormalize: bool) -> Tensor:
        """Mixture-of-experts routing weights (B, T, experts) from router logits (B, T, experts):
        the softmax, zero outside the ``top_k`` largest logits, and with ``renormalize`` divided by
        its sum over them (the softmax of the selected logits alone).  Ties at the k-th value
        select every tied expert (random weights never tie)."""
        ...

    def experts(
        self, x: Tensor, experts: Experts, weights: Tensor, layer: int, select: range | None = None
    ) -> Tensor:
        """Dense mixture of experts: every expert's gated MLP of ``x`` (B, T, C), weighted by
        ``weights`` (B, T, experts; zero for unselected experts) and summed.  The weight multiplies
        the expert's hidden activation (before ``down_proj``), which is the same sum.  With
        ``select``, only those experts (an expert pack of the export); ``weights`` still covers all."""
        ...

    def tap(self, site: str, layer: int, x: Tensor) -> Tensor:
        """A named point of the forward (residual, attn_out, ...): identity, except for the probe."""
        ...

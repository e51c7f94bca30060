"""Pieces every architecture shares: hyper-parameter parsing, RoPE tables, weight holders and the
per-call ``Step`` that carries positions, masks and the KV cache.

The forward of each family is written against these plus an ``ops`` backend, so the same code runs
eagerly on MLX and is traced into MIL for export.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UnsupportedError


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
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BaseArgs:
        """Keep the keys this family knows; HF configs carry many we do not need."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends over a sliding window (only Gemma3 has such layers)."""
        return False


# --- RoPE ---------------------------------------------------------------------------------------


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
        return mx.array((1.0 / self.inv_freq).astype(np.float32))

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of shape (length, head_dim), halves repeated as HF's rotate_half expects."""
        angles = np.outer(np.arange(self.length, dtype=np.float64), self.inv_freq)
        angles = np.concatenate([angles, angles], axis=-1)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# --- weight holders -----------------------------------------------------------------------------


class Linear(nn.Module):
    """A projection ``y = x W^T + b``; only holds the weight (out, in) and optional bias.

    How it is computed (matmul on MLX, 1x1 conv with an optional LUT on MIL) is the backend's job.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))
        if bias:
            self.bias = mx.zeros((out_features,))


class Norm(nn.Module):
    """RMSNorm gain.  Holds the effective multiplier: Gemma's (1 + w) is folded in at load time."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps


# --- one call of the model ----------------------------------------------------------------------


@dataclass
class Step:
    """What a forward call needs besides hidden states.

    ``positions`` are the absolute positions of the T tokens; ``start`` is the first of them when
    the backend knows it as a number (MLX), which lets MLX attend only over the filled part of the
    fixed-size cache.  ``masks`` maps "global" (and "sliding" for Gemma3) to an additive mask of
    shape (1, 1, T, context), or None when nothing needs masking.  ``cache`` belongs to the backend.
    """

    positions: Any
    masks: dict[str, Any]
    cache: Any
    start: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def mask(self, sliding: bool) -> Any:
        return self.masks["sliding" if sliding else "global"]


def args_from_config(args_class: type[BaseArgs], config: dict) -> BaseArgs:
    """Build the family's dataclass; a missing required key is reported by name."""
    required = [
        p.name
        for p in dataclasses.fields(args_class)
        if p.default is dataclasses.MISSING and p.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    missing = [k for k in required if k not in config]
    if missing:
        from ..errors import CorruptModelError

        raise CorruptModelError(f"config.json lacks {', '.join(missing)} for model_type '{config.get('model_type')}'")
    return args_class.from_dict(config)


__all__ = ["BaseArgs", "Linear", "Norm", "RoPE", "Step", "args_from_config", "rope_inv_freq"]


# --- the decoder every family builds on ---------------------------------------------------------


class Embedding(nn.Module):
    def __init__(self, vocab: int, dims: int):
        super().__init__()
        self.weight = mx.zeros((vocab, dims))


class Body(nn.Module):
    """Holds HF's ``model.*`` tensors under HF's names, so checkpoints load without renaming."""

    def __init__(self, args: BaseArgs, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = Norm(args.hidden_size, args.rms_norm_eps)


def causal_mask(start: int, length: int, width: int, window: int | None = None, dtype=mx.float32) -> mx.array:
    """Additive mask (1, 1, length, width): 0 where query ``start+i`` may see key ``j``, else -inf.

    A key is visible when it is not in the future and, with a sliding ``window``, when fewer than
    ``window`` positions back (the query itself included), as Hugging Face's Gemma3 masks it.
    """
    q = mx.arange(start, start + length)[:, None]
    k = mx.arange(width)[None]
    visible = k <= q
    if window is not None:
        visible = visible & (k > q - window)
    return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))[None, None]


class DecoderModel(nn.Module):
    """Embedding, a stack of blocks, final norm and LM head, callable piecewise.

    Export slices this into programs: ``embed`` alone, ``forward_layers`` over a layer range per
    chunk (the last chunk adds ``final_norm``), and ``logits`` split along the vocabulary.
    ``__call__`` chains them eagerly on MLX for generation and as the reference.
    """

    sliding_window: int | None = None

    def __init__(self, args: BaseArgs, layers: list[nn.Module]):
        super().__init__()
        self.args = args
        self.model = Body(args, layers)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size)
        self.embed_scale = 1.0

    # pieces, each taking the backend ``ops`` first

    def rope_for(self, layer: int) -> RoPE:
        raise NotImplementedError

    def embed(self, ops, ids):
        return ops.tap("embedding", -1, ops.embed(ids, self.model.embed_tokens.weight, self.embed_scale))

    def forward_layers(self, ops, h, step: Step, layers: range | None = None):
        for i in layers if layers is not None else range(len(self.model.layers)):
            h = self.model.layers[i](ops, h, i, self.rope_for(i), step)
        return h

    def final_norm(self, ops, h):
        return ops.rms_norm(h, self.model.norm)

    @property
    def head_weight(self) -> mx.array:
        return self.lm_head.weight if "lm_head" in self else self.model.embed_tokens.weight

    def logits(self, ops, h, sizes: list[int] | None = None) -> list:
        """Logits in pieces of ``sizes`` vocabulary rows (one piece when None)."""
        return ops.lm_head(h, self.head_weight, sizes)

    # eager MLX use

    def make_cache(self, context: int, dtype: mx.Dtype | None = None):
        from ..ops.mlx_ops import MLXKVCache

        a = self.args
        dtype = dtype or self.model.embed_tokens.weight.dtype
        return MLXKVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, context, dtype)

    def mlx_step(self, start: int, length: int, cache) -> Step:
        """Positions and masks for tokens start..start+length on MLX (masks as wide as the filled cache)."""
        dtype = self.model.embed_tokens.weight.dtype
        end = start + length
        masks: dict[str, Any] = {"global": None if length == 1 else causal_mask(start, length, end, dtype=dtype)}
        if self.sliding_window is not None:
            needs = length > 1 or end > self.sliding_window
            masks["sliding"] = causal_mask(start, length, end, self.sliding_window, dtype) if needs else None
        return Step(positions=mx.arange(start, end), masks=masks, cache=cache, start=start)

    def __call__(self, ids: mx.array, cache, start: int, ops=None, last_only: bool = False) -> mx.array:
        """Logits (B, T, vocab) for ``ids`` (B, T) placed at positions start..start+T.

        ``last_only`` gives (B, 1, vocab), the last position's: a prompt's other positions would
        cost a full LM-head matmul each for logits nobody reads.
        """
        from ..ops.mlx_ops import MLXOps

        ops = ops or MLXOps()
        if start + ids.shape[1] > cache.context:
            raise ValueError(f"positions up to {start + ids.shape[1]} exceed the cache context {cache.context}")
        h = self.embed(ops, ids)
        h = self.forward_layers(ops, h, self.mlx_step(start, ids.shape[1], cache))
        if last_only:
            h = h[:, -1:]
        return self.logits(ops, self.final_norm(ops, h))[0]

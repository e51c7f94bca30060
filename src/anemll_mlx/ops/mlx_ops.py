"""The op vocabulary on MLX: the eager reference backend.

Shapes follow the model code: hidden states (B, T, C); attention tensors (B, heads, T, head_dim).
Weights and activations stay in the model's dtype, so a float16 model rounds per op as the ANE
does (MLX accumulates matmuls and reductions in fp32).  Subclasses override ``tap`` (probe) or
single ops (explicit attention scores) without touching model code.

Half-precision products on the CPU: MLX's float16/bfloat16 matmuls do not go through BLAS and run
at 2-5 GFLOP/s here, 10-20x slower than float32 through the OpenBLAS under MLX (``blas.py``).  A
half matmul accumulating in float32 is a float32 matmul of the (exactly widened) half inputs,
rounded once to half, so on the CPU ``matmul`` computes it that way: the same numbers up to the
order of float32 summation (measured: 99.8% of outputs identical, the rest one rounding apart).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .vocabulary import Embedding, Experts, Linear, Norm, RoPE, Step

HALF = (mx.float16, mx.bfloat16)


class MLXOps:
    """Eager MLX implementation of every op a model file may call (``vocabulary.Ops``).

    ``widen_half``: compute half-precision products as float32 matmuls rounded once (the default
    on the CPU, see the module docstring); the GPU's half kernels are fast and left alone.
    ``keep_widened``: keep each weight's float32 copy for the next call (twice the weights' memory,
    for runs that push many tokens through one model, like the probe's).
    """

    def __init__(self, widen_half: bool | None = None, keep_widened: bool = False):
        self.widen_half = mx.default_device() == mx.cpu if widen_half is None else widen_half
        self._widened: dict[int, tuple[mx.array, mx.array]] | None = {} if keep_widened else None

    def matmul(self, a: mx.array, b: mx.array) -> mx.array:
        """``a @ b`` in their dtype, through float32 for half operands when ``widen_half``."""
        if self.widen_half and a.dtype in HALF:
            return (a.astype(mx.float32) @ b.astype(mx.float32)).astype(a.dtype)
        return a @ b

    def _wide(self, weight: mx.array) -> mx.array:
        """A half weight in float32: made per call, or once when ``keep_widened``."""
        if self._widened is None:
            return weight.astype(mx.float32)
        entry = self._widened.get(id(weight))
        if entry is None or entry[0] is not weight:
            entry = self._widened[id(weight)] = (weight, weight.astype(mx.float32))
        return entry[1]

    # --- projections and norms

    def linear(self, x: mx.array, layer: Linear) -> mx.array:
        if self.widen_half and x.dtype in HALF:
            y = x.astype(mx.float32) @ self._wide(layer.weight).T
            if "bias" in layer:
                y = y + layer.bias.astype(mx.float32)
            return y.astype(x.dtype)
        if "bias" in layer:
            return mx.addmm(layer.bias, x, layer.weight.T)
        return x @ layer.weight.T

    def rms_norm(self, x: mx.array, norm: Norm) -> mx.array:
        return mx.fast.rms_norm(x, norm.weight if "weight" in norm else None, norm.eps)

    def embed(self, ids: mx.array, table: Embedding, scale: float, rows: range | None = None) -> mx.array:
        if rows is None:
            h = table.weight[ids]
        else:
            inside = (ids >= rows.start) & (ids < rows.stop)
            h = table.weight[mx.where(inside, ids, rows.start)] * inside[..., None].astype(table.weight.dtype)
        return h if scale == 1.0 else h * mx.array(scale, dtype=h.dtype)

    def lm_head(
        self, x: mx.array, head: Linear | Embedding, sizes: list[int] | None = None, first_row: int = 0
    ) -> list[mx.array]:
        """Logits in pieces of ``sizes`` rows along the vocabulary, as the exported LM head returns them."""
        weight = self._wide(head.weight) if self.widen_half and x.dtype in HALF else head.weight
        sizes = sizes or [weight.shape[0] - first_row]
        bounds = [first_row + sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [self.matmul(x, weight[a:b].T).astype(x.dtype) for a, b in zip(bounds[:-1], bounds[1:])]

    # --- elementwise

    def add(self, a: mx.array, b: mx.array) -> mx.array:
        return a + b

    def mul(self, a: mx.array, b: mx.array) -> mx.array:
        return a * b

    def silu(self, x: mx.array) -> mx.array:
        return self._at_least_fp32(x, lambda y: y * mx.sigmoid(y))

    def gelu_tanh(self, x: mx.array) -> mx.array:
        return self._at_least_fp32(x, lambda y: 0.5 * y * (1 + mx.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3))))

    def gain(self, x: mx.array, holder: nn.Module, name: str, factor: float = 1.0) -> mx.array:
        vector = holder[name]
        if factor != 1.0:  # the product in float32, rounded once: the exported constant
            vector = vector.astype(mx.float32) * factor
        return x * vector.astype(x.dtype)

    def softcap(self, x: mx.array, cap: float) -> mx.array:
        return self._at_least_fp32(x, lambda y: mx.tanh(y / cap) * cap)

    def _at_least_fp32(self, x: mx.array, fn: Callable[[mx.array], mx.array]) -> mx.array:
        """``fn`` of half inputs computed in float32 and rounded once, when ``widen_half``: the
        exported program's one-op ``silu``/``gelu``, and 2-3x faster than MLX's CPU half kernels."""
        if self.widen_half and x.dtype in HALF:
            return fn(x.astype(mx.float32)).astype(x.dtype)
        return fn(x)

    # --- mixture of experts

    def route(self, logits: mx.array, top_k: int, renormalize: bool) -> mx.array:
        """Softmax of the router logits, zero outside the top_k, renormalised over them if asked;
        in float32, rounded once to the logits' dtype."""
        wide = logits.astype(mx.float32)
        kth = mx.min(mx.topk(wide, top_k, axis=-1), axis=-1, keepdims=True)
        chosen = (wide >= kth).astype(mx.float32)
        weights = mx.softmax(wide, axis=-1, precise=True) * chosen
        if renormalize:
            weights = weights / mx.sum(weights, axis=-1, keepdims=True)
        return weights.astype(logits.dtype)

    def experts(
        self, x: mx.array, experts: Experts, weights: mx.array, layer: int, select: range | None = None
    ) -> mx.array:
        """Every expert on every token (dense mode): gate and up of all experts as one product with
        their stacked rows, the hidden activations weighted per expert, then down_proj of all
        experts as one product over the experts' hidden units laid side by side."""
        part = slice(None) if select is None else slice(select.start, select.stop)
        gate_w, up_w, down_w = (p.weight[part] for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
        weights = weights[..., part]
        E, hidden_size, dims = gate_w.shape
        B, T, _ = x.shape
        gate = self.matmul(x, gate_w.reshape(E * hidden_size, dims).T)
        up = self.matmul(x, up_w.reshape(E * hidden_size, dims).T)
        act = self.silu(gate) if experts.activation == "silu" else self.gelu_tanh(gate)
        hidden = self.tap("mlp_hidden", layer, act * up).reshape(B, T, E, hidden_size)
        hidden = (hidden * weights[..., None].astype(hidden.dtype)).reshape(B, T, E * hidden_size)
        down = down_w.transpose(1, 0, 2).reshape(dims, E * hidden_size)
        return self.matmul(hidden, down.T)

    # --- shapes

    def split_heads(self, x: mx.array, heads: int, head_dim: int) -> mx.array:
        """(B, T, heads*head_dim) -> (B, heads, T, head_dim)."""
        B, T, _ = x.shape
        return x.reshape(B, T, heads, head_dim).transpose(0, 2, 1, 3)

    def merge_heads(self, x: mx.array) -> mx.array:
        """(B, heads, T, head_dim) -> (B, T, heads*head_dim)."""
        B, H, T, D = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)

    # --- attention

    def rope(self, x: mx.array, rope: RoPE, step: Step) -> mx.array:
        return mx.fast.rope(
            x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=_start(step), freqs=rope.periods
        )

    def attention(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, scale: float) -> mx.array:
        """Softmax(q k^T * scale + mask) v with grouped KV heads; k/v cover only the filled cache.

        ``mask`` is an additive array, None, or ``"causal"`` (MLX's own causal mode)."""
        if mask is not None and not isinstance(mask, str):
            mask = mask[..., : k.shape[2]]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def tap(self, site: str, layer: int, x: mx.array) -> mx.array:
        """A named point in the forward (residual, attn_out, ...). Identity here; the probe records."""
        return x


class MLXKVCache:
    """Fixed-size KV cache of ``context`` positions per layer, held as one array per layer.

    The exported program keeps all layers in one state tensor; on MLX one array per layer lets each
    write update in place.  ``update`` returns the keys and values up to the last written position.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, context: int, dtype: mx.Dtype):
        shape = (1, kv_heads, context, head_dim)
        self.context = context
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    def update(self, layer: int, k: mx.array, v: mx.array, step: Step) -> tuple[mx.array, mx.array]:
        start = _start(step)
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end, :] = k
        self.values[layer][:, :, start:end, :] = v
        return self.keys[layer][:, :, :end, :], self.values[layer][:, :, :end, :]

    @property
    def state(self) -> list[mx.array]:
        return self.keys + self.values

    def repeat(self, batch: int) -> MLXKVCache:
        """This cache copied into ``batch`` rows: many continuations of one prompt share its prefill
        (the cache starts with one row; the forward follows the batch of the ids it is given)."""
        copy = MLXKVCache.__new__(MLXKVCache)
        copy.context = self.context
        copy.keys = [mx.repeat(k[:1], batch, axis=0) for k in self.keys]
        copy.values = [mx.repeat(v[:1], batch, axis=0) for v in self.values]
        return copy


def _start(step: Step) -> int:
    """The first position of an MLX call (MLX steps always know it as a number)."""
    if step.start is None:
        raise ValueError("an MLX step needs its start position")
    return step.start

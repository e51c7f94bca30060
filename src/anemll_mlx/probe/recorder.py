"""``ProbeOps``: the MLX backend with eyes: peak |x| per (layer, site), inf/NaN, optional clamp.

The model files call ``ops.tap(site, layer, x)`` at every point the probe cares about; here each tap
records max |x| (in float32, whatever the run's dtype) and whether x holds inf or NaN.  Attention is
computed explicitly (scores, mask, softmax, weighted sum) so that the pre-softmax scores, which
``mx.fast.scaled_dot_product_attention`` never shows, are recorded too, as site ``attn_scores``.

Nothing is ever clipped, except the residual stream when a ``clamp`` is asked for: the clamp sweep
measures how far plain clipping (mlx-lm's gemma3 fp16 remedy) gets compared with exact scaling.

On the CPU, products go through numpy's BLAS.  The Linux MLX wheel links the reference BLAS
(about 2 GFLOP/s here, against 30+ for numpy's OpenBLAS) and its half-precision gemm is no faster,
while the probe pushes the whole calibration set through the model five or more times.  The
arithmetic is MLX's: float32 products of the run's values, rounded once to the run's dtype (MLX's
CPU half gemm does exactly that); only the summation order differs, at float32 rounding level.
"""

from __future__ import annotations

import math
from typing import Any, cast

import mlx.core as mx
import numpy as np

from .. import interrupts
from ..ops.mlx_ops import MLXOps
from ..ops.vocabulary import Embedding, Linear

# The order in which sites occur within one layer's forward; "embedding" (layer -1) precedes all.
SITES = ("attn_scores", "attn_out", "mlp_hidden", "mlp_out", "residual")
EMBEDDING = "embedding"
_ORDER = {EMBEDDING: -1, **{site: i for i, site in enumerate(SITES)}}


class ProbeOps(MLXOps):
    """Records peaks and the first non-finite site over every forward it is passed to.

    ``peaks[(layer, site)]`` is the largest |x| seen so far; ``first_nonfinite`` is the earliest
    (layer, site) in forward order that produced inf or NaN in any call, or None.  The attention
    layer is not passed to ``attention``, so it is inferred from the taps: the embedding tap starts
    layer 0 and each layer's ``residual`` tap ends it, which holds for whole-model forwards.
    """

    def __init__(self, clamp: float | None = None, record: bool = True):
        self.clamp = clamp
        self.record = record  # False: only the fast products (and clamp), e.g. for generation
        self.numpy_products = mx.default_device() == mx.cpu
        self._float32: dict[int, tuple[mx.array, np.ndarray]] = {}  # id(weight) -> (weight, float32 copy)
        self.peaks: dict[tuple[int, str], float] = {}
        self.first_nonfinite: tuple[int, str] | None = None
        self._pending: list[tuple[int, str, mx.array]] = []
        self._layer = 0

    # --- recording and clamping

    def tap(self, site: str, layer: int, x: mx.array) -> mx.array:
        if self.record:
            self._record(layer, site, x)
        if site == EMBEDDING:
            self._layer = 0
        elif site == "residual":
            self._layer = layer + 1
            self.flush()  # bounds what the pending scalars keep alive to one layer's activations
            if self.clamp is not None:
                x = mx.clip(x, -self.clamp, self.clamp)
        return x

    def attention(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, scale: float) -> mx.array:
        """Softmax(q k^T * scale + mask) v spelled out, with grouped KV heads.

        q is scaled before the product, as the exported program does, so an fp16 run overflows where
        the Neural Engine would.  Scores of masked positions are recorded too: they are computed.
        """
        q = q * mx.array(scale, dtype=q.dtype)
        if self.numpy_products:
            scores = self._grouped(q, k.transpose(0, 1, 3, 2))
        else:
            group = q.shape[1] // k.shape[1]
            k, v = (mx.repeat(k, group, axis=1), mx.repeat(v, group, axis=1)) if group > 1 else (k, v)
            scores = q @ k.transpose(0, 1, 3, 2)
        if self.record:
            self._record(self._layer, "attn_scores", scores)
        if mask is not None:
            scores = scores + mask[..., : scores.shape[-1]]
        weights = mx.softmax(scores, axis=-1, precise=True)
        return self._grouped(weights, v) if self.numpy_products else weights @ v

    # --- products

    def linear(self, x: mx.array, layer: Linear) -> mx.array:
        if not self.numpy_products:
            return super().linear(x, layer)
        y = _float32(x) @ self._weight(layer.weight).T
        if "bias" in layer:
            y += _float32(layer.bias)
        return mx.array(y).astype(x.dtype)

    def lm_head(self, x: mx.array, head: Linear | Embedding, sizes: list[int] | None = None) -> list[mx.array]:
        if not self.numpy_products or (sizes and len(sizes) > 1):
            return super().lm_head(x, head, sizes)
        return [mx.array(_float32(x) @ self._weight(head.weight).T).astype(x.dtype)]

    def _grouped(self, a: mx.array, b: mx.array) -> mx.array:
        """a (B, H, T, K) @ b (B, KV, K, N), each group of H // KV query heads sharing one b head."""
        B, H, T, K = a.shape
        kv = b.shape[1]
        out = _float32(a).reshape(B, kv, H // kv, T, K) @ _float32(b)[:, :, None]
        return mx.array(out.reshape(B, H, T, -1)).astype(a.dtype)

    def _weight(self, weight: mx.array) -> np.ndarray:
        """A float32 numpy view of a weight (a copy for half weights, made once per run)."""
        entry = self._float32.get(id(weight))
        if entry is None or entry[0] is not weight:
            entry = self._float32[id(weight)] = (weight, _float32(weight))
        return entry[1]

    # --- bookkeeping

    def _record(self, layer: int, site: str, x: mx.array) -> None:
        """Queue max |x|.  One reduction tells both: MLX's max propagates NaN, and inf stays inf.

        Half values are widened first (exactly): MLX's CPU half reductions are several times slower.
        """
        wide = x if x.dtype == mx.float32 else x.astype(mx.float32)
        self._pending.append((layer, site, mx.max(mx.abs(wide))))

    def flush(self) -> None:
        """Evaluate the pending records into ``peaks`` and ``first_nonfinite``; call after a forward.

        Runs once per layer, so it is also where a Ctrl-C that MLX swallowed is raised again.
        """
        interrupts.check()
        if not self._pending:
            return
        mx.eval([peak for _, _, peak in self._pending])
        for layer, site, peak in self._pending:
            key = (layer, site)
            value = cast(float, peak.item())
            if not math.isnan(value):  # NaN never raises a peak; it still marks the site non-finite
                self.peaks[key] = max(self.peaks.get(key, 0.0), value)
            if not math.isfinite(value) and (self.first_nonfinite is None or _before(key, self.first_nonfinite)):
                self.first_nonfinite = key
        self._pending.clear()

    def release(self) -> None:
        """Drop the float32 weight copies: the run is over, the records stay."""
        self._float32.clear()

    def peak(self, site: str) -> float:
        """The largest |x| recorded at ``site`` over all layers (0.0 when never seen)."""
        return max((v for (_, s), v in self.peaks.items() if s == site), default=0.0)


def _float32(x: mx.array) -> np.ndarray:
    """``x`` as a float32 numpy array (a view when it already is float32)."""
    return np.asarray(x if x.dtype == mx.float32 else x.astype(mx.float32))


def _before(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """Whether site ``a`` comes before ``b`` in one forward pass."""
    return (a[0], _ORDER[a[1]]) < (b[0], _ORDER[b[1]])

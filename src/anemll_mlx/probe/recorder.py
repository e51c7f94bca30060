"""``ProbeOps``: the MLX backend with eyes: peak |x| per (layer, site), inf/NaN, optional clamp.

The model files call ``ops.tap(site, layer, x)`` at every point the probe cares about; here each tap
records max |x| (in float32, whatever the run's dtype) and whether x holds inf or NaN.  Attention is
computed explicitly (scores, mask, softmax, weighted sum) so that the pre-softmax scores, which
``mx.fast.scaled_dot_product_attention`` never shows, are recorded too, as site ``attn_scores``.

Nothing is ever clipped, except the residual stream when a ``clamp`` is asked for: the clamp sweep
measures how far plain clipping (mlx-lm's gemma3 fp16 remedy) gets compared with exact scaling.

Products are ``MLXOps``' own: float32 through the BLAS under MLX, and on the CPU half-precision
runs as float32 products rounded once to half (see ``ops/mlx_ops.py``), which is what lets the
probe push the whole calibration set through the model five or more times in seconds.
"""

from __future__ import annotations

import math
from typing import Any, cast

import mlx.core as mx

from .. import interrupts
from ..format import causal_mask
from ..ops.mlx_ops import MLXOps

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
        super().__init__(keep_widened=True)
        self.clamp = clamp
        self.record = record  # False: nothing recorded (and the clamp, if any), e.g. for generation
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
        """Softmax(q k^T * scale + mask) v spelled out, the query heads of one KV head as rows of one
        product (as the exported program groups them).

        q is scaled before the product, as the exported program does, so an fp16 run overflows where
        the Neural Engine would.  Scores of masked positions are recorded too: they are computed.
        """
        B, H, T, D = q.shape
        kv = k.shape[1]
        q = q * mx.array(scale, dtype=q.dtype)
        scores = self.matmul(q.reshape(B, kv, (H // kv) * T, D), k.transpose(0, 1, 3, 2)).reshape(B, H, T, -1)
        if self.record:
            self._record(self._layer, "attn_scores", scores)
        if isinstance(mask, str):  # MLX's "causal": the queries are the last T of the keys
            keys = scores.shape[-1]
            mask = mx.array(causal_mask(keys - T, T, keys)).astype(scores.dtype)
        if mask is not None:
            scores = scores + mask[..., : scores.shape[-1]]
        weights = mx.softmax(scores, axis=-1, precise=True)
        return self.matmul(weights.reshape(B, kv, (H // kv) * T, -1), v).reshape(B, H, T, D)

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

    def peak(self, site: str) -> float:
        """The largest |x| recorded at ``site`` over all layers (0.0 when never seen)."""
        return max((v for (_, s), v in self.peaks.items() if s == site), default=0.0)


def _before(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """Whether site ``a`` comes before ``b`` in one forward pass."""
    return (a[0], _ORDER[a[1]]) < (b[0], _ORDER[b[1]])

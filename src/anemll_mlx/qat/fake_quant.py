"""LUT weights that train: fp32 tables and latent weights, an exact palettized weight in the forward.

A palettized weight is ``table[group][index]``.  Training keeps, per quantized Linear, the tables
(groups, 2**bits) and the latent float32 weight, and computes in the forward pass the weight Core ML
will materialise: every latent element assigned to its nearest table entry, the tables rounded to
fp16.  Gradients:

- the tables get the exact gradient of that weight (a gather's gradient is a scatter-add: each entry
  collects the gradients of the elements assigned to it), through a straight-through fp16 rounding;
- the latent weight gets the straight-through estimate (the gradient of the quantized weight, as if
  quantization were the identity), so elements drift across the midpoints between entries and
  change index.

Nothing here needs a runtime scale or a shift: what trains is exactly a ``constexpr_lut_to_dense``
(tables and indices), so the checkpoint exports bit for bit (no ``constexpr_blockwise_shift_scale``,
which crashes palettized stateful models on some macOS versions).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..quant.lut import LUTSpec, LUTWeight


def round_fp16(x: mx.array) -> mx.array:
    """``x`` rounded to fp16 values in the forward, the identity in the backward."""
    return x + mx.stop_gradient(x.astype(mx.float16).astype(mx.float32) - x)


def nearest_indices(latent: mx.array, tables: mx.array) -> mx.array:
    """Index of the nearest entry of its group's table for every element of ``latent`` (out, in).

    The tables are sorted per group, so the nearest entry is the count of midpoints below the value
    (ties go to the lower entry, as ``quant.lut`` assigns); the count is mapped back through the
    sort to an index of the unsorted table.  Returns uint8 (groups, elements per group).
    """
    groups, entries = tables.shape
    rows = latent.reshape(groups, -1)
    order = mx.argsort(tables, axis=1)
    ordered = mx.take_along_axis(tables, order, axis=1)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) * 0.5
    position = mx.zeros(rows.shape, dtype=mx.uint32)
    for j in range(entries - 1):  # one comparison per midpoint: no (groups, n, entries) temporary
        position = position + (rows > midpoints[:, j : j + 1]).astype(mx.uint32)
    return mx.take_along_axis(order.astype(mx.uint32), position, axis=1).astype(mx.uint8)


@dataclass
class TrainableLUT:
    """One quantized Linear while it trains: where it sits and how it is split into groups."""

    name: str  # the LUT target's name (the Hugging Face module path)
    spec: LUTSpec
    shape: tuple[int, int]  # (out, in)

    def params(self, lw: LUTWeight, latent: np.ndarray | mx.array) -> dict[str, mx.array]:
        """The trainable arrays of this weight, from its starting fit and its float32 weight."""
        return {
            "tables": mx.array(lw.lut.astype(np.float32)),
            "latent": mx.array(latent).astype(mx.float32).reshape(self.shape),
        }

    def weight(self, params: dict[str, mx.array], indices: mx.array | None = None) -> mx.array:
        """The weight the export will hold, differentiable in ``params``.

        ``indices``: the current assignments (groups, elements per group); None assigns every
        element to its nearest entry of the current fp16 tables.  The latent weight gets the
        straight-through gradient either way (the added term is exactly zero in value).
        """
        tables = round_fp16(params["tables"])
        latent = params["latent"]
        if indices is None:
            indices = nearest_indices(mx.stop_gradient(latent), mx.stop_gradient(tables))
        dense = mx.take_along_axis(tables, indices.astype(mx.uint32), axis=1).reshape(self.shape)
        return dense + (latent - mx.stop_gradient(latent))

    def export(self, params: dict[str, mx.array], indices: mx.array | None = None) -> LUTWeight:
        """The trained weight as the checkpoint stores it: fp16 tables and uint8 indices."""
        tables = params["tables"].astype(mx.float16).astype(mx.float32)
        if indices is None:
            indices = nearest_indices(params["latent"], tables)
        lut = np.array(tables).astype(np.float16)
        return LUTWeight(
            indices=np.array(indices).astype(np.uint8).reshape(self.shape), lut=lut, spec=self.spec
        )

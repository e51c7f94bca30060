"""How each exported weight is stored: fp16, or LUT-palettized with our own fitted tables.

Which weights a LUT may replace is the model's declaration (``DecoderModel.lut_targets``); which
parts get one is the export's ``LUTConfig``.  One ``WeightStore`` serves every function of an
export: a LUT is fitted once per weight and the same indices and table are emitted wherever the
weight appears, so the ``infer`` and ``prefill`` functions of a chunk share byte-identical
weights (Core ML then stores them once).
"""

from __future__ import annotations

from typing import Any

from ..models.base import DecoderModel
from ..ops.mil_ops import fp16_weight
from ..ops.vocabulary import Embedding, Linear
from ..quant.lut import LUTConfig, LUTWeight, fit_lut, lut_to_mil


class WeightStore:
    """The ``weight_for`` of ``MILOps``: (part, holder, shape, rows) -> an fp16 array or a LUT op."""

    def __init__(self, model: DecoderModel, lut: LUTConfig):
        self.lut = lut
        self.names = {(t.part, id(t.holder)): t.name for t in model.lut_targets()}
        self.fitted: dict[str, LUTWeight] = {}

    def __call__(self, part: str, holder: Linear | Embedding, shape: tuple[int, ...], rows: range | None = None) -> Any:
        spec = self.lut[part]
        name = self.names.get((part, id(holder)))
        if spec is None or name is None:
            return fp16_weight(part, holder, shape, rows)
        key = name if rows is None else f"{name}_{rows.start}_{rows.stop}"
        if key not in self.fitted:
            weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
            self.fitted[key] = fit_lut(weight, spec)
        return lut_to_mil(self.fitted[key], shape, key.replace(".", "_") + "_palettized")

"""How each exported weight is stored: fp16, or LUT-palettized with our own fitted tables.

Which weights a LUT may replace is the model's declaration (``DecoderModel.lut_targets``); which
parts get one is the export's ``LUTConfig``.  One ``WeightStore`` serves every function of a
package: each weight is made once (converted to fp16, or its LUT fitted) and emitted in every
function under one ``weight_id`` (``ops.mil_ops.shared_const``), so the ``infer`` and ``prefill``
functions of a chunk share its bytes in the package without a deduplication pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from ..models.base import DecoderModel
from ..ops.mil_ops import shared_const, to_numpy
from ..ops.vocabulary import Embedding, Linear
from ..quant.lut import LUTConfig, LUTWeight, fit_lut, lut_to_mil


class WeightStore:
    """The ``weight_for`` of ``MILOps``: (part, holder, shape, rows) -> a shared const or a LUT op."""

    def __init__(self, model: DecoderModel, lut: LUTConfig):
        self.lut = lut
        self.targets = {(t.part, id(t.holder)): t for t in model.lut_targets()}
        # Every array of the model by its parameter path: names for the weight ids.
        self.paths = {id(item[1]): str(item[0]) for item in tree_flatten(model.parameters())}
        self.fitted: dict[str, LUTWeight] = {}
        self.dense: dict[str, np.ndarray] = {}

    def __call__(self, part: str, holder: Linear | Embedding, shape: tuple[int, ...], rows: range | None = None) -> Any:
        spec = self.lut[part]
        target = self.targets.get((part, id(holder)))
        if spec is None or target is None:
            key = self._key(self.paths[id(holder.weight)], rows) + "_" + "x".join(map(str, shape))
            if key not in self.dense:
                weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
                self.dense[key] = to_numpy(weight).reshape(shape)
            return shared_const(self.dense[key], key, _mil_name(key))
        key = self._key(target.name, rows)
        if key not in self.fitted:
            self.fitted[key] = fit_lut(_rows(holder, rows), spec)
        return lut_to_mil(self.fitted[key], shape, _mil_name(key) + "_palettized", weight_id=key)

    @staticmethod
    def _key(name: str, rows: range | None) -> str:
        return name if rows is None else f"{name}_{rows.start}_{rows.stop}"

    def release(self) -> None:
        """Drop what was made for the package just saved (its LUTs and fp16 copies)."""
        self.fitted.clear()
        self.dense.clear()


def _rows(holder: Linear | Embedding, rows: range | None) -> np.ndarray:
    weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
    return to_numpy(weight, np.float32)


def _mil_name(key: str) -> str:
    return key.replace(".", "_")

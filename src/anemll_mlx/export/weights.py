"""How each exported weight is stored: fp16, or LUT-palettized with our own fitted tables.

One ``WeightStore`` serves every function of an export: a LUT is fitted once per weight and the
same indices and table are emitted wherever the weight appears, so the ``infer`` and ``prefill``
functions of a chunk share byte-identical weights (Core ML then stores them once).
"""

from __future__ import annotations

from collections.abc import Callable

from ..ops.mil_ops import to_numpy
from ..quant.lut import LUTSpec, LUTWeight, fit_lut, lut_to_mil


class WeightStore:
    def __init__(
        self,
        names: dict[int, str],
        lut_ffn: LUTSpec | None,
        lut_head: LUTSpec | None,
        lut_embed: LUTSpec | None,
        on_fit: Callable[[str], None] | None = None,
    ):
        self.names = names  # id(module) -> dotted path, for stable op names
        self.specs = {"ffn": lut_ffn, "lm_head": lut_head, "embed": lut_embed}
        self.fitted: dict[str, LUTWeight] = {}
        self.on_fit = on_fit

    def _key(self, holder) -> str:
        return getattr(holder, "key", None) or self.names[id(holder)]

    def __call__(self, kind: str, holder, shape: tuple[int, ...]):
        spec = self.specs[kind]
        if spec is None:
            return to_numpy(holder.weight).reshape(shape)
        key = self._key(holder)
        if key not in self.fitted:
            self.fitted[key] = fit_lut(holder.weight, spec)
            if self.on_fit:
                self.on_fit(key)
        name = key.replace(".", "_") + "_palettized"
        return lut_to_mil(self.fitted[key], shape, name)

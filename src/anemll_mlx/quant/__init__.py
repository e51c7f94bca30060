"""Weight quantization for the Core ML export: LUT (palettization) fitting and emission."""

from .lut import LUTConfig, LUTSpec, LUTWeight, fit_lut, lut_group_error, lut_to_mil, parse_lut_spec

__all__ = ["LUTConfig", "LUTSpec", "LUTWeight", "fit_lut", "lut_group_error", "lut_to_mil", "parse_lut_spec"]

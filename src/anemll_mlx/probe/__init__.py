"""FP16 overflow analysis (``anemll-mlx probe``); the scaling transform itself is ``transforms.apply_fp16_scale``.

- ``recorder``: ``ProbeOps``, the MLX backend that records per-layer peaks and inf/NaN;
- ``run``: ``probe``, the measurement itself, returning the report dict;
- ``recipes``: published scales of known models (``data/recipes/*.yaml``);
- ``decision``: ``--fp16-scale`` (``decide_fp16_scale``: recipe, else the cached or fresh probe);
- ``plot``: the per-layer peaks picture.
"""

from .decision import ScaleDecision, decide_fp16_scale, parse_fp16_scale
from .recipes import Recipe, find_recipe, load_recipes
from .recorder import ProbeOps
from .run import FP16_MAX, calibration_prompts, probe, recommend_scale

__all__ = [
    "FP16_MAX",
    "ProbeOps",
    "Recipe",
    "ScaleDecision",
    "decide_fp16_scale",
    "parse_fp16_scale",
    "calibration_prompts",
    "find_recipe",
    "load_recipes",
    "probe",
    "recommend_scale",
]

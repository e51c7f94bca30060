"""FP16 overflow analysis (``anemll-mlx probe``) and the exact FP16 scaling transform.

- ``scale``: ``apply_fp16_scale``, used by the probe and by export's ``--fp16-scale``;
- ``recorder``: ``ProbeOps``, the MLX backend that records per-layer peaks and inf/NaN;
- ``run``: ``probe``, the measurement itself, returning the report dict;
- ``recipes``: published scales of known models (``data/recipes/*.yaml``) and ``decide_fp16_scale``;
- ``plot``: the per-layer peaks picture.
"""

from .recipes import Recipe, ScaleDecision, decide_fp16_scale, find_recipe, load_recipes, parse_fp16_scale
from .recorder import ProbeOps
from .run import FP16_MAX, calibration_prompts, probe, recommend_scale
from .scale import apply_fp16_scale

__all__ = [
    "FP16_MAX",
    "ProbeOps",
    "Recipe",
    "apply_fp16_scale",
    "ScaleDecision",
    "decide_fp16_scale",
    "parse_fp16_scale",
    "calibration_prompts",
    "find_recipe",
    "load_recipes",
    "probe",
    "recommend_scale",
]

"""Helpers shared by the benchmarks: locating the SmolLM2 GGUF and building mlx-lm's peer model."""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import os
import statistics
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

DEFAULT_GGUF = Path.home() / ".cache/anemll-mlx/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    path = Path(os.environ.get("ANEMLL_MLX_SMOLLM2_GGUF", DEFAULT_GGUF))
    if not path.exists():
        sys.exit(f"error: {path} not found: run `make model` first")
    return path


def mlx_lm_peer(lm):
    """mlx-lm's own implementation of the same architecture, holding the very same weights.

    Our Gemma norms hold (1 + w); mlx-lm's hold w, so the offset is taken back out here.
    """
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(lm.config)
    peer = model_class(args_class.from_dict(lm.config))
    weights = dict(tree_flatten(lm.model.parameters()))
    if lm.architecture == "gemma3_text":
        weights = {k: (v - 1.0 if k.endswith("norm.weight") else v) for k, v in weights.items()}
    if hasattr(peer, "sanitize"):
        weights = peer.sanitize(weights)
    peer.load_weights(list(weights.items()), strict=True)
    mx.eval(peer.parameters())
    return peer


def median(values: list[float]) -> float:
    return statistics.median(values)

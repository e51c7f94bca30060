"""``--fp16-scale``: a number, none, or auto, and where an auto decision came from.

``auto`` takes a known model's recipe (published peaks from far more text than a probe sees
here), else the probe's float32 run decides (``run.residual_peak`` and ``run.scale_for``: the
other runs of the full probe do not change the answer).  That answer is kept in a small cache
keyed by the model's content hash (its weight files' sha256) beside the model cache, so exporting
the same weights again, under any name, reuses it and says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadArgumentError
from ..loading import LoadedModel
from .recipes import find_recipe
from .run import DEFAULT_MAX_TOKENS, calibration_prompts, residual_peak, scale_for

CACHE_ENV = "ANEMLL_MLX_CACHE"
CACHE_VERSION = 1  # bump when what the probe measures changes


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "anemll-mlx") / "fp16-scale"


@dataclass(frozen=True)
class ScaleDecision:
    """The fp16 scale an export uses (None: no scaling) and where it came from, for the user."""

    value: float | None
    source: str
    probed: bool = False  # a probe ran (and read every weight of the model) to decide

    def __str__(self) -> str:
        return f"{'none' if self.value is None else self.value} ({self.source})"


def parse_fp16_scale(text: str) -> float | str | None:
    """``--fp16-scale``: ``auto``, ``none`` or a number in (0, 1]."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = float(text)
    except ValueError:
        raise BadArgumentError(f"--fp16-scale must be auto, none or a number, not '{text}'") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise BadArgumentError(f"--fp16-scale must be in (0, 1], got {text}")
    return value


def decide_fp16_scale(
    lm: LoadedModel,
    setting: float | str | None = "auto",
    prompts: list[str] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress=None,
) -> ScaleDecision:
    """The scale for ``setting``: a number or None as given; ``auto``: the matching recipe's
    scale, else the probe's (cached by content hash; ``prompts`` and ``max_tokens`` go to it)."""
    if isinstance(setting, str) and setting != "auto":
        setting = parse_fp16_scale(setting)
    if setting != "auto":
        return ScaleDecision(float(setting) if setting is not None else None, "given")
    recipe = find_recipe(lm)
    if recipe is not None:
        return ScaleDecision(recipe.fp16_scale, f"recipe {recipe.name}, peak {recipe.published_peak:,.0f}")
    texts = calibration_prompts() if prompts is None else list(prompts)
    key = _cache_key(lm, texts, max_tokens)
    cached = _read_cache(key)
    if cached is not None:
        peak, when = cached
        return ScaleDecision(scale_for(peak), f"probe of these weights on {when}, peak {peak:,.0f}, reused")
    peak = residual_peak(lm, texts, max_tokens, progress=progress)
    _write_cache(key, lm, peak)
    return ScaleDecision(scale_for(peak), f"probe, peak {peak:,.0f}", probed=True)


def _cache_key(lm: LoadedModel, prompts: list[str], max_tokens: int) -> str:
    """The weights' content hash, plus what the probe ran on (prompts, tokens, its version)."""
    import hashlib

    settings = json.dumps({"prompts": prompts, "max_tokens": max_tokens, "version": CACHE_VERSION})
    return f"{lm.content_sha256}-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"


def _read_cache(key: str) -> tuple[float, str] | None:
    try:
        entry = json.loads((cache_folder() / f"{key}.json").read_text(encoding="utf-8"))
        return float(entry["peak"]), str(entry["date"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str, lm: LoadedModel, peak: float) -> None:
    """Best effort: a cache that cannot be written only costs the next export another probe."""
    entry = {"peak": peak, "date": time.strftime("%Y-%m-%d"), "source": lm.source, "model_type": lm.architecture}
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{key}.partial-{os.getpid()}"
        partial.write_text(json.dumps(entry) + "\n", encoding="utf-8")
        os.replace(partial, folder / f"{key}.json")
    except OSError:
        pass

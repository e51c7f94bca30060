"""Known models' FP16 recipes: published residual peaks and scales, package data in
``anemll_mlx/data/recipes/*.yaml``, used by the ``--fp16-scale auto`` decision (``decision.py``).

``--fp16-scale auto`` prefers a recipe over a fresh probe: the published figures come from far more
calibration text than a probe sees here.  A recipe matches a loaded model by hub id, folder name,
GGUF ``general.name`` or file name, and only when its architecture and layer count agree too, so a
renamed file of another model cannot pick up the wrong scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import yaml

from ..loading import LoadedModel

# Shipped inside the package, so an installed wheel finds them as a source checkout does.
RECIPES = resources.files("anemll_mlx").joinpath("data", "recipes")

# What may follow a recipe's name in a file or repo name: quantization and format tags only.
_TAG = re.compile(r"(gguf|mlx|f16|f32|bf16|fp16|q\d\w*|iq\d\w*|\d+bit|k|m|s|l|xs|xxs|\d)")


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: str
    num_layers: int
    match: tuple[str, ...]
    published_peak: float
    fp16_scale: float | None  # None: the model is FP16-safe as published


def load_recipes(folder: Path | Traversable = RECIPES) -> list[Recipe]:
    """Every ``*.yaml`` recipe in ``folder`` (the package's own by default)."""
    recipes = []
    paths = sorted((p for p in folder.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)
    for path in paths:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        try:
            scale = data["fp16_scale"]
            recipes.append(
                Recipe(
                    name=str(data["name"]),
                    architecture=str(data["architecture"]),
                    num_layers=int(data["num_layers"]),
                    match=tuple(_normal(m) for m in data["match"]),
                    published_peak=float(data["published_peak"]),
                    fp16_scale=None if scale is None else float(scale),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"recipe {path} is malformed: {e!r}") from None
    return recipes


def find_recipe(lm: LoadedModel, recipes: list[Recipe] | None = None) -> Recipe | None:
    """The recipe whose name matches ``lm`` most specifically, or None."""
    names = model_names(lm)
    best: tuple[int, Recipe] | None = None
    for recipe in load_recipes() if recipes is None else recipes:
        if recipe.architecture != lm.architecture or recipe.num_layers != lm.model.args.num_hidden_layers:
            continue
        for pattern in recipe.match:
            if any(_matches(name, pattern) for name in names) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), recipe)
    return best[1] if best else None


def model_names(lm: LoadedModel) -> set[str]:
    """Names ``lm`` goes by: hub id and its last part, folder name, HF-cache repo, GGUF names."""
    names = {lm.source}
    path = Path(lm.source)
    names.add(path.name)
    if lm.gguf_path is not None:
        names.add(lm.gguf_path.stem)
        names.update(_gguf_names(lm.gguf_path))
    for part in path.parts:  # ~/.cache/huggingface/hub/models--org--name/snapshots/<hash>
        if part.startswith("models--"):
            repo = part[len("models--") :].replace("--", "/")
            names.update({repo, repo.split("/")[-1]})
    for key in ("_name_or_path", "general.name", "name"):
        value = lm.config.get(key)
        if isinstance(value, str) and value:
            names.update({value, value.split("/")[-1]})
    return {_normal(n) for n in names}


def _gguf_names(path: Path) -> set[str]:
    """``general.name`` and basename-size[-finetune] from the GGUF header (the file name may be anything)."""
    from ..loading.gguf import read_header

    meta = read_header(path).metadata
    names = {meta["general.name"]} if isinstance(meta.get("general.name"), str) else set()
    parts = [meta.get(k) for k in ("general.basename", "general.size_label", "general.finetune")]
    if all(isinstance(p, str) for p in parts[:2]):
        names.add("-".join(p for p in parts if isinstance(p, str)))
    return names


def _matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, or ``pattern`` followed by quantization/format tags only."""
    if name == pattern:
        return True
    if not name.startswith(pattern) or name[len(pattern)] not in "-.":
        return False
    return all(_TAG.fullmatch(tag) for tag in re.split(r"[-.]", name[len(pattern) + 1 :]) if tag)


def _normal(name: str) -> str:
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())

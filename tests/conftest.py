"""Shared pytest fixtures: tiny random HF model folders (see ``tiny_models.py``) and the
optional SmolLM2 GGUF file."""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from anemll_mlx import blas
from tiny_models import ARCHS, make_tiny_model

blas.limit_numpy_threads()  # as the CLI does: one BLAS thread per library on these 2 cores


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """The fp16-scale decisions of this session's models live in a cache of their own (the
    console-script tests inherit the variable), never in the user's ~/.cache/anemll-mlx."""
    os.environ["ANEMLL_MLX_CACHE"] = str(tmp_path_factory.mktemp("anemll-mlx-cache"))

SMOLLM2_GGUF_DEFAULT = Path("/root/.cache/anemll-mlx/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch, *, seed=0, **config_overrides) -> Path``: a fresh tiny model folder
    on every call (safe to modify, e.g. with ``scale_weights``)."""

    def factory(arch: str, *, seed: int = 0, **config_overrides) -> Path:
        return make_tiny_model(tmp_path_factory.mktemp(arch), arch, seed=seed, **config_overrides)

    return factory


@pytest.fixture(scope="session")
def tiny_models(tiny_model_factory: Callable[..., Path]) -> dict[str, Path]:
    """One default folder per arch in ``ARCHS``, shared by the session: read only."""
    return {arch: tiny_model_factory(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (``$ANEMLL_MLX_SMOLLM2_GGUF`` or the cache path)."""
    env = os.environ.get("ANEMLL_MLX_SMOLLM2_GGUF")
    path = Path(env) if env else SMOLLM2_GGUF_DEFAULT
    if not path.is_file():
        pytest.skip(
            f"SmolLM2 GGUF not found at {path} (set ANEMLL_MLX_SMOLLM2_GGUF to a local "
            "SmolLM2-135M-Instruct.Q4_1.gguf; the hub is unreachable here)"
        )
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, its FP16 export) of a tiny llama at context 128, batch 16: what the commands
    that run exports (generate, chat, serve) are tested on through the mil driver.  Read only."""
    from anemll_mlx.export import ExportOptions, export_model
    from anemll_mlx.loading import load

    folder = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("tiny-export") / "export"
    export_model(load(folder, "float32"), out, ExportOptions(context=128, batch=16))
    return folder, out


ANEMLL_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "anemll-0.3.5"


@pytest.fixture(scope="session")
def anemll_fixtures() -> Path:
    """ANEMLL 0.3.5's own exports of a tiny random LLaMA and the model they came from (see its
    PROVENANCE.md); ``$ANEMLL_MLX_FIXTURES`` points elsewhere."""
    path = Path(os.environ.get("ANEMLL_MLX_FIXTURES", ANEMLL_FIXTURES))
    if not (path / "export-fp16" / "meta.yaml").is_file():
        pytest.skip(f"ANEMLL fixtures not found at {path} (the shared folder beside the repository)")
    return path

"""ANEMLL's own exports run here: ANEMLL 0.3.5 converted a tiny random LLaMA (FP16 and FFN LUT 4,4,
context 64, batch 32; see the fixtures' PROVENANCE.md).  Their KV state holds 512 positions, their
prefill returns a placeholder, meta.yaml names .mlmodelc files: ``inspect``, ``compare mil:`` and
``generate mil:`` take them as they are, and the FP16 one matches the MLX model it came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anemll_mlx.eval.compare import compare
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver, open_driver

CLI = Path(sys.executable).parent / "anemll-mlx"
LONG = (
    "Tell me everything about the long history of Paris, its rivers, its bridges, its many old streets, "
    "the kings and queens who lived there, and the artists who painted its gardens and its churches"
)


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("which", ["export-fp16", "export-lut44"])
def test_inspect_takes_anemll_exports(anemll_fixtures, which):
    parts, problems = inspect_export(anemll_fixtures / which)
    assert problems == [] and [p.problems for p in parts if p.problems] == []
    assert parts[1].functions == ["infer", "prefill"]
    done = cli("inspect", anemll_fixtures / which)
    assert done.returncode == 0 and "conforms to the ANEMLL layout" in done.stdout


def test_fp16_export_matches_its_source_model(anemll_fixtures):
    """Teacher-forced against MLX float32, with a prompt longer than the batch of 32 (two prefill
    calls, then the placeholder answered by infer): KL far under 1e-3, every argmax the same."""
    reference = MLXDriver(load(anemll_fixtures / "model", "float32"), "mlx@fp32", context=64)
    candidate = open_driver(f"mil:{anemll_fixtures / 'export-fp16'}")
    tok = reference.tokenizer
    prompts = [tok.encode_prompt("Hello there", chat=True), tok.encode_prompt(LONG, chat=False)]
    assert len(prompts[1]) > 32
    summary = compare(reference, candidate, prompts, 16).summary
    print({k: summary[k] for k in ("kl_mean", "kl_max", "match_rate")})
    assert summary["kl_max"] < 1e-3 and summary["match_rate"] == 1.0


def test_compare_cli_on_anemll_export(anemll_fixtures):
    """The issue's command, which used to stop at 'input hidden_states has shape (1, 0, 64)'."""
    done = cli(
        "compare", "--reference", f"mlx:{anemll_fixtures / 'model'}@fp32", "--candidate", f"mil:{anemll_fixtures / 'export-fp16'}",
        "--prompt", LONG, "--no-chat", "--max-tokens", "8", "--max-kl", "1e-3", "--min-match", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "healthy" in done.stdout


def test_lut_export_runs(anemll_fixtures):
    """ANEMLL's LUT 4,4 export runs too (its own k-means tables: nothing to match exactly)."""
    reference = MLXDriver(load(anemll_fixtures / "model", "float32"), "mlx@fp32", context=64)
    candidate = open_driver(f"mil:{anemll_fixtures / 'export-lut44'}")
    ids = reference.tokenizer.encode_prompt(LONG, chat=False)
    summary = compare(reference, candidate, [ids], 8).summary
    assert np.isfinite(summary["kl_mean"]) and summary["kl_mean"] < 0.01


def test_generate_on_anemll_export_is_the_models_greedy_text(anemll_fixtures):
    def tokens(spec: str) -> list[int]:
        done = cli("generate", spec, "--prompt", "Hello there", "--max-tokens", "12", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])["tokens"]

    export = anemll_fixtures / "export-fp16"
    assert tokens(f"mil:{export}") == tokens(f"mlx:{anemll_fixtures / 'model'}@fp32")
    done = cli("generate", export, "--prompt", "Hello", "--max-tokens", "2")  # a bare path: said once
    assert done.returncode == 0 and f"running it as mil:{export}" in done.stderr

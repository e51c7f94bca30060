"""The real model: SmolLM2-135M-Instruct (the Q4_1 GGUF from PyPI) exported FP16 with the default
options, run by our executor and compared with the float32 MLX reference on the default prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from anemll_mlx.eval.compare import compare
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver, open_driver

PROMPTS, STEPS = 4, 16  # a slice of the default set: the full 16 x 32 is the demo's and the note's


@pytest.mark.slow
def test_smollm2_fp16_export_tracks_mlx_fp32(smollm2_gguf: Path, tmp_path: Path):
    out = tmp_path / "smollm2-fp16"
    lm = load(smollm2_gguf, "float32")
    export_model(lm, out, ExportOptions())
    parts, problems = inspect_export(out)
    assert problems == [] and [p.problems for p in parts if p.problems] == []
    assert [p.name for p in parts] == [
        "llama_embeddings.mlpackage", "llama_FFN_PF_chunk_01of01.mlpackage", "llama_lm_head.mlpackage"
    ]

    reference = MLXDriver(lm, "mlx@fp32", context=512)
    candidate = open_driver(f"mil:{out}")
    prompts = [reference.tokenizer.encode_prompt(p, chat=True) for p in default_prompts()[:PROMPTS]]
    summary = compare(reference, candidate, prompts, STEPS, stop_ids=reference.tokenizer.eos_token_ids).summary
    print({k: summary[k] for k in ("kl_mean", "kl_max", "corr_mean", "match_rate", "first_divergence")})
    assert summary["kl_mean"] < 0.01
    assert summary["match_rate"] >= 0.98
    assert summary["corr_mean"] > 0.99


@pytest.mark.slow
def test_compare_stops_teacher_forcing_at_the_end_of_turn(smollm2_gguf: Path, tmp_path: Path):
    """SmolLM2 answers this in a few tokens and then ends its turn: the steps stop there, instead
    of comparing the new system turn the reference would go on to write."""
    cli = Path(sys.executable).parent / "anemll-mlx"
    out = tmp_path / "eot"
    done = subprocess.run(
        [str(cli), "compare", "--reference", f"mlx:{smollm2_gguf}", "--candidate", f"mlx:{smollm2_gguf}@fp16",
         "--prompt", "What is the capital of France?", "--max-tokens", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    print(record["steps"], repr(record["reference_text"]))
    assert record["ended"] == "eos" and record["steps"] < 32
    assert record["reference_text"].endswith("<|im_end|>") and "<|im_start|>" not in record["reference_text"]
    assert "reached the end of turn early" in done.stdout

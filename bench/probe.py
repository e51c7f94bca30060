"""Wall time of the probe on SmolLM2-135M and on a random-weight model of Gemma3-270M's shape.

Targets (2-core Linux reference machine): SmolLM2 with the 10 built-in calibration prompts under
20 s; a random model with Gemma3-270M's real configuration (hidden 640, 18 layers, vocabulary
262144, window 512) under 90 s.  Prints each stage's time, the total against its target, and what
the probe found.  Loading is not counted.

    python bench/probe.py [--max-tokens 8] [--cases smollm2 gemma3-270m]
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import os
import time

import mlx.core as mx
import numpy as np
from rich.console import Console
from rich.table import Table

from anemll_mlx.loading import LoadedModel, load
from anemll_mlx.models import build_model
from anemll_mlx.probe import probe
from anemll_mlx.probe.run import DEFAULT_MAX_TOKENS
from common import smollm2_gguf

TARGETS = {"smollm2": 20.0, "gemma3-270m": 90.0}
GEMMA3_270M = {
    "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "sliding_window": 512, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}  # fmt: skip


def gemma3_270m(tokenizer_source) -> LoadedModel:
    """Gemma3-270M's shape with random weights (std 0.02, norms at their (1 + w) = 1 start) and
    SmolLM2's tokenizer (its ids fall inside the 262144-row table)."""
    model = build_model(GEMMA3_270M)
    rng = np.random.default_rng(0)
    for name, holder in model.named_modules():
        if hasattr(holder, "weight") and isinstance(holder.weight, mx.array):
            shape = holder.weight.shape
            value = np.ones(shape, np.float32) if name.endswith("norm") else rng.standard_normal(shape, np.float32) * 0.02
            holder.weight = mx.array(value)
    mx.eval(model.parameters())
    donor = tokenizer_source
    return LoadedModel(model, donor.tokenizer, dict(GEMMA3_270M), "random gemma3-270m", donor.folder, donor.gguf_path, mx.float32)


def run(name: str, lm: LoadedModel, max_tokens: int) -> list[str]:
    stages: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - last[0]
        last[0] = now

    started = time.perf_counter()
    report = probe(lm, max_tokens=max_tokens, progress=progress)
    seconds = time.perf_counter() - started
    table = Table(title=f"{name} probe: {report['prompts']} prompts, {report['tokens']} tokens")
    table.add_column("stage")
    table.add_column("s", justify="right")
    for stage, spent in stages.items():
        table.add_row(stage, f"{spent:.1f}")
    table.add_row("total", f"{seconds:.1f}", style="bold")
    Console().print(table)
    peak = "inf" if report["peak"] is None else f"{report['peak']:,.0f}"
    verdict = "within" if seconds <= TARGETS[name] else "OVER"
    return [
        f"{name}: peak {peak} at layer {report['peak_layer']} ({report['peak_site']}); "
        f"fp16 match {report['fp16']['token_match']:.3f}, bf16 match {report['bf16']['token_match']:.3f}; {report['verdict']}",
        f"{name}: {seconds:.1f} s vs target {TARGETS[name]:.0f} s: {verdict} (load average {os.getloadavg()[0]:.2f})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--cases", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    opts = parser.parse_args()
    smollm2 = load(smollm2_gguf(), "float32")
    lines = []
    if "smollm2" in opts.cases:
        lines += run("smollm2", smollm2, opts.max_tokens)
    if "gemma3-270m" in opts.cases:
        lines += run("gemma3-270m", gemma3_270m(smollm2), opts.max_tokens)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()

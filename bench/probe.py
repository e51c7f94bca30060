"""Wall time of ``anemll-mlx probe`` on SmolLM2-135M with the built-in calibration prompts.

Target: 60 s.  Prints the time of each stage (generation, float32, float16, bfloat16, clamp runs),
the total against the target, and the figures the probe found.  Loading the GGUF is not counted.

    python bench/probe.py [--max-tokens 16]
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import time

from rich.console import Console
from rich.table import Table

from anemll_mlx.loading import load
from anemll_mlx.probe import probe
from anemll_mlx.probe.run import DEFAULT_MAX_TOKENS
from common import smollm2_gguf

TARGET_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    opts = parser.parse_args()

    lm = load(smollm2_gguf(), "float32")
    stages: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - last[0]
        last[0] = now

    started = time.perf_counter()
    report = probe(lm, max_tokens=opts.max_tokens, progress=progress)
    seconds = time.perf_counter() - started

    table = Table(title=f"SmolLM2-135M probe: {report['prompts']} prompts, {report['tokens']} tokens")
    table.add_column("stage")
    table.add_column("s", justify="right")
    for stage, spent in stages.items():
        table.add_row(stage, f"{spent:.1f}")
    table.add_row("total", f"{seconds:.1f}", style="bold")
    Console().print(table)
    print(
        f"peak {report['peak']:,.0f} at layer {report['peak_layer']} ({report['peak_site']}); "
        f"fp16 match {report['fp16']['token_match']:.3f}, bf16 match {report['bf16']['token_match']:.3f}; "
        f"{report['verdict']}"
    )
    verdict = "within" if seconds <= TARGET_S else "OVER"
    print(f"{seconds:.1f} s vs target {TARGET_S:.0f} s: {verdict}")


if __name__ == "__main__":
    main()

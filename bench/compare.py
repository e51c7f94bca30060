"""Wall time of ``anemll-mlx compare`` as a user runs it, and the executor's memory on a big export.

- SmolLM2-135M: its FP16 export (made first when missing) against the float32 MLX reference on the
  16 default prompts x 32 teacher-forced steps; target under 60 s on the 2-core reference machine.
- ``--synthetic``: the ~1.7B synthetic LLaMA's FP16 export (bench/export.py --synthetic makes it)
  run by the mil executor against the MLX reference in bfloat16, 2 prompts x 4 steps; the peak
  resident memory of the whole compare, target within 12 GB.

    python bench/compare.py [--export out/bench-compare/fp16] [--synthetic] [--out-root out/bench-export]
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import smollm2_gguf

CLI = Path(sys.executable).parent / "anemll-mlx"
PEAK = Path(__file__).with_name("peak.py")  # runs the CLI and measures its peak memory (see there)


def timed_cli(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one CLI run; exits when it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(PEAK), str(CLI), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: anemll-mlx {' '.join(args[:1])} failed:\n{done.stderr[-2000:]}")
    return seconds, int(done.stdout.split()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="out/bench-compare/fp16")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--out-root", default="out/bench-export")
    opts = parser.parse_args()
    gguf = smollm2_gguf()
    export = Path(opts.export)
    if not (export / "meta.yaml").exists():
        timed_cli("export", str(gguf), "--out", str(export), "--fp16-scale", "none")
    load = os.getloadavg()[0]
    seconds, peak = timed_cli("compare", "--reference", f"mlx:{gguf}", "--candidate", f"mil:{export}")
    print(f"compare SmolLM2 FP16 export vs mlx fp32, 16 prompts x 32 steps: {seconds:.1f} s "
          f"(target 60 s: {'within' if seconds <= 60 else 'OVER'}), peak {peak:.2f} GB, load average {load:.2f}")  # fmt: skip
    if opts.synthetic:
        root = Path(opts.out_root)
        model, big = root / "synthetic-1.7b", root / "1.7B-fp16"
        if not (big / "meta.yaml").exists():
            sys.exit(f"error: {big} missing: run bench/export.py --synthetic first")
        seconds, peak = timed_cli(
            "compare", "--reference", f"mlx:{model}@bf16", "--candidate", f"mil:{big}", "--max-tokens", "4",
            "--prompt", "What is the capital of France?", "--prompt", "Write a haiku about the sea.",
        )  # fmt: skip
        print(f"compare 1.7B FP16 export (mil) vs mlx bf16, 2 prompts x 4 steps: {seconds:.1f} s, "
              f"peak {peak:.2f} GB (target 12 GB: {'within' if peak <= 12 else 'OVER'})")  # fmt: skip


if __name__ == "__main__":
    main()

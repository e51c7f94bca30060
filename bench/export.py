"""Wall time and peak memory of exporting SmolLM2-135M (FP16 and LUT 4,4), each in its own process.

    python bench/export.py [--out-root out/bench-export] [--context 512]

The LUT-fit comparison with coremltools lives in bench/lut.py.
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import smollm2_gguf

CLI = Path(sys.executable).parent / "anemll-mlx"
CASES = {"fp16": [], "lut4,4": ["--lut", "4,4"], "lut4,4 + head 6,4": ["--lut", "4,4", "--lut-lm-head", "6,4"]}


def run(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one CLI run, measured by the kernel for that child."""
    start = time.perf_counter()
    child = subprocess.Popen([str(CLI), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    return seconds, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", default="out/bench-export")
    parser.add_argument("--context", default="512")
    opts = parser.parse_args()
    gguf = smollm2_gguf()
    root = Path(opts.out_root)
    table = Table(title=f"export SmolLM2-135M, context {opts.context} (one process each)")
    for col in ("case", "seconds", "peak RSS MB", "MB on disk"):
        table.add_column(col, justify="right")
    for name, extra in CASES.items():
        out = root / name.replace(" ", "").replace(",", "_").replace("+", "_")
        shutil.rmtree(out, ignore_errors=True)
        seconds, rss, code = run(["export", str(gguf), "--out", str(out), "--context", opts.context, "--fp16-scale", "none", *extra])
        if code != 0:
            sys.exit(f"error: export {name} failed with exit code {code}")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        table.add_row(name, f"{seconds:.1f}", f"{rss:.0f}", f"{size:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()

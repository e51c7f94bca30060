"""Wall time and peak memory of exporting SmolLM2-135M (FP16, LUT 4,4, ...), each run in its own process.

    python bench/export.py [--out-root out/bench-export] [--context 512] [--repeat 3] [--cases fp16 lut4,4]

Each case runs ``--repeat`` times through the CLI (``anemll-mlx export GGUF --fp16-scale none``);
the table gives the median wall seconds and the largest peak RSS (the kernel's ru_maxrss of the
CLI process and of the LUT-fit workers it forked, whichever was larger), and the load average
before the runs, since other work on the machine moves the times.  Targets on the 2-core Linux
reference machine: FP16 <= 20 s, LUT 4,4 <= 30 s.  The LUT-fit comparison with coremltools lives
in bench/lut.py.
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import smollm2_gguf

CLI = Path(sys.executable).parent / "anemll-mlx"
CASES = {"fp16": [], "lut4,4": ["--lut", "4,4"], "lut4,4+head6,4": ["--lut", "4,4", "--lut-lm-head", "6,4"]}


def run(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one CLI run, measured by the kernel for that child
    (wait4's ru_maxrss: the child's own peak or that of a process it waited for, the larger)."""
    start = time.perf_counter()
    child = subprocess.Popen([str(CLI), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    return seconds, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", default="out/bench-export")
    parser.add_argument("--context", default="512")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    opts = parser.parse_args()
    gguf = smollm2_gguf()
    root = Path(opts.out_root)
    table = Table(title=f"export SmolLM2-135M, context {opts.context} (one process each, median of {opts.repeat})")
    for col in ("case", "seconds", "each run", "peak RSS MB", "MB on disk", "load avg before"):
        table.add_column(col, justify="right")
    for name in opts.cases:
        out = root / name.replace(",", "_").replace("+", "_")
        load = os.getloadavg()[0]
        seconds, peaks = [], []
        for _ in range(opts.repeat):
            shutil.rmtree(out, ignore_errors=True)
            args = ["export", str(gguf), "--out", str(out), "--context", opts.context, "--fp16-scale", "none"]
            wall, rss, code = run([*args, *CASES[name]])
            if code != 0:
                sys.exit(f"error: export {name} failed with exit code {code}")
            seconds.append(wall)
            peaks.append(rss)
            print(f"{name}: {wall:.1f} s, peak RSS {rss:.0f} MB", flush=True)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        runs = " ".join(f"{s:.1f}" for s in seconds)
        table.add_row(name, f"{statistics.median(seconds):.1f}", runs, f"{max(peaks):.0f}", f"{size:.1f}", f"{load:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()

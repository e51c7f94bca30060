"""Wall time and peak memory of exporting SmolLM2-135M (FP16, LUT 4,4, ...), each run in its own
process, and of a synthetic ~1.7B-parameter LLaMA (bounded memory, time linear in parameters).

    python bench/export.py [--out-root out/bench-export] [--context 512] [--repeat 3] [--cases fp16 lut4,4]
                           [--synthetic] [--synthetic-only]

Each case runs ``--repeat`` times through the CLI (``anemll-mlx export GGUF --fp16-scale none``);
the table gives the median wall seconds and the largest peak memory (the total proportional set
size of the CLI and the LUT-fit workers it forks: each worker's RSS would count the pages it
shares with its parent again; bench/peak.py), and the load average
before the runs, since other work on the machine moves the times.  Targets on the 2-core Linux
reference machine: FP16 <= 20 s, LUT 4,4 <= 30 s.  The LUT-fit comparison with coremltools lives
in bench/lut.py.

``--synthetic`` adds a random-weight LLaMA of about 1.7B parameters (hidden 2048, 24 layers,
intermediate 8192, vocabulary 49152 so SmolLM2's tokenizer fits it; 3.4 GB of fp16 safetensors in
4 shards, written by this bench) exported FP16 and LUT 4,4 with ``--max-chunk-mb 500``: wall time,
seconds per billion parameters (and the 8B extrapolation) and peak memory, target <= 2.5 GB.
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


PEAK = Path(__file__).with_name("peak.py")  # runs the CLI and measures its peak memory (see there)


def run(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak memory in MB, exit code) of one CLI run: the total proportional set size of
    the CLI and the LUT-fit workers it forks, at its largest (bench/peak.py)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(PEAK), str(CLI), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = int(done.stdout.split()[-1]) / 1024 if done.stdout.split() else float("nan")
    return seconds, peak, done.returncode


SYNTHETIC = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 49152, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}  # fmt: skip


def synthetic_model(folder: Path, gguf: Path) -> tuple[Path, int]:
    """The synthetic LLaMA as a sharded Hugging Face folder (made once), and its parameter count."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from anemll_mlx.export.meta import write_tokenizer_files
    from anemll_mlx.loading import load, read_config
    from anemll_mlx.models import build_model
    from anemll_mlx.models.base import parameter_arrays

    c = SYNTHETIC
    count = sum(a.size for a in parameter_arrays(build_model(c)))
    if (folder / "config.json").exists():
        return folder, count
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    from mlx.utils import tree_flatten

    shapes = {name: tuple(a.shape) for name, a in tree_flatten(build_model(c).parameters())}
    names = sorted(shapes)
    shards = [names[i::4] for i in range(4)]
    index = {}
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-00004.safetensors"
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shapes[name], np.float16)
            else:
                tensors[name] = (rng.standard_normal(shapes[name], np.float32) * 0.02).astype(np.float16)
            index[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    write_tokenizer_files(load(gguf, lazy=True), folder)  # SmolLM2's tokenizer files
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    read_config(folder)
    return folder, count


def synthetic_rows(root: Path, gguf: Path, repeat: int) -> list[tuple[str, ...]]:
    folder, count = synthetic_model(root / "synthetic-1.7b", gguf)
    rows = []
    for name, flags in (("1.7B fp16", []), ("1.7B lut4,4", ["--lut", "4,4"])):
        out = root / name.replace(" ", "-").replace(",", "_")
        seconds, peaks = [], []
        for _ in range(repeat):
            shutil.rmtree(out, ignore_errors=True)
            args = ["export", str(folder), "--out", str(out), "--fp16-scale", "none", "--max-chunk-mb", "500"]
            wall, peak, code = run([*args, *flags])
            if code != 0:
                sys.exit(f"error: export {name} failed with exit code {code}")
            seconds.append(wall)
            peaks.append(peak)
            print(f"{name}: {wall:.1f} s, peak {peak:.0f} MB (PSS)", flush=True)
        wall = statistics.median(seconds)
        per_billion = wall / (count / 1e9)
        rows.append((f"{name} ({count / 1e9:.2f}B)", f"{wall:.1f}", f"{per_billion:.0f} s/B, 8B ~{8 * per_billion / 60:.0f} min",
                     f"{max(peaks):.0f}", f"{sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.0f}",
                     f"{os.getloadavg()[0]:.2f}"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", default="out/bench-export")
    parser.add_argument("--context", default="512")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--synthetic", action="store_true", help="also the ~1.7B synthetic LLaMA")
    parser.add_argument("--synthetic-only", action="store_true", help="only the ~1.7B synthetic LLaMA")
    opts = parser.parse_args()
    gguf = smollm2_gguf()
    root = Path(opts.out_root)
    table = Table(title=f"export SmolLM2-135M, context {opts.context} (one process each, median of {opts.repeat})")
    for col in ("case", "seconds", "each run", "peak MB (PSS)", "MB on disk", "load avg before"):
        table.add_column(col, justify="right")
    for name in [] if opts.synthetic_only else opts.cases:
        out = root / name.replace(",", "_").replace("+", "_")
        load = os.getloadavg()[0]
        seconds, peaks = [], []
        for _ in range(opts.repeat):
            shutil.rmtree(out, ignore_errors=True)
            args = ["export", str(gguf), "--out", str(out), "--context", opts.context, "--fp16-scale", "none"]
            wall, peak, code = run([*args, *CASES[name]])
            if code != 0:
                sys.exit(f"error: export {name} failed with exit code {code}")
            seconds.append(wall)
            peaks.append(peak)
            print(f"{name}: {wall:.1f} s, peak {peak:.0f} MB (PSS)", flush=True)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        runs = " ".join(f"{s:.1f}" for s in seconds)
        table.add_row(name, f"{statistics.median(seconds):.1f}", runs, f"{max(peaks):.0f}", f"{size:.1f}", f"{load:.2f}")
    if opts.synthetic or opts.synthetic_only:
        for row in synthetic_rows(root, gguf, 1):
            table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()

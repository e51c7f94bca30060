"""An export's peak memory follows its largest part, not the model: a ~200M-parameter LLaMA
(840 MB as the float32 weights MLX would hold) exported in 8 parts of ~50 MB stays within a few
hundred MB of what exporting a model of a few MB costs the same process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import make_tiny_model

CLI = Path(sys.executable).parent / "anemll-mlx"
BIG = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 8192,
}  # fmt: skip


# Linux carries a process's memory high-water mark over vfork/exec, so a child started by this large
# test process would report at least our own size: a small launcher starts it instead.
LAUNCHER = (
    "import os, subprocess, sys; c = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "_, s, u = os.wait4(c.pid, 0); print(u.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(s))"
)


def export_peak_mb(model: Path, out: Path, *flags: str) -> float:
    """Peak resident memory (MB) of one ``anemll-mlx export`` process, as the kernel counted it."""
    args = [str(CLI), "export", str(model), "--out", str(out), "--context", "64", "--batch", "16",
            "--fp16-scale", "none", *flags]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_follows_the_largest_part(tmp_path):
    small = make_tiny_model(tmp_path / "small", "llama", num_hidden_layers=2)
    big = make_tiny_model(tmp_path / "big", "llama", **BIG)
    params = 16 * (4 * 1024 * 1024 + 3 * 1024 * 2816) + 2 * 8192 * 1024
    weights_mb = 4 * params / 2**20  # float32, as loaded
    base = export_peak_mb(small, tmp_path / "small-out")
    peak = export_peak_mb(big, tmp_path / "big-out", "--max-chunk-mb", "60")
    parts = sorted(p.name for p in (tmp_path / "big-out").glob("*FFN_PF*"))
    print(f"model {weights_mb:.0f} MB float32; peak RSS {peak:.0f} MB vs {base:.0f} MB for a tiny model; {len(parts)} chunks")
    assert len(parts) == 8
    assert peak - base < 0.4 * weights_mb, f"the export held {peak - base:.0f} MB more than a tiny one"

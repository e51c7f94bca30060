"""The BLAS under MLX (anemll_mlx/blas.py): loaded when present, MLX bound to it, the switch
honoured, and a clean fallback to MLX's own BLAS otherwise.

Each case runs in a fresh interpreter, since the library can only go under MLX before
``mlx.core`` is first imported.  The dynamic linker itself (``LD_DEBUG=bindings``) says which
library ``libmlx.so``'s ``cblas_sgemm`` was bound to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anemll_mlx import blas

LINUX = sys.platform == "linux"
CLI = Path(sys.executable).parent / "anemll-mlx"

PROBE = """
import json, anemll_mlx
from anemll_mlx import blas
import mlx.core as mx, numpy as np
a = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((48, 32)).astype(np.float32)
y = np.array(mx.array(a) @ mx.array(b))
s = blas.status()
print(json.dumps({"library": s.library, "threads": s.threads, "reason": s.reason,
                  "error": float(np.abs(y - a.astype(np.float64) @ b).max())}))
"""


def run_probe(env: dict[str, str] | None = None, first: str = "") -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", first + PROBE],
        env={**os.environ, "LD_DEBUG": "bindings", **(env or {})},
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def mlx_binding(ld_debug: str) -> str:
    """The library libmlx.so's cblas_sgemm was bound to."""
    lines = [line for line in ld_debug.splitlines() if "libmlx.so" in line and "`cblas_sgemm'" in line]
    assert lines, "no binding of libmlx.so's cblas_sgemm was logged"
    return lines[0].split(" to ", 1)[1]


def fast_blas_available() -> bool:
    candidates = blas._wheel_library() + [p for p in blas.SYSTEM_OPENBLAS if os.path.exists(p)]
    return LINUX and bool(candidates) and os.environ.get(blas.ENV_SWITCH, "auto") == "auto"


@pytest.mark.skipif(not LINUX, reason="the BLAS under MLX is a Linux matter (macOS: Accelerate, Metal)")
def test_the_fast_blas_goes_under_mlx_when_present():
    if not fast_blas_available():
        pytest.skip("no OpenBLAS installed here: MLX keeps its reference BLAS (the fallback is tested below)")
    found, ld_debug = run_probe()
    if found["library"] is None:
        pytest.skip(f"an OpenBLAS is installed but cannot load here: {found['reason']}")
    assert found["threads"] == 1 and found["error"] < 1e-3
    assert mlx_binding(ld_debug).startswith(found["library"])  # MLX computes with it, not its own


@pytest.mark.skipif(not LINUX, reason="the BLAS under MLX is a Linux matter")
def test_the_switch_leaves_mlx_as_shipped():
    found, ld_debug = run_probe({blas.ENV_SWITCH: "off"})
    assert found["library"] is None and found["reason"] == f"{blas.ENV_SWITCH}=off"
    assert "mlx_cpu.libs/libblas" in mlx_binding(ld_debug) and found["error"] < 1e-3


@pytest.mark.skipif(not LINUX, reason="the BLAS under MLX is a Linux matter")
def test_a_missing_library_falls_back_cleanly():
    found, ld_debug = run_probe({blas.ENV_SWITCH: "/nonexistent/libopenblas.so.0"})
    assert found["library"] is None and "libopenblas.so.0" in found["reason"] and "apt install" in found["reason"]
    assert "mlx_cpu.libs/libblas" in mlx_binding(ld_debug) and found["error"] < 1e-3


@pytest.mark.skipif(not LINUX, reason="the BLAS under MLX is a Linux matter")
def test_too_late_after_mlx_core_says_so():
    found, _ = run_probe(first="import mlx.core\n")
    assert found["library"] is None and "mlx.core was imported before anemll_mlx" in found["reason"]


def test_verbose_says_which_blas_runs_under_mlx():
    done = subprocess.run([str(CLI), "--verbose", "info", "/nonexistent"], capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and lines[0].startswith("MLX BLAS: ") and lines[1].startswith("error: ")
    assert str(blas.status()) == lines[0]  # the same decision in every process of this environment

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
error = float(np.abs(y - a.astype(np.float64) @ b).max())
# decode shapes (one output row or column), every layout MLX may hand to cblas_sgemm, and addmm's
# alpha and beta: what the sgemm -> sgemv forwarder takes over
rng = np.random.default_rng(2)
for m, k, n in [(1, 300, 70), (70, 300, 1), (1, 5, 1), (1, 1, 9)]:
    x, w, c = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (m, n)))
    for xs in (mx.array(x), mx.array(x.T.copy()).T):
        for ws in (mx.array(w), mx.array(w.T.copy()).T):
            exact = x.astype(np.float64) @ w
            error = max(error, float(np.abs(np.array(xs @ ws) - exact).max()) / np.abs(exact).max())
            got = np.array(mx.addmm(mx.array(c), xs, ws, alpha=0.5, beta=3.0))
            error = max(error, float(np.abs(got - (0.5 * exact + 3.0 * c)).max()) / np.abs(exact).max())
s = blas.status()
print(json.dumps({"library": s.library, "threads": s.threads, "reason": s.reason, "gemv": s.gemv,
                  "error": error}))
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
    if found["gemv"] == "forwarded to sgemv":  # MLX's sgemm is the forwarder, which calls this OpenBLAS
        assert "/anemll-mlx/native/gemv_forward-" in mlx_binding(ld_debug)
    else:
        assert mlx_binding(ld_debug).startswith(found["library"])  # MLX computes with it, not its own


@pytest.mark.skipif(not LINUX, reason="the BLAS under MLX is a Linux matter")
def test_decode_shapes_go_to_sgemv_and_the_forwarder_can_be_turned_off(tmp_path):
    if not fast_blas_available():
        pytest.skip("no OpenBLAS installed here")
    cache = {"XDG_CACHE_HOME": str(tmp_path)}  # a fresh cache: the forwarder is compiled here
    found, ld_debug = run_probe(cache)
    if found["library"] is None:
        pytest.skip(f"an OpenBLAS is installed but cannot load here: {found['reason']}")
    if "no C compiler" in found["gemv"]:
        pytest.skip("no C compiler here: MLX calls OpenBLAS's sgemm directly")
    assert found["gemv"] == "forwarded to sgemv" and found["error"] < 1e-5
    assert mlx_binding(ld_debug).startswith(str(tmp_path / "anemll-mlx" / "native" / "gemv_forward-"))
    assert [p.name for p in (tmp_path / "anemll-mlx" / "native").iterdir() if p.name.startswith(".")] == []

    off, ld_debug = run_probe({**cache, blas.ENV_GEMV: "off"})
    assert off["gemv"] == f"OpenBLAS sgemm ({blas.ENV_GEMV}=off)" and off["error"] < 1e-5
    assert mlx_binding(ld_debug).startswith(off["library"])


@pytest.mark.skipif(not LINUX, reason="the BLAS under MLX is a Linux matter")
def test_without_a_compiler_mlx_calls_openblas_directly(tmp_path):
    if not fast_blas_available():
        pytest.skip("no OpenBLAS installed here")
    found, ld_debug = run_probe({"XDG_CACHE_HOME": str(tmp_path), "CC": "/nonexistent/cc"})
    if found["library"] is None:
        pytest.skip(f"an OpenBLAS is installed but cannot load here: {found['reason']}")
    assert found["gemv"].startswith("OpenBLAS sgemm (no forwarder: ") and found["error"] < 1e-5
    assert mlx_binding(ld_debug).startswith(found["library"])


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

"""MLX at BLAS speed on Linux: a fast OpenBLAS put under MLX's CPU backend.

Why: the Linux ``mlx[cpu]`` wheel bundles the reference netlib BLAS, 2-5 GFLOP/s for the float32
matmuls every MLX run here is made of (reference generation, probe, compare, QAT).  ``libmlx.so``
binds ``cblas_sgemm`` (and its LAPACK calls) when ``mlx.core`` is imported, and a library already in
the process's global symbol namespace wins over the one it bundles.  So ``load()`` opens an
OpenBLAS that exports plain ``cblas_*`` names with ``RTLD_GLOBAL`` before anything imports
``mlx.core``: ``anemll_mlx/__init__.py`` calls it first thing, and measured 40-200 GFLOP/s.

Where the library comes from, in order:
1. ``ANEMLL_MLX_BLAS=PATH``: that library; ``ANEMLL_MLX_BLAS=off``: none (MLX as shipped).
2. The PyPI wheel ``ngsolve-openblas`` (a dependency on Linux x86-64: OpenBLAS 0.3.33 built with
   run-time CPU kernel selection).  It needs ``libgfortran.so.5``: the system's, or the copy
   ``make install`` unpacks from Debian's ``libgfortran5`` into the venv (``NATIVE``) when the
   system has none (minimal Debian images).
3. A system OpenBLAS (Debian/Ubuntu ``libopenblas0-pthread``, Fedora, Arch).
Without one, MLX runs as shipped; ``status()`` says why, and ``anemll-mlx --verbose`` prints it.

Threads: one OpenBLAS thread unless ``ANEMLL_MLX_BLAS_THREADS`` says otherwise.  On 2 cores, two
threads were never faster for our shapes and up to 5x slower when MLX's own thread or another
process wanted the second core.  macOS is left alone (Accelerate and Metal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_SWITCH = "ANEMLL_MLX_BLAS"
ENV_THREADS = "ANEMLL_MLX_BLAS_THREADS"
NATIVE = Path(sys.prefix) / "lib" / "anemll-mlx-native"  # where make install puts libgfortran.so.5
SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",  # Arch
)


@dataclass
class Status:
    """What ``load()`` did: the library under MLX (None: MLX's own) and why."""

    library: str | None = None
    threads: int | None = None
    reason: str = "not attempted"

    def __str__(self) -> str:
        if self.library:
            return f"MLX BLAS: {self.library} ({self.threads} thread{'s' if self.threads != 1 else ''})"
        return f"MLX BLAS: the reference BLAS MLX ships with ({self.reason})"


_status = Status()


def status() -> Status:
    return _status


def _wheel_library() -> list[str]:
    """ngsolve-openblas's shared library, found from its installed file list (importing the
    package would load it itself and print to stderr when libgfortran is missing)."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        entries = files("ngsolve-openblas") or []
    except PackageNotFoundError:
        return []
    return [str(f.locate()) for f in entries if f.name.startswith("libopenblas") and ".so" in f.name]


def _gfortran() -> None:
    """Load the venv's copy of libgfortran.so.5 (if make install put one there) globally, so that
    the wheel's OpenBLAS finds its dependency by soname."""
    for path in sorted(NATIVE.glob("libgfortran.so.5*")):
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def _threads() -> int:
    try:
        return max(1, int(os.environ.get(ENV_THREADS, "1")))
    except ValueError:
        return 1


def load() -> Status:
    """Put a fast BLAS under MLX (Linux only; once; before ``mlx.core`` is imported)."""
    global _status
    if _status.library or _status.reason != "not attempted":
        return _status
    switch = os.environ.get(ENV_SWITCH, "auto")
    if sys.platform != "linux":
        _status = Status(reason="not Linux: MLX uses Accelerate or Metal")
        return _status
    if switch.lower() in ("off", "0", "none", "reference"):
        _status = Status(reason=f"{ENV_SWITCH}={switch}")
        return _status
    if "mlx.core" in sys.modules:
        _status = Status(reason="mlx.core was imported before anemll_mlx, too late to put a BLAS under it")
        return _status
    if switch != "auto":
        candidates = [switch]
    else:
        _gfortran()
        found = ctypes.util.find_library("openblas")
        candidates = _wheel_library() + [p for p in SYSTEM_OPENBLAS if os.path.exists(p)] + ([found] if found else [])
    failures = []
    for path in candidates:
        try:
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            library.cblas_sgemm  # noqa: B018  (the plain CBLAS name MLX binds to must be there)
        except (OSError, AttributeError) as e:
            failures.append(f"{Path(path).name}: {' '.join(str(e).split())[:120]}")
            continue
        threads = _threads()
        if hasattr(library, "openblas_set_num_threads"):
            library.openblas_set_num_threads(threads)
        _status = Status(library=path, threads=threads, reason="loaded")
        return _status
    hint = "pip install ngsolve-openblas and give it libgfortran.so.5 (apt install libgfortran5), or install libopenblas0-pthread"
    _status = Status(reason=("; ".join(failures) or "no OpenBLAS found") + f" -- {hint}")
    return _status


def limit_numpy_threads(threads: int | None = None) -> None:
    """Give numpy's own OpenBLAS (the executor's products) the same thread count: on 2 cores its
    default of one thread per core oversubscribed (a one-prompt probe 26 s instead of 5 s)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads or _threads(), user_api="blas")

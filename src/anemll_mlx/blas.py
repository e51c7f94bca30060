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

Decode shapes: libmlx.so binds only ``cblas_sgemm``, and OpenBLAS's sgemm repacks the whole weight
matrix on every call, so a one-token step (1 x K by K x N) ran at a third of the memory bandwidth
a gemv reaches.  ``native/gemv_forward.c`` is a ``cblas_sgemm`` that hands products with one output
row or column to ``cblas_sgemv`` and the rest to OpenBLAS; it is compiled once with the system's C
compiler into the user cache and loaded globally ahead of OpenBLAS, so it is the one MLX binds.
Without a compiler (or with ``ANEMLL_MLX_GEMV=off``) MLX calls OpenBLAS's sgemm directly.

Threads: one OpenBLAS thread unless ``ANEMLL_MLX_BLAS_THREADS`` says otherwise.  On 2 cores, two
threads were never faster for our shapes and up to 5x slower when MLX's own thread or another
process wanted the second core.  macOS is left alone (Accelerate and Metal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_SWITCH = "ANEMLL_MLX_BLAS"
ENV_THREADS = "ANEMLL_MLX_BLAS_THREADS"
ENV_GEMV = "ANEMLL_MLX_GEMV"
GEMV_SOURCE = Path(__file__).with_name("native") / "gemv_forward.c"
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
    gemv: str = "not attempted"  # what became of the matrix-vector forwarding (see native/)

    def __str__(self) -> str:
        if self.library:
            threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
            return f"MLX BLAS: {self.library} ({threads}; matrix-vector products: {self.gemv})"
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
            library = ctypes.CDLL(path)  # local first: the forwarder must precede it globally
            library.cblas_sgemm  # noqa: B018  (the plain CBLAS name MLX binds to must be there)
            library.cblas_sgemv  # noqa: B018
        except (OSError, AttributeError) as e:
            failures.append(f"{Path(path).name}: {' '.join(str(e).split())[:120]}")
            continue
        gemv = _forward_gemv(library)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # now global, for the LAPACK names MLX binds
        threads = _threads()
        if hasattr(library, "openblas_set_num_threads"):
            library.openblas_set_num_threads(threads)
        _status = Status(library=path, threads=threads, reason="loaded", gemv=gemv)
        return _status
    hint = "pip install ngsolve-openblas and give it libgfortran.so.5 (apt install libgfortran5), or install libopenblas0-pthread"
    _status = Status(reason=("; ".join(failures) or "no OpenBLAS found") + f" -- {hint}")
    return _status


def _forward_gemv(openblas: ctypes.CDLL) -> str:
    """Load the sgemm -> sgemv forwarder globally, pointed at ``openblas``; says what happened."""
    if os.environ.get(ENV_GEMV, "auto").lower() in ("off", "0", "none"):
        return f"OpenBLAS sgemm ({ENV_GEMV}=off)"
    try:
        forwarder = ctypes.CDLL(str(_compiled_forwarder()), mode=ctypes.RTLD_GLOBAL)
    except (OSError, RuntimeError) as e:
        return f"OpenBLAS sgemm (no forwarder: {' '.join(str(e).split())[:160]})"
    address = ctypes.cast  # the entry points of this OpenBLAS, whatever the global scope holds
    forwarder.anemll_gemv_forward_init(
        address(openblas.cblas_sgemm, ctypes.c_void_p), address(openblas.cblas_sgemv, ctypes.c_void_p)
    )
    return "forwarded to sgemv"


def _compiled_forwarder() -> Path:
    """``native/gemv_forward.c`` as a shared library, built once per source version into the user
    cache (written under a temporary name and renamed: concurrent first runs cannot see half a file)."""
    source = GEMV_SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anemll-mlx" / "native"
    library = cache / f"gemv_forward-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc) to build it")
    cache.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}")
    try:
        built = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(GEMV_SOURCE)],
            capture_output=True, text=True,
        )
        if built.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {built.stderr.strip()[-300:]}")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


def limit_numpy_threads(threads: int | None = None) -> None:
    """Give numpy's own OpenBLAS (the executor's products) the same thread count: on 2 cores its
    default of one thread per core oversubscribed (a one-prompt probe 26 s instead of 5 s)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads or _threads(), user_api="blas")

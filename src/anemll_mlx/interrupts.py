"""Ctrl-C and SIGTERM that always stop the program, and leave nothing half-written behind.

Python turns SIGINT into ``KeyboardInterrupt`` at the next bytecode, but native code can swallow
it: converting a numpy array with ``mx.array`` inside a tight loop lost the interrupt every time in
our measurements (the exception is raised inside MLX's binding and cleared there).  So the handler
installed here does two things: it raises ``Interrupted`` as usual *and* remembers the signal, and
long loops call ``check()`` between steps, which raises again if the first raise was eaten.
SIGTERM gets the same treatment, so ``kill`` cleans up as Ctrl-C does.

Library code never installs handlers; it only calls ``check()`` (a no-op unless the CLI installed
them).  Cleanup code that must not be cut short runs inside ``deferred()``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived.  A ``KeyboardInterrupt`` so that ordinary cleanup catches it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    @property
    def message(self) -> str:
        return "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "terminated (SIGTERM)"


_pending: int | None = None
_defer_depth = 0


def _handler(signum: int, frame) -> None:
    global _pending
    _pending = signum
    if _defer_depth == 0:
        raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to ``Interrupted`` (main thread only; the CLI calls this)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in EXIT_CODES:
        signal.signal(signum, _handler)


def check() -> None:
    """Raise ``Interrupted`` if a signal arrived whose exception native code may have swallowed."""
    if _pending is not None and _defer_depth == 0:
        raise Interrupted(_pending)


def clear() -> None:
    """Forget a handled signal (after the CLI has reported it)."""
    global _pending
    _pending = None


@contextmanager
def deferred() -> Iterator[None]:
    """Hold signals while the body runs (cleanup, a rename); they are raised by the next ``check()``."""
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1

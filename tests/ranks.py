"""Launch the ``anemll-mlx`` CLI as several ranks of MLX's ring backend on loopback, for tests.

``mlx.launch`` does the same, but it merges the ranks' output, exits 0 whatever they return, and
terminates the other ranks as soon as one fails; these tests need each rank's own exit code and
stderr, so they set what ``mlx.launch`` sets (``MLX_RANK`` and ``MLX_HOSTFILE``, a JSON list of
one ``ip:port`` per rank) themselves.  Every run is bounded: on timeout all ranks are killed and
the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CLI = str(Path(sys.executable).parent / "anemll-mlx")
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")


@dataclass
class Rank:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports nobody listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def hostfile(folder: Path, ranks: int) -> Path:
    """A ring hostfile of ``ranks`` loopback addresses (what mlx.launch writes)."""
    path = folder / f"hosts-{os.getpid()}-{ranks}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
    return path


def start_ranks(args: list[str], folder: Path, ranks: int = 2, cwds: list[Path] | None = None) -> list[subprocess.Popen]:
    """The CLI with ``args`` started as ``ranks`` ranks (each in its own session, so a test can
    kill one whole rank)."""
    hosts = hostfile(folder, ranks)
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hosts))
        procs.append(
            subprocess.Popen(
                [CLI, *args],
                cwd=str(cwds[rank] if cwds else folder),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every rank (as a crash or ``kill -9`` would) and reap them."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def run_ranks(
    args: list[str], folder: Path, ranks: int = 2, timeout: float = 180, cwds: list[Path] | None = None
) -> list[Rank]:
    """Run the CLI as ``ranks`` ranks to the end; every rank's exit code and output."""
    procs = start_ranks(args, folder, ranks, cwds)
    results = []
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            results.append(Rank(rank, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        kill(procs)
        raise AssertionError(f"{ranks} ranks of {' '.join(args[:2])} still running after {timeout} s") from None
    return results

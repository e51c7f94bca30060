"""Several processes training as one, over MLX's own distributed layer (``mx.distributed``).

``mlx.launch`` (ring over TCP, or JACCL on Macs with Thunderbolt RDMA) or ``mpirun`` starts the
same command once per rank; ``connect`` joins them into a ``World``.  A command that was not
launched that way gets the world of one process, and nothing changes for it.

What the ranks must agree on, and how:

- **Errors.** A check that fails on one rank only (a file missing on one host) must not leave the
  others waiting forever in the next collective.  ``World.together()`` runs a block on every rank
  and then exchanges one flag and message per rank: if any failed, every rank raises (the failing
  rank its own error, the others ``PeerError`` naming it), so all exit 2 and rank 0 prints the line.
- **Numbers.** ``all_sum`` of one flat float32 vector (every gradient plus the loss and token
  counts) per step, never one reduction per tensor: each collective pays a round trip.
  ``broadcast`` gives every rank rank 0's arrays (a sum where the other ranks contribute zeros,
  exact in any dtype), so the ranks start from one state even when their BLAS differ.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import BadArgumentError, UserError

BACKENDS = ("any", "ring", "mpi", "jaccl", "nccl")
# What the launchers set in every rank's environment: mlx.launch (ring, jaccl), Open MPI, MPICH.
_RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_MESSAGE_BYTES = 1024  # an error line exchanged between ranks, cut to this many UTF-8 bytes


class PeerError(UserError):
    """Another rank failed; this rank stops too (its own message is printed by rank 0)."""


def launcher_rank() -> int | None:
    """This process's rank as its launcher announced it, None when nothing launched it."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


@dataclass
class World:
    """The processes of one run: ``rank`` of ``size``; ``group`` is None for a single process."""

    group: Any = None  # mx.distributed.Group
    rank: int = 0
    size: int = 1
    comm_seconds: float = field(default=0.0, compare=False)  # time spent in reductions so far

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, logs and progress."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """A global batch of ``batch_size`` sequences splits evenly over the ranks, or one line."""
        if batch_size % self.size:
            raise BadArgumentError(
                f"--batch-size {batch_size} does not split over {self.size} ranks: give a multiple of {self.size}"
            )

    def part(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (``count`` a multiple of ``size``)."""
        share = count // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    # --- collectives

    def all_sum(self, x: mx.array) -> mx.array:
        """The element-wise sum over ranks of ``x`` (evaluated; timed into ``comm_seconds``)."""
        if self.size == 1:
            return x
        mx.eval(x)  # the work before the reduction is not communication
        start = time.perf_counter()
        total = mx.distributed.all_sum(x, group=self.group)
        mx.eval(total)
        self.comm_seconds += time.perf_counter() - start
        return total

    def all_sum_flat(self, arrays: list[mx.array]) -> list[mx.array]:
        """``arrays`` summed over ranks in one float32 reduction, back in their shapes and dtypes."""
        if self.size == 1 or not arrays:
            return arrays
        flat = mx.concatenate([a.astype(mx.float32).reshape(-1) for a in arrays])
        total = self.all_sum(flat)
        out, start = [], 0
        for a in arrays:
            out.append(total[start : start + a.size].reshape(a.shape).astype(a.dtype))
            start += a.size
        return out

    def broadcast(self, arrays: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rank 0's ``arrays`` on every rank (same keys and shapes everywhere; exact: the other
        ranks add zeros), one reduction per dtype."""
        if self.size == 1:
            return arrays
        out: dict[str, mx.array] = {}
        for group, flat in _by_dtype(arrays):
            total = self.all_sum(flat if self.main else mx.zeros_like(flat))
            out.update(_unflatten(total, group, arrays))
        return out

    def gather(self, arrays: dict[str, mx.array]) -> list[dict[str, mx.array]]:
        """Every rank's ``arrays`` (same keys, shapes and dtypes on every rank), in rank order;
        one all-gather per dtype."""
        if self.size == 1:
            return [arrays]
        out: list[dict[str, mx.array]] = [{} for _ in range(self.size)]
        for group, flat in _by_dtype(arrays):
            mx.eval(flat)
            start = time.perf_counter()
            everyone = mx.distributed.all_gather(flat, group=self.group).reshape(self.size, -1)
            mx.eval(everyone)
            self.comm_seconds += time.perf_counter() - start
            for rank in range(self.size):
                out[rank].update(_unflatten(everyone[rank], group, arrays))
        return out

    def broadcast_numbers(self, values: list[float]) -> list[float]:
        """Rank 0's few numbers (steps, counts) on every rank; float64 on the host, exact for ints."""
        if self.size == 1:
            return values
        mine = np.array(values if self.main else [0.0] * len(values), np.float64)
        hi = mine.astype(np.float32)  # float32 carries it over the wire: split into two parts
        lo = (mine - hi.astype(np.float64)).astype(np.float32)
        total = np.array(self.all_sum(mx.array(np.stack([hi, lo]))), np.float64)
        return [float(v) for v in total[0] + total[1]]

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank, then stop every rank if any failed (see the module doc).

        Only ``UserError`` travels as a message; any other exception (a bug, an interrupt) is
        reported to the others as a failure and re-raised here with its traceback.
        """
        if self.size == 1:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - every failure must reach the other ranks
            error = e
        text = (str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}") if error else ""
        row = np.zeros((self.size, _MESSAGE_BYTES + 1), np.int32)
        if error is not None:
            data = text.encode("utf-8")[:_MESSAGE_BYTES]
            row[self.rank, 0] = 1
            row[self.rank, 1 : 1 + len(data)] = np.frombuffer(data, np.uint8)
        table = np.array(self.all_sum(mx.array(row)))
        if error is not None:
            raise error
        failed = [r for r in range(self.size) if table[r, 0]]
        if failed:
            first = failed[0]
            message = bytes(table[first, 1:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
            raise PeerError(f"rank {first}: {message}")


SINGLE = World()


def _by_dtype(arrays: dict[str, mx.array]) -> list[tuple[list[str], mx.array]]:
    """(names, their arrays flattened and concatenated) per dtype, in a fixed order (the same
    on every rank, so one collective per dtype lines up)."""
    names = sorted(arrays)
    groups = []
    for dtype in sorted({arrays[n].dtype for n in names}, key=str):
        group = [n for n in names if arrays[n].dtype == dtype]
        groups.append((group, mx.concatenate([arrays[n].reshape(-1) for n in group])))
    return groups


def _unflatten(flat: mx.array, names: list[str], like: dict[str, mx.array]) -> dict[str, mx.array]:
    """``flat`` cut back into ``names``' arrays, shaped as in ``like``."""
    out, start = {}, 0
    for n in names:
        out[n] = flat[start : start + like[n].size].reshape(like[n].shape)
        start += like[n].size
    return out


def connect(backend: str = "any") -> World:
    """This process's world: every launched rank joined over ``backend``, or a world of one.

    ``any`` tries MLX's backends in its own order when a launcher started us and is a world of one
    otherwise; a named backend must come up (one clear line if it cannot).  A launched process whose
    backend fails does not quietly train alone: every rank would write the same checkpoint.
    """
    if backend not in BACKENDS:
        raise BadArgumentError(f"--backend takes {', '.join(BACKENDS)}, got {backend}")
    launched = launcher_rank() is not None
    if backend == "any" and not launched:
        return SINGLE
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise BadArgumentError(
            f"the {backend} distributed backend is not available here ({' '.join(str(e).split())})"
        ) from None
    if group.size() == 1:
        return World(group, 0, 1)
    return World(group, group.rank(), group.size())


__all__ = ["World", "SINGLE", "BACKENDS", "PeerError", "connect", "launcher_rank"]

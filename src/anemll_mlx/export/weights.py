"""How each exported weight is stored: fp16, or LUT-palettized with our own fitted tables.

Which weights a LUT may replace is the model's declaration (``DecoderModel.lut_targets``); which
parts get one is the export's ``LUTConfig``.  One ``WeightStore`` serves every function of a
package: each weight is made once (converted to fp16, or its LUT fitted) and emitted in every
function under one ``weight_id`` (``ops.mil_ops.shared_const``), so the ``infer`` and ``prefill``
functions of a chunk share its bytes in the package without a deduplication pass.

With calibration statistics (``probe.calibrate.InputMoments``) each LUT is a sensitivity-weighted
fit: every element's squared error weighted by the mean square of its input feature.

A model loaded from a LUT checkpoint carries its tables (``DecoderModel.lut_weights``): those are
emitted as they are, never refitted (a row piece of a split table takes its rows of the indices
and its groups of the table, ``checkpoint_rows``).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from ..errors import BadArgumentError
from ..models.base import DecoderModel, LUTTarget, lut_matrix
from ..ops.mil_ops import shared_const, to_numpy
from ..ops.vocabulary import Embedding, Linear
from ..quant.lut import InputStats, LUTConfig, LUTSpec, LUTWeight, fit_lut, lut_to_mil

if TYPE_CHECKING:
    from ..probe.calibrate import InputMoments

# LUT fits run in this many processes (fit_lut is numpy, single-threaded and deterministic, so the
# result is the same bytes whatever the count); ANEMLL_MLX_LUT_WORKERS overrides, 1 fits in-process.
DEFAULT_LUT_WORKERS = 2


class WeightStore:
    """The ``weight_for`` of ``MILOps``: (part, holder, shape, rows) -> a shared const or a LUT op.

    ``consume``: once a whole weight has been made into its fp16 copy or its LUT, the model's own
    (evaluated) array is replaced by unevaluated zeros, so a lazily loaded model never holds more
    than the weights in flight (export of a lazy model; the model is spent afterwards).
    ``moments``: calibration statistics; LUT targets that have them are fitted weighted by them.
    """

    def __init__(
        self,
        model: DecoderModel,
        lut: LUTConfig,
        consume: bool = False,
        keep: tuple = (),
        moments: InputMoments | None = None,
    ):
        self.lut = lut
        self.moments = moments
        self.consume = consume
        self.keep = {id(holder) for holder in keep}  # needed by a later part too (a tied table)
        self.targets = {(t.part, id(t.holder)): t for t in model.lut_targets()}
        # Every weight holder by its module path: names for the weight ids.
        self.paths = {id(module): f"{name}.weight" for name, module in model.named_modules()}
        self.fitted: dict[str, PackedLUT] = {}  # fitted ahead (prefit), waiting for the trace
        self.emitted: dict[str, LUTWeight] = {}  # in the program being traced (every function's)
        self.dense: dict[str, np.ndarray] = {}
        self.checkpoint = model.lut_weights  # tables from a LUT checkpoint, by target name

    def __call__(self, part: str, holder: Linear | Embedding, shape: tuple[int, ...], rows: range | None = None) -> Any:
        spec = self.lut[part]
        target = self.targets.get((part, id(holder)))
        if spec is None or target is None:
            key = self._key(self.paths[id(holder)], rows) + "_" + "x".join(map(str, shape))
            if key not in self.dense:
                weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
                self.dense[key] = to_numpy(weight).reshape(shape)
                self._spent(holder, rows)
            return shared_const(self.dense[key], key, _mil_name(key))
        key = self._key(target.name, rows)
        if key not in self.emitted:
            ahead = self.fitted.pop(key, None)
            if target.name in self.checkpoint:
                self.emitted[key] = checkpoint_rows(self._from_checkpoint(target, spec, rows), rows)
            elif ahead is not None:
                self.emitted[key] = ahead.unpack()
            else:
                importance, second_moment = self._inputs(target)
                self.emitted[key] = fit_lut(_rows(holder, rows), spec, importance=importance, second_moment=second_moment)
            self._spent(holder, rows)
        return lut_to_mil(self.emitted[key], shape, _mil_name(key) + "_palettized", weight_id=key)

    def _from_checkpoint(self, target: LUTTarget, spec: LUTSpec, rows: range | None) -> LUTWeight:
        lw = self.checkpoint[target.name]
        if lw.spec != spec:  # ExportOptions.check_model refuses this before any work
            raise BadArgumentError(f"{target.name}: the checkpoint's LUT is {lw.spec}, the export asks for {spec}")
        if self.consume and (rows is None or rows.stop == lw.indices.shape[0]):
            del self.checkpoint[target.name]  # the last use: a consumed model lets its tables go too
        return lw

    def _spent(self, holder: Linear | Embedding, rows: range | None) -> None:
        """Drop the model's array of a weight made whole (row pieces are dropped by the export,
        after the last piece)."""
        if self.consume and rows is None and id(holder) not in self.keep:
            holder.weight = mx.zeros(holder.weight.shape, holder.weight.dtype)

    def _inputs(self, target: LUTTarget) -> InputStats:
        """The input moments of ``target`` (per input column, whatever rows are fitted)."""
        return (None, None) if self.moments is None else self.moments.stats(target.part, target.name)

    @staticmethod
    def _key(name: str, rows: range | None) -> str:
        return name if rows is None else f"{name}_{rows.start}_{rows.stop}"

    def prefit(self, part: str, layers: range | None = None, workers: int | None = None) -> None:
        """Fit now, in ``workers`` processes, the LUTs of ``part`` (of ``layers`` only, if given)
        that tracing will ask for, so that tracing finds them made (same bytes as fitting each on
        first use: ``fit_lut`` is deterministic)."""
        spec = self.lut[part]
        if spec is None:
            return
        todo = [
            t for t in self.targets.values()
            if t.part == part and (layers is None or t.layer in layers)
            and t.name not in self.fitted and t.name not in self.emitted and t.name not in self.checkpoint
        ]  # fmt: skip
        # a layer at a time: only one layer's float32 weights are in memory (a LUT part holds many
        # more parameters than its bytes suggest: 8x an fp16 part's at 4 bits)
        groups: dict[int | None, list] = {}
        for target in todo:
            groups.setdefault(target.layer, []).append(target)
        for group in groups.values():
            weights = []
            for target in group:  # the model's own array goes as soon as its float32 copy is made
                weights.append(_rows(target.holder, None))
                self._spent(target.holder, None)
            _give_back_freed_memory()  # before the workers fork: they inherit what the parent holds
            inputs = [self._inputs(target) for target in group]
            for target, fitted in zip(group, fit_luts(weights, spec, workers, packed=True, inputs=inputs)):
                self.fitted[target.name] = fitted
            del weights
            _give_back_freed_memory()

    def release(self) -> None:
        """Drop what was made for the package just saved (its LUTs and fp16 copies)."""
        self.fitted.clear()
        self.emitted.clear()
        self.dense.clear()


@dataclass
class PackedLUT:
    """A fitted LUT waiting for its trace, its indices two to a byte when they fit in 4 bits.

    A chunk's fits all wait in memory until the chunk is traced, and coremltools wants one byte per
    index: at 4 bits that is twice the chunk's file size (805 MB for a 500 MB chunk of the 1.7B
    bench model).  Packed, they take what the file will; each is unpacked when traced.
    """

    data: np.ndarray  # uint8: the indices, two per byte (low nibble first) when bits <= 4
    shape: tuple[int, ...]
    lut: np.ndarray
    spec: LUTSpec

    @classmethod
    def pack(cls, lw: LUTWeight) -> PackedLUT:
        flat = lw.indices.reshape(-1)
        if lw.spec.bits <= 4:
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            flat = flat[0::2] | (flat[1::2] << np.uint8(4))
        return cls(flat, tuple(lw.indices.shape), lw.lut, lw.spec)

    def unpack(self) -> LUTWeight:
        if self.spec.bits > 4:
            return LUTWeight(self.data.reshape(self.shape), self.lut, self.spec)
        size = int(np.prod(self.shape))
        indices = np.empty(2 * self.data.size, dtype=np.uint8)
        indices[0::2] = self.data & np.uint8(0x0F)
        indices[1::2] = self.data >> np.uint8(4)
        return LUTWeight(indices[:size].reshape(self.shape), self.lut, self.spec)


def checkpoint_rows(lw: LUTWeight, rows: range | None) -> LUTWeight:
    """Rows ``rows`` of a LUT weight: those rows of its indices and the tables of their groups
    (``rows`` must hold whole groups: ``ExportOptions.check_plan``)."""
    if rows is None or (rows.start == 0 and rows.stop == lw.indices.shape[0]):
        return lw
    per = lw.rows_per_group
    if lw.lut.shape[0] == 1:
        return LUTWeight(lw.indices[rows.start : rows.stop], lw.lut, lw.spec)
    if rows.start % per or (rows.stop % per and rows.stop != lw.indices.shape[0]):
        raise BadArgumentError(f"rows {rows.start}-{rows.stop - 1} cut the checkpoint's LUT groups of {per} rows")
    table = lw.lut[rows.start // per : -(-rows.stop // per)]
    return LUTWeight(lw.indices[rows.start : rows.stop], table, lw.spec)


def _give_back_freed_memory() -> None:
    """Ask glibc to return freed heap to the system: the fits' large temporaries otherwise stay in
    the process (and in every worker forked after them) long after they are freed."""
    if sys.platform == "linux":
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _rows(holder: Linear | Embedding, rows: range | None) -> np.ndarray:
    """The weight (those ``rows`` of it) as the float32 matrix its LUT is fitted to."""
    weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
    return to_numpy(lut_matrix(weight), np.float32)


def _mil_name(key: str) -> str:
    return key.replace(".", "_")


def lut_workers(workers: int | None = None) -> int:
    """Processes for LUT fits: ``workers``, else $ANEMLL_MLX_LUT_WORKERS, else 2; at most the CPUs,
    and 1 (in-process) where fork is not the safe way to start them (anything but Linux)."""
    if workers is None:
        workers = int(os.environ.get("ANEMLL_MLX_LUT_WORKERS", DEFAULT_LUT_WORKERS))
    if sys.platform != "linux":
        return 1
    return max(1, min(workers, os.cpu_count() or 1))


def fit_luts(
    weights: list[np.ndarray],
    spec: LUTSpec,
    workers: int | None = None,
    packed: bool = False,
    inputs: list[InputStats] | None = None,
) -> list:
    """``fit_lut`` of each weight, in order, spread over ``workers`` forked processes; each fit as a
    ``PackedLUT`` when ``packed`` (workers then send back half the bytes); ``inputs[i]``, if
    given, is the importance and second moment of ``weights[i]``'s input (see ``fit_lut``).

    Fork, not spawn: spawn re-imports the caller's main module (a script without a ``__main__``
    guard would run again) and would pickle every weight to the children; forked children find
    the weights in memory (``_init_worker``) and only send the fits back.  They run numpy only,
    never MLX, whose threads fork does not copy.  On an error or a signal in the parent the pool is
    terminated at once (``Pool.__exit__``), so an interrupted export does not wait for the fits.
    """
    workers = min(lut_workers(workers), len(weights))
    inputs = inputs if inputs is not None else [(None, None)] * len(weights)
    if workers <= 1:
        return [_fit(w, spec, packed, stats) for w, stats in zip(weights, inputs)]
    # Largest first, so the last fits to start are short ones and the processes finish together.
    order = sorted(range(len(weights)), key=lambda i: -weights[i].size)
    job = (weights, spec, packed, inputs)
    with get_context("fork").Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        fitted = pool.map(_fit_one, order, chunksize=1)
    out: list = [None] * len(weights)
    for i, lw in zip(order, fitted):
        out[i] = lw
    return out


def _fit(weight: np.ndarray, spec: LUTSpec, packed: bool, inputs: InputStats) -> LUTWeight | PackedLUT:
    importance, second_moment = inputs
    fitted = fit_lut(weight, spec, importance=importance, second_moment=second_moment)
    return PackedLUT.pack(fitted) if packed else fitted


# what each forked worker fits: (weights, spec, packed, input statistics per weight)
_Job = tuple[list[np.ndarray], LUTSpec, bool, list[InputStats]]
_worker_job: _Job | None = None  # set in each forked worker


def _init_worker(job: _Job) -> None:
    """A worker leaves signals to the parent (which terminates the pool) and dies on SIGTERM, not
    through the parent's ``interrupts`` handlers it inherited."""
    global _worker_job
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_job = job


def _fit_one(index: int) -> LUTWeight | PackedLUT:
    assert _worker_job is not None
    weights, spec, packed, inputs = _worker_job
    return _fit(weights[index], spec, packed, inputs[index])

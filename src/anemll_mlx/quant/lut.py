"""LUT (palettized) weights: our own k-means fit and its exact Core ML emission.

A palettized weight stores, for every element, a small index into a table of ``2**bits`` fp16
values; one table serves a group of consecutive output channels.  coremltools fits those tables after
conversion, one group at a time (scikit-learn, or exact DP for large groups), which is slow and
leaves the fit outside our control.  Here the fit happens before conversion, on all groups at once, and the result is emitted
as a ``constexpr_lut_to_dense`` op whose materialised value is exactly ``LUTWeight.dequantize()``.

The fit is 1-D k-means per group, made cheap by working on sorted values: the nearest-centre
regions are intervals between midpoints, so one Lloyd assignment is a batched binary search of the
``K - 1`` midpoints and one update is two gathers from a prefix sum, O(groups * K * log n) rather
than O(groups * n * K).  Three stages, all vectorised across groups:

1. initial centres spaced by density**(1/3), the asymptotically optimal quantiser density (quantile
   initialisation leaves Lloyd up to 6x worse at 6 and 8 bits);
2. Lloyd in float64 until no assignment changes;
3. rounds of an exact dynamic programme over boundary positions near the current ones, each
   followed by Lloyd.  Lloyd alone stalls 2-13% above the optimum on real (Q4_1-derived) weights
   with few values per table entry; this lands within ~0.1% of the exact 1-D optimum.

The tables are then rounded to fp16 and every element is assigned to its nearest fp16 entry, so
``dequantize()`` is exactly what Core ML reconstructs.

Sensitivity-weighted fits (``importance``): a Linear's output error is sum_j x_j dW_ij, so with a
diagonal approximation of the input covariance the loss an element's error adds is E[x_j^2] dW_ij^2.
Weighting each element's squared error by its column's E[x_j^2] (``probe.calibrate`` measures it)
spends the table entries where the inputs are large.  Weighted 1-D k-means keeps the structure
above: with nearest-entry assignment (all Core ML can do) the regions are still intervals, so the
prefix sums just become weighted (sum w, sum w x, sum w x^2) and each centre is its cluster's
weighted mean.  Without ``importance`` the fit is the unweighted one, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import BadArgumentError, UnsupportedError
from ..format import PARTS
from .compensate import compensated_indices

# Index widths Core ML's iOS18 constexpr_lut_to_dense accepts (there is no uint5 or uint7).
SUPPORTED_BITS = (1, 2, 3, 4, 6, 8)
# ANEMLL's default: "--lut2 4" means 4 bits with one table per 8 output channels.
DEFAULT_GROUP_SIZE = 8
DEFAULT_ITERS = 100

_SPEC_FORMS = (
    "expected BITS or BITS,GROUP with BITS in 1,2,3,4,6,8 and GROUP a positive number of output "
    "channels per LUT, or 0/t/tensor for one LUT per tensor (e.g. 4, 4,4, 6,0), or none"
)
_NONE_WORDS = ("none", "no", "false", "")
_TENSOR_WORDS = ("0", "t", "tensor")
_FP16_MAX = 65504.0
# Groups are fitted in batches of about this many elements, to bound memory on LM heads.
_BATCH_ELEMENTS = 1 << 22
# Equal-count pieces used to estimate each group's density for the initial centres.
_INIT_PIECES = 256
# Candidate positions per boundary in the refinement's dynamic programme (odd: includes "stay"),
# and the rounds of refinement + Lloyd; 33 gets within ~0.1% of the optimum, 17 within ~0.5%.
_WINDOW = 33
DEFAULT_REFINE_ROUNDS = 8
# Groups per dynamic-programming chunk: each (groups, W, W) array stays cache-sized (measured best).
_DP_ELEMENTS = 1 << 16
# Importance below this fraction of the mean counts as this much: every element keeps some weight,
# so a non-empty cluster always has a positive total weight (a well-defined weighted mean).
_MIN_IMPORTANCE = 1e-6


@dataclass(frozen=True)
class LUTSpec:
    """How to palettize one weight: index width and output channels per lookup table."""

    bits: int
    group_size: int | None = DEFAULT_GROUP_SIZE  # None = one LUT for the whole tensor

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise BadArgumentError(f"LUT bits {self.bits} not supported: Core ML indices are uint1,2,3,4,6,8")
        if self.group_size is not None and self.group_size < 1:
            raise BadArgumentError(f"LUT group size {self.group_size} must be positive (None = per tensor)")

    @property
    def entries(self) -> int:
        return 1 << self.bits

    def num_groups(self, out_channels: int) -> int:
        """Number of LUTs for a weight with ``out_channels`` rows; the group must divide it."""
        if self.group_size is None:
            return 1
        if out_channels % self.group_size:
            raise BadArgumentError(
                f"LUT group size {self.group_size} does not divide {out_channels} output channels"
            )
        return out_channels // self.group_size

    def __str__(self) -> str:
        return f"{self.bits},{'t' if self.group_size is None else self.group_size}"


@dataclass(frozen=True)
class LUTConfig:
    """The LUT of each export part (``format.PARTS``); None leaves a part in fp16.

    One object, one name per part, from the CLI (``--lut``, ``--lut-lm-head``,
    ``--lut-embeddings``) through the library to meta.yaml.
    """

    ffn: LUTSpec | None = None
    lm_head: LUTSpec | None = None
    embeddings: LUTSpec | None = None

    def __getitem__(self, part: str) -> LUTSpec | None:
        return getattr(self, part)

    def bits(self) -> dict[str, int | None]:
        return {part: spec.bits if spec else None for part, spec in self.items()}

    def items(self) -> list[tuple[str, LUTSpec | None]]:
        return [(part, self[part]) for part in PARTS]

    def __bool__(self) -> bool:
        return any(spec is not None for _, spec in self.items())

    def __str__(self) -> str:
        return ", ".join(f"{part} {spec}" for part, spec in self.items() if spec) or "none"


def parse_lut_spec(text: str) -> LUTSpec | None:
    """Read ANEMLL's flag form: "4" (group 8), "4,4", "4,0"/"4,t" (per tensor), "none"."""
    cleaned = str(text).strip().lower()
    if cleaned in _NONE_WORDS:
        return None
    parts = [p.strip() for p in cleaned.split(",")]
    if len(parts) > 2 or not parts[0].isdigit():
        raise BadArgumentError(f"bad LUT spec {text!r}: {_SPEC_FORMS}")
    bits = int(parts[0])
    if bits not in SUPPORTED_BITS:
        raise BadArgumentError(f"bad LUT spec {text!r}: {_SPEC_FORMS}")
    if len(parts) == 1:
        return LUTSpec(bits, DEFAULT_GROUP_SIZE)
    if parts[1] in _TENSOR_WORDS:
        return LUTSpec(bits, None)
    if not parts[1].isdigit():
        raise BadArgumentError(f"bad LUT spec {text!r}: {_SPEC_FORMS}")
    return LUTSpec(bits, int(parts[1]))


@dataclass
class LUTWeight:
    """A fitted palettized weight: per-element indices plus one fp16 table per channel group."""

    indices: np.ndarray  # uint8, the weight's shape; values < 2**bits
    lut: np.ndarray  # float16 (num_groups, 2**bits); row g serves output channels of group g
    spec: LUTSpec

    @property
    def rows_per_group(self) -> int:
        return self.indices.shape[0] // self.lut.shape[0]

    def dequantize(self) -> np.ndarray:
        """The dense fp16 weight, exactly as Core ML's constexpr_lut_to_dense materialises it."""
        table = np.repeat(self.lut, self.rows_per_group, axis=0)
        flat = self.indices.reshape(self.indices.shape[0], -1).astype(np.intp)
        return np.take_along_axis(table, flat, axis=1).reshape(self.indices.shape)


# --- exact comparisons against midpoints


def _sortable_keys(x: np.ndarray) -> np.ndarray:
    """Map float32 values to uint64 keys with the same order (no -0.0 or NaN expected).

    With the group index in the upper 32 bits, the keys of all groups form one sorted array,
    so a single ``np.searchsorted`` serves every group at once.
    """
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    negative = (bits & np.uint64(0x80000000)) != 0
    return np.where(negative, ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))


def _round_down_to_f32(m: np.ndarray) -> np.ndarray:
    """Largest float32 <= m: for float32 x, ``x > m`` holds exactly when ``x > result`` does."""
    m32 = m.astype(np.float32)
    too_big = m32.astype(np.float64) > m
    return np.where(too_big, np.nextafter(m32, np.float32(-np.inf)), m32)


def _to_fp16(values: np.ndarray) -> np.ndarray:
    """Round to fp16 and return as float64, with -0.0 made +0.0 so keys stay ordered."""
    return values.astype(np.float16).astype(np.float64) + 0.0


class _SortedGroups:
    """Sorted values of a batch of groups, with what Lloyd's iterations need from them.

    Methods take ``rows``, the indices of the groups still iterating, so converged groups cost
    nothing; gathers go through flat indices to avoid copying whole rows.

    With ``weights`` (positive, one per element of ``rows``) the prefix sums are weighted and
    ``prefix_w`` holds the running total weight; without, ``prefix_w`` is None and a cluster's
    weight is its element count (the original, unweighted arithmetic, untouched).
    """

    def __init__(self, rows: np.ndarray, weights: np.ndarray | None = None) -> None:
        self.count, self.n = rows.shape
        if weights is None:
            values = np.sort(rows, axis=1)
        else:
            order = np.argsort(rows, axis=1, kind="stable")
            values = np.take_along_axis(rows, order, axis=1)
            sorted_weights = np.take_along_axis(weights, order, axis=1).astype(np.float64)
        self.row_keys = np.arange(self.count, dtype=np.uint64) << np.uint64(32)
        self.keys = (_sortable_keys(values) | self.row_keys[:, None]).ravel()
        self.values = values.ravel()
        self.prefix_w: np.ndarray | None = None
        if weights is None:
            prefix = np.zeros((2, self.count, self.n + 1))
            np.cumsum(values, axis=1, dtype=np.float64, out=prefix[0, :, 1:])
            np.cumsum(np.square(values, dtype=np.float64), axis=1, out=prefix[1, :, 1:])
        else:
            prefix = np.zeros((3, self.count, self.n + 1))
            weighted = sorted_weights * values
            np.cumsum(weighted, axis=1, out=prefix[0, :, 1:])
            np.cumsum(weighted * values, axis=1, out=prefix[1, :, 1:])
            np.cumsum(sorted_weights, axis=1, out=prefix[2, :, 1:])
            self.prefix_w = prefix[2].ravel()
        self.prefix, self.prefix_sq = prefix[0].ravel(), prefix[1].ravel()

    def boundary_keys(self, centres: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Keys of the midpoints between neighbouring (sorted) centres of groups ``rows``.

        Midpoints are computed in float64, exactly for fp16 centres, then rounded down to
        float32 so that comparing float32 keys decides ``x > midpoint`` exactly.
        """
        mid = (centres[:, :-1] + centres[:, 1:]) * 0.5
        return _sortable_keys(_round_down_to_f32(mid) + np.float32(0.0)) | self.row_keys[rows, None]

    def cuts(self, centres: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Start of each cluster in the sorted values, plus n: shape (len(rows), K + 1).

        A value equal to a midpoint goes to the lower centre, as argmin over the table would.
        """
        found = np.searchsorted(self.keys, self.boundary_keys(centres, rows).ravel(), side="right")
        edges = np.empty((len(rows), centres.shape[1] + 1), dtype=np.int64)
        edges[:, 0], edges[:, -1] = 0, self.n
        edges[:, 1:-1] = found.reshape(len(rows), -1) - (rows * self.n)[:, None]
        return edges

    def means(self, cuts: np.ndarray, centres: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Lloyd's update; an empty cluster moves to the worst-served value of its group.

        One empty cluster per group is reseeded per iteration, which is enough since emptiness
        is rare (duplicate values, or fewer distinct values than table entries).
        """
        flat = cuts + (rows * (self.n + 1))[:, None]
        at = self.prefix[flat]
        sizes = np.diff(cuts, axis=1)
        if self.prefix_w is None:
            new = np.where(sizes > 0, np.diff(at, axis=1) / np.maximum(sizes, 1), centres)
        else:  # weighted mean; a non-empty cluster has a positive weight (_MIN_IMPORTANCE)
            mass = np.diff(self.prefix_w[flat], axis=1)
            new = np.where(sizes > 0, np.diff(at, axis=1) / np.where(sizes > 0, mass, 1.0), centres)
        empty = sizes == 0
        if empty.any():
            new = self._reseed(new, cuts, sizes, empty, rows)
        return new

    def _reseed(
        self, centres: np.ndarray, cuts: np.ndarray, sizes: np.ndarray, empty: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        # The farthest value of a cluster from its centre is its first or last (sorted) value.
        base = (rows * self.n)[:, None]
        lo = self.values[base + np.minimum(self.n - 1, cuts[:, :-1])].astype(np.float64)
        hi = self.values[base + np.clip(cuts[:, 1:] - 1, 0, self.n - 1)].astype(np.float64)
        far = np.where(np.abs(hi - centres) > np.abs(lo - centres), hi, lo)
        err = np.where(sizes > 0, np.abs(far - centres), -1.0)
        worst = np.argmax(err, axis=1)
        fix = np.nonzero(empty.any(axis=1) & (err.max(axis=1) > 0))[0]
        out = centres.copy()
        out[fix, np.argmax(empty[fix], axis=1)] = far[fix, worst[fix]]
        return np.sort(out, axis=1)

    def best_cuts_near(self, cuts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact best partition among boundaries near ``cuts`` (dynamic programming).

        Boundary j may move to any of ``_WINDOW`` positions between its neighbours' current
        positions, denser close to where it is (the current partition is one of the choices, so
        the result is never worse).  Lloyd only ever makes small moves; this lets whole runs of
        boundaries shift together, which is how it escapes the local optima that leave plain
        Lloyd 2-13% above the optimum on real weights.
        """
        out = np.empty_like(cuts)
        step = max(1, _DP_ELEMENTS // (_WINDOW * _WINDOW))
        for start in range(0, len(rows), step):
            part = slice(start, start + step)
            out[part] = self._window_dp(cuts[part], rows[part])
        return out

    def _window_dp(self, cuts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One chunk of ``best_cuts_near``: a Viterbi pass over boundaries, W x W per step."""
        count, layers = len(rows), cuts.shape[1] - 2  # layers = movable boundaries (K - 1)
        pick = np.arange(count)
        reach = np.linspace(-1.0, 1.0, _WINDOW)
        reach = np.sign(reach) * reach * reach
        left = (cuts[:, 1:-1] - cuts[:, :-2])[:, :, None]
        right = (cuts[:, 2:] - cuts[:, 1:-1])[:, :, None]
        offset = np.round(reach * np.where(reach < 0, left, right)).astype(np.int64)
        cand = cuts[:, 1:-1, None] + offset  # (count, K - 1, W), within [0, n]
        flat = cand + (rows * (self.n + 1))[:, None, None]
        s1, s2 = self.prefix[flat], self.prefix_sq[flat]
        base = (rows * (self.n + 1))[:, None]
        first_s1, first_s2 = self.prefix[base], self.prefix_sq[base]
        last_s1, last_s2 = self.prefix[base + self.n], self.prefix_sq[base + self.n]
        # the weight below each candidate (None: the count, i.e. the candidate position itself)
        sw = first_w = last_w = None
        if self.prefix_w is not None:
            sw, first_w, last_w = self.prefix_w[flat], self.prefix_w[base], self.prefix_w[base + self.n]
        # best[w]: least SSE of clusters 0..j with boundary j at candidate w.
        best = _interval_sse(cand[:, 0], s1[:, 0], s2[:, 0], 0, first_s1, first_s2, _pick(sw, 0), first_w)
        back = []
        for j in range(1, layers):
            # SSE(a, b) = S2(b) - S2(a) - (S1(b) - S1(a))**2 / W(a, b); S2(b) is added after the min.
            total = _interval_sse_less_end(
                cand[:, j, None, :], s1[:, j, None, :], cand[:, j - 1, :, None], s1[:, j - 1, :, None],
                None if sw is None else sw[:, j, None, :], None if sw is None else sw[:, j - 1, :, None],
            )  # fmt: skip
            total += (best - s2[:, j - 1])[:, :, None]
            arg = np.argmin(total, axis=1)
            back.append(arg)
            best = np.take_along_axis(total, arg[:, None, :], 1)[:, 0, :] + s2[:, j]
        best = best + _interval_sse(
            self.n, last_s1, last_s2, cand[:, -1], s1[:, -1], s2[:, -1], last_w, _pick(sw, -1)
        )
        w = np.argmin(best, axis=1)
        new = cuts.copy()
        new[:, layers] = cand[pick, layers - 1, w]
        for j in range(layers - 1, 0, -1):
            w = back[j - 1][pick, w]
            new[:, j] = cand[pick, j - 1, w]
        return new


def _pick(prefix_w: np.ndarray | None, j: int) -> np.ndarray | None:
    """Boundary ``j``'s candidates' weights, or None in an unweighted fit."""
    return None if prefix_w is None else prefix_w[:, j]


def _interval_sse(b, b1, b2, a, a1, a2, bw=None, aw=None) -> np.ndarray:
    """Sum of squared deviations of the sorted values in [a, b) from their mean (b >= a).

    ``bw``/``aw``: the weight prefix at b and a, for the weighted sum about the weighted mean
    (None: unweighted, the weight of [a, b) is its count).
    """
    if bw is None:
        size = np.maximum(np.asarray(b) - np.asarray(a), 1)
    else:  # a non-empty interval weighs > 0 (_MIN_IMPORTANCE); an empty one sums to 0 anyway
        size = np.where(np.asarray(b) - np.asarray(a) > 0, bw - aw, 1.0)
    total = b1 - a1
    return (b2 - a2) - total * total / size


def _interval_sse_less_end(b, b1, a, a1, bw=None, aw=None) -> np.ndarray:
    """``SSE(a, b) - S2(b) + S2(a)``, i.e. minus sum**2/weight; +inf where a > b (no interval)."""
    size = b - a
    total = b1 - a1
    total *= total
    if bw is None:
        total /= np.maximum(size, 1)
    else:
        total /= np.where(size > 0, bw - aw, 1.0)
    np.negative(total, out=total)
    total[size < 0] = np.inf
    return total


def _density_init(values: np.ndarray, entries: int) -> np.ndarray:
    """Initial centres spaced by density**(1/3), the asymptotically optimal quantiser density.

    The density comes from the sorted values cut into equal-count pieces: a piece of width dx
    holding du values contributes (dx/du)**(2/3) * du to the centres' cumulative share.
    """
    count, n = values.shape
    pieces = max(1, min(_INIT_PIECES, n - 1))
    edges = np.round(np.linspace(0, n - 1, pieces + 1)).astype(np.int64)
    x = values[:, edges].astype(np.float64)
    share = np.concatenate(
        [np.zeros((count, 1)), np.cumsum(np.cbrt(np.diff(x, axis=1) ** 2 * np.diff(edges)), axis=1)], axis=1
    )
    total = share[:, -1:]
    share = share / np.where(total > 0, total, 1.0)
    targets = (np.arange(entries) + 0.5) / entries
    # Batched interpolation: shares lie in [0, 1], so offsetting each group by 2 keeps them apart.
    offset = 2.0 * np.arange(count)[:, None]
    pos = np.searchsorted((share + offset).ravel(), (targets + offset).ravel(), side="right")
    right = np.clip(pos.reshape(count, entries) - np.arange(count)[:, None] * (pieces + 1), 1, pieces)
    s0, s1 = np.take_along_axis(share, right - 1, 1), np.take_along_axis(share, right, 1)
    x0, x1 = np.take_along_axis(x, right - 1, 1), np.take_along_axis(x, right, 1)
    width = s1 - s0
    frac = np.where(width > 0, (targets - s0) / np.where(width > 0, width, 1.0), 0.5)
    return x0 + np.clip(frac, 0.0, 1.0) * (x1 - x0)


def _lloyd(
    groups: _SortedGroups, centres: np.ndarray, rows: np.ndarray, iters: int, to_fp16: bool
) -> np.ndarray:
    """Lloyd iterations on groups ``rows`` until no assignment changes, or ``iters`` updates.

    A group whose assignment did not change is at a fixed point (its update would give the same
    centres again), so it leaves the active set: the result equals iterating every group.
    """
    centres = centres.copy()
    active = np.arange(len(rows))
    previous = np.full((len(rows), centres.shape[1] + 1), -1, dtype=np.int64)
    for _ in range(iters):
        cuts = groups.cuts(centres[active], rows[active])
        changed = np.any(cuts != previous[active], axis=1)
        previous[active] = cuts
        active, cuts = active[changed], cuts[changed]
        if not len(active):
            break
        update = groups.means(cuts, centres[active], rows[active])
        centres[active] = _to_fp16(update) if to_fp16 else update
    return centres


def _refine(groups: _SortedGroups, centres: np.ndarray, rounds: int, iters: int) -> np.ndarray:
    """Alternate the windowed exact partition and Lloyd; each step can only lower the error."""
    centres = centres.copy()
    active = np.arange(groups.count)
    for _ in range(rounds):
        cuts = groups.cuts(centres[active], active)
        better = groups.best_cuts_near(cuts, active)
        changed = np.any(better != cuts, axis=1)
        active, better = active[changed], better[changed]
        if not len(active):
            break
        start = groups.means(better, centres[active], active)
        centres[active] = _lloyd(groups, start, active, iters, to_fp16=False)
    return centres


def _fit_batch(
    rows: np.ndarray, entries: int, iters: int, rounds: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fit one table per row of ``rows`` (groups, n), each element's squared error times its
    ``weights`` entry if given; return (indices (groups, n), lut fp16)."""
    groups = _SortedGroups(rows, weights)
    everyone = np.arange(groups.count)
    centres = _density_init(groups.values.reshape(rows.shape), entries)
    # Converge in float64 first: rounding every step to fp16 stalls Lloyd's small late moves.
    centres = _lloyd(groups, centres, everyone, iters, to_fp16=False)
    centres = _refine(groups, centres, rounds, iters)
    # Then settle on fp16 tables, so assignment is against the values Core ML will hold.
    centres = _lloyd(groups, _to_fp16(centres), everyone, 2, to_fp16=True)
    boundaries = groups.boundary_keys(centres, everyone).ravel()
    element_keys = (_sortable_keys(rows) | groups.row_keys[:, None]).ravel()
    below = np.searchsorted(boundaries, element_keys, side="left").reshape(rows.shape)
    indices = below - (everyone * (entries - 1))[:, None]
    return indices.astype(np.uint8), centres.astype(np.float16)


def _as_float32(weight: np.ndarray | mx.array) -> np.ndarray:
    if isinstance(weight, mx.array):
        return np.array(weight.astype(mx.float32))
    return np.asarray(weight, dtype=np.float32)


# What calibration knows of a weight's input, as ``fit_lut`` takes it: (importance, second_moment)
InputStats = tuple["np.ndarray | None", "np.ndarray | None"]


def fit_lut(
    weight: np.ndarray | mx.array,
    spec: LUTSpec,
    iters: int = DEFAULT_ITERS,
    refine_rounds: int = DEFAULT_REFINE_ROUNDS,
    importance: np.ndarray | None = None,
    second_moment: np.ndarray | None = None,
) -> LUTWeight:
    """Fit a palettized version of ``weight`` (Cout, Cin[, 1, 1]) by 1-D k-means per channel group.

    ``iters`` bounds each Lloyd run; ``refine_rounds`` bounds the escapes from Lloyd's local
    optima (0: plain Lloyd, about 2-4x faster, 2-13% more error on real weights).

    ``importance``: how much an error in each input column costs (for a Linear, the mean square of
    its input feature over calibration data), shape (Cin,) or the weight's shape; each element's
    squared error is weighted by it.  Only ratios matter.  None: the plain, unweighted fit.

    ``second_moment``: E[x x^T] of the input (Cin, Cin); the fitted tables are kept and the indices
    reassigned so that the output's error, not each weight's, is small (``quant.compensate``).

    Deterministic: the same weight, spec and importance give byte-identical indices and tables,
    which the byte-identical exports (and weight sharing across multifunction programs) rely on.
    """
    w = _as_float32(weight)
    if w.ndim < 2:
        raise ValueError(f"fit_lut needs a weight of rank >= 2, got shape {w.shape}")
    if not np.isfinite(w).all() or (w.size and np.abs(w).max() > _FP16_MAX):
        raise UnsupportedError("LUT fitting needs finite weights within the fp16 range")
    num_groups = spec.num_groups(w.shape[0])
    rows = (w + np.float32(0.0)).reshape(num_groups, -1)  # +0.0 turns -0.0 into +0.0
    element_weights = None if importance is None else _element_weights(importance, w.shape)
    per_batch = max(1, _BATCH_ELEMENTS // max(1, rows.shape[1]))
    indices = np.empty(rows.shape, dtype=np.uint8)
    lut = np.empty((num_groups, spec.entries), dtype=np.float16)
    rows_per_group = w.shape[0] // num_groups
    for start in range(0, num_groups, per_batch):
        stop = min(num_groups, start + per_batch)
        batch_weights = None
        if element_weights is not None:  # broadcast per batch: never the whole weight's worth at once
            part = element_weights[start * rows_per_group : stop * rows_per_group]
            batch_weights = np.ascontiguousarray(part).reshape(stop - start, -1)
        indices[start:stop], lut[start:stop] = _fit_batch(
            rows[start:stop], spec.entries, iters, refine_rounds, batch_weights
        )
    fitted = LUTWeight(indices=indices.reshape(w.shape), lut=lut, spec=spec)
    if second_moment is None:
        return fitted
    return compensated_indices(w.reshape(w.shape[0], -1), fitted, second_moment)


def _element_weights(importance: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``importance`` (one per input column, or one per element) as a read-only (Cout, Cin...)
    view, scaled to mean 1 and floored at ``_MIN_IMPORTANCE`` so every element counts a little."""
    imp = np.asarray(importance, dtype=np.float64)
    per_row = int(np.prod(shape[1:]))
    if imp.shape != tuple(shape) and imp.size != per_row:
        raise ValueError(f"importance of shape {imp.shape} fits neither the weight {shape} nor one row of it")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be finite and >= 0")
    mean = imp.mean() if imp.size else 0.0
    imp = np.maximum(imp / mean, _MIN_IMPORTANCE) if mean > 0 else np.ones_like(imp)
    if imp.shape == tuple(shape):
        return imp.reshape(shape[0], per_row)
    return np.broadcast_to(imp.reshape(1, per_row), (shape[0], per_row))


def lut_group_error(
    weight: np.ndarray | mx.array, lw: LUTWeight, importance: np.ndarray | None = None
) -> np.ndarray:
    """Mean squared reconstruction error of each channel group (float64, one per LUT); with
    ``importance`` (as ``fit_lut`` takes it) each element's squared error is weighted by it."""
    w = _as_float32(weight).astype(np.float64).reshape(lw.indices.shape[0], -1)
    diff = lw.dequantize().astype(np.float64).reshape(w.shape) - w
    sq = diff * diff
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float64)
        sq *= imp.reshape(w.shape) if imp.size == w.size else imp.reshape(1, -1)
    return np.mean(sq.reshape(lw.lut.shape[0], -1), axis=1)


def lut_to_mil(lw: LUTWeight, shape: tuple[int, ...], name: str, weight_id: str | None = None) -> Any:
    """Emit ``lw`` as an iOS18 ``constexpr_lut_to_dense`` op producing an fp16 weight of ``shape``.

    ``shape`` is (Cout, Cin) for a linear or (Cout, Cin, 1, 1) for a 1x1 conv.  The table gets
    shape [groups, 1, ..., 1, 2**bits, 1]: one leading entry per output-channel group and 1 on
    every other weight axis.  Call inside an ``mb.program`` function whose opset is iOS18 or later.
    With ``weight_id``, the indices and the table are consts of that id (``_indices``, ``_lut``),
    stored once in a package whatever the number of functions emitting them.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    shape = tuple(int(d) for d in shape)
    if shape[0] != lw.indices.shape[0] or int(np.prod(shape)) != lw.indices.size:
        raise ValueError(f"LUT weight of shape {lw.indices.shape} cannot be emitted as {shape}")
    index_dtype = getattr(types, f"np_uint{lw.spec.bits}_dtype", None) if lw.spec.bits < 8 else np.uint8
    # uint8 bytes either way, the uint{bits} meaning in the dtype's metadata: a view, not a copy
    indices: Any = np.ascontiguousarray(lw.indices.reshape(shape)).view(index_dtype)
    lut_shape = (lw.lut.shape[0],) + (1,) * (len(shape) - 1) + (lw.spec.entries, 1)
    lut: Any = lw.lut.reshape(lut_shape)
    if weight_id is not None:
        indices = mb.const(val=indices, name=f"{name}_indices")
        indices.op.weight_id = f"{weight_id}_indices"
        lut = mb.const(val=lut, name=f"{name}_lut")
        lut.op.weight_id = f"{weight_id}_lut"
    return mb.constexpr_lut_to_dense(indices=indices, lut=lut, name=name)

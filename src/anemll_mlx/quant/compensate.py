"""Error-compensated LUT indices: GPTQ's column sweep with a LUT's tables in place of its grid.

A k-means fit (``quant.lut.fit_lut``) assigns every element to its nearest table entry, which
minimises the weight's own error.  What a user sees is the error of the layer's output, and
rounding errors of different input columns can cancel there: sweeping the columns in order, each
column's rounding error is pushed onto the columns not yet assigned, in proportion to how their
inputs correlate (the inverse of the input second moment E[x x^T]; Frantar et al., "GPTQ", 2022).
The tables stay as fitted, so the result is still a plain ``constexpr_lut_to_dense`` weight; only
which entry each element takes changes.  Measured on SmolLM2-135M with LUT 4,4 (the 16 compare
prompts in MLX against float32): the sensitivity-weighted fit KL 0.241 / 79.2%, with compensated
indices 0.206 / 80.5%.

Deterministic: the same weight, tables and moment give the same indices (the export's
multifunction weight sharing and byte-identical exports rely on that).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # quant.lut calls this module: only the type from there
    from .lut import LUTWeight

DAMP = 0.01  # added to the moment's diagonal, as a fraction of its mean: keeps it invertible
BLOCK = 128  # columns swept between two updates of the rest (the result does not depend on it)


def compensated_indices(weight: np.ndarray, lw: LUTWeight, second_moment: np.ndarray) -> LUTWeight:
    """``lw`` with every element of ``weight`` (Cout, Cin) reassigned, column by column in order of
    decreasing input energy, to the table entry nearest its error-compensated value.

    ``second_moment``: E[x x^T] of the weight's input over calibration data, (Cin, Cin)."""
    w = np.asarray(weight, dtype=np.float64).reshape(lw.indices.shape[0], -1).copy()
    cout, cin = w.shape
    if second_moment.shape != (cin, cin):
        raise ValueError(f"a second moment of shape {second_moment.shape} does not fit a weight of {cin} inputs")
    groups = lw.lut.shape[0]
    tables = np.repeat(lw.lut.astype(np.float64), cout // groups, axis=0)  # each row's table
    order = np.argsort(-np.diag(second_moment), kind="stable")
    upper = _inverse_cholesky(second_moment[np.ix_(order, order)])
    w = w[:, order]
    rows = np.arange(cout)
    indices = np.empty((cout, cin), dtype=np.uint8)
    for start in range(0, cin, BLOCK):
        stop = min(cin, start + BLOCK)
        errors = np.empty((cout, stop - start))
        for j in range(start, stop):
            column = w[:, j]
            chosen = np.argmin(np.abs(tables - column[:, None]), axis=1)
            indices[:, j] = chosen
            error = (column - tables[rows, chosen]) / upper[j, j]
            w[:, j + 1 : stop] -= np.outer(error, upper[j, j + 1 : stop])
            errors[:, j - start] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    out = np.empty_like(indices)
    out[:, order] = indices
    return replace(lw, indices=out.reshape(lw.indices.shape))


def _inverse_cholesky(moment: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of the damped moment's inverse (GPTQ's sweep coefficients); the
    damping grows tenfold until the moment is positive definite."""
    m = np.asarray(moment, dtype=np.float64).copy()
    dead = np.diag(m) <= 0  # an input never seen: any entry is as good as any other
    m[dead, dead] = 1.0
    mean = float(np.mean(np.diag(m)))
    for damp in (DAMP, 10 * DAMP, 100 * DAMP, 1.0):
        try:
            inverse = np.linalg.inv(m + damp * mean * np.eye(len(m)))
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("the input second moment is not positive definite even with damping")

"""Divergence metrics between a reference and a candidate next-token distribution.

Every function takes logits shaped ``(..., vocab)`` and reduces the last axis, so the same code
serves one step ``(vocab,)`` and a whole run ``(steps, vocab)``.  Work happens in float64 on a
max-shifted log-softmax: exported fp16 programs produce logits in the tens, where a naive
``exp`` in float32 loses the tail that KL is most sensitive to.

Non-finite logits are not hidden: NaN from a candidate propagates into its metrics, and a health
check on NaN says "concerning", because an overflowing export is exactly what we want reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K = 5

HEALTHY, WARNING, CONCERNING = "healthy", "warning", "concerning"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-probabilities over the last axis, float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _xlogy_terms(p: np.ndarray, log_terms: np.ndarray) -> np.ndarray:
    """``p * log_terms`` with 0 where ``p == 0``, so masked (-inf) tokens contribute nothing."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * log_terms, 0.0)


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(ref || cand) in nats: the extra surprise of sampling the reference through the candidate."""
    log_p = log_softmax(ref_logits)
    log_q = log_softmax(cand_logits)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        diff = log_p - log_q
    # Rounding can leave a hair below zero for identical inputs; KL itself is never negative.
    return np.maximum(np.sum(_xlogy_terms(p, diff), axis=-1), 0.0)


def pearson(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """Pearson correlation of the raw logits (shape of the distribution, blind to a constant offset).

    Constant logits have no variance, so correlation is undefined there; two constant vectors are
    the same (uniform) distribution and score 1, one constant against a varying one scores 0.
    """
    a = np.asarray(ref_logits, dtype=np.float64)
    b = np.asarray(cand_logits, dtype=np.float64)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    norm_a = np.sqrt(np.sum(a * a, axis=-1))
    norm_b = np.sqrt(np.sum(b * b, axis=-1))
    flat_a, flat_b = norm_a == 0, norm_b == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.sum(a * b, axis=-1) / (norm_a * norm_b)
    corr = np.where(flat_a & flat_b, 1.0, np.where(flat_a | flat_b, 0.0, corr))
    return np.clip(corr, -1.0, 1.0)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in nats; near 0 means a collapsed (one-hot) distribution, log(vocab) is uniform."""
    log_p = log_softmax(logits)
    return -np.sum(_xlogy_terms(np.exp(log_p), log_p), axis=-1)


def argmax_match(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """Whether greedy decoding picks the same token (ties go to the lowest id, as ``np.argmax``)."""
    return np.argmax(ref_logits, axis=-1) == np.argmax(cand_logits, axis=-1)


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-np.asarray(logits, dtype=np.float64), k - 1, axis=-1)[..., :k]


def top_k_overlap(ref_logits: np.ndarray, cand_logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """|top-k(ref) ∩ top-k(cand)| / k: agreement on the plausible alternatives, not just the winner."""
    k = min(k, np.shape(ref_logits)[-1])
    ref_top = _top_k_ids(ref_logits, k)
    cand_top = _top_k_ids(cand_logits, k)
    shared = (ref_top[..., :, None] == cand_top[..., None, :]).any(axis=-1).sum(axis=-1)
    return shared / k


@dataclass(frozen=True)
class StepMetrics:
    """All metrics for one step (scalars) or for a run of steps (arrays of shape ``(steps,)``)."""

    kl: np.ndarray
    corr: np.ndarray
    entropy: np.ndarray
    match: np.ndarray
    top5: np.ndarray


def step_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray) -> StepMetrics:
    """Every metric at once, for ``(vocab,)`` or ``(steps, vocab)`` inputs of equal shape."""
    if np.shape(ref_logits) != np.shape(cand_logits):
        raise ValueError(f"logit shapes differ: {np.shape(ref_logits)} vs {np.shape(cand_logits)}")
    return StepMetrics(
        kl=kl_divergence(ref_logits, cand_logits),
        corr=pearson(ref_logits, cand_logits),
        entropy=entropy(cand_logits),
        match=argmax_match(ref_logits, cand_logits),
        top5=top_k_overlap(ref_logits, cand_logits),
    )


# --- health: ANEMLL's thresholds, (healthy when, concerning when); in between is a warning.
# ``higher_is_better`` flips the comparisons for correlation, match rate and entropy.

THRESHOLDS: dict[str, tuple[float, float, bool]] = {
    "kl": (0.01, 0.1, False),
    "correlation": (0.99, 0.95, True),
    "match": (0.98, 0.90, True),
    "entropy": (0.5, 0.1, True),  # below 0.1 nats: the candidate's distribution has collapsed
}


def classify(metric: str, value: float) -> str:
    """``"healthy"``, ``"warning"`` or ``"concerning"`` for one metric (keys of ``THRESHOLDS``).

    Thresholds are strict: a value exactly on a boundary is a warning.  NaN is concerning.
    """
    healthy, concerning, higher_is_better = THRESHOLDS[metric]
    value = float(value)
    if np.isnan(value):
        return CONCERNING
    if higher_is_better:
        if value > healthy:
            return HEALTHY
        return CONCERNING if value < concerning else WARNING
    if value < healthy:
        return HEALTHY
    return CONCERNING if value > concerning else WARNING


def worst(labels: list[str]) -> str:
    """The most severe of several labels (``"healthy"`` for none)."""
    order = (HEALTHY, WARNING, CONCERNING)
    return max(labels, key=order.index, default=HEALTHY)

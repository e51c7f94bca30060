"""The distillation loss against the teacher's cached top-k logits, and the metrics we report.

The teacher's distribution is known only on its top-k tokens (the KD cache), so the soft term is
the KL between the two distributions renormalised over those k tokens, at temperature T and
multiplied by T^2 (Hinton et al.: keeps the gradient scale independent of T).  Two small hard terms
keep the student honest outside the top-k: cross-entropy on the teacher's top-1 token, and a
full-vocabulary cross-entropy against the teacher's (T = 1) top-k distribution, which penalises
probability the student puts outside the teacher's top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class LossWeights:
    temperature: float = 2.0
    hard_top1: float = 0.1
    hard_full: float = 5e-4


def _masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    return (values * mask).sum() / mx.maximum(mask.sum(), 1.0)


def kd_loss(
    logits: mx.array, topk_ids: mx.array, topk_logits: mx.array, mask: mx.array, weights: LossWeights
) -> tuple[mx.array, mx.array]:
    """(total loss, soft KL term) for student ``logits`` (B, L, V) against the teacher's top-k.

    ``topk_ids``/``topk_logits`` are (B, L, K), ``mask`` (B, L) is 1 where a position has a target.
    """
    s = logits.astype(mx.float32)
    t = weights.temperature
    student_k = mx.take_along_axis(s, topk_ids, axis=-1)
    log_p = topk_logits / t - mx.logsumexp(topk_logits / t, axis=-1, keepdims=True)
    log_q = student_k / t - mx.logsumexp(student_k / t, axis=-1, keepdims=True)
    soft = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1) * (t * t)
    log_z = mx.logsumexp(s, axis=-1)
    top1 = log_z - student_k[..., 0]
    p1 = mx.softmax(topk_logits, axis=-1)
    full = -(p1 * (student_k - log_z[..., None])).sum(axis=-1)
    per_position = soft + weights.hard_top1 * top1 + weights.hard_full * full
    return _masked_mean(per_position, mask), _masked_mean(soft, mask)


def drift(
    logits: mx.array, topk_ids: mx.array, topk_logits: mx.array, mask: mx.array
) -> tuple[float, float, int]:
    """(KL, top-1 match, positions) of the student against the teacher at temperature 1.

    KL(teacher || student) over the teacher's top-k, the teacher renormalised there and the student
    taken over the whole vocabulary: with k = 64 the top-k holds nearly all of a chat model's mass,
    so this tracks ``compare``'s full-vocabulary KL from below.  Match: the student's argmax is the
    teacher's top-1 token.
    """
    s = logits.astype(mx.float32)
    log_q = mx.take_along_axis(s, topk_ids, axis=-1) - mx.logsumexp(s, axis=-1, keepdims=True)
    log_p = topk_logits - mx.logsumexp(topk_logits, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    match = (mx.argmax(s, axis=-1) == topk_ids[..., 0]).astype(mx.float32)
    count = float(mask.sum())
    return (
        float((kl * mask).sum()) / max(count, 1.0),
        float((match * mask).sum()) / max(count, 1.0),
        int(count),
    )

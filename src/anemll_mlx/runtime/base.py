"""The driver interface that ``compare`` (and ``probe``) speak to.

A driver is anything that turns token ids into next-token logits while keeping its own KV state:
the MLX reference model, our MIL executor over an export, or Core ML itself.  Keeping the contract
this small is what lets one harness measure any export against any reference, and lets the tests
use tiny numpy language models instead of real models.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Driver(Protocol):
    """A stateful next-token predictor.

    ``name`` identifies the driver in reports (e.g. ``"mlx:model@fp32"``).  Logits are float32 and
    unnormalised; callers apply their own softmax, so a driver never needs to.
    """

    name: str
    vocab_size: int
    context_length: int

    def reset(self) -> None:
        """Forget all tokens seen so far: the next ``prefill`` starts at position 0."""
        ...

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed a prompt; logits ``(len(token_ids), vocab)``, one row per prompt position.

        Row ``i`` predicts the token after ``token_ids[i]``; the last row predicts the first new
        token.  A driver that can only produce the last row may return it alone as ``(vocab,)``;
        ``last_logits`` accepts both.
        """
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token at the next position; logits ``(vocab,)`` predicting the token after it."""
        ...


@runtime_checkable
class ResumableDriver(Driver, Protocol):
    """A driver that can continue a conversation: what chat and serve need beyond ``Driver``.

    ``prefill`` feeds its tokens at ``position`` (the whole prompt after ``reset``, or the rest of
    one after ``rewind``), so a new turn that extends what the KV state already holds runs only the
    new tokens.  The drivers of ``runtime.drivers`` (mlx, mil, coreml) are all resumable.
    """

    position: int  # tokens the KV state holds: where the next prefill or decode writes

    def rewind(self, position: int) -> None:
        """Keep only the first ``position`` tokens (0 <= position <= self.position).  The positions
        past it stay in the state, hidden by the causal mask until they are written again."""
        ...


def last_logits(logits: np.ndarray, vocab_size: int, who: str) -> np.ndarray:
    """The prediction for the next position out of a ``prefill`` or ``decode`` result.

    Accepts ``(T, vocab)``, ``(1, vocab)`` or ``(vocab,)`` so exported programs that only emit the
    last position's logits still fit; anything else is a driver bug and raises ``ValueError``.
    """
    array = np.asarray(logits)
    if array.ndim == 2 and array.shape[0] >= 1:
        array = array[-1]
    if array.ndim != 1 or array.shape[0] != vocab_size:
        raise ValueError(f"{who} returned logits of shape {np.shape(logits)}, expected (..., {vocab_size})")
    return array


def release_thread_streams() -> None:
    """Destroy the MLX streams the calling thread created; a worker thread calls this as it ends.

    MLX gives each thread its own default stream.  One whose thread has ended but that is still
    there when the process exits can abort the exit ("terminate called without an active
    exception", seen after Ctrl-C in compare's reference thread).  Without MLX loaded, nothing to do.
    """
    mlx_core = sys.modules.get("mlx.core")
    if mlx_core is not None:
        mlx_core.clear_streams()

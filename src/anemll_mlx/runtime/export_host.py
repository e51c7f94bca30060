"""Driving an export the way ANEMLL's runtimes do, over any executor of its programs.

Host logic only: embed the tokens, run every chunk's ``prefill`` over full batches (the last one
padded, its padding hidden by the causal mask) or ``infer`` for one token, then the LM head on
the last real position.  The KV state(s) are shared by all chunks and functions.  Gemma3 exports
whose context exceeds their sliding window W (meta.yaml gives it) have rotate variants of both
functions, called instead once a call's current_pos >= W (``format.host_function``).  The
``mil`` driver plugs in our executor; the ``coreml`` driver plugs in Core ML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .. import format as fmt
from ..errors import UnsupportedError, UserError
from ..loading.tokenizer import Tokenizer


class ProgramRunner(Protocol):
    """Executes one function of one program file, keeping the KV state shared across calls."""

    def run(self, program: str, function: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def reset_state(self) -> None: ...


class ExportHost:
    def __init__(self, export: fmt.ExportFolder, runner: ProgramRunner, name: str):
        meta = export.meta
        if meta.argmax_in_model:
            raise UnsupportedError(
                f"{export.path} computes argmax inside the LM head, so it returns no logits to compare: "
                "export without --argmax-in-model"
            )
        self.export = export
        self.meta = meta
        self.runner = runner
        self.name = name
        self.context_length = meta.context
        self.vocab_size = meta.vocab_size or 0
        self.position = 0
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer files copied into the export (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_folder(self.export.path)
        return self._tokenizer

    def reset(self) -> None:
        self.runner.reset_state()
        self.position = 0

    def _layers(self, hidden: np.ndarray, start: int, tokens: int, kind: str) -> np.ndarray:
        function = fmt.host_function(kind, start, tokens, self.meta.window)
        inputs: dict[str, np.ndarray] = {
            fmt.POSITION_IDS: np.arange(start, start + tokens, dtype=np.int32),
            fmt.CAUSAL_MASK: fmt.causal_mask(start, tokens, self.context_length).astype(np.float16),
            fmt.CURRENT_POS: np.array([start], dtype=np.int32),
        }
        for chunk in self.export.chunks:
            out = self.runner.run(str(chunk), function, {fmt.HIDDEN_STATES: hidden, **inputs})
            hidden = out[fmt.OUTPUT_HIDDEN_STATES]
        return hidden

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        out = self.runner.run(str(self.export.lm_head), None, {fmt.HIDDEN_STATES: hidden.astype(np.float16)})
        return np.concatenate([np.asarray(out[k], dtype=np.float32).reshape(-1) for k in fmt.logits_pieces(list(out))])

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.runner.run(str(self.export.embeddings), None, {fmt.INPUT_IDS: ids})[fmt.HIDDEN_STATES]

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (vocab,) after the prompt, which is processed in full ``batch``-token calls."""
        ids = list(token_ids)
        batch = self.meta.batch
        if not ids:
            raise UserError("cannot prefill an empty prompt")
        if self.position + len(ids) > self.context_length:
            raise UserError(f"prompt of {len(ids)} tokens does not fit the export's context {self.context_length}")
        if self.position % batch:
            raise UserError("prefill must start at a multiple of the export's batch size; reset first")
        last_hidden = None
        for start in range(0, len(ids), batch):
            piece = ids[start : start + batch]
            padded = np.zeros((1, batch), dtype=np.int32)
            padded[0, : len(piece)] = piece
            pos = self.position + start
            hidden = self._layers(self._embed(padded), pos, batch, fmt.PREFILL)
            last_hidden = hidden[:, len(piece) - 1 : len(piece), :]
        self.position += len(ids)
        assert last_hidden is not None
        return self._logits(last_hidden)

    def decode(self, token_id: int) -> np.ndarray:
        """Logits (vocab,) after feeding one token at the next position."""
        if self.position >= self.context_length:
            raise UserError(f"the export's context of {self.context_length} tokens is full")
        hidden = self._embed(np.array([[token_id]], dtype=np.int32))
        hidden = self._layers(hidden, self.position, 1, fmt.INFER)
        self.position += 1
        return self._logits(hidden)

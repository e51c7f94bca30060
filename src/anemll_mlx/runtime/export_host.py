"""Driving an export the way ANEMLL's runtimes do, over any executor of its programs.

Host logic only: embed the tokens, run every chunk's ``prefill`` over full batches (the last one
padded, its padding hidden by the causal mask) or ``infer`` for one token, then the LM head on
the last real position.  The KV state(s) are shared by all chunks and functions.  Gemma3 exports
whose context exceeds their sliding window W (``model_info.parameters.sliding_window``) have
``infer_rotate`` and ``prefill_rotate`` too, called instead once a call's current_pos >= W.  The
``mil`` driver plugs in our executor; the ``coreml`` driver plugs in Core ML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..errors import UnsupportedError, UserError
from .export_folder import ExportFolder


class ProgramRunner(Protocol):
    """Executes one function of one program file, keeping the KV state shared across calls."""

    def run(self, program: str, function: str | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def reset_state(self) -> None: ...


def causal_mask(start: int, tokens: int, context: int) -> np.ndarray:
    """(1, 1, tokens, context) fp16: 0 where key j <= query position, -inf elsewhere."""
    q = np.arange(start, start + tokens)[:, None]
    return np.where(np.arange(context)[None] <= q, 0.0, -np.inf).astype(np.float16)[None, None]


class ExportHost:
    def __init__(self, export: ExportFolder, runner: ProgramRunner, name: str):
        if export.argmax_in_model:
            raise UnsupportedError(
                f"{export.path} computes argmax inside the LM head, so it returns no logits to compare: "
                "export without --argmax-in-model"
            )
        self.export = export
        self.runner = runner
        self.name = name
        self.context_length = export.context
        sizes = export.head_sizes
        self.vocab_size = sum(sizes) if sizes else int(export.params.get("vocab_size", 0))
        self.position = 0
        self._tokenizer = None
        window = export.params.get("sliding_window")
        # rotate functions exist only when the window bites within the context
        self.window = int(window) if window and int(window) < self.context_length else None

    @property
    def tokenizer(self):
        """The tokenizer files copied into the export (loaded on first use)."""
        if self._tokenizer is None:
            from ..loading.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_folder(self.export.path)
        return self._tokenizer

    def reset(self) -> None:
        self.runner.reset_state()
        self.position = 0

    def _function(self, kind: str, start: int, tokens: int) -> str:
        """``infer``/``prefill`` or, past the sliding window, their ``_rotate`` variant."""
        if self.window is None:
            return kind
        if start < self.window < start + tokens:
            raise UnsupportedError(
                f"a {tokens}-token call at position {start} straddles the sliding window {self.window}: "
                "the export's batch size must divide its window"
            )
        return f"{kind}_rotate" if start >= self.window else kind

    def _layers(self, hidden: np.ndarray, start: int, tokens: int, function: str) -> np.ndarray:
        function = self._function(function, start, tokens)
        inputs = {
            "position_ids": np.arange(start, start + tokens, dtype=np.int32),
            "causal_mask": causal_mask(start, tokens, self.context_length),
            "current_pos": np.array([start], dtype=np.int32),
        }
        for chunk in self.export.chunks:
            hidden = self.runner.run(str(chunk), function, {"hidden_states": hidden, **inputs})["output_hidden_states"]
        return hidden

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        out = self.runner.run(str(self.export.lm_head), None, {"hidden_states": hidden.astype(np.float16)})
        pieces = sorted((k for k in out if k.startswith("logits")), key=lambda k: int(k[len("logits") :] or 0))
        return np.concatenate([np.asarray(out[k], dtype=np.float32).reshape(-1) for k in pieces])

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.runner.run(str(self.export.embeddings), None, {"input_ids": ids})["hidden_states"]

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (vocab,) after the prompt, which is processed in full ``batch``-token calls."""
        ids = list(token_ids)
        batch = self.export.batch
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
            hidden = self._layers(self._embed(padded), pos, batch, "prefill")
            last_hidden = hidden[:, len(piece) - 1 : len(piece), :]
        self.position += len(ids)
        return self._logits(last_hidden)

    def decode(self, token_id: int) -> np.ndarray:
        """Logits (vocab,) after feeding one token at the next position."""
        if self.position >= self.context_length:
            raise UserError(f"the export's context of {self.context_length} tokens is full")
        hidden = self._embed(np.array([[token_id]], dtype=np.int32))
        hidden = self._layers(hidden, self.position, 1, "infer")
        self.position += 1
        return self._logits(hidden)

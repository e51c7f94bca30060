"""Driving an export the way ANEMLL's runtimes do, over any executor of its programs.

Host logic only: embed the tokens, run every chunk's ``prefill`` over whole batches (a partial
one padded: its padding lands on future positions, hidden by the causal mask and overwritten by
later writes) or ``infer`` for single tokens, then the LM head on the last real position.  The
KV state(s) are shared by all chunks and functions.  Gemma3 exports whose context exceeds their
sliding window W (meta.yaml gives it) have rotate variants of both functions, called instead once
a call's current_pos >= W (``format.host_function``).  The ``mil`` driver plugs in our executor;
the ``coreml`` driver plugs in Core ML.

Continuing a conversation (``rewind`` then ``prefill`` of the new tokens) starts a prefill at any
position.  A batch may start anywhere its ``batch`` rows fit in the context (the program writes
them at ``current_pos``: ANEMLL calls this ``prefill_dynamic_slice``); a remainder of fewer than
``PREFILL_MIN`` tokens, a batch that would run past the context or straddle the sliding window,
and any unaligned batch of an ANEMLL export that does not declare dynamic slices, run through
``infer`` one token at a time.  Measured with the mil executor on SmolLM2-135M (2 cores): a
64-token prefill costs 4-7 single-token infers, so a padded batch wins from a few tokens on
(on the ANE the ratio is lower still).

ANEMLL's own exports (0.3.5) need two more things, both read from the programs rather than from
meta.yaml: the ``causal_mask`` is as wide as the function declares (their KV state holds 512
positions whatever the context), and ``prefill`` returns a (1, 1, H) placeholder, so the last
prompt token runs through ``infer`` again (rewriting its own KV entry) for the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .. import format as fmt
from ..errors import UnsupportedError, UserError
from ..loading.tokenizer import Tokenizer

PREFILL_MIN = 4  # fewer remaining tokens than this at an unaligned position go through infer


class ProgramRunner(Protocol):
    """Executes one function of one program file, keeping the KV state shared across calls."""

    def run(
        self, program: str, function: str | None, inputs: dict[str, np.ndarray], stateful: bool = True
    ) -> dict[str, np.ndarray]:
        """``stateful=False``: a function without the KV state (an expert pack)."""
        ...

    def reset_state(self) -> None: ...

    def input_shape(self, program: str, function: str, name: str) -> tuple[int, ...] | None:
        """The declared shape of an input, or None where the runner cannot tell (a compiled model)."""
        ...


class ExportHost:
    def __init__(self, export: fmt.ExportFolder, runner: ProgramRunner, name: str, moe_mode: str | None = None):
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
        self._mask_width = self._read_mask_widths()
        self.moe = meta.moe
        if moe_mode is not None and moe_mode not in fmt.MOE_MODES:
            raise UserError(f"unknown mixture-of-experts mode '{moe_mode}' (choose {' or '.join(fmt.MOE_MODES)})")
        if moe_mode in ("routed", "gathered") and self.moe is None:
            raise UserError(f"{export.path} has no expert packs: {moe_mode} execution needs an export with them")
        if moe_mode == "gathered" and self.moe is not None and not any(r.kind == fmt.GATHER for r in self.moe.roles):
            raise UserError(f"{export.path} has no gather programs: export it with --moe-mode gathered")
        self.moe_mode = moe_mode or (self.moe.mode if self.moe else "dense")
        self._stacks: dict[tuple[int, str], np.ndarray] = {}  # gathered mode: memory-mapped expert weights
        self.calls = 0  # programs run so far (what a decoded token costs: see ``export.plan.Estimate``)

    def _read_mask_widths(self) -> dict[str, int]:
        """Each chunk function's causal_mask width as its program declares it (the context, for
        exports without that information)."""
        widths = {}
        for f in fmt.chunk_functions(self.meta.batch, rotate=self.meta.window is not None):
            shape = self.runner.input_shape(str(self.export.chunks[0]), f.name, fmt.CAUSAL_MASK)
            widths[f.name] = int(shape[-1]) if shape else self.context_length
        return widths

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer files copied into the export (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_folder(self.export.path)
        return self._tokenizer

    def reset(self) -> None:
        self.runner.reset_state()
        self.position = 0

    def rewind(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind to {position}: the state holds {self.position} tokens")
        self.position = position

    def _layers(self, hidden: np.ndarray, start: int, tokens: int, kind: str) -> np.ndarray:
        function = fmt.host_function(kind, start, tokens, self.meta.window)
        width = self._mask_width.get(function, self.context_length)
        inputs: dict[str, np.ndarray] = {
            fmt.POSITION_IDS: np.arange(start, start + tokens, dtype=np.int32),
            fmt.CAUSAL_MASK: fmt.causal_mask(start, tokens, width).astype(np.float16),
            fmt.CURRENT_POS: np.array([start], dtype=np.int32),
        }
        if self.moe is not None:
            return self._moe_layers(hidden, function, inputs)
        for chunk in self.export.chunks:
            out = self._run(chunk, function, {fmt.HIDDEN_STATES: hidden, **inputs})
            hidden = out[fmt.OUTPUT_HIDDEN_STATES]
        return hidden

    def _run(self, program, function: str | None, inputs: dict[str, np.ndarray], stateful: bool = True) -> dict:
        self.calls += 1
        if stateful:
            return self.runner.run(str(program), function, inputs)
        return self.runner.run(str(program), function, inputs, stateful=False)

    def _moe_layers(self, hidden: np.ndarray, function: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Chunks by their roles (``format.ChunkRole``), as ``format`` describes the chain: an
        attention part gives the residual h, the router's weights (and the shared branch, and the
        sum of the experts riding in it); each expert pack called (in routed mode only those
        holding an expert of nonzero weight for some token) adds its experts to the running sum
        and finishes the layer; the output of the last program called is the layer's.  Gathered
        mode decodes a token through the layer's gather program instead of its packs, passing it
        the chosen experts' weights (prefills run as routed)."""
        assert self.moe is not None
        gathering = self.moe_mode == "gathered" and function == fmt.INFER
        layer: dict[str, np.ndarray] = {}  # the current layer's inputs to its packs
        weights = np.zeros(0, dtype=np.float16)
        use_packs = True
        for chunk, role in zip(self.export.chunks, self.moe.roles):
            if role.kind == fmt.EXPERTS:
                assert role.experts is not None
                mine = weights[..., role.experts.start : role.experts.stop]
                if use_packs and (self.moe_mode == "dense" or np.any(mine != 0)):
                    out = self._run(chunk, function, layer, stateful=False)
                    hidden = out[fmt.OUTPUT_HIDDEN_STATES]
                    layer[fmt.EXPERT_SUM_IN] = np.asarray(out[fmt.EXPERT_SUM], dtype=np.float16)
            elif role.kind == fmt.GATHER:
                if not use_packs:
                    out = self._run(chunk, None, self._gather(role.layers.start, layer, weights), stateful=False)
                    hidden = out[fmt.OUTPUT_HIDDEN_STATES]
            else:
                out = self._run(chunk, function, {fmt.HIDDEN_STATES: hidden, **inputs})
                hidden = out[fmt.OUTPUT_HIDDEN_STATES]
                if role.kind != fmt.ATTENTION:
                    continue
                weights = np.asarray(out[fmt.EXPERT_WEIGHTS], dtype=np.float16)
                h = np.asarray(out[fmt.MOE_RESIDUAL], dtype=np.float16)
                layer = {fmt.HIDDEN_STATES: h, fmt.EXPERT_WEIGHTS: weights}
                if fmt.MOE_SHARED in out:
                    layer[fmt.MOE_SHARED] = np.asarray(out[fmt.MOE_SHARED], dtype=np.float16)
                layer[fmt.EXPERT_SUM_IN] = np.asarray(out.get(fmt.EXPERT_SUM, np.zeros_like(h)), dtype=np.float16)
                # ties at the k-th router logit choose more than k experts: those run through the packs
                use_packs = not gathering or int(np.count_nonzero(weights)) > self.moe.top_k
        return hidden

    def _gather(self, layer: int, inputs: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
        """The gather program's inputs for one token: the residual (and shared branch) from
        ``inputs``, and the chosen experts' weights (padded with expert 0 at weight zero when
        fewer than k are chosen) from the export's stacked files."""
        assert self.moe is not None
        k = self.moe.top_k
        row = weights.reshape(-1)
        ids = np.flatnonzero(row)
        ids = np.concatenate([ids, np.zeros(k - len(ids), dtype=ids.dtype)])
        chosen = np.where(np.arange(k) < np.count_nonzero(row), row[ids], 0).astype(np.float16)
        out = {key: inputs[key] for key in (fmt.HIDDEN_STATES, fmt.MOE_SHARED) if key in inputs}
        out[fmt.EXPERT_WEIGHTS] = chosen.reshape(1, 1, k)
        for name, key in (("gate", fmt.EXPERTS_GATE), ("up", fmt.EXPERTS_UP), ("down", fmt.EXPERTS_DOWN)):
            out[key] = np.ascontiguousarray(self._expert_stack(layer, name)[ids])
        return out

    def _expert_stack(self, layer: int, name: str) -> np.ndarray:
        key = (layer, name)
        if key not in self._stacks:
            path = self.export.path / fmt.expert_file(self.meta.prefix, layer, name)
            if not path.is_file():
                raise UserError(f"{self.export.path} lacks {path.name}: gathered mode needs an export made with --moe-mode gathered")
            self._stacks[key] = np.load(path, mmap_mode="r")
        return self._stacks[key]

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        """Every LM-head program's pieces, in the order of their ``logitsN`` names."""
        out: dict[str, np.ndarray] = {}
        for program in self.export.lm_head:
            out.update(self._run(program, None, {fmt.HIDDEN_STATES: hidden.astype(np.float16)}))
        return np.concatenate([np.asarray(out[k], dtype=np.float32).reshape(-1) for k in fmt.logits_pieces(list(out))])

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """The embeddings of ``ids``: a split table's programs each give their own rows and zeros
        elsewhere, so their sum (exact: one term is non-zero) is the table's lookup; where meta.yaml
        records each program's rows, only those holding some of the ids are called (a decoded
        token calls one)."""
        programs = self.export.embeddings
        rows = self.meta.embeddings_rows
        if rows is not None and len(rows) == len(programs):  # only the programs holding these ids
            programs = [p for p, r in zip(programs, rows) if np.any((ids >= r.start) & (ids < r.stop))] or programs[:1]
        parts = [self._run(p, None, {fmt.INPUT_IDS: ids})[fmt.HIDDEN_STATES] for p in programs]
        return parts[0] if len(parts) == 1 else np.asarray(np.sum(parts, axis=0, dtype=np.float16))

    def _batch_fits(self, remaining: int) -> bool:
        """Whether the next tokens go through one ``prefill`` batch at the current position."""
        batch, pos = self.meta.batch, self.position
        if pos + batch > self.context_length or fmt.straddles(pos, batch, self.meta.window):
            return False
        if pos % batch == 0:
            return True
        return remaining >= PREFILL_MIN and self.meta.prefill_dynamic_slice

    def _infer(self, token: int) -> np.ndarray:
        """Hidden state (1, 1, H) after one token at the current position."""
        hidden = self._embed(np.array([[token]], dtype=np.int32))
        hidden = self._layers(hidden, self.position, 1, fmt.INFER)
        self.position += 1
        return hidden

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (vocab,) after ``token_ids`` fed at the current position (see the module docstring)."""
        ids = list(token_ids)
        batch = self.meta.batch
        if not ids:
            raise UserError("cannot prefill an empty prompt")
        if self.position + len(ids) > self.context_length:
            raise UserError(
                f"{self.position + len(ids)} tokens do not fit the export's context of {self.context_length}"
            )
        last: np.ndarray | None = None
        done = 0
        while done < len(ids):
            if self._batch_fits(len(ids) - done):
                piece = ids[done : done + batch]
                padded = np.zeros((1, batch), dtype=np.int32)
                padded[0, : len(piece)] = piece
                hidden = self._layers(self._embed(padded), self.position, batch, fmt.PREFILL)
                rows = hidden.shape[1]
                last = hidden[:, len(piece) - 1 : len(piece), :] if fmt.returns_batch(rows, batch) else None
                self.position += len(piece)
                done += len(piece)
            else:
                last = self._infer(ids[done])
                done += 1
        if last is None:  # ANEMLL's placeholder: the last token again, through infer
            self.position -= 1
            last = self._infer(ids[-1])
        return self._logits(last)

    def decode(self, token_id: int) -> np.ndarray:
        """Logits (vocab,) after feeding one token at the next position."""
        if self.position >= self.context_length:
            raise UserError(f"the export's context of {self.context_length} tokens is full")
        return self._logits(self._infer(token_id))

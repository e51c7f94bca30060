"""Calibration statistics for sensitivity-weighted LUT fits: E[x_j^2] of every LUT target's inputs.

A Linear ``y = x W^T`` whose weight is off by ``dW`` is off by ``x dW^T`` in its output.  Averaged
over inputs, and keeping only the diagonal of the input covariance (the proxy GPTQ/AWQ-style and
SqueezeLLM-style methods use), the squared output error is ``sum_ij E[x_j^2] dW_ij^2``: an error in
a column whose input feature is large costs more.  ``quant.lut.fit_lut(..., importance=...)``
weights each element's squared error by its column's E[x_j^2], which this module measures.  It
also keeps the whole second moment E[x x^T] of every input up to ``FULL_MOMENT_WIDTH`` features,
with which ``quant.compensate`` then reassigns the fitted indices so that rounding errors of
correlated columns cancel in the output (GPTQ's sweep; wider inputs keep the weighted fit alone).

The statistics come from the model's own forward on MLX in float32: ``MomentOps`` is the MLX backend
with every ``linear`` recording the mean square of its input per feature, so whatever a family's
blocks feed their projections is what is measured, with no hook into anything but the op
vocabulary.  The LM head's input is the final norm's output, recorded the same way; embedding
tables are lookups, have no input activations, and stay unweighted.

What is run: the built-in calibration prompts (``data/calibration.jsonl``, through the chat
template, each continued by a few greedy tokens so the model's own answers are measured too), or
the user's files: ``.txt`` (the whole file as plain text) and ``.jsonl`` (``"text"``: plain text;
``"prompt"``: chat-templated and continued like the built-in prompts; ``"messages"``: a whole
conversation, a list of ``{"role", "content"}``, rendered by the chat template as it stands).  Long texts are cut into
segments of at most ``SEGMENT`` tokens, each run from position 0.  Never the eval prompts
(``data/prompts.jsonl``): what ``compare`` measures must not be what the fit saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import interrupts
from ..errors import BadArgumentError
from ..loading import LoadedModel
from ..loading.tokenizer import Tokenizer
from ..models.base import DecoderModel
from ..ops.mlx_ops import MLXOps
from ..ops.vocabulary import Embedding, Linear
from ..quant.lut import InputStats
from .run import _cast, calibration_prompts

SEGMENT = 512  # tokens per forward: bounds the attention scores and the activations held at once
DEFAULT_CONTINUATION = 32  # greedy tokens after each chat prompt
SUFFIXES = (".txt", ".jsonl")
BUILT_IN = "built-in calibration prompts"

Progress = Callable[[str, int, int], None]  # (stage, samples done, samples total)


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration text: ``chat`` ones go through the chat template and are continued greedily;
    ``messages`` (a conversation, as (role, content) pairs) is rendered whole and not continued."""

    text: str
    chat: bool
    messages: tuple[tuple[str, str], ...] | None = None

    def ids(self, tokenizer: Tokenizer) -> list[int]:
        """The sample's token ids, before any continuation."""
        if self.messages is not None:
            return tokenizer.encode_messages([{"role": r, "content": c} for r, c in self.messages])
        return tokenizer.encode_prompt(self.text, self.chat)


@dataclass
class CalibrationSet:
    """What the calibration pass runs, and how meta.yaml names it."""

    samples: list[CalibrationSample]
    source: str


def calibration_set(files: list[Path] | None = None) -> CalibrationSet:
    """The built-in prompts (no files), or every sample of ``files`` in order; bad files raise
    ``BadArgumentError`` naming the file (and line), so the CLI can check them before loading."""
    if not files:
        return CalibrationSet([CalibrationSample(p, chat=True) for p in calibration_prompts()], BUILT_IN)
    return CalibrationSet(read_samples(files), ", ".join(str(p) for p in files))


def read_samples(files: list[Path], noun: str = "calibration file") -> list[CalibrationSample]:
    """Every sample of ``files`` in order (the reader other text-driven passes share: the KD cache's
    ``--data``); ``noun`` names the files in the one-line errors."""
    samples: list[CalibrationSample] = []
    for path in map(Path, files):
        samples += _read_file(path, noun)
    return samples


def _read_file(path: Path, noun: str = "calibration file") -> list[CalibrationSample]:
    if not path.is_file():
        raise BadArgumentError(f"{noun} not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise BadArgumentError(
            f'{noun} {path} must be .txt (plain text) or .jsonl ("text", "prompt" or "messages" per line)'
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadArgumentError(f"{noun} {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".txt":
        samples = [CalibrationSample(text, chat=False)] if text.strip() else []
    else:
        samples = [s for n, line in enumerate(text.splitlines(), 1) if (s := _jsonl_sample(line, path, n))]
    if not samples:
        raise BadArgumentError(f"{noun} {path} holds no text")
    return samples


def _jsonl_sample(line: str, path: Path, number: int) -> CalibrationSample | None:
    """One JSONL line: ``{"text": ...}`` (plain), ``{"prompt": ...}`` (chat) or ``{"messages":
    [{"role": ..., "content": ...}, ...]}`` (a conversation); None when blank."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict):
        for key, chat in (("text", False), ("prompt", True)):
            value = record.get(key)
            if isinstance(value, str) and value.strip():
                return CalibrationSample(value, chat)
        if "messages" in record:
            return CalibrationSample("", chat=True, messages=_messages(record["messages"], path, number))
    raise BadArgumentError(
        f'{path} line {number}: expected a JSON object with a non-empty "text" or "prompt" string or a "messages" list'
    )


def _messages(value: object, path: Path, number: int) -> tuple[tuple[str, str], ...]:
    """A chat record's messages as (role, content) pairs: hashable, and checked here so that a bad
    record is named by its line before any model loads."""
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok or not isinstance(value, list):
        raise BadArgumentError(
            f'{path} line {number}: "messages" must be a non-empty list of {{"role": str, "content": str}} objects'
        )
    return tuple((m["role"], m["content"]) for m in value)


# The widest input whose whole second moment is kept: (width x width) float32 per LUT target
# (SmolLM2-135M: 211 targets, 520 MB; a 16384-wide down_proj would take 1 GB on its own).
FULL_MOMENT_WIDTH = 4096


@dataclass
class InputMoments:
    """Mean square of each input feature of each LUT target, over ``tokens`` calibration positions,
    and for inputs up to ``FULL_MOMENT_WIDTH`` wide the whole second moment E[x x^T].

    Keyed like ``DecoderModel.lut_targets``: (part, name).  ``importance`` is what
    ``fit_lut(..., importance=...)`` takes, ``second_moment`` its ``second_moment``; a target
    without moments (the embeddings) gets None.
    """

    moments: dict[tuple[str, str], np.ndarray]
    tokens: int
    source: str
    full: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def importance(self, part: str, name: str) -> np.ndarray | None:
        return self.moments.get((part, name))

    def second_moment(self, part: str, name: str) -> np.ndarray | None:
        return self.full.get((part, name))

    def stats(self, part: str, name: str) -> InputStats:
        """(importance, second moment) of one target: ``fit_lut``'s ``importance`` and ``second_moment``."""
        return self.importance(part, name), self.second_moment(part, name)


class MomentOps(MLXOps):
    """The MLX backend, summing x x^T (or, past ``full_width`` features, x^2 per feature) at every
    ``linear`` and at the LM head.

    Sums are float32 MLX arrays per holder, evaluated once per forward (``settle``) so the graph
    stays one forward long; ``rows`` counts the positions each holder saw.
    """

    def __init__(self, full_width: int = FULL_MOMENT_WIDTH) -> None:
        super().__init__()
        self.full_width = full_width
        self.sums: dict[int, mx.array] = {}
        self.rows: dict[int, int] = {}

    def _record(self, holder: Linear | Embedding, x: mx.array) -> None:
        flat = x.astype(mx.float32).reshape(-1, x.shape[-1])
        key = id(holder)
        if flat.shape[1] <= self.full_width:
            moment = flat.T @ flat
        else:
            moment = mx.sum(flat * flat, axis=0)
        self.sums[key] = moment if key not in self.sums else self.sums[key] + moment
        self.rows[key] = self.rows.get(key, 0) + flat.shape[0]

    def linear(self, x: mx.array, layer: Linear) -> mx.array:
        self._record(layer, x)
        return super().linear(x, layer)

    def head_input(self, head: Linear | Embedding, x: mx.array) -> None:
        """Record what the LM head reads (its logits are not needed for the statistics)."""
        self._record(head, x)

    def settle(self) -> None:
        mx.eval(list(self.sums.values()))

    def moment(self, holder: Linear | Embedding) -> np.ndarray | None:
        """E[x x^T] (width x width, float32), or E[x^2] per feature for a wider input."""
        key = id(holder)
        if key not in self.sums:
            return None
        return (np.array(self.sums[key]) / np.float32(self.rows[key])).astype(np.float32)


def collect_input_moments(
    lm: LoadedModel,
    calibration: CalibrationSet,
    continuation: int = DEFAULT_CONTINUATION,
    progress: Progress | None = None,
    full_width: int = FULL_MOMENT_WIDTH,
) -> InputMoments:
    """Run ``calibration`` through ``lm`` in float32 and return E[x^2] per input feature of every
    Linear LUT target and of the LM head, and E[x x^T] of inputs up to ``full_width`` wide (0: none,
    so the fits are weighted but not compensated).  The model's weights are put back as found (a
    lazily loaded model has then been read whole)."""
    model = lm.model
    original = model.parameters()
    ops = MomentOps(full_width)
    tokens = 0
    try:
        _cast(model, original, mx.float32)
        for i, sample in enumerate(calibration.samples):
            interrupts.check()
            ids = _sample_ids(lm, sample, continuation)
            for segment in _segments(ids, min(SEGMENT, model.args.max_position_embeddings)):
                _record_segment(model, segment, ops)
                tokens += len(segment)
            if progress is not None:
                progress("calibration", i + 1, len(calibration.samples))
    finally:
        model.update(original)
    moments, full = {}, {}
    for target in model.lut_targets():
        found = ops.moment(target.holder) if target.part != "embeddings" else None
        if found is None:
            continue
        key = (target.part, target.name)
        if found.ndim == 2:
            full[key] = found
            found = np.diag(found)
        moments[key] = found.astype(np.float64)
    return InputMoments(moments, tokens, calibration.source, full)


def _sample_ids(lm: LoadedModel, sample: CalibrationSample, continuation: int) -> list[int]:
    """The sample's ids; a chat sample continued by up to ``continuation`` greedy tokens (through
    an EOS), so the statistics see the model's own answers as well as the prompt."""
    ids = sample.ids(lm.tokenizer)
    if not ids:
        raise BadArgumentError(f"the calibration text {sample.text[:40]!r} encodes to no tokens")
    if not sample.chat or sample.messages is not None or continuation <= 0:
        return ids
    context = lm.model.args.max_position_embeddings
    ids = ids[: max(1, context - continuation)]  # a prompt too long for the context still calibrates, cut
    model, ops = lm.model, MLXOps()
    cache = model.make_cache(len(ids) + continuation)
    logits = model(mx.array(ids)[None], cache, 0, ops=ops, last_only=True)
    for _ in range(continuation):
        ids.append(int(np.array(mx.argmax(logits[0, -1]))))
        if ids[-1] in lm.tokenizer.eos_token_ids or len(ids) == cache.context:
            break
        logits = model(mx.array(ids[-1:])[None], cache, len(ids) - 1, ops=ops)
    return ids


def _segments(ids: list[int], length: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), length):
        yield ids[start : start + length]


def _record_segment(model: DecoderModel, ids: list[int], ops: MomentOps) -> None:
    """One forward over ``ids`` from position 0: the model's own pieces, as ``DecoderModel.__call__``
    chains them, up to the LM head's input (its logits would cost a vocabulary-sized product)."""
    cache = model.make_cache(len(ids))
    h = model.embed(ops, mx.array(ids)[None])
    h = model.forward_layers(ops, h, model.mlx_step(0, len(ids), cache))
    ops.head_input(model.head, model.final_norm(ops, h))
    ops.settle()

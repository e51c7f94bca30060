"""Text generation over any driver (mlx, mil, coreml): sampling, the decode loop, speed figures.

One loop serves ``generate``, ``chat`` and ``serve``.  A driver feeds tokens and returns logits
(``runtime.base.Driver``); the loop samples, stops at the tokenizer's EOS ids and at the context,
and streams.  The MLX reference keeps an asynchronous fast path: the next step is queued
(``mx.async_eval``) before the current token is read back, as mlx-lm does, so sampling happens in
MLX and the host never waits between steps; every other driver (and MLX with a repetition penalty,
which needs each token back before the next step) returns numpy logits sampled with numpy.

A ``Session`` keeps what a driver's KV state holds between calls, so a chat turn or a server
request that extends the previous conversation prefills only the tokens past the shared prefix.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import numpy as np

from . import format as fmt
from . import interrupts
from .errors import BadArgumentError
from .runtime.base import last_logits
from .runtime.drivers import MLXDriver

PREFILL_STEP = 2048  # tokens per MLX prefill call: bounds the (T, T) mask and activations
REPETITION_WINDOW = 20  # tokens a repetition penalty looks back over (mlx-lm's default)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temp`` 0, else sampling from the ``top_k`` most
    likely tokens (0: all) cut to the nucleus of mass ``top_p``.  ``repetition_penalty`` > 1 makes
    the tokens of the last ``REPETITION_WINDOW`` less likely (positive logits divided by it,
    negative ones multiplied), as Hugging Face and mlx-lm do; it applies to greedy decoding too."""

    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0

    def check(self) -> None:
        if not self.temp >= 0:
            raise BadArgumentError(f"--temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise BadArgumentError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BadArgumentError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise BadArgumentError(f"--repetition-penalty must be > 0 (1: none), got {self.repetition_penalty}")

    @classmethod
    def choose(
        cls,
        recommended: fmt.RecommendedSampling | None = None,
        *,
        temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ) -> Sampling:
        """What the user gave, else what the export's meta.yaml recommends, else the defaults."""
        rec = recommended or fmt.RecommendedSampling()

        def pick(given, suggested, default):
            return given if given is not None else suggested if suggested is not None else default

        return cls(
            temp=float(pick(temp, rec.temperature, 0.0)),
            top_p=float(pick(top_p, rec.top_p, 1.0)),
            seed=seed,
            top_k=int(pick(top_k, rec.top_k, 0)),
            repetition_penalty=float(pick(repetition_penalty, None, 1.0)),
        )


def recommended_sampling(driver: Any) -> fmt.RecommendedSampling:
    """The sampling an export's meta.yaml recommends (nothing for the MLX reference)."""
    meta = getattr(driver, "meta", None)
    return fmt.recommended_sampling(meta) if isinstance(meta, fmt.ExportMeta) else fmt.RecommendedSampling()


def sample_mx(logits: mx.array, s: Sampling) -> mx.array:
    """Next token from the last-position logits (vocab,) on MLX (no repetition penalty here)."""
    if s.temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / s.temp
    if s.top_p < 1.0 or s.top_k:
        order = mx.argsort(-logits)
        sorted_logits = logits[order]
        if s.top_k:
            sorted_logits = mx.where(mx.arange(sorted_logits.shape[0]) < s.top_k, sorted_logits, -mx.inf)
        if s.top_p < 1.0:
            probs = mx.softmax(sorted_logits)
            keep = (mx.cumsum(probs) - probs) < s.top_p  # the smallest set whose mass reaches top_p
            sorted_logits = mx.where(keep, sorted_logits, -mx.inf)
        return order[mx.random.categorical(sorted_logits)]
    return mx.random.categorical(logits)


def penalize(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """``logits`` with the tokens of the last ``REPETITION_WINDOW`` of ``history`` penalized."""
    out = np.array(logits, dtype=np.float64)
    if penalty == 1.0 or not history:
        return out
    ids = np.unique(np.asarray(history[-REPETITION_WINDOW:], dtype=np.int64))
    values = out[ids]
    out[ids] = np.where(values < 0, values * penalty, values / penalty)
    return out


def sample_np(logits: np.ndarray, s: Sampling, rng: np.random.Generator, history: Sequence[int] = ()) -> int:
    """Next token from numpy logits (vocab,): the same rule as ``sample_mx``, plus the penalty."""
    scores = penalize(logits, history, s.repetition_penalty)
    if s.temp == 0:
        return int(np.argmax(scores))
    scaled = scores / s.temp
    order = np.argsort(-scaled, kind="stable")
    if s.top_k:
        order = order[: s.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if s.top_p < 1.0:
        keep = (np.cumsum(probs) - probs) < s.top_p
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return int(order[rng.choice(len(probs), p=probs)])


# --- what the KV state holds -------------------------------------------------------------------


class Session:
    """A resumable driver (``runtime.base.ResumableDriver``) and the token ids its KV state holds.

    ``resume(prompt_ids)`` rewinds the driver to the longest prefix of the new prompt it already
    holds, so only the rest is prefilled: a chat's new turn, or a server request whose messages
    extend the previous one's.  Re-rendering the whole conversation through the chat template and
    comparing ids (rather than appending a rendered turn) keeps this right for any template; where
    the answer re-tokenizes differently the shared prefix just ends there.
    """

    def __init__(self, driver: Any):
        self.driver = driver
        self.ids: list[int] = []  # fed, or about to be: what is held is ids[: driver.position]
        self.prefilled = 0  # tokens the last resume left to prefill
        driver.reset()  # the MLX driver: a cache over its whole context

    def reset(self) -> None:
        self.driver.reset()
        self.ids = []

    @property
    def held(self) -> list[int]:
        return self.ids[: self.driver.position]

    def resume(self, prompt_ids: Sequence[int]) -> int:
        """Rewind to the shared prefix (at most all but the last prompt token, whose logits start
        the answer); returns its length.  ``prefilled`` is what remains to run."""
        held, prompt = self.held, list(prompt_ids)
        limit = min(len(held), len(prompt) - 1)
        shared = 0
        while shared < limit and held[shared] == prompt[shared]:
            shared += 1
        self.driver.rewind(shared)
        self.ids = prompt
        self.prefilled = len(prompt) - shared
        return shared


# --- the loop ----------------------------------------------------------------------------------


def room(driver: Any, prompt_tokens: int) -> int:
    """Tokens that can follow a prompt in the driver's context (the last one is never fed back)."""
    return driver.context_length - prompt_tokens + 1


def check_prompt(driver: Any, prompt_ids: Sequence[int]) -> None:
    if len(prompt_ids) == 0:
        raise BadArgumentError("the prompt encodes to no tokens")
    if len(prompt_ids) > driver.context_length:
        raise BadArgumentError(
            f"the prompt has {len(prompt_ids)} tokens, more than the context of {driver.context_length}"
        )


def generate_tokens(
    driver: Any,
    prompt_ids: Sequence[int],
    max_tokens: int,
    sampling: Sampling = Sampling(),
    session: Session | None = None,
) -> Iterator[tuple[int, float]]:
    """Yield (token, seconds since start) for up to ``max_tokens`` tokens after ``prompt_ids``, fewer
    where the context ends first; stops after an EOS id.  Without a ``session`` the driver starts
    from a reset state; with one it continues from what the session holds.  The driver ends where
    generation stopped."""
    sampling.check()
    check_prompt(driver, prompt_ids)
    max_tokens = min(max_tokens, room(driver, len(prompt_ids)))
    stop = driver.tokenizer.eos_token_ids
    if session is not None:
        start = session.resume(prompt_ids)
    elif isinstance(driver, MLXDriver):  # a cache as long as this generation needs, no longer
        driver.reset(len(prompt_ids) + max_tokens)
        start = 0
    else:
        driver.reset()
        start = 0
    fast = isinstance(driver, MLXDriver) and sampling.repetition_penalty == 1.0
    steps = _mlx_steps if fast else _driver_steps
    begin = time.perf_counter()
    for token in steps(driver, list(prompt_ids), start, max_tokens, sampling):
        if session is not None:
            session.ids.append(token)
        yield token, time.perf_counter() - begin
        if token in stop:
            return


def _driver_steps(driver: Any, prompt_ids: list[int], start: int, max_tokens: int, sampling: Sampling) -> Iterator[int]:
    """Any driver: prefill what the state does not hold yet, then one decode per token, sampled on the host."""
    rng = np.random.default_rng(sampling.seed)
    history = list(prompt_ids)
    logits = last_logits(driver.prefill(prompt_ids[start:]), driver.vocab_size, driver.name)
    for n in range(max_tokens):
        interrupts.check()
        token = sample_np(logits, sampling, rng, history)
        history.append(token)
        yield token
        if n + 1 < max_tokens:
            logits = last_logits(driver.decode(token), driver.vocab_size, driver.name)


def _mlx_steps(driver: MLXDriver, prompt_ids: list[int], start: int, max_tokens: int, sampling: Sampling) -> Iterator[int]:
    """The MLX reference, pipelined: step n + 1 is queued before token n is read back."""
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    model, cache = driver.lm.model, driver.cache

    def step(ids: list[int] | mx.array, at: int) -> mx.array:
        logits = model(mx.array(ids).reshape(1, -1), cache, at, last_only=True)
        return sample_mx(logits[0, -1], sampling)

    pos = start
    while len(prompt_ids) - pos > PREFILL_STEP:  # long prompts: fill the cache in slices
        model(mx.array(prompt_ids[pos : pos + PREFILL_STEP])[None], cache, pos)
        mx.eval(cache.state)
        pos += PREFILL_STEP
        driver.position = pos
    token = step(prompt_ids[pos:], pos)
    mx.async_eval(token)
    pos = len(prompt_ids)
    driver.position = pos
    for n in range(max_tokens):
        interrupts.check()
        if n + 1 < max_tokens:
            following = step(token, pos)
            mx.async_eval(following)
            pos += 1
        driver.position = pos
        yield cast(int, token.item())
        if n + 1 < max_tokens:
            token = following


# --- text ----------------------------------------------------------------------------------------


class StopStrings:
    """Cuts streamed text at the first of ``stops`` and never lets part of one out: the end of the
    text that could still grow into a stop string is held back until it cannot."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything fed, cut at a stop string once one is found
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; returns the text that is now safe to emit."""
        if self.hit:
            return ""
        self.text += piece
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            self.text = self.text[: min(found)]
            return self.flush()
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent : len(self.text) - hold]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max tokens or the context), "interrupted", "cancelled"
    prefilled_tokens: int = 0  # prompt tokens run this time (fewer than prompt_tokens when a prefix was reused)
    ttft: float = 0.0  # seconds to the first token
    context_full: bool = False  # generation ended because the context has no room left
    timings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
        }


def generate_ids(
    driver: Any,
    prompt_ids: Sequence[int],
    max_tokens: int = 256,
    sampling: Sampling = Sampling(),
    on_text: Callable[[str], None] | None = None,
    *,
    stop: Sequence[str] = (),
    session: Session | None = None,
    cancelled: Callable[[], bool] | None = None,
    stop_on_interrupt: bool = False,
) -> GenerationResult:
    """Generate after ``prompt_ids``, streaming text pieces to ``on_text`` as they decode.

    ``stop`` strings end the text (not included, never partly emitted).  ``cancelled()`` is asked
    after every token (a server's client went away).  With ``stop_on_interrupt`` Ctrl-C ends this
    answer and returns what was generated (a chat goes on); SIGTERM still propagates.
    """
    from .loading.tokenizer import StreamingDetokenizer

    tokenizer = driver.tokenizer
    eos = tokenizer.eos_token_ids
    mx.reset_peak_memory()
    detok = StreamingDetokenizer(tokenizer)
    stops = StopStrings(stop)
    tokens: list[int] = []
    first = last = 0.0
    finish = "length"

    def emit(piece: str) -> None:
        if on_text and piece:
            on_text(piece)

    begin = time.perf_counter()
    try:
        for token, t in generate_tokens(driver, prompt_ids, max_tokens, sampling, session):
            if not tokens:
                first = t
            last = t
            tokens.append(token)
            if token in eos:
                finish = "stop"
                break
            emit(stops.feed(detok.add(token)))
            if stops.hit:
                finish = "stop"
                break
            if cancelled is not None and cancelled():
                finish = "cancelled"
                break
    except interrupts.Interrupted as e:
        if not stop_on_interrupt or e.signum != signal.SIGINT:
            raise
        interrupts.clear()
        finish = "interrupted"
        last = time.perf_counter() - begin
    text_ids = tokens[:-1] if tokens and tokens[-1] in eos else tokens
    full = tokenizer.decode(text_ids)
    if not stops.hit:  # a held-back incomplete character, and the text held back for stop strings
        emit(stops.feed(full[len(detok.emitted) :]))
        emit(stops.flush())
        if stops.hit:
            finish = "stop"
    decode_steps = len(tokens) - 1
    prefilled = session.prefilled if session is not None else len(prompt_ids)
    return GenerationResult(
        text=stops.text,
        tokens=tokens,
        prompt_tokens=len(prompt_ids),
        prompt_tps=prefilled / first if first > 0 else 0.0,
        generation_tps=decode_steps / (last - first) if decode_steps > 0 and last > first else 0.0,
        peak_memory_gb=_peak_memory_gb(driver),
        finish_reason=finish,
        prefilled_tokens=prefilled,
        ttft=first,
        context_full=finish == "length" and len(tokens) >= room(driver, len(prompt_ids)),
    )


def generate(
    driver: Any,
    prompt: str,
    max_tokens: int = 256,
    sampling: Sampling = Sampling(),
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate a completion of ``prompt`` (chat-templated unless ``chat`` is False)."""
    return generate_ids(driver, driver.tokenizer.encode_prompt(prompt, chat), max_tokens, sampling, on_text)


def _peak_memory_gb(driver: Any) -> float:
    """MLX's peak for the MLX reference; the process's peak resident set for the others."""
    if isinstance(driver, MLXDriver):
        return mx.get_peak_memory() / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux

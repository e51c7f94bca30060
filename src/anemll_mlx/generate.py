"""Text generation over any driver (mlx, mil, coreml): sampling, the decode loop, speed figures.

One loop serves ``generate`` and the commands built on it.  A driver feeds tokens and returns
logits (``runtime.base.Driver``); the loop samples, stops at the tokenizer's EOS ids, and streams.
The MLX reference keeps an asynchronous fast path: the next step is queued (``mx.async_eval``)
before the current token is read back, as mlx-lm does, so sampling happens in MLX and the host
never waits between steps; every other driver returns numpy logits and is sampled with numpy.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import numpy as np

from . import interrupts
from .errors import BadArgumentError
from .runtime.base import last_logits
from .runtime.drivers import MLXDriver

PREFILL_STEP = 2048  # tokens per MLX prefill call: bounds the (T, T) mask and activations


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temp`` 0, else nucleus sampling over ``top_p``."""

    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.temp < 0:
            raise BadArgumentError(f"--temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise BadArgumentError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_mx(logits: mx.array, s: Sampling) -> mx.array:
    """Next token from the last-position logits (vocab,) on MLX."""
    if s.temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / s.temp
    if s.top_p < 1.0:
        order = mx.argsort(-logits)
        sorted_logits = logits[order]
        probs = mx.softmax(sorted_logits)
        keep = (mx.cumsum(probs) - probs) < s.top_p  # the smallest set whose mass reaches top_p
        sorted_logits = mx.where(keep, sorted_logits, -mx.inf)
        return order[mx.random.categorical(sorted_logits)]
    return mx.random.categorical(logits)


def sample_np(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """Next token from numpy logits (vocab,): the same rule as ``sample_mx``."""
    if s.temp == 0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / s.temp
    order = np.argsort(-scaled, kind="stable")
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if s.top_p < 1.0:
        keep = (np.cumsum(probs) - probs) < s.top_p
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return int(order[rng.choice(len(probs), p=probs)])


def generate_tokens(
    driver: Any, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling()
) -> Iterator[tuple[int, float]]:
    """Yield (token, seconds since start) for up to ``max_tokens`` tokens after ``prompt_ids``;
    stops after an EOS id.  The driver starts from a reset state and ends where generation stopped."""
    sampling.check()
    if len(prompt_ids) == 0:
        raise BadArgumentError("the prompt encodes to no tokens")
    if len(prompt_ids) + max_tokens > driver.context_length:
        raise BadArgumentError(
            f"prompt ({len(prompt_ids)} tokens) + --max-tokens {max_tokens} exceeds the context {driver.context_length}"
        )
    stop = driver.tokenizer.eos_token_ids
    if isinstance(driver, MLXDriver):  # a cache as long as this generation needs, no longer
        driver.reset(len(prompt_ids) + max_tokens)
        steps = _mlx_steps
    else:
        driver.reset()
        steps = _driver_steps
    start = time.perf_counter()
    for token in steps(driver, list(prompt_ids), max_tokens, sampling):
        yield token, time.perf_counter() - start
        if token in stop:
            return


def _driver_steps(driver: Any, prompt_ids: list[int], max_tokens: int, sampling: Sampling) -> Iterator[int]:
    """Any driver: prefill, then one decode per token, sampled on the host."""
    rng = np.random.default_rng(sampling.seed)
    logits = last_logits(driver.prefill(prompt_ids), driver.vocab_size, driver.name)
    for n in range(max_tokens):
        interrupts.check()
        token = sample_np(logits, sampling, rng)
        yield token
        if n + 1 < max_tokens:
            logits = last_logits(driver.decode(token), driver.vocab_size, driver.name)


def _mlx_steps(driver: MLXDriver, prompt_ids: list[int], max_tokens: int, sampling: Sampling) -> Iterator[int]:
    """The MLX reference, pipelined: step n + 1 is queued before token n is read back."""
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    model, cache = driver.lm.model, driver.cache

    def step(ids: list[int] | mx.array, start: int) -> mx.array:
        logits = model(mx.array(ids).reshape(1, -1), cache, start, last_only=True)
        return sample_mx(logits[0, -1], sampling)

    pos = 0
    while len(prompt_ids) - pos > PREFILL_STEP:  # long prompts: fill the cache in slices
        model(mx.array(prompt_ids[pos : pos + PREFILL_STEP])[None], cache, pos)
        mx.eval(cache.state)
        pos += PREFILL_STEP
    token = step(prompt_ids[pos:], pos)
    mx.async_eval(token)
    pos = len(prompt_ids)
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


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str  # "stop" (EOS) or "length"
    timings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
        }


def generate(
    driver: Any,
    prompt: str,
    max_tokens: int = 256,
    sampling: Sampling = Sampling(),
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate a completion of ``prompt``, streaming text pieces to ``on_text`` as they decode."""
    from .loading.tokenizer import StreamingDetokenizer

    tokenizer = driver.tokenizer
    prompt_ids = tokenizer.encode_prompt(prompt, chat)
    mx.reset_peak_memory()
    detok = StreamingDetokenizer(tokenizer)
    tokens: list[int] = []
    first = last = 0.0
    finish = "length"
    for token, t in generate_tokens(driver, prompt_ids, max_tokens, sampling):
        if not tokens:
            first = t
        last = t
        tokens.append(token)
        if token in tokenizer.eos_token_ids:
            finish = "stop"
            break
        piece = detok.add(token)
        if on_text and piece:
            on_text(piece)
    text_ids = tokens[:-1] if finish == "stop" else tokens
    text = tokenizer.decode(text_ids)
    if on_text and len(text) > len(detok.emitted):  # flush a held-back incomplete character
        on_text(text[len(detok.emitted) :])
    decode_steps = len(tokens) - 1
    return GenerationResult(
        text=text,
        tokens=tokens,
        prompt_tokens=len(prompt_ids),
        prompt_tps=len(prompt_ids) / first if first > 0 else 0.0,
        generation_tps=decode_steps / (last - first) if decode_steps > 0 and last > first else 0.0,
        peak_memory_gb=_peak_memory_gb(driver),
        finish_reason=finish,
    )


def _peak_memory_gb(driver: Any) -> float:
    """MLX's peak for the MLX reference; the process's peak resident set for the others."""
    if isinstance(driver, MLXDriver):
        return mx.get_peak_memory() / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux

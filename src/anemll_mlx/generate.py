"""Text generation on the MLX reference: sampling, a pipelined decode loop, and speed figures.

The loop overlaps the host with MLX: the next step is queued (``mx.async_eval``) before the
current token is read back, as mlx-lm does, so the fixed-shape cache is the only difference a
speed comparison with mlx-lm sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from . import interrupts
from .errors import BadArgumentError
from .loading import LoadedModel
from .loading.tokenizer import StreamingDetokenizer

PREFILL_STEP = 2048  # tokens per prefill call: bounds the (T, T) mask and activations


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


def check_sampling(temp: float, top_p: float) -> None:
    if temp < 0:
        raise BadArgumentError(f"--temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise BadArgumentError(f"--top-p must be in (0, 1], got {top_p}")


def sample(logits: mx.array, temp: float, top_p: float) -> mx.array:
    """Next token from the last-position logits (vocab,): greedy at temp 0, else nucleus sampling."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temp
    if top_p < 1.0:
        order = mx.argsort(-logits)
        sorted_logits = logits[order]
        probs = mx.softmax(sorted_logits)
        keep = (mx.cumsum(probs) - probs) < top_p  # the smallest set whose mass reaches top_p
        sorted_logits = mx.where(keep, sorted_logits, -mx.inf)
        return order[mx.random.categorical(sorted_logits)]
    return mx.random.categorical(logits)


def generate_tokens(
    lm: LoadedModel, prompt_ids: list[int], max_tokens: int, temp: float = 0.0, top_p: float = 1.0
) -> Iterator[tuple[int, float]]:
    """Yield (token, seconds since start) for up to ``max_tokens`` tokens; stops after an EOS id."""
    check_sampling(temp, top_p)
    model = lm.model
    limit = model.args.max_position_embeddings
    if len(prompt_ids) == 0:
        raise BadArgumentError("the prompt encodes to no tokens")
    if len(prompt_ids) + max_tokens > limit:
        raise BadArgumentError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {max_tokens} exceeds the context {limit}")
    cache = model.make_cache(len(prompt_ids) + max_tokens)
    start_time = time.perf_counter()

    def step(ids: list[int] | mx.array, start: int) -> mx.array:
        logits = model(mx.array(ids).reshape(1, -1), cache, start, last_only=True)
        return sample(logits[0, -1], temp, top_p)

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
        value = token.item()
        yield value, time.perf_counter() - start_time
        if value in lm.tokenizer.eos_token_ids:
            return
        if n + 1 < max_tokens:
            token = following


def generate(
    lm: LoadedModel,
    prompt: str,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate a completion of ``prompt``, streaming text pieces to ``on_text`` as they decode."""
    prompt_ids = lm.tokenizer.encode_prompt(prompt, chat)
    mx.reset_peak_memory()
    detok = StreamingDetokenizer(lm.tokenizer)
    tokens: list[int] = []
    first = last = 0.0
    finish = "length"
    for token, t in generate_tokens(lm, prompt_ids, max_tokens, temp, top_p):
        if not tokens:
            first = t
        last = t
        tokens.append(token)
        if token in lm.tokenizer.eos_token_ids:
            finish = "stop"
            break
        piece = detok.add(token)
        if on_text and piece:
            on_text(piece)
    text_ids = tokens[:-1] if finish == "stop" else tokens
    text = lm.tokenizer.decode(text_ids)
    if on_text and len(text) > len(detok.emitted):  # flush a held-back incomplete character
        on_text(text[len(detok.emitted) :])
    decode_steps = len(tokens) - 1
    return GenerationResult(
        text=text,
        tokens=tokens,
        prompt_tokens=len(prompt_ids),
        prompt_tps=len(prompt_ids) / first if first > 0 else 0.0,
        generation_tps=decode_steps / (last - first) if decode_steps > 0 and last > first else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
    )

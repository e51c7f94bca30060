"""Continuing from what a driver holds: rewind + prefill at any position (the export host's unaligned
batches and single-token remainders, ANEMLL's exports too), sessions that reuse a shared prefix,
the extended samplers, stop strings, and the context as a limit rather than a crash."""

from __future__ import annotations

import numpy as np
import pytest

from anemll_mlx import format as fmt
from anemll_mlx.errors import BadArgumentError
from anemll_mlx.generate import (
    Sampling,
    Session,
    StopStrings,
    generate_ids,
    generate_tokens,
    penalize,
    sample_np,
)
from anemll_mlx.loading import load
from anemll_mlx.runtime.base import ResumableDriver
from anemll_mlx.runtime.drivers import MLXDriver, open_driver
from anemll_mlx.runtime.export_host import PREFILL_MIN

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the green forest. " * 2


class Calls:
    """Wraps an export host's runner, keeping (function, current_pos) of each call to the first chunk."""

    def __init__(self, host):
        self.runner = host.runner
        self.first = str(host.export.chunks[0])
        self.calls: list[tuple[str, int]] = []
        host.runner = self

    def run(self, program, function, inputs):
        if program == self.first:
            self.calls.append((function, int(inputs[fmt.CURRENT_POS][0])))
        return self.runner.run(program, function, inputs)

    def reset_state(self):
        self.runner.reset_state()

    def input_shape(self, program, function, name):
        return self.runner.input_shape(program, function, name)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    lp = p - p.max() - np.log(np.exp(p - p.max()).sum())
    lq = q - q.max() - np.log(np.exp(q - q.max()).sum())
    return float((np.exp(lp) * (lp - lq)).sum())


@pytest.fixture(scope="module")
def ids(tiny_export) -> list[int]:
    folder, _ = tiny_export
    out = load(folder, "float32").tokenizer.encode_prompt(TEXT, chat=False)
    assert len(out) >= 60
    return out[:60]


def test_every_driver_can_resume(tiny_export):
    folder, export = tiny_export
    assert isinstance(open_driver(f"mil:{export}"), ResumableDriver)
    assert isinstance(MLXDriver(load(folder), "mlx"), ResumableDriver)


P, INF = fmt.PREFILL, fmt.INFER


@pytest.mark.parametrize(
    "split, calls",
    [
        (5, [(P, 5), (P, 21), (P, 37), (P, 53)]),  # unaligned batches, the last one 7 tokens
        (16, [(P, 16), (P, 32), (P, 48)]),
        (45, [(P, 45)]),
        (58, [(INF, 58), (INF, 59)]),  # fewer than PREFILL_MIN tokens: single tokens
    ],
)
def test_export_prefill_continues_at_any_position(tiny_export, ids, split, calls):
    """Prefilling ids[:split] and then the rest gives the logits of one prefill of all of it (and of
    the MLX reference): unaligned batches and single-token remainders write where they should."""
    assert PREFILL_MIN == 4
    folder, export = tiny_export
    whole = open_driver(f"mil:{export}").prefill(ids)
    host = open_driver(f"mil:{export}")
    log = Calls(host)
    host.prefill(ids[:split])
    assert host.position == split
    log.calls.clear()
    resumed = host.prefill(ids[split:])
    assert host.position == len(ids) and log.calls == calls
    reference = MLXDriver(load(folder, "float32"), "mlx", context=128).prefill(ids)
    assert kl(reference, resumed) < 1e-3 and kl(whole, resumed) < 1e-4
    assert int(np.argmax(resumed)) == int(np.argmax(reference))


def test_rewind_forgets_what_follows(tiny_export, ids):
    """Rewinding to n and feeding other tokens is the same as never having fed the first ones."""
    folder, export = tiny_export
    for driver in (open_driver(f"mil:{export}"), MLXDriver(load(folder, "float32"), "mlx", context=128)):
        fresh = driver.prefill(ids[:20] + ids[40:50])
        driver.reset()
        driver.prefill(ids[:40])
        driver.rewind(20)
        again = driver.prefill(ids[40:50])
        assert kl(fresh, again) < 1e-4, driver.name
        with pytest.raises(ValueError):
            driver.rewind(driver.position + 1)


def test_a_session_prefills_only_past_the_shared_prefix(tiny_export, ids):
    folder, export = tiny_export
    for driver in (open_driver(f"mil:{export}"), MLXDriver(load(folder, "float32"), "mlx", context=128)):
        session = Session(driver)
        first = generate_ids(driver, ids[:30], 6, session=session)
        assert first.prefilled_tokens == 30
        # the next prompt extends the first one and its answer (minus the unfed last token)
        follow = ids[:30] + first.tokens[:-1] + ids[30:40]
        second = generate_ids(driver, follow, 6, session=session)
        assert second.prefilled_tokens == 10
        # the same tokens from scratch
        alone = generate_ids(driver, follow, 6)
        assert second.tokens == alone.tokens, driver.name
        # an identical prompt still runs its last token, whose logits start the answer
        assert generate_ids(driver, follow, 6, session=session).prefilled_tokens == 1
        # a prompt that shares nothing starts over
        assert generate_ids(driver, ids[45:50], 2, session=session).prefilled_tokens == 5


def test_anemll_exports_resume_too(anemll_fixtures):
    """ANEMLL's prefill returns a placeholder and declares dynamic slices: a resumed prompt still
    matches the MLX model (FP16)."""
    reference = MLXDriver(load(anemll_fixtures / "model", "float32"), "mlx", context=64)
    host = open_driver(f"mil:{anemll_fixtures / 'export-fp16'}")
    ids = reference.tokenizer.encode_prompt(TEXT, chat=False)[:50]
    host.prefill(ids[:7])
    resumed = host.prefill(ids[7:])
    assert kl(reference.prefill(ids), resumed) < 1e-3


def test_the_context_is_a_limit_not_a_crash(tiny_export, ids):
    folder, export = tiny_export
    driver = open_driver(f"mil:{export}")
    with pytest.raises(BadArgumentError, match="more than the context of 128"):
        list(generate_tokens(driver, ids * 3, 4))
    driver.tokenizer.eos_token_ids = set()  # a random model may end its turn any time
    prompt = (ids * 2)[:120]
    result = generate_ids(driver, prompt, 50)
    assert len(result.tokens) == 128 - 120 + 1 and result.context_full and result.finish_reason == "length"


# --- sampling and text


def test_top_k_one_is_greedy_and_top_k_limits_the_choice():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=100).astype(np.float32)
    top = set(np.argsort(-logits)[:3].tolist())
    picks = {sample_np(logits, Sampling(temp=2.0, top_k=3), rng) for _ in range(300)}
    assert picks == top
    assert {sample_np(logits, Sampling(temp=5.0, top_k=1), rng) for _ in range(20)} == {int(np.argmax(logits))}


def test_repetition_penalty_pushes_recent_tokens_down():
    logits = np.array([3.0, 2.9, -1.0, 0.5])
    out = penalize(logits, [0, 2], 1.5)
    assert out[0] == pytest.approx(2.0) and out[2] == pytest.approx(-1.5) and out[1] == 2.9
    assert sample_np(logits, Sampling(repetition_penalty=1.5), np.random.default_rng(0), [0]) == 1
    assert penalize(logits, list(range(4)) + [1] * 30, 2.0)[0] == 3.0  # only the last 20 tokens count


def test_sampling_choice_prefers_flags_then_the_export():
    rec = fmt.RecommendedSampling(temperature=0.7, top_p=0.9, top_k=40)
    assert Sampling.choose(rec) == Sampling(0.7, 0.9, None, 40, 1.0)
    assert Sampling.choose(rec, temp=0.0, top_k=0) == Sampling(0.0, 0.9, None, 0, 1.0)
    assert Sampling.choose(None) == Sampling()
    for bad in (Sampling(top_k=-1), Sampling(repetition_penalty=0.0), Sampling(temp=-1.0)):
        with pytest.raises(BadArgumentError):
            bad.check()


def test_recommended_sampling_is_read_from_meta_yaml():
    meta = fmt.ExportMeta.from_yaml(
        "model_info:\n  parameters:\n    context_length: 64\n    batch_size: 32\n    num_chunks: 1\n"
        "    model_prefix: x\n    embeddings: x_embeddings\n    lm_head: x_lm_head\n    ffn: x_FFN_PF_chunk_01of01\n"
        "    recommended_sampling: {temperature: 0.6, top_p: 0.95, top_k: 20, do_sample: true}\n",
        "meta.yaml",
    )
    assert fmt.recommended_sampling(meta) == fmt.RecommendedSampling(0.6, 0.95, 20)
    meta.recommended_sampling = {"temperature": 0.6, "do_sample": False}
    assert fmt.recommended_sampling(meta).temperature == 0.0


@pytest.mark.parametrize(
    "pieces, stops, emitted, text",
    [
        (["Hello", " wor", "ld. Bye"], ["world"], ["Hello", " ", ""], "Hello "),  # " wor" held back, then cut
        (["ab", "c<", "|e", "nd|>", "x"], ["<|end|>"], ["ab", "c", "", ""], "abc"),
        (["no stop ", "here"], ["STOP"], ["no stop ", "here"], "no stop here"),
        (["a<", "b"], ["<|"], ["a", "<b"], "a<b"),  # a held-back prefix that did not grow into a stop
    ],
)
def test_stop_strings_never_leak(pieces, stops, emitted, text):
    s = StopStrings(stops)
    out = [s.feed(p) for p in pieces][: len(emitted)]
    assert out == emitted
    s.flush()
    assert s.text == text

"""compare harness: metrics, health labels, teacher forcing vs free-run, written results, prompts, gate.

The drivers are tiny real language models in numpy (a hashed bigram over 50 tokens), not mocks:
the harness sees the same reset/prefill/decode protocol and state handling as with a real export.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from anemll_mlx.errors import BadArgumentError
from anemll_mlx.eval.compare import compare, gate, render_table, verdict, write_results
from anemll_mlx.eval.metrics import (
    argmax_match,
    classify,
    entropy,
    kl_divergence,
    pearson,
    step_metrics,
    top_k_overlap,
    worst,
)
from anemll_mlx.eval.prompts import load_prompts
from anemll_mlx.runtime.base import Driver

VOCAB = 50
PROMPTS = [[1, 2, 3], [7], [10, 20, 30, 40, 49]]


def _table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, size=(VOCAB, VOCAB)).astype(np.float32)


class HashedBigram:
    """Next-token logits from the last token and a hash of (last token, position)."""

    def __init__(self, table: np.ndarray, name: str = "bigram", context_length: int = 64):
        self.table = table
        self.name = name
        self.vocab_size = VOCAB
        self.context_length = context_length
        self.reset()

    def reset(self) -> None:
        self.history: list[int] = []

    def _row(self) -> np.ndarray:
        last, position = self.history[-1], len(self.history)
        return self.table[last] + 0.5 * self.table[(31 * last + position) % VOCAB]

    def _feed(self, token: int) -> np.ndarray:
        if len(self.history) >= self.context_length:
            raise AssertionError(f"{self.name}: fed past its context of {self.context_length}")
        self.history.append(int(token))
        return self._row()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.stack([self._feed(t) for t in token_ids]).astype(np.float32)

    def decode(self, token_id: int) -> np.ndarray:
        return self._feed(token_id).astype(np.float32)


class FlipAt(HashedBigram):
    """The same model, except that at one step (0 = after the prompt) its top two logits swap."""

    def __init__(self, table: np.ndarray, flip_step: int, **kwargs):
        self.flip_step = flip_step
        super().__init__(table, name="flip", **kwargs)

    def reset(self) -> None:
        super().reset()
        self.step = -1

    def _flip(self, logits: np.ndarray) -> np.ndarray:
        self.step += 1
        if self.step != self.flip_step:
            return logits
        out = logits.copy()
        first, second = np.argsort(out)[-1], np.argsort(out)[-2]
        out[first], out[second] = out[second], out[first]
        return out

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        rows = super().prefill(token_ids)
        rows[-1] = self._flip(rows[-1])
        return rows

    def decode(self, token_id: int) -> np.ndarray:
        return self._flip(super().decode(token_id))


class LastRowOnly(HashedBigram):
    """An export-like driver whose prefill returns only the last position's logits."""

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return super().prefill(token_ids)[-1]


def _greedy(driver: HashedBigram, prompt: list[int], steps: int) -> list[int]:
    driver.reset()
    logits = driver.prefill(prompt)[-1]
    tokens = [int(np.argmax(logits))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(driver.decode(tokens[-1]))))
    return tokens


def _softmax_reference_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) written out independently of the library."""
    p = np.exp(p_logits.astype(np.float64) - p_logits.max())
    p /= p.sum()
    q = np.exp(q_logits.astype(np.float64) - q_logits.max())
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


# --- metrics


def test_driver_protocol_is_satisfied() -> None:
    assert isinstance(HashedBigram(_table()), Driver)


def test_identical_logits_have_zero_kl_and_unit_correlation() -> None:
    x = _table()[:4]
    m = step_metrics(x, x.copy())
    assert np.all(m.kl < 1e-12)
    np.testing.assert_allclose(m.corr, 1.0, atol=1e-12)
    assert m.match.all() and np.all(m.top5 == 1.0)


def test_kl_matches_an_independent_computation_and_is_asymmetric() -> None:
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=VOCAB) * 3, rng.normal(size=VOCAB) * 3
    assert float(kl_divergence(p, q)) == pytest.approx(_softmax_reference_kl(p, q), rel=1e-12)
    assert float(kl_divergence(p, q)) != pytest.approx(float(kl_divergence(q, p)), rel=1e-3)


def test_kl_is_stable_for_large_logits_and_ignores_masked_tokens() -> None:
    big = np.array([1000.0, 999.0, 998.0])
    assert float(kl_divergence(big, big - 500.0)) == pytest.approx(0.0, abs=1e-15)
    masked = np.array([2.0, 1.0, -np.inf])
    assert float(kl_divergence(masked, masked)) == pytest.approx(0.0, abs=1e-15)
    assert math.isinf(float(kl_divergence(np.array([2.0, 1.0, 0.0]), masked)))


def test_entropy_of_uniform_is_log_vocab_and_one_hot_is_near_zero() -> None:
    assert float(entropy(np.zeros(VOCAB))) == pytest.approx(math.log(VOCAB), rel=1e-14)
    spike = np.zeros(VOCAB)
    spike[7] = 100.0
    assert float(entropy(spike)) < 1e-30


def test_pearson_handles_shift_scale_and_flat_vectors() -> None:
    x = np.arange(10.0)
    assert float(pearson(x, 3 * x + 5)) == pytest.approx(1.0)
    assert float(pearson(x, -x)) == pytest.approx(-1.0)
    assert float(pearson(np.ones(10), np.ones(10) * 4)) == 1.0
    assert float(pearson(np.ones(10), x)) == 0.0


def test_top5_overlap_counts_shared_ids() -> None:
    ref = np.arange(10.0)  # top 5: 5..9
    cand = ref.copy()
    cand[[8, 9]] = -1.0  # top 5 now: 3..7, sharing 5, 6, 7
    assert float(top_k_overlap(ref, cand)) == pytest.approx(3 / 5)
    assert bool(argmax_match(ref, cand)) is False


def test_vectorised_metrics_equal_per_step_metrics() -> None:
    ref, cand = _table(0)[:6], _table(1)[:6]
    batch = step_metrics(ref, cand)
    for i in range(6):
        one = step_metrics(ref[i], cand[i])
        for name in ("kl", "corr", "entropy", "match", "top5"):
            assert getattr(batch, name)[i] == pytest.approx(float(getattr(one, name)), rel=1e-12)


@pytest.mark.parametrize(
    ("metric", "value", "label"),
    [
        ("kl", 0.0, "healthy"),
        ("kl", 0.0099, "healthy"),
        ("kl", 0.01, "warning"),
        ("kl", 0.1, "warning"),
        ("kl", 0.1001, "concerning"),
        ("correlation", 0.995, "healthy"),
        ("correlation", 0.99, "warning"),
        ("correlation", 0.95, "warning"),
        ("correlation", 0.949, "concerning"),
        ("match", 1.0, "healthy"),
        ("match", 0.98, "warning"),
        ("match", 0.90, "warning"),
        ("match", 0.89, "concerning"),
        ("entropy", 0.51, "healthy"),
        ("entropy", 0.5, "warning"),
        ("entropy", 0.1, "warning"),
        ("entropy", 0.09, "concerning"),
        ("kl", math.nan, "concerning"),
        ("correlation", math.nan, "concerning"),
    ],
)
def test_health_thresholds(metric: str, value: float, label: str) -> None:
    assert classify(metric, value) == label


def test_worst_label() -> None:
    assert worst(["healthy", "concerning", "warning"]) == "concerning"
    assert worst([]) == "healthy"


# --- compare


def test_identical_drivers_agree_everywhere() -> None:
    result = compare(HashedBigram(_table(), "ref"), HashedBigram(_table(), "cand"), PROMPTS, max_tokens=6)
    s = result.summary
    assert s["kl_mean"] < 1e-12 and s["kl_max"] < 1e-12
    assert s["corr_mean"] == pytest.approx(1.0, abs=1e-12)
    assert s["match_rate"] == 1.0 and s["top5_overlap"] == 1.0
    assert s["first_divergence"] == [None, None, None]
    assert s["prompts"] == 3 and s["steps"] == 18
    assert s["reference"] == "ref" and s["candidate"] == "cand"
    assert s["health"] == {
        "kl": "healthy",
        "correlation": "healthy",
        "match": "healthy",
        "entropy": "healthy",
    }
    assert set(s) == {
        "kl_mean", "kl_max", "corr_mean", "entropy_mean", "match_rate", "first_divergence",
        "top5_overlap", "prompts", "steps", "steps_per_prompt", "ended_at_eos", "health", "reference",
        "candidate",
    }  # fmt: skip


def test_perturbed_driver_kl_at_step_zero_matches_independent_value() -> None:
    table = _table()
    perturbed = table + 0.3 * np.random.default_rng(9).normal(size=table.shape).astype(np.float32)
    reference, candidate = HashedBigram(table), HashedBigram(perturbed)
    result = compare(reference, candidate, [PROMPTS[0]], max_tokens=4)
    reference.reset()
    candidate.reset()
    expected = _softmax_reference_kl(reference.prefill(PROMPTS[0])[-1], candidate.prefill(PROMPTS[0])[-1])
    assert expected > 1e-4
    assert result.per_prompt[0].kl[0] == pytest.approx(expected, rel=1e-10)
    assert result.summary["kl_mean"] > 0


def test_teacher_forcing_keeps_feeding_reference_tokens_after_a_flip() -> None:
    table = _table()
    result = compare(HashedBigram(table), FlipAt(table, flip_step=3), [PROMPTS[0]], max_tokens=8)
    prompt = result.per_prompt[0]
    assert prompt.match == [True, True, True, False, True, True, True, True]
    assert prompt.first_divergence == 3
    assert result.summary["first_divergence"] == [3]
    assert prompt.tokens == _greedy(HashedBigram(table), PROMPTS[0], 8)
    assert prompt.candidate_tokens[3] != prompt.tokens[3]
    assert prompt.kl[3] > 0 and prompt.kl[4] < 1e-12  # back in step once fed the reference's token
    assert result.summary["match_rate"] == pytest.approx(7 / 8)


def test_flip_on_the_first_prediction_is_step_zero() -> None:
    table = _table()
    result = compare(HashedBigram(table), FlipAt(table, flip_step=0), [PROMPTS[1]], max_tokens=3)
    assert result.per_prompt[0].first_divergence == 0


def test_free_run_reports_divergence_and_stops_measuring() -> None:
    table = _table()
    result = compare(
        HashedBigram(table), FlipAt(table, flip_step=3), [PROMPTS[0]], max_tokens=8, free_run=True,
        detokenize=lambda ids: " ".join(map(str, ids)),
    )  # fmt: skip
    prompt = result.per_prompt[0]
    assert prompt.first_divergence == 3
    assert prompt.steps == 4 and prompt.match == [True, True, True, False]
    assert len(prompt.tokens) == len(prompt.candidate_tokens) == 8
    assert prompt.tokens == _greedy(HashedBigram(table), PROMPTS[0], 8)
    assert prompt.candidate_tokens[:3] == prompt.tokens[:3]
    assert prompt.candidate_tokens[3] != prompt.tokens[3]
    assert prompt.reference_text == " ".join(map(str, prompt.tokens))
    assert prompt.candidate_text == " ".join(map(str, prompt.candidate_tokens))
    assert result.summary["steps"] == 4


def test_steps_stop_at_the_context_length() -> None:
    reference = HashedBigram(_table(), context_length=8)
    candidate = HashedBigram(_table(), context_length=10)
    result = compare(reference, candidate, [[1, 2, 3, 4, 5], [1] * 8], max_tokens=10)
    assert [r.steps for r in result.per_prompt] == [4, 1]  # 8 - 5 + 1 predictions; a full prompt gets 1


def test_progress_counts_every_step() -> None:
    calls: list[tuple[int, int]] = []
    compare(
        HashedBigram(_table()), HashedBigram(_table()), PROMPTS, 3, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i, 9) for i in range(1, 10)]


@pytest.mark.parametrize("free_run", [False, True])
def test_steps_end_where_the_reference_ends_its_turn(free_run: bool) -> None:
    """Past an end-of-turn token the reference writes a turn nobody asked for: no steps there."""
    table = _table()
    tokens = compare(HashedBigram(table), HashedBigram(table), [PROMPTS[0]], 8).per_prompt[0].tokens
    stop = tokens[3]
    cut = tokens.index(stop) + 1  # the step that produced the first stop token is the last one
    calls: list[tuple[int, int]] = []
    result = compare(
        HashedBigram(table), FlipAt(table, flip_step=6), [PROMPTS[0], PROMPTS[1]], 8, free_run,
        progress=lambda d, t: calls.append((d, t)), stop_ids={stop},
    )  # fmt: skip
    first = result.per_prompt[0]
    assert first.tokens == tokens[:cut] and first.steps == cut and first.ended == "eos"
    assert result.summary["steps_per_prompt"][0] == cut
    assert first.first_divergence is None  # the flip at step 6 lies past the end of turn
    assert calls[-1] == (16, 16)  # the bar still completes
    second = result.per_prompt[1]
    assert second.ended == ("eos" if stop in second.tokens else "max_tokens")
    assert result.summary["ended_at_eos"] == sum(r.ended == "eos" for r in result.per_prompt)


def test_a_driver_returning_only_the_last_prefill_row_is_accepted() -> None:
    result = compare(HashedBigram(_table()), LastRowOnly(_table()), PROMPTS, max_tokens=3)
    assert result.summary["kl_max"] < 1e-12


class ThreadRecorder(HashedBigram):
    """Notes the thread of every call, and the calls of both drivers in order."""

    def __init__(self, table: np.ndarray, name: str, log: list[tuple[str, str]], fail_on_decode: int | None = None):
        super().__init__(table, name)
        self.log, self.threads, self.fail_on_decode = log, set(), fail_on_decode

    def _note(self, what: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.log.append((self.name, what))

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self._note("prefill")
        return super().prefill(token_ids)

    def decode(self, token_id: int) -> np.ndarray:
        self._note("decode")
        if self.fail_on_decode is not None and len(self.history) >= self.fail_on_decode:
            raise RuntimeError(f"{self.name} broke at position {len(self.history)}")
        return super().decode(token_id)


def test_the_reference_runs_ahead_on_a_worker_thread() -> None:
    """The two drivers work at once: the reference on a worker, the candidate on the caller's
    thread; the results are those of running them in turn (as the other tests check)."""
    log: list[tuple[str, str]] = []
    reference, candidate = ThreadRecorder(_table(), "ref", log), ThreadRecorder(_table(), "cand", log)
    result = compare(reference, candidate, PROMPTS, max_tokens=6)
    assert reference.threads == {"compare-reference"}
    assert candidate.threads == {threading.current_thread().name}
    assert result.summary["kl_max"] < 1e-12 and result.summary["steps"] == 18
    assert all(t.name != "compare-reference" for t in threading.enumerate())  # the worker has ended


def test_an_error_in_the_reference_is_raised_by_compare_and_stops_both() -> None:
    log: list[tuple[str, str]] = []
    reference = ThreadRecorder(_table(), "ref", log, fail_on_decode=len(PROMPTS[0]) + 2)
    with pytest.raises(RuntimeError, match=r"^ref broke at position 5$"):
        compare(reference, ThreadRecorder(_table(), "cand", log), PROMPTS, max_tokens=6)
    assert all(t.name != "compare-reference" for t in threading.enumerate())
    # the candidate follows finished trajectories only, and the reference never finished its first
    assert log == [("ref", "prefill")] + [("ref", "decode")] * 3


def test_one_driver_cannot_be_both_reference_and_candidate() -> None:
    driver = HashedBigram(_table())
    with pytest.raises(ValueError, match="must be two drivers"):
        compare(driver, driver, PROMPTS, max_tokens=2)


def test_bad_runs_are_user_errors() -> None:
    ref = HashedBigram(_table(), context_length=4)
    with pytest.raises(BadArgumentError, match=r"^prompt 0 has 5 tokens, more than the context length 4$"):
        compare(ref, HashedBigram(_table()), [[1, 2, 3, 4, 5]], 2)
    with pytest.raises(BadArgumentError, match=r"^prompt 1 has no tokens$"):
        compare(ref, HashedBigram(_table()), [[1], []], 2)
    with pytest.raises(BadArgumentError, match=r"^max tokens must be at least 1, got 0$"):
        compare(ref, HashedBigram(_table()), [[1]], 0)
    other = HashedBigram(_table(), "small")
    other.vocab_size = 40
    with pytest.raises(BadArgumentError, match=r"^vocabulary sizes differ: bigram has 50, small has 40$"):
        compare(ref, other, [[1]], 2)


def test_nan_logits_are_concerning_and_written_as_null(tmp_path: Path) -> None:
    broken = _table().copy()
    broken[3] = np.nan
    result = compare(HashedBigram(_table()), HashedBigram(broken), [[3]], max_tokens=2)
    assert result.summary["health"]["kl"] == "concerning"
    assert gate(result.summary, max_kl=10.0, min_match=None) != []
    write_results(result, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kl_mean"] is None and summary["kl_max"] is None


# --- written results


def test_write_results_contents(tmp_path: Path) -> None:
    table = _table()
    result = compare(
        HashedBigram(table, "ref"), FlipAt(table, flip_step=1), PROMPTS[:2], max_tokens=3,
        texts=["one two three", "seven"],
    )  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    write_results(result, out)
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "summary.json"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.jsonl", "summary.json"):  # readable as any file the user writes
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [0, 1]
    first = lines[0]
    assert first["text"] == "one two three" and first["prompt_ids"] == [1, 2, 3]
    assert first["mode"] == "teacher_forced" and first["steps"] == 3
    assert first["match"] == [True, False, True] and first["first_divergence"] == 1
    assert first["tokens"] == result.per_prompt[0].tokens
    assert first["kl"] == result.per_prompt[0].kl
    assert set(first["means"]) == {"kl", "kl_max", "corr", "entropy", "match_rate", "top5_overlap"}
    assert first["means"]["match_rate"] == pytest.approx(2 / 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["first_divergence"] == [1, 1] and summary["candidate"] == "flip"
    write_results(result, out)  # overwriting is fine
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_table_and_verdict_render() -> None:
    table = _table()
    result = compare(HashedBigram(table), FlipAt(table, flip_step=1), PROMPTS, 4, texts=["a", "b", "c"])
    console = Console(file=io.StringIO(), width=140)
    console.print(render_table(result))
    text = console.file.getvalue()
    assert "KL mean" in text and "all" in text and "3/3" in text
    line = verdict(result.summary)
    assert line.startswith("concerning: ") and "match 75.0% (concerning)" in line
    assert line.endswith("3 of 3 prompts diverged")


# --- gate


def test_gate() -> None:
    summary = {"kl_mean": 0.02, "match_rate": 0.95}
    assert gate(summary, None, None) == []
    assert gate(summary, 0.05, 0.9) == []
    assert gate(summary, 0.01, 0.98) == [
        "mean KL 0.02 exceeds the maximum 0.01",
        "match rate 95.00% is below the minimum 98.00%",
    ]
    assert gate({"kl_mean": math.nan, "match_rate": math.nan}, 1.0, 0.0) == [
        "mean KL n/a exceeds the maximum 1",
        "match rate n/a is below the minimum 0.00%",
    ]
    with pytest.raises(BadArgumentError, match="--max-kl must be a number >= 0, got -1.0"):
        gate(summary, -1.0, None)
    with pytest.raises(BadArgumentError, match=r"--min-match must be between 0 and 1 \(a fraction\), got 1.5"):
        gate(summary, None, 1.5)


# --- prompts


def test_default_prompts() -> None:
    prompts = load_prompts(None, [])
    assert len(prompts) == 16 and len(set(prompts)) == 16
    assert all(p.strip() for p in prompts)
    assert load_prompts(None, ["just this"]) == ["just this"]


def test_prompt_files_jsonl_plain_and_extra(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "first", "id": 1}\n\n{"prompt": "sécond"}\n', encoding="utf-8")
    assert load_prompts(jsonl, ["extra"]) == ["first", "sécond", "extra"]
    plain = tmp_path / "p.txt"
    plain.write_text("Hello there\r\n   \r\nWhat is 2+2?\n")
    assert load_prompts(plain, []) == ["Hello there", "What is 2+2?"]


@pytest.mark.parametrize(
    "bad_line",
    ['{"prompt": "unterminated', '{"promt": "typo"}', '{"prompt": 3}', '{"prompt": "  "}', "{}"],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(f'{{"prompt": "ok"}}\n\n{bad_line}\n')
    with pytest.raises(BadArgumentError) as info:
        load_prompts(path, [])
    assert str(info.value) == f'{path} line 3: expected a JSON object with a non-empty "prompt" string'


def test_empty_missing_and_bad_prompt_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(BadArgumentError) as info:
        load_prompts(empty, [])
    assert str(info.value) == f"prompt file {empty} holds no prompts"
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(BadArgumentError) as info:
        load_prompts(missing, [])
    assert str(info.value) == f"prompt file not found: {missing}"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BadArgumentError) as info:
        load_prompts(binary, [])
    assert str(info.value) == f"prompt file {binary} is not UTF-8 text"
    with pytest.raises(BadArgumentError) as info:
        load_prompts(None, ["fine", " "])
    assert str(info.value) == "a prompt must not be empty"

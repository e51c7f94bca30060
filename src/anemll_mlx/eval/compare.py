"""The compare harness: run a reference and a candidate driver side by side and measure the drift.

Teacher forcing (the default) feeds both drivers the reference's greedy tokens, so every step
compares two predictions made from the same history: one early flip does not cascade into a
meaningless comparison of two different texts.  Free-run lets each driver generate on its own,
which is what a user sees; metrics are kept only while both histories are still identical,
because after the first differing token the two distributions answer different questions.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich import box
from rich.table import Table

from .. import interrupts
from ..errors import BadArgumentError
from ..runtime.base import Driver, last_logits, release_thread_streams
from .metrics import classify, step_metrics, worst

Progress = Callable[[int, int], None]

HEALTH_STYLES = {"healthy": "green", "warning": "yellow", "concerning": "red"}


@dataclass
class PromptResult:
    """One prompt's run: per-step metric lists (one entry per compared step) and the tokens.

    ``tokens`` are the reference's greedy tokens (the ones fed to both drivers when teacher
    forcing); ``candidate_tokens`` are the candidate's argmax at each step, or, in free-run, the
    tokens it generated itself.  ``first_divergence`` is the first step whose argmaxes differ.
    """

    index: int
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    candidate_tokens: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    corr: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    match: list[bool] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    first_divergence: int | None = None
    ended: str = "max_tokens"  # why the steps stopped: max_tokens, context, or eos (end of turn)
    text: str | None = None
    reference_text: str | None = None
    candidate_text: str | None = None

    @property
    def steps(self) -> int:
        """Steps with metrics (in free-run, fewer than generated tokens once the texts part)."""
        return len(self.kl)

    def means(self) -> dict[str, float]:
        return {
            "kl": _mean(self.kl),
            "kl_max": _max(self.kl),
            "corr": _mean(self.corr),
            "entropy": _mean(self.entropy),
            "match_rate": _mean(self.match),
            "top5_overlap": _mean(self.top5),
        }

    def record(self, ref_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        """Append one step's metrics."""
        m = step_metrics(ref_logits, cand_logits)
        self.kl.append(float(m.kl))
        self.corr.append(float(m.corr))
        self.entropy.append(float(m.entropy))
        self.match.append(bool(m.match))
        self.top5.append(float(m.top5))
        if not m.match and self.first_divergence is None:
            self.first_divergence = len(self.match) - 1


@dataclass
class CompareResult:
    per_prompt: list[PromptResult]
    summary: dict
    free_run: bool = False


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else math.nan


def _max(values: Sequence[float]) -> float:
    """Largest value, NaN if any is NaN (Python's ``max`` would depend on the order)."""
    return float(np.max(np.asarray(values, dtype=np.float64))) if len(values) else math.nan


def planned_steps(prompt_length: int, context_length: int, max_tokens: int) -> int:
    """Steps a prompt gets: ``max_tokens``, cut where the fed tokens would overflow the context.

    Step 0 is the prediction after the prompt; step ``s`` needs ``s`` more positions, the last of
    which is ``prompt_length + s - 1``, so at most ``context - prompt_length + 1`` steps fit.
    """
    return min(max_tokens, context_length - prompt_length + 1)


def _check(reference: Driver, candidate: Driver, prompts: Sequence[Sequence[int]], max_tokens: int) -> int:
    """Validate the run and return the shared context length."""
    if max_tokens < 1:
        raise BadArgumentError(f"max tokens must be at least 1, got {max_tokens}")
    if not prompts:
        raise BadArgumentError("no prompts to compare")
    if reference is candidate:
        raise ValueError("the reference and the candidate must be two drivers (they run at once)")
    if reference.vocab_size != candidate.vocab_size:
        raise BadArgumentError(
            f"vocabulary sizes differ: {reference.name} has {reference.vocab_size}, "
            f"{candidate.name} has {candidate.vocab_size}"
        )
    context = min(reference.context_length, candidate.context_length)
    for n, ids in enumerate(prompts):
        if not ids:
            raise BadArgumentError(f"prompt {n} has no tokens")
        if len(ids) > context:
            raise BadArgumentError(
                f"prompt {n} has {len(ids)} tokens, more than the context length {context}"
            )
    return context


def compare(
    reference: Driver,
    candidate: Driver,
    prompts: list[list[int]],
    max_tokens: int,
    free_run: bool = False,
    progress: Progress | None = None,
    *,
    texts: Sequence[str] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    stop_ids: Collection[int] = (),
) -> CompareResult:
    """Compare ``candidate`` against ``reference`` over tokenized ``prompts``.

    A prompt's steps end early once the reference picks one of ``stop_ids`` (its tokenizer's
    end-of-turn / EOS ids): past that point the reference text is a new turn nobody asked for.
    ``progress(done, total)`` is called after every step, counted over all prompts.  ``texts``
    (the prompts before tokenizing) and ``detokenize`` only enrich the written results.
    """
    context = _check(reference, candidate, prompts, max_tokens)
    if texts is not None and len(texts) != len(prompts):
        raise ValueError(f"{len(texts)} prompt texts for {len(prompts)} prompts")
    plan = [planned_steps(len(ids), context, max_tokens) for ids in prompts]
    total, done = sum(plan), 0

    def tick(count: int = 1) -> None:
        nonlocal done
        interrupts.check()
        done += count
        if progress is not None:
            progress(done, total)

    stops = {int(t) for t in stop_ids}
    results = []
    with _ReferenceAhead(reference, prompts, plan, stops) as ahead:
        for n, (ids, steps) in enumerate(zip(prompts, plan)):
            result = PromptResult(
                index=n, prompt_ids=[int(t) for t in ids], text=None if texts is None else texts[n]
            )
            if steps < max_tokens:
                result.ended = "context"
            _follow(candidate, result, ahead.next(), free_run, tick)
            if len(result.tokens) < steps:
                tick(steps - len(result.tokens))  # the steps skipped after the end of turn
            if detokenize is not None:
                result.reference_text = detokenize(result.tokens)
                if free_run:
                    result.candidate_text = detokenize(result.candidate_tokens)
            results.append(result)
    return CompareResult(results, summarize(results, reference.name, candidate.name), free_run)


@dataclass
class Trajectory:
    """The reference's greedy run on one prompt: its logits at every step and the tokens it chose."""

    logits: list[np.ndarray]
    tokens: list[int]
    ended_at_eos: bool


def greedy_trajectory(driver: Driver, prompt_ids: list[int], steps: int, stops: Collection[int]) -> Trajectory:
    """Prefill, then feed back the argmax for up to ``steps`` predictions (fewer at a stop token)."""
    logits = [_start(driver, prompt_ids)]
    tokens = [int(np.argmax(logits[0]))]
    while len(tokens) < steps and tokens[-1] not in stops:
        interrupts.check()
        logits.append(_step(driver, tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    return Trajectory(logits, tokens, tokens[-1] in stops)


class _ReferenceAhead:
    """Runs the reference's trajectories on a worker thread, a prompt or two ahead of the candidate.

    Teacher forcing needs only the reference's tokens, and free-run nothing of it, so the two
    drivers can work at once: on a 2-core machine compare takes about as long as the slower driver
    instead of both in turn (MLX and numpy release the GIL in their kernels).  The queue holds at
    most two prompts' logits (steps x vocabulary floats each).  An error in the worker is raised
    again by ``next``; leaving the block early (an error or Ctrl-C in the candidate) stops it.
    """

    def __init__(self, reference: Driver, prompts: Sequence[Sequence[int]], plan: Sequence[int], stops: set[int]):
        self.reference, self.work = reference, [([int(t) for t in ids], steps) for ids, steps in zip(prompts, plan)]
        self.stops = stops
        self.ready: queue.Queue[Trajectory | BaseException] = queue.Queue(maxsize=2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="compare-reference", daemon=True)

    def __enter__(self) -> _ReferenceAhead:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        while self.thread.is_alive():  # unblock a worker waiting to put its next prompt
            with contextlib.suppress(queue.Empty):
                self.ready.get(timeout=0.1)
        self.thread.join()

    def _run(self) -> None:
        try:
            for ids, steps in self.work:
                if self.stopping.is_set():
                    return
                self._put(greedy_trajectory(self.reference, ids, steps, self.stops))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, raised there
            self._put(error)
        finally:
            release_thread_streams()

    def _put(self, item: Trajectory | BaseException) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(queue.Full):
                self.ready.put(item, timeout=0.1)
                return

    def next(self) -> Trajectory:
        while True:
            interrupts.check()
            with contextlib.suppress(queue.Empty):
                item = self.ready.get(timeout=0.1)
                if isinstance(item, BaseException):
                    raise item
                return item


def _start(driver: Driver, ids: list[int]) -> np.ndarray:
    driver.reset()
    return last_logits(driver.prefill(ids), driver.vocab_size, f"{driver.name} prefill")


def _step(driver: Driver, token: int) -> np.ndarray:
    return last_logits(driver.decode(token), driver.vocab_size, f"{driver.name} decode")


def _follow(candidate: Driver, result: PromptResult, reference: Trajectory, free_run: bool, tick: Callable) -> None:
    """Run the candidate along the reference's trajectory and record each step's metrics.

    Teacher-forced, the candidate is fed the reference's tokens; free-run, its own, and metrics are
    kept only while both histories are identical.  Either way it takes as many steps as the
    reference did (which stopped at the end of turn).
    """
    cand = _start(candidate, result.prompt_ids)
    for step, ref in enumerate(reference.logits):
        if step:
            cand = _step(candidate, result.candidate_tokens[-1] if free_run else result.tokens[-1])
        if not free_run or result.first_divergence is None:
            result.record(ref, cand)
        result.tokens.append(reference.tokens[step])
        result.candidate_tokens.append(int(np.argmax(cand)))
        tick()
    if reference.ended_at_eos:
        result.ended = "eos"


def summarize(results: Sequence[PromptResult], reference: str, candidate: str) -> dict:
    """Pooled over every compared step of every prompt (long prompts weigh more, as they should)."""
    kl = [v for r in results for v in r.kl]
    means = {
        "kl_mean": _mean(kl),
        "corr_mean": _mean([v for r in results for v in r.corr]),
        "entropy_mean": _mean([v for r in results for v in r.entropy]),
        "match_rate": _mean([v for r in results for v in r.match]),
    }
    return {
        "kl_mean": means["kl_mean"],
        "kl_max": _max(kl),
        "corr_mean": means["corr_mean"],
        "entropy_mean": means["entropy_mean"],
        "match_rate": means["match_rate"],
        "top5_overlap": _mean([v for r in results for v in r.top5]),
        "first_divergence": [r.first_divergence for r in results],
        "prompts": len(results),
        "steps": len(kl),
        "steps_per_prompt": [r.steps for r in results],
        "ended_at_eos": sum(r.ended == "eos" for r in results),
        "reference": reference,
        "candidate": candidate,
        "health": {
            "kl": classify("kl", means["kl_mean"]),
            "correlation": classify("correlation", means["corr_mean"]),
            "match": classify("match", means["match_rate"]),
            "entropy": classify("entropy", means["entropy_mean"]),
        },
    }


# --- writing


def _finite(value):
    """JSON has no NaN or infinity: non-finite floats (from overflowing logits) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def prompt_record(result: PromptResult, free_run: bool) -> dict:
    """One results.jsonl line."""
    return _finite(
        {
            "prompt": result.index,
            "text": result.text,
            "mode": "free_run" if free_run else "teacher_forced",
            "prompt_ids": result.prompt_ids,
            "tokens": result.tokens,
            "candidate_tokens": result.candidate_tokens,
            "reference_text": result.reference_text,
            "candidate_text": result.candidate_text,
            "steps": result.steps,
            "ended": result.ended,
            "kl": result.kl,
            "corr": result.corr,
            "entropy": result.entropy,
            "match": result.match,
            "top5": result.top5,
            "first_divergence": result.first_divergence,
            "means": result.means(),
        }
    )


def write_results(result: CompareResult, folder: Path) -> None:
    """``results.jsonl`` (one line per prompt) and ``summary.json`` in ``folder``.

    ``folder`` is meant to be the partial folder of an ``OutputFolder`` (see ``anemll_mlx.output``),
    which makes the pair appear together or not at all.
    """
    folder = Path(folder)
    lines = (json.dumps(prompt_record(r, result.free_run), ensure_ascii=False) for r in result.per_prompt)
    (folder / "results.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    summary = json.dumps(_finite(result.summary), indent=2, ensure_ascii=False) + "\n"
    (folder / "summary.json").write_text(summary, encoding="utf-8")


# --- presenting and gating


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _shorten(text: str | None, width: int = 32) -> str:
    if text is None:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_table(result: CompareResult) -> Table:
    """Per-prompt means plus a pooled row coloured by health."""
    s = result.summary
    mode = "free-run" if result.free_run else "teacher-forced"
    # Fits 80 columns: numbers never wrap, the prompt gives way (cut with an ellipsis).
    table = Table(title=f"{s['candidate']}\nvs {s['reference']}\n({mode})", box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("prompt", overflow="ellipsis", no_wrap=True, max_width=20)
    for name in ("steps", "KL mean", "KL max", "corr", "entropy", "match", "top-5", "div"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in result.per_prompt:
        m = r.means()
        table.add_row(
            str(r.index),
            _shorten(r.text),
            str(r.steps),
            _fmt(m["kl"], ".1e"),
            _fmt(m["kl_max"], ".1e"),
            _fmt(m["corr"], ".4f"),
            _fmt(m["entropy"], ".3f"),
            _fmt(m["match_rate"], ".1%"),
            _fmt(m["top5_overlap"], ".2f"),
            "-" if r.first_divergence is None else str(r.first_divergence),
        )
    health = s["health"]

    def styled(text: str, metric: str) -> str:
        return f"[{HEALTH_STYLES[health[metric]]}]{text}[/]"

    diverged = sum(d is not None for d in s["first_divergence"])
    table.add_section()
    table.add_row(
        "all",
        "",
        str(s["steps"]),
        styled(_fmt(s["kl_mean"], ".1e"), "kl"),
        _fmt(s["kl_max"], ".1e"),
        styled(_fmt(s["corr_mean"], ".4f"), "correlation"),
        styled(_fmt(s["entropy_mean"], ".3f"), "entropy"),
        styled(_fmt(s["match_rate"], ".1%"), "match"),
        _fmt(s["top5_overlap"], ".2f"),
        f"{diverged}/{s['prompts']}",
        style="bold",
    )
    return table


def verdict(summary: dict) -> str:
    """One plain line: the worst health label, then each metric with its own label."""
    h = summary["health"]
    diverged = sum(d is not None for d in summary["first_divergence"])
    return (
        f"{worst(list(h.values()))}: "
        f"KL {_fmt(summary['kl_mean'], '.3g')} ({h['kl']}), "
        f"correlation {_fmt(summary['corr_mean'], '.4f')} ({h['correlation']}), "
        f"match {_fmt(summary['match_rate'], '.1%')} ({h['match']}), "
        f"entropy {_fmt(summary['entropy_mean'], '.3f')} nats ({h['entropy']}); "
        f"{diverged} of {summary['prompts']} prompts diverged"
        + (f"; {summary['ended_at_eos']} reached the end of turn early" if summary.get("ended_at_eos") else "")
    )


def check_thresholds(max_kl: float | None, min_match: float | None) -> None:
    """The gate's flags, checked before anything runs."""
    if max_kl is not None and not max_kl >= 0:
        raise BadArgumentError(f"--max-kl must be a number >= 0, got {max_kl}")
    if min_match is not None and not 0 <= min_match <= 1:
        raise BadArgumentError(f"--min-match must be between 0 and 1 (a fraction), got {min_match:g}")


def gate(summary: dict, max_kl: float | None, min_match: float | None) -> list[str]:
    """Failed thresholds as sentences (empty: pass).  NaN never passes a threshold."""
    check_thresholds(max_kl, min_match)
    failures = []
    kl, match = summary["kl_mean"], summary["match_rate"]
    if max_kl is not None and not kl <= max_kl:
        failures.append(f"mean KL {_fmt(kl, '.4g')} exceeds the maximum {max_kl:g}")
    if min_match is not None and not match >= min_match:
        failures.append(f"match rate {_fmt(match, '.2%')} is below the minimum {min_match:.2%}")
    return failures

"""Golden files: a reference's teacher-forced logits, saved once, checked later without the reference.

A 26B model cannot sit in memory beside its export, so the gate runs in two passes.
``record`` runs the reference alone over the prompts (greedy, teacher-forced as ``compare`` does)
and keeps the prompt ids, the logits at every step and the greedy tokens; ``save`` writes them,
with the reference's name and a fingerprint of its tokenizer, to one .npz (no pickles).  Later
``check`` replays that file as the reference driver of an ordinary ``compare`` against the
candidate, so KL, match and the table are the usual ones, and adds what the gate asks: the cosine
of the two logit vectors at every position, and whether the candidate's greedy tokens are the
reference's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, interrupts
from ..errors import BadArgumentError, CorruptModelError, ModelNotFoundError
from ..runtime.base import Driver, last_logits
from .compare import CompareResult, compare, planned_steps

FORMAT = "anemll-mlx-golden"
VERSION = 1
MIN_COSINE = 0.97


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The vocabulary with its ids and the EOS ids, hashed: two tokenizers that encode alike agree."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    payload = json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), sorted(tokenizer.eos_token_ids)])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass
class Golden:
    reference: str  # the driver spec it came from
    tokenizer: str  # tokenizer_fingerprint of the reference
    vocab_size: int
    context: int
    max_tokens: int
    stop_ids: list[int]
    prompts: list[list[int]]
    texts: list[str] | None
    logits: list[np.ndarray]  # per prompt: (steps, vocab) float32, step 0 after the prompt
    tokens: list[list[int]]  # per prompt: the reference's greedy token at each step


def record(
    reference: Driver,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    stop_ids: Collection[int] = (),
    texts: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Golden:
    """Run the reference alone, greedy and teacher-forced, exactly as ``compare`` steps it."""
    if not prompts:
        raise BadArgumentError("no prompts to record")
    plan = [planned_steps(len(ids), reference.context_length, max_tokens) for ids in prompts]
    for n, steps in enumerate(plan):
        if steps < 1:
            raise BadArgumentError(f"prompt {n} has {len(prompts[n])} tokens, more than the context {reference.context_length}")
    stops, total, done = {int(t) for t in stop_ids}, sum(plan), 0
    all_logits, all_tokens = [], []
    def tick(count: int = 1) -> None:
        nonlocal done
        interrupts.check()
        done += count
        if progress:
            progress(done, total)

    for ids, steps in zip(prompts, plan):
        reference.reset()
        rows = [last_logits(reference.prefill(list(ids)), reference.vocab_size, reference.name)]
        tokens = [int(np.argmax(rows[-1]))]
        tick()
        while len(tokens) < steps and tokens[-1] not in stops:
            rows.append(last_logits(reference.decode(tokens[-1]), reference.vocab_size, reference.name))
            tokens.append(int(np.argmax(rows[-1])))
            tick()
        if len(tokens) < steps:
            tick(steps - len(tokens))  # the steps after the end of turn
        all_logits.append(np.stack(rows).astype(np.float32))
        all_tokens.append(tokens)
    return Golden(
        reference=reference.name,
        tokenizer=tokenizer_fingerprint(reference.tokenizer),  # type: ignore[attr-defined]
        vocab_size=reference.vocab_size,
        context=reference.context_length,
        max_tokens=max_tokens,
        stop_ids=sorted(stops),
        prompts=[[int(t) for t in ids] for ids in prompts],
        texts=list(texts) if texts is not None else None,
        logits=all_logits,
        tokens=all_tokens,
    )


def save(golden: Golden, path: Path) -> None:
    """One .npz: a JSON header (``meta``) and per prompt ``ids_N``, ``logits_N``, ``tokens_N``."""
    header = {
        "format": FORMAT, "version": VERSION, "written_by": f"anemll-mlx {__version__}",
        "reference": golden.reference, "tokenizer": golden.tokenizer, "vocab_size": golden.vocab_size,
        "context": golden.context, "max_tokens": golden.max_tokens, "stop_ids": golden.stop_ids,
        "prompts": len(golden.prompts), "texts": golden.texts,
    }  # fmt: skip
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(header))}
    for n, (ids, logits, tokens) in enumerate(zip(golden.prompts, golden.logits, golden.tokens)):
        arrays[f"ids_{n}"] = np.asarray(ids, dtype=np.int64)
        arrays[f"logits_{n}"] = np.asarray(logits, dtype=np.float32)
        arrays[f"tokens_{n}"] = np.asarray(tokens, dtype=np.int64)
    write: Any = np.savez  # numpy's stub reads **arrays as its own keyword arguments
    with open(path, "wb") as f:
        write(f, **arrays)


def load(path: str | Path) -> Golden:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such golden file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["meta"]))
            if header.get("format") != FORMAT:
                raise CorruptModelError(f"{path} is not a golden file written by compare --save-golden")
            if header.get("version") != VERSION:
                raise CorruptModelError(f"{path} is a golden file of version {header.get('version')}; this reads {VERSION}")
            count = int(header["prompts"])
            prompts = [z[f"ids_{n}"].tolist() for n in range(count)]
            logits = [np.asarray(z[f"logits_{n}"], dtype=np.float32) for n in range(count)]
            tokens = [z[f"tokens_{n}"].tolist() for n in range(count)]
    except CorruptModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # not an npz, a missing key, bad JSON
        raise CorruptModelError(f"{path} is not a readable golden file ({type(e).__name__}: {e})") from None
    return Golden(
        reference=str(header["reference"]), tokenizer=str(header["tokenizer"]), vocab_size=int(header["vocab_size"]),
        context=int(header["context"]), max_tokens=int(header["max_tokens"]), stop_ids=[int(t) for t in header["stop_ids"]],
        prompts=prompts, texts=header.get("texts"), logits=logits, tokens=tokens,
    )  # fmt: skip


class Replay:
    """A golden file as a reference driver: it returns the stored logits, and insists on being fed
    the prompts and tokens they were recorded with (compare's teacher forcing feeds exactly those)."""

    def __init__(self, golden: Golden):
        self.golden = golden
        self.name = f"golden:{golden.reference}"
        self.vocab_size = golden.vocab_size
        self.context_length = golden.context
        self.prompt = -1
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def _row(self) -> np.ndarray:
        logits = self.golden.logits[self.prompt]
        if self.step >= len(logits):
            raise ValueError(f"the golden file holds {len(logits)} steps for prompt {self.prompt}")
        self.step += 1
        return logits[self.step - 1]

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        following = self.prompt + 1
        if following >= len(self.golden.prompts) or self.golden.prompts[following] != ids:
            raise ValueError("the golden replay was fed a prompt it did not record")
        self.prompt, self.step = following, 0
        return self._row()

    def decode(self, token_id: int) -> np.ndarray:
        expected = self.golden.tokens[self.prompt][self.step - 1]
        if int(token_id) != expected:
            raise ValueError(f"the golden replay was fed token {token_id} where it recorded {expected}")
        return self._row()


class _Cosines:
    """Wraps the candidate; after each of its steps, the cosine with the golden logits of that step.

    It keeps its own place in the golden file (prompt, step) rather than asking the replay, which
    compare runs ahead on another thread.
    """

    def __init__(self, candidate: Driver, golden: Golden):
        self.candidate, self.golden = candidate, golden
        self.name, self.vocab_size, self.context_length = candidate.name, candidate.vocab_size, candidate.context_length
        self.cosines: list[list[float]] = [[] for _ in golden.prompts]
        self.prompt = -1

    def _keep(self, logits: np.ndarray) -> np.ndarray:
        row = last_logits(logits, self.vocab_size, self.name)
        done = self.cosines[self.prompt]
        done.append(cosine(self.golden.logits[self.prompt][len(done)], row))
        return row

    def reset(self) -> None:
        self.candidate.reset()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self.prompt += 1
        return self._keep(self.candidate.prefill(token_ids))

    def decode(self, token_id: int) -> np.ndarray:
        return self._keep(self.candidate.decode(token_id))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two logit vectors in float64 (NaN when either has no finite norm)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm > 0 and math.isfinite(norm) else math.nan


@dataclass
class GoldenResult:
    compared: CompareResult
    cosines: list[list[float]]  # per prompt, per step
    token_mismatches: int  # steps where the candidate's greedy token is not the reference's

    @property
    def min_cosine(self) -> tuple[float, int, int]:
        """(lowest cosine, its prompt, its step); a NaN is the lowest of all."""
        worst = (math.inf, -1, -1)
        for p, row in enumerate(self.cosines):
            for s, c in enumerate(row):
                if math.isnan(c):
                    return (c, p, s)
                if c < worst[0]:
                    worst = (c, p, s)
        return worst


def check(
    golden: Golden,
    candidate: Driver,
    progress: Callable[[int, int], None] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
) -> GoldenResult:
    """Compare the candidate with the golden file's reference, step for step."""
    fingerprint = tokenizer_fingerprint(candidate.tokenizer)  # type: ignore[attr-defined]
    if fingerprint != golden.tokenizer:
        raise BadArgumentError(
            f"the golden file's reference ({golden.reference}) has another tokenizer than {candidate.name} "
            f"(fingerprints {golden.tokenizer} and {fingerprint}): its prompts and tokens mean other text there"
        )
    replay = Replay(golden)
    probe = _Cosines(candidate, golden)
    result = compare(
        replay, probe, golden.prompts, golden.max_tokens, progress=progress,
        texts=golden.texts, detokenize=detokenize, stop_ids=golden.stop_ids,
    )  # fmt: skip
    mismatches = sum(not m for r in result.per_prompt for m in r.match)
    return GoldenResult(result, probe.cosines, mismatches)


def check_golden_thresholds(min_cosine: float, max_token_mismatches: int) -> None:
    if not 0 <= min_cosine <= 1:
        raise BadArgumentError(f"--min-cosine must be between 0 and 1, got {min_cosine:g}")
    if max_token_mismatches < 0:
        raise BadArgumentError(f"--max-token-mismatches must be >= 0, got {max_token_mismatches}")


def golden_gate(result: GoldenResult, min_cosine: float = MIN_COSINE, max_token_mismatches: int = 0) -> list[str]:
    """Failed golden thresholds as sentences (empty: pass)."""
    failures = []
    lowest, prompt, step = result.min_cosine
    if not lowest >= min_cosine:
        failures.append(f"cosine {lowest:.4f} at prompt {prompt} step {step} is below {min_cosine:g}")
    if result.token_mismatches > max_token_mismatches:
        failures.append(
            f"{result.token_mismatches} greedy token(s) differ from the reference's (at most {max_token_mismatches} allowed)"
        )
    return failures


def summary_line(result: GoldenResult) -> str:
    lowest, prompt, step = result.min_cosine
    steps = sum(len(c) for c in result.cosines)
    return (
        f"golden: lowest cosine {lowest:.4f} (prompt {prompt}, step {step}) over {steps} positions; "
        f"{steps - result.token_mismatches}/{steps} greedy tokens identical"
    )

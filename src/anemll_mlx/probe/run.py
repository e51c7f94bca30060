"""The FP16 probe: where a model's activations sit against fp16's 65504, and what fixes them.

One probe runs the calibration prompts, each followed by a few greedily generated tokens, through
the model several times, teacher-forced on the same tokens:
1. float32 with ``ProbeOps``: per-layer peaks of every site (the reference; nothing clips here);
2. float16 and bfloat16: the first layer/site that goes inf/NaN, and how often their argmax agrees
   with float32's (token match);
3. when needed, float16 with the recommended ``apply_fp16_scale`` alpha;
4. float16 with the residual clamped at a few thresholds (the clipping remedy, for comparison).
The result is a plain, strict-JSON dict (see ``probe``) that the CLI prints and saves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import resources

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from .. import interrupts
from ..errors import BadArgumentError
from ..loading import LoadedModel
from ..models.base import DecoderModel
from ..ops.mlx_ops import MLXOps
from ..ops.vocabulary import Norm
from ..transforms import apply_fp16_scale
from .recorder import EMBEDDING, SITES, ProbeOps

FP16_MAX = 65504.0
SAFE_FRACTION = 0.75  # a peak above 0.75 x 65504 leaves too little headroom for unseen prompts
TARGET_PEAK = 50000.0  # where the recommended alpha puts the peak
CLAMP_THRESHOLDS = (65504.0, 32768.0, 16384.0, 8192.0)
CHUNK = 512  # tokens per forward call: bounds the explicit (T, T) score matrices
DEFAULT_MAX_TOKENS = 8  # generated tokens per prompt; fp32 decode is memory-bound, ~60 ms a token here
CALIBRATION = "calibration.jsonl"

# progress(stage, done, total): called after each prompt of each run; total may change once the
# probe knows whether a scaled run is needed and which clamp runs differ from the plain fp16 one.
Progress = Callable[[str, int, int], None]


def calibration_prompts() -> list[str]:
    """The built-in calibration set: chat, code, math, long prose and non-English prompts."""
    from ..eval.prompts import parse_prompts

    text = resources.files("anemll_mlx").joinpath("data", CALIBRATION).read_text(encoding="utf-8")
    return parse_prompts(text, f"anemll_mlx/data/{CALIBRATION}")


def recommend_scale(peak: float) -> float:
    """The largest alpha <= TARGET_PEAK / peak with 4 significant bits (e.g. 0.46875 for 104,162).

    Few bits make alpha exact in fp16 and a flag value that reads back exactly (--fp16-scale 0.46875).
    """
    raw = TARGET_PEAK / peak
    exponent = math.floor(math.log2(raw))
    return math.floor(raw / 2.0**exponent * 8) / 8 * 2.0**exponent


def scale_for(peak: float) -> float | None:
    """The --fp16-scale a float32 residual peak calls for: None when it is FP16-safe (<= 0.75 x
    65504), or when no alpha < 1 would help (inf: the model overflows even float32)."""
    if not (math.isfinite(peak) and peak > SAFE_FRACTION * FP16_MAX):
        return None
    alpha = recommend_scale(peak)
    return alpha if alpha < 1.0 else None


def residual_peak(
    lm: LoadedModel,
    prompts: list[str] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chat: bool = True,
    progress: Progress | None = None,
) -> float:
    """The probe's float32 run alone: the largest residual-stream value over the calibration set.

    All ``--fp16-scale auto`` needs (``scale_for``): the float16 and bfloat16 runs of the full
    probe tell a person how the model fares, not which scale to export with.
    """
    prompts = calibration_prompts() if prompts is None else list(prompts)
    original = lm.model.parameters()
    try:
        fp32, _, _ = _float32_run(lm, prompts, max_tokens, chat, original, _Meter(progress, len(prompts), runs=1))
    finally:
        lm.model.update(original)
    return _residual_peak(fp32, lm.model.args.num_hidden_layers)[0]


def _float32_run(
    lm: LoadedModel, prompts: list[str], max_tokens: int, chat: bool, params: dict, meter: _Meter
) -> tuple[ProbeOps, list[list[int]], list[np.ndarray]]:
    """The recorded float32 run: its records, the calibration sequences and their argmaxes."""
    _cast(lm.model, params, mx.float32)
    fp32 = ProbeOps()
    sequences, reference = [], []
    for prompt in meter.each(prompts, "float32"):
        sequence, predicted = _calibration_run(lm, prompt, max_tokens, chat, fp32)
        sequences.append(sequence)
        reference.append(predicted)
    return fp32, sequences, reference


def probe(
    lm: LoadedModel,
    prompts: list[str] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chat: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Probe ``lm`` (best loaded in float32) and return the report; the model is left as found.

    Report keys other tools read: model, architecture, num_layers, fp16_max, peak (largest
    residual-stream value, float32), peak_layer (-1: the embedding), peak_site, ratio (peak / fp16_max),
    needs_scaling, recommended_fp16_scale (None when not needed or when scaling cannot help),
    layers [{index, residual, attn_out, mlp_hidden, mlp_out, attn_scores}], fp16 {overflow,
    first_overflow {layer, site} | None, token_match}, bf16 {token_match}, scaled {fp16_scale,
    overflow, token_match} (all None when no scaled run), clamp_sweep [{threshold, token_match}],
    prompts, tokens, seconds.  Also: verdict, embedding, site_peaks, max_tokens.
    """
    started = time.perf_counter()
    prompts = calibration_prompts() if prompts is None else list(prompts)
    if not prompts:
        raise BadArgumentError("the probe needs at least one prompt")
    if max_tokens < 0:
        raise BadArgumentError(f"--max-tokens must be >= 0, got {max_tokens}")
    model = lm.model
    original = model.parameters()
    # runs: float32 (greedy tokens and the reference), float16, bfloat16, scaled, one per clamp threshold
    meter = _Meter(progress, len(prompts), runs=4 + len(CLAMP_THRESHOLDS))
    try:
        fp32, sequences, reference = _float32_run(lm, prompts, max_tokens, chat, original, meter)

        _cast(model, original, mx.float16)
        fp16 = ProbeOps()
        fp16_match = _match(reference, _predict(model, meter.each(sequences, "float16"), fp16))
        _cast(model, original, mx.bfloat16)
        bf16_match = _match(reference, _predict(model, meter.each(sequences, "bfloat16"), ProbeOps()))

        peak, peak_layer, peak_site = _residual_peak(fp32, model.args.num_hidden_layers)
        needs_scaling = peak > SAFE_FRACTION * FP16_MAX or fp16.first_nonfinite is not None
        alpha = scale_for(peak)  # None also when fp16 broke outside the residual stream: scaling cannot help
        scaled = {"fp16_scale": alpha, "overflow": None, "token_match": None}
        if alpha is None:
            meter.skip(1, "float16 scaled: not needed")
        else:
            with _scaled(model, original, alpha):
                ops = ProbeOps()
                match = _match(reference, _predict(model, meter.each(sequences, f"float16 x {alpha:g}"), ops))
            scaled.update(overflow=ops.first_nonfinite is not None, token_match=match)

        clamp_sweep = _clamp_sweep(model, original, sequences, reference, fp16, fp16_match, meter)
    finally:
        model.update(original)

    first = fp16.first_nonfinite
    return {
        "model": lm.source,
        "architecture": lm.architecture,
        "num_layers": model.args.num_hidden_layers,
        "fp16_max": FP16_MAX,
        "peak": _finite(peak),
        "peak_layer": peak_layer,
        "peak_site": peak_site,
        "ratio": _finite(peak / FP16_MAX),
        "needs_scaling": needs_scaling,
        "recommended_fp16_scale": alpha,
        "verdict": verdict(needs_scaling, alpha, first),
        "embedding": _finite(fp32.peaks.get((-1, EMBEDDING), 0.0)),
        "site_peaks": {site: _finite(fp32.peak(site)) for site in SITES},
        "layers": [
            {"index": i, **{site: _finite(fp32.peaks.get((i, site), 0.0)) for site in SITES}}
            for i in range(model.args.num_hidden_layers)
        ],
        "fp16": {
            "overflow": first is not None,
            "first_overflow": {"layer": first[0], "site": first[1]} if first else None,
            "token_match": fp16_match,
        },
        "bf16": {"token_match": bf16_match},
        "scaled": scaled,
        "clamp_sweep": clamp_sweep,
        "prompts": len(prompts),
        "tokens": sum(len(s) for s in sequences),
        "max_tokens": max_tokens,
        "seconds": time.perf_counter() - started,
    }


def verdict(needs_scaling: bool, alpha: float | None, first: tuple[int, str] | None) -> str:
    """The one line a user reads: safe, the flag to export with, or why scaling cannot help."""
    if not needs_scaling:
        return "FP16-safe"
    if alpha is not None:
        return f"needs --fp16-scale {alpha}"
    where = f" at layer {first[0]} ({first[1]})" if first else ""
    return f"fp16 overflows{where} outside the residual stream: --fp16-scale cannot fix it"


# --- runs


def _calibration_run(
    lm: LoadedModel, prompt: str, max_tokens: int, chat: bool, ops: ProbeOps
) -> tuple[list[int], np.ndarray]:
    """The reference run of one prompt, recorded by ``ops``: the prompt's ids (chat template when
    the tokenizer has one) plus up to ``max_tokens`` greedy tokens (through an EOS), and the argmax
    at every position of that sequence, as a teacher-forced pass over it would give.

    Generating and recording in one pass saves a whole float32 run: every token of the sequence
    goes through the model once (the last one too, for its prediction).  A prompt longer than the
    model's context is cut to fit: it still calibrates, only shorter.
    """
    ids = lm.tokenizer.encode_prompt(prompt, chat)
    if not ids:
        raise BadArgumentError(f"the prompt {prompt[:40]!r} encodes to no tokens")
    context = lm.model.args.max_position_embeddings
    if max_tokens >= context:
        raise BadArgumentError(f"--max-tokens {max_tokens} leaves no room for a prompt in the context {context}")
    ids = ids[: context - max_tokens]
    model = lm.model
    cache = model.make_cache(len(ids) + max_tokens)
    predicted = [_argmax(logits) for logits in _forward(model, ids, cache, 0, ops)]
    sequence = list(ids)
    for _ in range(max_tokens):
        sequence.append(int(predicted[-1][-1]))
        (logits,) = _forward(model, sequence[-1:], cache, len(sequence) - 1, ops)
        predicted.append(_argmax(logits))
        if sequence[-1] in lm.tokenizer.eos_token_ids:
            break
    ops.flush()
    return sequence, np.concatenate(predicted)


def _argmax(logits: mx.array) -> np.ndarray:
    """Argmax per position (T, vocab) -> (T,), -1 where the logits are not finite."""
    finite = mx.all(mx.isfinite(logits), axis=-1)
    return np.array(mx.where(finite, mx.argmax(logits, axis=-1).astype(mx.int32), -1))


def _forward(model: DecoderModel, ids: list[int], cache, start: int, ops: MLXOps) -> Iterator[mx.array]:
    """Logits (T, vocab) of ``ids`` placed at ``start``, one CHUNK of tokens at a time.

    Slices bound the explicit score matrices, and yielding them keeps only one slice of logits
    (a large vocabulary times up to CHUNK rows) alive at a time.
    """
    for offset in range(0, len(ids), CHUNK):
        interrupts.check()
        logits = model(mx.array(ids[offset : offset + CHUNK])[None], cache, start + offset, ops=ops)[0]
        mx.eval(logits)
        yield logits


def _predict(model: DecoderModel, sequences: Iterable[list[int]], ops: MLXOps) -> list[np.ndarray]:
    """Teacher-forced argmax at every position of every sequence; -1 where logits are not finite."""
    out = []
    for seq in sequences:
        cache = model.make_cache(len(seq))
        out.append(np.concatenate([_argmax(logits) for logits in _forward(model, seq, cache, 0, ops)]))
        if isinstance(ops, ProbeOps):
            ops.flush()
    return out


def _match(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Fraction of positions where ``other`` predicts the reference's token."""
    agree = sum(int((r == o).sum()) for r, o in zip(reference, other))
    return agree / sum(len(r) for r in reference)


def _cast(model: DecoderModel, params: dict, dtype: mx.Dtype) -> None:
    """Load ``params`` into ``model`` as ``dtype`` (floating tensors only)."""
    convert = lambda p: p if p.dtype == dtype or not mx.issubdtype(p.dtype, mx.floating) else p.astype(dtype)  # noqa: E731
    model.update(tree_map(convert, params))
    mx.eval(model.parameters())


@contextmanager
def _scaled(model: DecoderModel, params: dict, alpha: float) -> Iterator[None]:
    """The model scaled by alpha from its float32 weights, in float16; put back as found afterwards."""
    embed_scale, had = model.embed_scale, model.fp16_scale
    norms = [(m, m.eps) for m in model.modules() if isinstance(m, Norm)]
    _cast(model, params, mx.float32)
    try:
        apply_fp16_scale(model, alpha)
        _cast(model, model.parameters(), mx.float16)
        yield
    finally:
        model.update(params)
        model.embed_scale = embed_scale
        model.fp16_scale = had
        for norm, eps in norms:
            norm.eps = eps


def _clamp_sweep(
    model: DecoderModel,
    params: dict,
    sequences: list[list[int]],
    reference: list[np.ndarray],
    fp16: ProbeOps,
    fp16_match: float,
    meter: _Meter,
) -> list[dict]:
    """Token match of float16 with the residual clamped at each threshold.

    A threshold above everything the plain fp16 run produced (and no inf/NaN there) cannot change
    a single value, so that run is skipped and the plain fp16 match reported.
    """
    unchanged = {t for t in CLAMP_THRESHOLDS if fp16.first_nonfinite is None and fp16.peak("residual") <= t}
    meter.skip(len(unchanged), "clamp sweep")
    if len(unchanged) < len(CLAMP_THRESHOLDS):
        _cast(model, params, mx.float16)
    sweep = []
    for threshold in CLAMP_THRESHOLDS:
        if threshold in unchanged:
            match = fp16_match
        else:
            ops = ProbeOps(clamp=threshold)
            match = _match(reference, _predict(model, meter.each(sequences, f"clamp {threshold:g}"), ops))
        sweep.append({"threshold": threshold, "token_match": match})
    return sweep


def _residual_peak(ops: ProbeOps, num_layers: int) -> tuple[float, int, str]:
    """The largest residual-stream value: the embedding output (layer -1) or a layer's output."""
    candidates = [(ops.peaks.get((-1, EMBEDDING), 0.0), -1, EMBEDDING)]
    candidates += [(ops.peaks.get((i, "residual"), 0.0), i, "residual") for i in range(num_layers)]
    return max(candidates, key=lambda c: c[0])


def _finite(value: float) -> float | None:
    """JSON has no inf: a float32 peak that overflowed even float32 is reported as null."""
    return value if math.isfinite(value) else None


class _Meter:
    """Counts prompts done across runs for the progress callback; ``runs`` may shrink on the way."""

    def __init__(self, progress: Progress | None, prompts: int, runs: int):
        self.progress, self.prompts, self.runs, self.done = progress, prompts, runs, 0

    def skip(self, runs: int, stage: str) -> None:
        """Drop runs that turned out unnecessary, and say so (the bar may be complete now)."""
        self.runs -= runs
        if runs and self.progress is not None:
            self.progress(stage, self.done, self.runs * self.prompts)

    def each(self, items: list, stage: str) -> Iterator:
        for item in items:
            interrupts.check()
            yield item
            self.done += 1
            if self.progress is not None:
                self.progress(stage, self.done, self.runs * self.prompts)

"""QAT on SmolLM2-135M: training speed, and drift of 4-bit weights against mlx-lm's 4-bit, one run.

Drift is measured as ``compare`` measures it, on the same 16 default prompts: the float32 model's
greedy answer (up to 32 tokens, to the end of turn) is the reference text, and every candidate is
teacher-forced along it; KL(reference || candidate) over the whole vocabulary and top-1 match per
position.  All candidates run in MLX (a LUT model in MLX gives the export's logits: the export
emits the same tables and indices, ``tests/test_qat_checkpoint.py``):

- ours, FFN LUT 4,4: plain post-training fit, calibrated fit, and the QAT checkpoint;
- mlx-lm's affine 4-bit quantization (``mlx.nn.quantize``, group 64, as ``mlx_lm convert -q``) of
  the same projections (decoder layers only, like our FFN part), on mlx-lm's own model class
  holding the same weights;
- with ``--dwq-steps N`` (and the QAT run's ``--kd-cache``), mlx-lm's DWQ of that 4-bit model:
  ``mlx_lm.quant.dwq.dwq_quantize`` itself (its loop, its loss: KL at temperature 2 against the
  float32 teacher's full logits, its trainable scales and biases), float32 on the CPU, over the KD
  cache's training text: N batches of 4, the budget a QAT run of N steps gets.  Its learning rate
  is mlx-lm's default (1e-6) unless ``--dwq-lr`` says otherwise.  On this 2-core Linux machine it
  runs but at about 100 s per step of 4 x 128 tokens (a validation forward of 4 samples alone takes
  55 s: MLX's CPU quantized matmul), against 9-10 s for a QAT step: 150 steps would take 4 hours,
  so it was measured for 3 steps only; it is meant for a Mac.

Speed: short ``qat`` runs (``--bench-steps``) on 1 rank and on 2 local ranks (``mlx.launch``, ring
over loopback) report seconds per step, tokens per second, and for 2 ranks the gradient reduction's
time and bytes per step.  This machine has 2 cores, so 2 ranks measure the overhead of the split,
not a speed-up.

Run: .venv/bin/python bench/qat.py [--checkpoint CKPT] [--bench-steps 6] [--kd-cache KD --dwq-steps 150]
  --checkpoint: a QAT checkpoint of SmolLM2 (``anemll-mlx qat GGUF --out CKPT``); without it the QAT
  row is left out (a full run takes most of an hour here).
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from anemll_mlx.eval.compare import greedy_trajectory
from anemll_mlx.eval.metrics import argmax_match, kl_divergence
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.loading import load
from anemll_mlx.probe.calibrate import calibration_set, collect_input_moments
from anemll_mlx.qat.checkpoint import ptq_luts
from anemll_mlx.qat.kd_cache import build_kd_cache, open_kd_cache
from anemll_mlx.qat.train import forward, luts_in_place
from anemll_mlx.quant.lut import LUTConfig, LUTSpec
from anemll_mlx.runtime.drivers import MLXDriver
from common import mlx_lm_peer, smollm2_gguf

STEPS = 32
LUT44 = LUTConfig(ffn=LUTSpec(4, 4))


def references(lm) -> list[tuple[list[int], int]]:
    """(prompt + reference answer ids, prompt length) for each default prompt."""
    driver = MLXDriver(lm, "mlx fp32")
    stops = set(lm.tokenizer.eos_token_ids)
    out = []
    for prompt in default_prompts():
        ids = lm.tokenizer.encode_prompt(prompt, True)
        driver.reset()
        answer = greedy_trajectory(driver, ids, STEPS, stops).tokens
        out.append((ids + answer[:-1], len(ids)))
    return out


def drift(logits_of, refs, reference_logits) -> tuple[float, float]:
    kls, matches = [], []
    for (ids, start), ref in zip(refs, reference_logits):
        cand = logits_of(ids)[start - 1 :]
        kls.append(kl_divergence(ref, cand))
        matches.append(argmax_match(ref, cand))
    return float(np.mean(np.concatenate(kls))), float(np.mean(np.concatenate(matches)))


def ours(model):
    return lambda ids: np.array(forward(model, mx.array(ids)[None])[0].astype(mx.float32))


def quantized_peer(lm):
    """mlx-lm's model holding the same weights, its decoder-layer projections at affine 4 bits, group 64."""
    peer = mlx_lm_peer(lm)
    nn.quantize(
        peer,
        group_size=64,
        bits=4,
        class_predicate=lambda path, m: isinstance(m, nn.Linear) and ".layers." in f".{path}",
    )
    mx.eval(peer.parameters())
    return peer


def mlx_lm_4bit(lm):
    peer = quantized_peer(lm)
    return lambda ids: np.array(peer(mx.array(ids)[None])[0].astype(mx.float32))


def mlx_lm_dwq(lm, kd_path: Path, steps: int, lr: float):
    """mlx-lm's DWQ of ``mlx_lm_4bit``'s model (see the module docstring); returns its logits
    function and the seconds per step."""
    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize

    kd = open_kd_cache(kd_path)
    rows = []
    for batch in itertools.islice(kd.batches(4, seed=0), steps):
        for tokens, mask in zip(np.array(batch.tokens), np.array(batch.mask)):
            rows.append((tokens[: int(mask.sum()) + 1].tolist(), 0))
    valid = kd.validation(8)
    held = [(t[: int(m.sum()) + 1].tolist(), 0) for t, m in zip(np.array(valid.tokens), np.array(valid.mask))]
    teacher = mlx_lm_peer(lm)
    student = quantized_peer(lm)
    # the embeddings stay float and untrained, as in our FFN-only LUT runs (mlx-lm would quantize
    # them and train their scales); the norms train, as in mlx-lm's DWQ
    student.model.embed_tokens.freeze()
    started = time.perf_counter()
    dwq_quantize(
        student, lambda batch, i, split: teacher(batch), optim.Adam(learning_rate=lr, bias_correction=True),
        rows, held, 4, kd.max_length, seed=0, dtype=mx.float32,
    )  # fmt: skip
    seconds = (time.perf_counter() - started) / steps
    student.eval()
    return (lambda ids: np.array(student(mx.array(ids)[None])[0].astype(mx.float32))), seconds


def training_speed(gguf: Path, steps: int) -> dict[int, dict]:
    """qat's own throughput (qat.json) with 1 and with 2 local ranks (ring over loopback, launched
    by mlx.launch), same KD cache, global batch 4.  On this 2-core machine two ranks share the
    cores: this measures the overhead of splitting, not a speed-up."""
    cli = Path(sys.executable).parent
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        kd = build_kd_cache(load(gguf, "float32"), Path(tmp) / "kd", samples=64, max_length=128)
        for ranks in (1, 2):
            out = Path(tmp) / f"ck{ranks}"
            args = [str(cli / "anemll-mlx"), "qat", str(gguf), "--out", str(out), "--kd-cache", str(kd.path),
                    "--steps", str(steps), "--save-every", str(steps + 1)]  # fmt: skip
            if ranks > 1:
                args = [str(cli / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--", *args]
            subprocess.run(args, check=True, capture_output=True, text=True)
            speeds[ranks] = json.loads((out / "qat.json").read_text())["throughput"]
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--bench-steps", type=int, default=6)
    parser.add_argument("--kd-cache", type=Path, help="the QAT run's KD cache (for --dwq-steps)")
    parser.add_argument("--dwq-steps", type=int, default=0, help="run mlx-lm's DWQ for this many batches of 4")
    parser.add_argument("--dwq-lr", type=float, default=1e-6)
    parser.add_argument("--skip-speed", action="store_true", help="leave out the qat speed runs")
    opts = parser.parse_args()
    gguf = smollm2_gguf()

    speed = {} if opts.skip_speed else training_speed(gguf, opts.bench_steps)
    for ranks, row in speed.items():
        comm = (
            f", gradient reduction {1000 * row['comm_seconds_per_step']:.0f} ms/step, "
            f"{row['reduced_bytes_per_step'] / 2**20:.2f} MB all-reduced per rank and step"
            if ranks > 1 else ""
        )  # fmt: skip
        print(
            f"qat step on {ranks} rank(s) (global batch 4 x 128 tokens, fp32, tables): "
            f"{row['seconds_per_step']:.1f} s, {row['tokens_per_second']:.0f} tokens/s{comm}"
        )
    if speed:
        ratio = speed[2]["tokens_per_second"] / speed[1]["tokens_per_second"]
        print(f"2 ranks / 1 rank tokens/s: {ratio:.2f}x (2 cores in all: overhead, not speed-up)")

    lm = load(gguf, "float32")
    refs = references(lm)
    reference_logits = [ours(lm.model)(ids)[start - 1 :] for ids, start in refs]
    rows = {}
    rows["mlx-lm affine 4-bit g64"] = drift(mlx_lm_4bit(lm), refs, reference_logits)
    if opts.dwq_steps:
        if opts.kd_cache is None:
            parser.error("--dwq-steps needs --kd-cache (the QAT run's, for the same training text)")
        dwq, seconds = mlx_lm_dwq(lm, opts.kd_cache, opts.dwq_steps, opts.dwq_lr)
        print(f"mlx-lm DWQ: {opts.dwq_steps} steps of 4, lr {opts.dwq_lr:g}, {seconds:.1f} s/step (float32, CPU)")
        rows[f"mlx-lm DWQ 4-bit g64 ({opts.dwq_steps} steps, lr {opts.dwq_lr:g})"] = drift(dwq, refs, reference_logits)
    plain = ptq_luts(lm, LUT44)
    moments = collect_input_moments(lm, calibration_set())
    calibrated = ptq_luts(lm, LUT44, moments)
    for name, luts in (("plain", plain), ("calibrated", calibrated)):
        with luts_in_place(lm.model, luts) as model:
            rows[f"ours LUT 4,4 {name} PTQ"] = drift(ours(model), refs, reference_logits)
    if opts.checkpoint:
        rows[f"ours LUT 4,4 QAT ({opts.checkpoint.name})"] = drift(
            ours(load(opts.checkpoint, "float32").model), refs, reference_logits
        )
    positions = sum(len(r) for r in reference_logits)
    print(
        f"\ndrift vs mlx fp32, {len(refs)} prompts, {positions} teacher-forced positions (decoder-layer weights at 4 bits)"
    )
    print(f"{'weights':44s} {'KL':>8s} {'match':>7s}")
    for name, (kl, match) in rows.items():
        print(f"{name:44s} {kl:8.4f} {100 * match:6.1f}%")
    peers = {name: kl for name, (kl, _) in rows.items() if name.startswith("mlx-lm")}
    for name, (kl, _) in rows.items():
        if name.startswith("ours"):
            print(f"{name}: KL " + ", ".join(f"{kl / base:.2f}x {peer}'s" for peer, base in peers.items()))
    print(json.dumps({"speed": speed, "drift": rows}))


if __name__ == "__main__":
    main()

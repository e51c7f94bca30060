"""Running the real model's export: SmolLM2-135M-Instruct exported FP16 (default options), then
``generate`` on the mil driver against the MLX float16 reference, and the golden gate round trip
(the reference saved once, the export checked without it; a broken export fails it)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.generate import generate_ids
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver, open_driver

CLI = Path(sys.executable).parent / "anemll-mlx"
TOKENS = 24
TIE = 0.05  # where two greedy texts part, the reference's top-2 logit gap must be below this
PROMPTS = [  # (text, chat template)
    ("The capital of France is", False),
    ("What is the capital of France?", True),
    ("Write a Python function that reverses a string.", True),
]


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def export(smollm2_gguf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "fp16"
    export_model(load(smollm2_gguf, "float32"), out, ExportOptions())
    return out


@pytest.mark.slow
def test_greedy_generate_on_mil_is_mlx_fp16s_text(smollm2_gguf, export):
    reference = MLXDriver(load(smollm2_gguf, "float16"), "mlx@fp16")
    candidate = open_driver(f"mil:{export}")
    for text, chat in PROMPTS:
        ids = reference.tokenizer.encode_prompt(text, chat)
        ours, theirs = generate_ids(candidate, ids, TOKENS), generate_ids(reference, ids, TOKENS)
        same = ours.tokens == theirs.tokens
        print(repr(text), "->", repr(ours.text), "(identical to mlx@fp16)" if same else f"(mlx@fp16: {theirs.text!r})")
        if same:
            assert ours.text == theirs.text
            continue
        part = next(i for i, (a, b) in enumerate(zip(ours.tokens, theirs.tokens)) if a != b)
        reference.reset()
        logits = reference.prefill(ids + theirs.tokens[:part]) if part else reference.prefill(ids)
        top2 = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
        assert top2[1] - top2[0] < TIE, f"{text!r}: the texts part at token {part} where the reference is sure"
    # and through the command, as a user runs it
    done = cli("generate", f"mil:{export}", "--prompt", "The capital of France is", "--no-chat", "--max-tokens", "4")
    assert done.returncode == 0 and done.stdout.startswith(" Paris"), done.stdout + done.stderr


def break_first_layer(folder: Path) -> int:
    """Zero the first layer's seven projection weights (the first seven blobs of 200 kB or more in
    the chunk's weight.bin: q, k, v, o, gate, up, down; the RoPE tables and norms are smaller)."""
    (weights,) = folder.glob("*_FFN_PF*_chunk_01of01.mlpackage/Data/com.apple.CoreML/weights/weight.bin")
    zeroed, position = 0, 64  # the file header, then (64-byte metadata, data) per blob
    with open(weights, "r+b") as f:
        data = f.read()
        while zeroed < 7:
            sentinel, _, size, offset = struct.unpack_from("<IIQQ", data, position)
            assert sentinel == 0xDEADBEEF
            if size >= 200_000:
                f.seek(offset)
                f.write(bytes(size))
                zeroed += 1
            position = (offset + size + 63) // 64 * 64
    return zeroed


@pytest.mark.slow
def test_golden_gate_round_trip(smollm2_gguf, export, tmp_path):
    golden = tmp_path / "smollm2.npz"
    prompts = ("--prompt", "What is the capital of France?", "--prompt", "Write a Python function that reverses a string.")
    saved = cli("compare", "--reference", f"mlx:{smollm2_gguf}", "--save-golden", golden, *prompts, "--max-tokens", "16")
    assert saved.returncode == 0, saved.stderr
    assert golden.is_file() and f"to {golden}" in saved.stdout

    passed = cli("compare", "--golden", golden, "--candidate", f"mil:{export}")
    print(passed.stdout)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "greedy tokens identical" in passed.stdout and "gate:" not in passed.stdout

    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    assert break_first_layer(broken) == 7
    failed = cli("compare", "--golden", golden, "--candidate", f"mil:{broken}")
    print(failed.stdout)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "gate: cosine" in failed.stdout and "greedy token(s) differ" in failed.stdout

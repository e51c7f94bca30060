"""Prefill and decode speed of ``anemll-mlx generate`` against mlx-lm, measured in one run.

Two peers, each on SmolLM2-135M-Instruct's weights and the same prompt:
- mlx-lm as a user runs it: ``python -m mlx_lm generate`` in a separate process without our
  library (so with the Linux wheel's reference BLAS), on a bf16 checkpoint, as the model ships;
- mlx-lm inside our process: the same BLAS under MLX as ours, float32 like ours, same weights.
Ours runs as a user runs it too: the ``anemll-mlx generate`` console script (float32).  Runs are
interleaved and the medians compared.  Targets on Linux: prefill >= 5x and decode >= 1.5x mlx-lm as
a user runs it; >= 1.0x mlx-lm in our process.  Decode time per token is broken down at the end.

    python bench/generate.py [--contexts 512,2048] [--decode 64] [--repeats 3]
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from rich.console import Console
from rich.table import Table

from anemll_mlx import blas
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.export.meta import write_tokenizer_files
from anemll_mlx.generate import generate_tokens
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver
from common import median, mlx_lm_peer, smollm2_gguf

CLI = Path(sys.executable).parent / "anemll-mlx"


def bf16_checkpoint(lm, folder: Path) -> Path:
    """The model as a Hugging Face folder in bf16 (how SmolLM2 ships), for mlx-lm's own loader."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(lm.model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_tokenizer_files(lm, folder)
    config = {**lm.config, "torch_dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def prompt_text(lm, tokens: int) -> str:
    """Plain text (no chat template) of about ``tokens`` tokens: the default prompts run together."""
    pieces, ids = [], []
    while len(ids) < tokens:
        pieces += default_prompts()
        ids = lm.tokenizer.encode_prompt(" ".join(pieces), chat=False)
    return lm.tokenizer.decode(ids[:tokens])


def ours_as_a_user(gguf: Path, text: str, decode: int) -> tuple[float, float, int]:
    done = subprocess.run(
        [str(CLI), "generate", str(gguf), "--prompt", text, "--no-chat", "--max-tokens", str(decode), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return record["prompt_tps"], record["generation_tps"], record["prompt_tokens"]


def mlx_lm_as_a_user(folder: Path, text: str, decode: int) -> tuple[float, float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANEMLL_MLX")}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(folder), "--prompt", text,
         "--ignore-chat-template", "--max-tokens", str(decode)],
        capture_output=True, text=True, check=True, env=env, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    prompt = re.search(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec", done.stdout)
    generation = re.search(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", done.stdout)
    assert prompt and generation, done.stdout[-2000:]
    return float(prompt[2]), float(generation[2]), int(prompt[1])


def timed(tokens) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s) from an iterator of tokens."""
    start = time.perf_counter()
    stamps = [time.perf_counter() - start for _ in tokens]
    return stamps[0], (len(stamps) - 1) / (stamps[-1] - stamps[0])


def in_process(lm, peer, ids: list[int], decode: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(prefill, decode) tokens/s of ours and mlx-lm's generate_step, both in this process."""
    first, tps = timed(generate_tokens(MLXDriver(lm, "mlx", context=len(ids) + decode), ids, decode))
    ours = (len(ids) / first, tps)
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    first, tps = timed(generate_step(mx.array(ids), peer, max_tokens=decode, sampler=greedy))
    return ours, (len(ids) / first, tps)


def decode_breakdown(lm, context: int) -> list[str]:
    """Where a decode step's time goes: the weight products (at the machine's matrix-vector
    speed) against the rest (attention over the cache, norms, activations, Python)."""
    driver = MLXDriver(lm, "mlx", context=context)
    ids = list(range(100, 100 + context - 65))
    driver.prefill(ids)
    start = time.perf_counter()
    for i in range(32):
        driver.decode(200 + i)
    step = (time.perf_counter() - start) / 32
    weights = [v for _, v in tree_flatten(lm.model.parameters()) if v.ndim == 2]
    x = mx.ones((1, weights[0].shape[1]))
    mx.eval(x)
    start = time.perf_counter()
    for _ in range(8):
        mx.eval([mx.ones((1, w.shape[1])) @ w.T for w in weights])
    products = (time.perf_counter() - start) / 8
    nbytes = sum(w.nbytes for w in weights)
    return [
        f"decode at context {context}: {step * 1e3:.1f} ms/token; the float32 weight products alone "
        f"({nbytes / 1e6:.0f} MB read per token) take {products * 1e3:.1f} ms "
        f"({nbytes / products / 1e9:.1f} GB/s), the rest of the step {max(0.0, step - products) * 1e3:.1f} ms"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    gguf = smollm2_gguf()
    lm = load(gguf, "float32")
    peer = mlx_lm_peer(lm)
    never_stop = type(lm.tokenizer.eos_token_ids)()  # in-process runs decode the same count every time
    lm.tokenizer.eos_token_ids = never_stop
    console = Console()
    console.print(str(blas.status()))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = bf16_checkpoint(lm, Path(tmp) / "smollm2-bf16")
        table = Table(title=f"SmolLM2-135M tokens/s, decode {opts.decode}, median of {opts.repeats}")
        for col in ("context", "", "ours", "mlx-lm (user, bf16)", "ratio", "mlx-lm (our process)", "ratio"):
            table.add_column(col, justify="right")
        for context in (int(c) for c in opts.contexts.split(",")):
            text = prompt_text(lm, context - opts.decode)
            ids = lm.tokenizer.encode_prompt(text, chat=False)
            runs: dict[str, list[tuple[float, float]]] = {"ours": [], "user": [], "ours_in": [], "peer_in": []}
            for _ in range(opts.repeats):
                runs["ours"].append(ours_as_a_user(gguf, text, opts.decode)[:2])
                runs["user"].append(mlx_lm_as_a_user(checkpoint, text, opts.decode)[:2])
                ours_in, peer_in = in_process(lm, peer, ids, opts.decode)
                runs["ours_in"].append(ours_in)
                runs["peer_in"].append(peer_in)
            med = {k: (median([r[0] for r in v]), median([r[1] for r in v])) for k, v in runs.items()}
            for i, what in enumerate(("prefill", "decode")):
                o, u, oi, pi = med["ours"][i], med["user"][i], med["ours_in"][i], med["peer_in"][i]
                table.add_row(str(context) if i == 0 else "", what, f"{o:.1f}", f"{u:.1f}", f"{o / u:.2f}x",
                              f"{pi:.1f}", f"{oi / pi:.2f}x (ours {oi:.1f})")  # fmt: skip
        console.print(table)
    for line in decode_breakdown(lm, 512):
        console.print(line)


if __name__ == "__main__":
    main()

"""Prefill and decode speed of our MLX model vs mlx-lm's on the same weights, dtype and prompt.

Runs are interleaved (ours, peer, ours, peer, ...) so machine noise hits both alike; the table
shows medians and the ratio ours/peer.  Target: decode ratio >= 1.0 at context 512 and 2048,
i.e. the fixed-shape KV cache costs nothing.

    python bench/generate.py [--dtype float16] [--contexts 512,2048] [--decode 64] [--repeats 3]
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from rich.console import Console
from rich.table import Table

from anemll_mlx.generate import generate_tokens
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver
from common import median, mlx_lm_peer, smollm2_gguf


def timed(tokens) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) from an iterator of tokens, timing it from outside."""
    start = time.perf_counter()
    stamps = []
    for _ in tokens:
        stamps.append(time.perf_counter() - start)
    return stamps[0], (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    lm = load(smollm2_gguf(), opts.dtype)
    peer = mlx_lm_peer(lm)
    never_stop = type(lm.tokenizer.eos_token_ids)()  # ignore EOS so every run decodes the same count
    lm.tokenizer.eos_token_ids = never_stop
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    rng = np.random.default_rng(0)
    table = Table(title=f"SmolLM2-135M, {opts.dtype}, decode {opts.decode} tokens, median of {opts.repeats}")
    for col in ("context", "prefill ours", "prefill mlx-lm", "ratio", "decode ours", "decode mlx-lm", "ratio"):
        table.add_column(col, justify="right")
    for context in (int(c) for c in opts.contexts.split(",")):
        prompt = rng.integers(100, lm.model.args.vocab_size, size=context - opts.decode).tolist()
        ours, theirs = {"prefill": [], "decode": []}, {"prefill": [], "decode": []}
        for _ in range(opts.repeats + 1):  # the first round warms up both and is dropped
            t_first, tps = timed(generate_tokens(MLXDriver(lm, "mlx"), prompt, opts.decode))
            ours["prefill"].append(len(prompt) / t_first)
            ours["decode"].append(tps)
            t_first, tps = timed(generate_step(mx.array(prompt), peer, max_tokens=opts.decode, sampler=greedy))
            theirs["prefill"].append(len(prompt) / t_first)
            theirs["decode"].append(tps)
        o_p, t_p = median(ours["prefill"][1:]), median(theirs["prefill"][1:])
        o_d, t_d = median(ours["decode"][1:]), median(theirs["decode"][1:])
        table.add_row(str(context), f"{o_p:.0f}", f"{t_p:.0f}", f"{o_p / t_p:.2f}", f"{o_d:.1f}", f"{t_d:.1f}", f"{o_d / t_d:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()

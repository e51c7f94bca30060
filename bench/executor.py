"""Decode speed of an export run by our MIL executor vs the MLX fp16 reference, same tokens.

    python bench/executor.py [--export out/demo/fp16] [--steps 32]

Target: the mil driver decodes at >= 0.25x the MLX fp16 reference's tokens/s, so real checks of
a 135M export stay practical.  Exports SmolLM2-135M (FP16) first when --export is missing.
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import subprocess
import sys
import time
from pathlib import Path

from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver, open_driver
from common import smollm2_gguf

CLI = Path(sys.executable).parent / "anemll-mlx"


def decode_tps(driver, prompt: list[int], steps: int) -> float:
    driver.reset()
    token = int(driver.prefill(prompt).argmax())
    start = time.perf_counter()
    for _ in range(steps):
        token = int(driver.decode(token).argmax())
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="out/bench-executor/fp16")
    parser.add_argument("--steps", type=int, default=32)
    opts = parser.parse_args()
    gguf = smollm2_gguf()
    export = Path(opts.export)
    if not (export / "meta.yaml").exists():
        subprocess.run([str(CLI), "export", str(gguf), "--out", str(export), "--fp16-scale", "none"], check=True)
    lm = load(gguf, "float16")
    reference = MLXDriver(lm, "mlx@fp16", context=512)
    candidate = open_driver(f"mil:{export}")
    prompt = lm.tokenizer.encode_prompt("Write a short story about a lighthouse keeper.", chat=True)
    decode_tps(candidate, prompt, 2)  # load and warm the executor
    rounds = [(decode_tps(reference, prompt, opts.steps), decode_tps(candidate, prompt, opts.steps)) for _ in range(2)]
    ref, cand = max(r for r, _ in rounds), max(c for _, c in rounds)
    print(f"decode tokens/s over {opts.steps} steps (best of 2, interleaved)")
    print(f"  mlx fp16 reference : {ref:8.2f}")
    print(f"  mil executor       : {cand:8.2f}")
    print(f"  ratio              : {cand / ref:8.2f}  (target >= 0.25)")


if __name__ == "__main__":
    main()

"""serve's overhead over generate on the same driver: decode tokens/s and time to the first token.

    python bench/serve.py [--export out/bench-executor/fp16] [--spec SPEC] [--tokens 48] [--rounds 3]

``generate``'s loop runs in this process on a warmed driver (every program loaded), reset before
each run; ``serve`` runs as the console script and is asked through the official openai client
(streaming chat).  The same prompt and greedy sampling give both the same tokens.  serve's time to
the first token is given for a new user turn (the template's system prompt is reused from the
previous request, the rest prefilled) and for the same request again (its KV state reused: one
token prefilled); generate's prefills the whole prompt.  Target: serve decodes within 10% of generate.  Exports SmolLM2-135M (FP16) first when
--export is missing.
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai

from common import smollm2_gguf

CLI = Path(sys.executable).parent / "anemll-mlx"
PROMPT = "Write a short story about a lighthouse keeper."


class Generate:
    """`generate`'s own loop in this process, on a driver opened and warmed once (its programs
    loaded), each run from a reset state: the whole chat-templated prompt is prefilled."""

    def __init__(self, spec: str):
        from anemll_mlx import blas
        from anemll_mlx.generate import Sampling, generate_ids
        from anemll_mlx.runtime.drivers import open_driver

        blas.limit_numpy_threads()  # as the CLI (and so serve) does
        self.driver = open_driver(spec)
        self.run_ids, self.greedy = generate_ids, Sampling()
        self.run("Hello", 2)

    def run(self, prompt: str, tokens: int) -> tuple[float, float, int]:
        """(decode tokens/s, seconds to the first token, tokens)."""
        ids = self.driver.tokenizer.encode_prompt(prompt, chat=True)
        result = self.run_ids(self.driver, ids, tokens, self.greedy)
        return result.generation_tps, result.ttft, len(result.tokens)


def start_server(spec: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(CLI), "serve", spec, "--port", "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    return proc, f"http://127.0.0.1:{port}/v1"


def stream_once(client: openai.OpenAI, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(decode tokens/s, seconds to the first token, tokens) of one streamed chat request."""
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter() - start
            first = first or now
            last = now
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    # pieces arrive per token, except the few held back for an incomplete character; the span from
    # the first to the last piece covers count - 1 decode steps (the last token may be EOS, unsent)
    steps = count - 1 - (1 if count and last == first else 0)
    return (steps / (last - first) if last > first else 0.0), first, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="out/bench-executor/fp16")
    parser.add_argument("--spec", help="any driver spec instead of mil:EXPORT")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    spec = opts.spec
    if spec is None:
        export = Path(opts.export)
        if not (export / "meta.yaml").exists():
            gguf = smollm2_gguf()
            subprocess.run([str(CLI), "export", str(gguf), "--out", str(export), "--fp16-scale", "none"], check=True)
        spec = f"mil:{export}"
    local = Generate(spec)
    proc, url = start_server(spec)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        stream_once(client, "Hello", 2)  # load and warm
        gen, cold, warm, serve = [], [], [], []
        for n in range(opts.rounds):  # interleaved: the machine's load hits both alike
            gen.append(local.run(f"Story {n}: {PROMPT}", opts.tokens))
            tps, ttft, count = stream_once(client, f"Story {n}: {PROMPT}", opts.tokens)  # a new user turn: cold
            cold.append(ttft)
            tps, ttft, count = stream_once(client, f"Story {n}: {PROMPT}", opts.tokens)  # the same again: warm
            warm.append(ttft)
            serve.append((tps, count))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    g_tps, g_ttft = max(t for t, _, _ in gen), min(f for _, f, _ in gen)
    s_tps = max(t for t, _ in serve)
    print(f"serve vs generate on {spec}: {opts.tokens} tokens at most, greedy, best of {opts.rounds} (interleaved)")
    print(f"  generate : decode {g_tps:7.2f} tokens/s, first token {g_ttft:6.2f} s ({gen[0][2]} tokens)")
    print(f"  serve    : decode {s_tps:7.2f} tokens/s, first token {min(cold):6.2f} s cold, {min(warm):6.2f} s warm ({serve[0][1]} tokens)")
    overhead = 1 - s_tps / g_tps if g_tps else float("nan")
    print(f"  overhead : {100 * overhead:5.1f}% of generate's decode speed (target <= 10%)")
    if os.environ.get("BENCH_STRICT") and overhead > 0.10:
        sys.exit(1)


if __name__ == "__main__":
    main()

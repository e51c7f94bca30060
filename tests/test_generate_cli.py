"""The ``generate`` and ``info`` commands through the real console script, checked against mlx-lm
and the checkpoint files: streamed text, speed lines, the JSON record, chat/no-chat prompts,
reproducible sampling and the model summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load as mlx_lm_load

from anemll_mlx.loading import load
from tiny_models import ARCHS

CLI = Path(sys.executable).parent / "anemll-mlx"
PROMPT = "What is the capital of France?"


def run_cli(*args: str | Path) -> str:
    """Run the installed console script, expect success, return stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [str(CLI), *map(str, args)], capture_output=True, env=env, timeout=120, check=False
    )
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == 0, f"exit code {result.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr
    return result.stdout.decode("utf-8")


def generate_json(folder: Path, *flags: str) -> dict:
    """The JSON record ``generate --json`` prints last."""
    stdout = run_cli("generate", folder, "--prompt", PROMPT, "--json", *flags)
    return json.loads(stdout.rstrip("\n").splitlines()[-1])


def mlx_lm_greedy(folder: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model, _ = mlx_lm_load(str(folder))
    steps = generate_step(
        mx.array(prompt_ids), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    )
    return [int(token) for token, _ in steps]


def assert_greedy_prefix(tokens: list[int], reference: list[int], eos_ids: set[int]) -> None:
    """Our tokens are mlx-lm's, cut short only right after an EOS id."""
    assert tokens == reference[: len(tokens)]
    assert len(tokens) == len(reference) or tokens[-1] in eos_ids


# --- generate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_json_matches_mlx_lm_greedy(tiny_models, arch):
    """`generate --temp 0 --json` streams the text, prints the three speed lines, then one JSON
    record whose tokens are mlx-lm's greedy ids for the same chat-templated prompt ids."""
    folder = tiny_models[arch]
    stdout = run_cli("generate", folder, "--prompt", PROMPT, "--max-tokens", "8", "--temp", "0", "--json")
    streamed, sep, report = stdout.partition("\n==========\n")
    assert sep, f"no separator line in:\n{stdout}"
    lines = report.rstrip("\n").splitlines()
    assert len(lines) == 4
    record = json.loads(lines[3])
    assert set(record) == {"text", "tokens", "prompt_tokens", "prompt_tps", "generation_tps"}

    lm = load(folder)
    prompt_ids = lm.tokenizer.encode_prompt(PROMPT, chat=True)
    assert record["prompt_tokens"] == len(prompt_ids)
    eos = lm.tokenizer.eos_token_ids
    assert_greedy_prefix(record["tokens"], mlx_lm_greedy(folder, prompt_ids, 8), eos)
    text_ids = record["tokens"][:-1] if record["tokens"][-1] in eos else record["tokens"]
    assert record["text"] == lm.tokenizer.decode(text_ids)
    assert streamed == record["text"]

    prompt = re.fullmatch(r"Prompt: (\d+) tokens, ([\d.]+) tokens/s", lines[0])
    generation = re.fullmatch(r"Generation: (\d+) tokens, ([\d.]+) tokens/s", lines[1])
    assert prompt and generation, lines
    assert int(prompt[1]) == record["prompt_tokens"]
    assert int(generation[1]) == len(record["tokens"])
    assert float(prompt[2]) == pytest.approx(record["prompt_tps"], abs=0.051)
    assert float(generation[2]) == pytest.approx(record["generation_tps"], abs=0.051)
    assert record["prompt_tps"] > 0 and record["generation_tps"] > 0
    assert re.fullmatch(r"Peak memory: \d+\.\d{3} GB", lines[2])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_no_chat_encodes_the_prompt_as_is(tiny_models, arch):
    """`--no-chat` skips the template: the prompt is exactly mlx-lm's tokenizer.encode(text), and
    the greedy tokens continue those ids as mlx-lm would."""
    folder = tiny_models[arch]
    record = generate_json(folder, "--no-chat", "--max-tokens", "8", "--temp", "0")
    _, tokenizer = mlx_lm_load(str(folder))
    prompt_ids = tokenizer.encode(PROMPT)
    assert record["prompt_tokens"] == len(prompt_ids)
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    assert record["prompt_tokens"] < len(chat_ids)
    eos = load(folder).tokenizer.eos_token_ids
    assert_greedy_prefix(record["tokens"], mlx_lm_greedy(folder, prompt_ids, 8), eos)


def test_sampling_is_reproducible_with_a_seed(tiny_models):
    """--temp > 0 with the same --seed gives the same tokens twice; another seed gives others."""
    folder = tiny_models["qwen3"]
    flags = ("--max-tokens", "12", "--temp", "1.0")
    first = generate_json(folder, *flags, "--seed", "7")["tokens"]
    again = generate_json(folder, *flags, "--seed", "7")["tokens"]
    other = generate_json(folder, *flags, "--seed", "8")["tokens"]
    assert first == again
    assert first != other


def test_tiny_top_p_is_greedy(tiny_models):
    """--top-p 1e-6 keeps only the most likely token, so sampling at any temperature is greedy."""
    folder = tiny_models["llama_tied"]
    sampled = generate_json(folder, "--max-tokens", "12", "--temp", "1.5", "--top-p", "1e-6", "--seed", "3")
    greedy = generate_json(folder, "--max-tokens", "12", "--temp", "0")
    assert sampled["tokens"] == greedy["tokens"]
    assert len(set(greedy["tokens"])) >= 3  # a varied sequence, so a sampled token would show


# --- info ---------------------------------------------------------------------------------------


def info_rows(folder: Path) -> dict[str, str]:
    """`info`'s table as {row name: value}."""
    rows = {}
    for line in run_cli("info", folder).splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.parametrize("arch", ARCHS)
def test_info_matches_config_and_weights(tiny_models, arch):
    """`info` shows the architecture and sizes of config.json, and a parameter count equal to
    the number of values stored in model.safetensors."""
    folder = tiny_models[arch]
    config = json.loads((folder / "config.json").read_text())
    rows = info_rows(folder)
    assert rows["architecture"] == config["model_type"]
    assert int(rows["layers"]) == config["num_hidden_layers"]
    assert int(rows["attention heads"]) == config["num_attention_heads"]
    assert int(rows["KV heads"]) == config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert int(rows["head dim"]) == head_dim
    assert int(rows["vocab"]) == config["vocab_size"]
    assert rows["tied embeddings"] == str(config["tie_word_embeddings"])
    stored = sum(v.size for v in mx.load(str(folder / "model.safetensors")).values())
    assert int(rows["parameters"].replace(",", "")) == stored
    assert int(rows["bytes"].replace(",", "")) == 4 * stored  # float32

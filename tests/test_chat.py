"""``chat`` through its standard input, on a tiny export (mil driver) and the MLX reference: turns
reuse the KV state of the earlier ones (only the new turn is prefilled), /reset and /system work,
a conversation that outgrows the context says so (or trims with --trim), Ctrl-C ends an answer
and not the program."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anemll_mlx import interrupts
from anemll_mlx.chat import Chat, ChatOptions
from anemll_mlx.generate import generate_ids
from anemll_mlx.runtime.drivers import open_driver

CLI = Path(sys.executable).parent / "anemll-mlx"
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tokens/s; prompt (\d+) tokens, (\d+) prefilled, [\d.]+ s to the first token\]")


def chat(spec: str, lines: list[str], *flags: str) -> tuple[str, list[tuple[int, int, int]]]:
    """Run chat with ``lines`` on its standard input; (stdout, [(tokens, prompt, prefilled) per answer])."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [str(CLI), "chat", spec, *flags], input="".join(line + "\n" for line in lines),
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout, [tuple(map(int, m)) for m in STATS.findall(done.stdout)]  # type: ignore[misc]


@pytest.fixture(scope="module", params=["mil", "mlx"])
def spec(request, tiny_export) -> str:
    folder, export = tiny_export
    return f"mil:{export}" if request.param == "mil" else f"mlx:{folder}"


def test_the_second_turn_prefills_only_itself_and_reset_starts_over(spec):
    out, stats = chat(spec, ["Hello there", "And what else?", "/reset", "Hello there", "/quit"], "--max-tokens", "6")
    assert len(stats) == 3, out
    (_, prompt1, prefilled1), (_, prompt2, prefilled2), (_, prompt3, prefilled3) = stats
    assert prefilled1 == prompt1
    # the first prompt and the answer are held: only the answer's tail and the new turn run
    assert prompt2 - prefilled2 >= prompt1 and 0 < prefilled2 < prompt2 - prompt1 + 6
    assert "[conversation reset]" in out
    assert (prompt3, prefilled3) == (prompt1, prompt1)  # the same first message, from scratch


def test_the_first_answer_is_generates_text(tiny_export):
    """Greedy chat says what greedy generate says for the same message (same driver)."""
    _, export = tiny_export
    driver = open_driver(f"mil:{export}")
    expected = generate_ids(driver, driver.tokenizer.encode_prompt("Hello there", chat=True), 6).text
    out, _ = chat(f"mil:{export}", ["Hello there"], "--max-tokens", "6")
    answer = out.split(">> ", 2)[1]
    assert answer.startswith(expected + "\n[")


def test_system_prompt_command(tiny_export):
    _, export = tiny_export
    out, stats = chat(f"mil:{export}", ["/system", "/system You are terse.", "/system", "Hi"], "--max-tokens", "2")
    assert "[system prompt: (none)]" in out and "[system prompt set]" in out and "[system prompt: You are terse.]" in out
    _, plain = chat(f"mil:{export}", ["Hi"], "--max-tokens", "2")
    assert stats[0][1] > plain[0][1]  # the system turn is in the prompt
    _, flagged = chat(f"mil:{export}", ["Hi"], "--max-tokens", "2", "--system", "You are terse.")
    assert flagged[0][1] == stats[0][1]


def test_a_conversation_past_the_context_says_so_or_trims(tiny_export):
    _, export = tiny_export
    long = "tell me " * 80  # > 128 tokens alone
    message = "Please tell me a story about a cat and a dog"
    out, stats = chat(f"mil:{export}", [long, message] * 1 + [message] * 5, "--max-tokens", "12")
    assert "[this message alone takes" in out and "the context holds 128]" in out
    assert "/reset to start over, or chat --trim" in out  # the turns outgrew it
    assert all(prompt < 128 for _, prompt, _ in stats)
    out, trimmed = chat(f"mil:{export}", [message] * 6, "--max-tokens", "12", "--trim")
    assert len(trimmed) == 6 and "context holds" not in out
    assert all(prompt < 128 for _, prompt, _ in trimmed)


def test_ctrl_c_at_the_prompt_does_not_leave(tiny_export):
    _, export = tiny_export
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(CLI), "chat", f"mil:{export}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    seen = ""
    while ">> " not in seen:  # the first prompt: the model is loaded
        seen += proc.stdout.read(1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out, err = proc.communicate("/quit\n", timeout=60)
    assert proc.returncode == 0, err
    assert "(/quit or Ctrl-D to leave)" in out


def test_ctrl_c_ends_the_answer_not_the_conversation(tiny_export):
    """Library level (a signal's timing is not a test's to choose): an interrupt in the middle of
    an answer keeps what was said, and the next turn continues from a consistent state."""
    _, export = tiny_export
    driver = open_driver(f"mil:{export}")
    driver.tokenizer.eos_token_ids = set()
    decode, calls = driver.decode, []

    def interrupted_decode(token: int):
        calls.append(token)
        if len(calls) == 3:
            raise interrupts.Interrupted(signal.SIGINT)
        return decode(token)

    driver.decode = interrupted_decode  # type: ignore[method-assign]
    talk = Chat(driver, ChatOptions(max_tokens=8))
    first = talk.ask("Hello there")
    assert first.finish_reason == "interrupted" and len(first.tokens) == 3
    assert talk.turns[-1] == {"role": "assistant", "content": first.text}
    second = talk.ask("Go on")
    assert second.finish_reason == "length" and len(second.tokens) == 8
    assert second.prefilled_tokens < second.prompt_tokens
    # and a SIGTERM still ends everything
    driver.decode = lambda token: (_ for _ in ()).throw(interrupts.Interrupted(signal.SIGTERM))  # type: ignore[method-assign]
    with pytest.raises(interrupts.Interrupted):
        talk.ask("More")

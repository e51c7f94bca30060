"""``chat``: a multi-turn conversation with any driver, through the model's chat template.

Every turn re-renders the whole conversation with the template and hands it to a ``Session``,
which keeps the KV state of the earlier turns: only the new turn (and whatever of the last answer
re-tokenizes differently) is prefilled.  When the conversation outgrows the context it says so, or
with ``trim`` drops the oldest turns (the system prompt stays).  Reading lines and writing text
are passed in, so the REPL runs the same under a terminal and under a test's standard input.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import interrupts
from .errors import BadArgumentError, UserError
from .generate import GenerationResult, Sampling, Session, generate_ids

HELP = "/reset starts over, /system [TEXT] shows or sets the system prompt, /quit leaves (or Ctrl-D); Ctrl-C stops an answer"


class ContextFull(UserError):
    """The conversation no longer fits the context (and trimming is off or cannot help)."""


@dataclass(frozen=True)
class ChatOptions:
    system: str | None = None
    max_tokens: int = 512
    sampling: Sampling = Sampling()
    trim: bool = False


class Chat:
    """The conversation (messages) and the session that holds its KV state."""

    def __init__(self, driver: Any, options: ChatOptions):
        tokenizer = driver.tokenizer
        if not tokenizer.chat_template:
            raise BadArgumentError("chat needs a chat template and this tokenizer has none: use generate --no-chat")
        self.driver = driver
        self.tokenizer = tokenizer
        self.options = options
        self.system = options.system
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        self.session = Session(driver)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reset(self) -> None:
        self.turns = []
        self.session.reset()

    def _fitted_ids(self) -> list[int]:
        """The prompt ids, the oldest turns dropped first when ``trim`` allows (room is left for
        at least one answer token)."""
        context = self.driver.context_length
        ids = self.prompt_ids()
        while len(ids) >= context:
            if not self.options.trim or len(self.turns) <= 1:
                detail = "this message alone" if len(self.turns) <= 1 else "the conversation"
                hint = "" if len(self.turns) <= 1 else ": /reset to start over, or chat --trim to drop the oldest turns"
                self.turns.pop()  # the message that did not fit
                raise ContextFull(f"{detail} takes {len(ids)} tokens, and the context holds {context}{hint}")
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[-1:]
            ids = self.prompt_ids()
        return ids

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Answer one user message, streaming; Ctrl-C ends the answer early (kept as said so far)."""
        self.turns.append({"role": "user", "content": text})
        ids = self._fitted_ids()
        o = self.options
        result = generate_ids(
            self.driver, ids, o.max_tokens, o.sampling, on_text, session=self.session, stop_on_interrupt=True
        )
        self.turns.append({"role": "assistant", "content": result.text})
        return result


def stats_line(result: GenerationResult, context: int) -> str:
    """What follows every answer: tokens, speed, and how much of the prompt was prefilled."""
    line = (
        f"[{len(result.tokens)} tokens, {result.generation_tps:.1f} tokens/s; prompt {result.prompt_tokens} tokens, "
        f"{result.prefilled_tokens} prefilled, {result.ttft:.2f} s to the first token]"
    )
    if result.finish_reason == "interrupted":
        line = "[stopped] " + line
    if result.context_full:
        line += f"\n[the context of {context} tokens is full: /reset, or chat --trim to drop the oldest turns]"
    return line


def repl(chat: Chat, read_line: Callable[[], str | None], write: Callable[[str], None]) -> None:
    """Read messages and commands until /quit or the end of input.

    ``read_line`` returns None at the end of input; ``write`` gets text to show as is.
    """
    write(f"chatting with {chat.driver.name} (context {chat.driver.context_length} tokens). {HELP}\n")
    while True:
        write(">> ")
        try:
            line = read_line()
        except interrupts.Interrupted as e:  # Ctrl-C at the prompt: not a way out (SIGTERM is)
            if e.signum != signal.SIGINT:
                raise
            interrupts.clear()
            write("\n(/quit or Ctrl-D to leave)\n")
            continue
        if line is None:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            chat.reset()
            write("[conversation reset]\n")
            continue
        if command == "/system":
            if rest.strip():
                chat.system = rest.strip()
                write("[system prompt set]\n")
            else:
                write(f"[system prompt: {chat.system or '(none)'}]\n")
            continue
        if command == "/help" or (command.startswith("/") and " " not in text and len(command) > 1):
            write(f"[{HELP}]\n")
            continue
        try:
            result = chat.ask(text, on_text=write)
        except ContextFull as e:
            write(f"[{e}]\n")
            continue
        write("\n" + stats_line(result, chat.driver.context_length) + "\n")

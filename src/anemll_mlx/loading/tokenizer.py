"""The tokenizer: a ``tokenizers.Tokenizer`` plus what transformers keeps beside it.

We avoid transformers' AutoTokenizer (it may run remote code and pulls in much more); a
tokenizer.json, the chat template (a Jinja template rendered in a sandbox) and the EOS ids from
tokenizer_config.json / generation_config.json are all generation needs.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CorruptModelError, ModelNotFoundError, UserError

# the files of a Hugging Face folder that describe its tokenizer (copied as they are)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def write_tokenizer(tokenizer: Tokenizer, folder: Path | None, dest: Path) -> None:
    """Tokenizer files in ``dest`` that ``Tokenizer.from_folder`` reads back as ``tokenizer``:
    copies of ``folder``'s, or, without a folder (a GGUF source), tokenizer.json,
    tokenizer_config.json (chat template included) and generation_config.json (EOS ids) rebuilt
    from what the tokenizer holds."""
    if folder is not None:
        for name in TOKENIZER_FILES:
            if (folder / name).exists():
                shutil.copy2(folder / name, dest / name)
        return
    (dest / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True))
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer.config, indent=2, sort_keys=True))
    eos = sorted(tokenizer.eos_token_ids)
    gen = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode, decode and chat-format text the way the source model's own tokenizer does."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, generation_config: dict | None = None):
        self.backend = backend
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: take the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_ids = self._eos_ids(generation_config or {})

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ModelNotFoundError(f"{folder} has no tokenizer.json (sentencepiece-only tokenizers are not supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise CorruptModelError(f"{path} could not be read: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = folder / "chat_template.jinja"
        if template.exists():
            config["chat_template"] = template.read_text()
        return cls(backend, config, _read_json(folder / "generation_config.json"))

    def _eos_ids(self, generation_config: dict) -> set[int]:
        ids: set[int] = set()
        gen = generation_config.get("eos_token_id")
        ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
        if self.eos_token is not None and (i := self.backend.token_to_id(self.eos_token)) is not None:
            ids.add(i)
        return ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("this tokenizer has no chat template: use --no-chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials
            )
        except TemplateError as e:
            raise UserError(f"the chat template failed: {e}") from None

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Prompt ids: through the chat template (whose text already holds BOS) or plain encoding."""
        if chat and self.chat_template:
            text = self.apply_chat_template([{"role": "user", "content": prompt}])
            return self.encode(text, add_special_tokens=False)
        return self.encode(prompt)

    def encode_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        """A whole conversation's ids through the chat template (a training text, not a prompt to
        answer, hence no generation prompt by default); without a template the turns are joined
        by blank lines and encoded plainly, as ``encode_prompt`` falls back to plain text."""
        if self.chat_template:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
        return self.encode("\n\n".join(m["content"] for m in messages))


class StreamingDetokenizer:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CorruptModelError(f"{path} is not valid JSON ({e})") from None

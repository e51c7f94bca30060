"""Prompt sets for ``compare`` and ``probe``: a file, prompts given one by one, or the built-in set.

A file is JSONL (``{"prompt": "..."}`` per line) or plain text with one prompt per line; both may
be mixed, because the rule is per line: a line that starts with ``{`` must be a JSON object with a
non-empty ``"prompt"`` string.  That rule keeps a typo in a JSONL file from silently becoming a
prompt that reads ``{"promt": ...}``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import BadArgumentError

DEFAULT_PROMPTS = "prompts.jsonl"


def _parse_line(line: str, source: str, number: int) -> str | None:
    """The prompt on one line, ``None`` for a blank line."""
    text = line.strip()
    if not text:
        return None
    if not text.startswith("{"):
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadArgumentError(
            f'{source} line {number}: expected a JSON object with a non-empty "prompt" string'
        )
    return prompt


def parse_prompts(text: str, source: str) -> list[str]:
    """Prompts in a file's text; ``source`` names the file in errors.  Empty input is an error."""
    prompts = [
        p for n, line in enumerate(text.splitlines(), 1) if (p := _parse_line(line, source, n)) is not None
    ]
    if not prompts:
        raise BadArgumentError(f"prompt file {source} holds no prompts")
    return prompts


def default_prompts() -> list[str]:
    """The built-in set: short, varied prompts (facts, code, math, several languages...)."""
    resource = resources.files("anemll_mlx").joinpath("data", DEFAULT_PROMPTS)
    return parse_prompts(resource.read_text(encoding="utf-8"), f"anemll_mlx/data/{DEFAULT_PROMPTS}")


def load_prompts(path: Path | None, extra: list[str]) -> list[str]:
    """The prompts from ``path`` (if any) followed by ``extra``; the built-in set when both are absent."""
    for prompt in extra:
        if not prompt.strip():
            raise BadArgumentError("a prompt must not be empty")
    if path is None:
        return list(extra) if extra else default_prompts()
    path = Path(path)
    if not path.is_file():
        raise BadArgumentError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadArgumentError(f"prompt file {path} is not UTF-8 text") from exc
    return parse_prompts(text, str(path)) + list(extra)

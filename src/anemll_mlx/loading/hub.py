"""Hugging Face hub ids (``org/name``): download into the hub cache, or use what is cached."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what loading reads: safetensors and the small JSON/Jinja files; never pickles or code.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).exists()


def download(repo_id: str) -> Path:
    """The local snapshot folder of ``repo_id``; honours HF_HUB_OFFLINE through huggingface_hub."""
    return _fetch(repo_id, ALLOW_PATTERNS)


def download_config(repo_id: str) -> Path:
    """A snapshot folder of ``repo_id`` holding config.json only (to plan or check flags)."""
    return _fetch(repo_id, ["config.json"])


def _fetch(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        reason = "the hub cannot be reached and nothing is cached"
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    raise ModelNotFoundError(
        f"cannot load '{repo_id}' from the Hugging Face hub ({reason}); "
        f"download it elsewhere and pass the local folder instead, e.g. anemll-mlx info ./{repo_id.split('/')[-1]}"
    )

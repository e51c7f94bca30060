"""Reading an export folder: meta.yaml and the program files it names (ANEMLL's layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import BadArgumentError, CorruptModelError, ModelNotFoundError

REQUIRED = ("context_length", "batch_size", "num_chunks", "model_prefix", "embeddings", "lm_head", "ffn")


@dataclass
class ExportFolder:
    path: Path
    meta: dict
    context: int
    batch: int
    embeddings: Path
    lm_head: Path
    chunks: list[Path]
    head_sizes: list[int] | None
    argmax_in_model: bool

    @property
    def params(self) -> dict:
        return self.meta["model_info"]["parameters"]

    @property
    def ours(self) -> dict:
        """Our own section (absent in ANEMLL's exports)."""
        return self.meta.get("anemll_mlx") or {}


def _program(folder: Path, stem: str, prefer_compiled: bool, must_exist: bool) -> Path:
    """The .mlmodelc (when preferred and present) or .mlpackage for a file stem from meta.yaml.

    Without ``must_exist`` a missing program comes back as its .mlpackage path, for ``inspect``
    to report along with everything else.
    """
    stem = stem.removesuffix(".mlmodelc").removesuffix(".mlpackage")
    order = (".mlmodelc", ".mlpackage") if prefer_compiled else (".mlpackage", ".mlmodelc")
    for suffix in order:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    if not must_exist:
        return folder / f"{stem}.mlpackage"
    raise CorruptModelError(f"{folder} lacks {stem}.mlpackage (named in meta.yaml)")


def chunk_stem(first: str, index: int, total: int) -> str:
    """ANEMLL names chunk NN of MM by replacing the 01ofMM of the first chunk's name."""
    marker = f"_chunk_01of{total:02d}"
    if marker not in first:
        raise CorruptModelError(f"meta.yaml ffn '{first}' does not end in {marker}")
    return first.replace(marker, f"_chunk_{index + 1:02d}of{total:02d}")


def read_export(folder: str | Path, prefer_compiled: bool = False, must_exist: bool = True) -> ExportFolder:
    """The export in ``folder``; ``must_exist=False`` tolerates missing programs (for ``inspect``)."""
    path = Path(folder)
    meta_path = path / "meta.yaml"
    if path.is_file():
        raise BadArgumentError(f"{path} is a file, not an export folder (the folder export --out wrote)")
    if not path.is_dir():
        raise ModelNotFoundError(f"no such export folder: {path}")
    if not meta_path.exists():
        raise ModelNotFoundError(f"{path} has no meta.yaml: not an export folder")
    try:
        meta = yaml.safe_load(meta_path.read_text())
        params = meta["model_info"]["parameters"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise CorruptModelError(f"{meta_path} is malformed ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED if k not in params]
    if missing:
        raise CorruptModelError(f"{meta_path} lacks model_info.parameters.{', '.join(missing)}")
    try:
        context, batch, chunks = int(params["context_length"]), int(params["batch_size"]), int(params["num_chunks"])
    except (TypeError, ValueError) as e:
        raise CorruptModelError(f"{meta_path} has a non-integer size ({e})") from None
    sizes = params.get("lm_head_chunk_sizes")
    return ExportFolder(
        path=path,
        meta=meta,
        context=context,
        batch=batch,
        embeddings=_program(path, str(params["embeddings"]), prefer_compiled, must_exist),
        lm_head=_program(path, str(params["lm_head"]), prefer_compiled, must_exist),
        chunks=[
            _program(path, chunk_stem(str(params["ffn"]), i, chunks), prefer_compiled, must_exist)
            for i in range(chunks)
        ],
        head_sizes=[int(s) for s in sizes] if sizes else None,
        argmax_in_model=bool(params.get("argmax_in_model", False)),
    )

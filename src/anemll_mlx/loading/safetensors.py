"""Reading safetensors checkpoints, single-file or sharded, after checking they are whole.

``mx.load`` on a truncated file fails deep inside MLX or, worse, reads garbage; a header check
first turns that into one clear line naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx

from ..errors import CorruptModelError, ModelNotFoundError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def check_safetensors(path: Path) -> None:
    """Raise CorruptModelError unless the header parses and every tensor lies inside the file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path} is not a readable safetensors file ({e})") from None
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CorruptModelError(
            f"{path} is truncated: its header needs {8 + header_len + data_end} bytes, the file has {size}"
        )


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder, from its index when sharded."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CorruptModelError(f"{index} is malformed ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / SINGLE_NAME).exists():
        files = [folder / SINGLE_NAME]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(bins)}: pickled checkpoints are never loaded)" if bins else ""
        raise ModelNotFoundError(f"{folder} has no safetensors weights{hint}")
    for f in files:
        if not f.exists():
            raise CorruptModelError(f"{f} is listed in {INDEX_NAME} but missing")
    return files


def load_safetensors(folder: Path) -> dict[str, mx.array]:
    """All tensors of the checkpoint in ``folder``, as stored (dtype conversion comes later)."""
    weights: dict[str, mx.array] = {}
    for path in checkpoint_files(folder):
        check_safetensors(path)
        try:
            loaded = mx.load(str(path))
            assert isinstance(loaded, dict)
            weights.update(loaded)
        except Exception as e:  # MLX raises plain RuntimeError/ValueError on bad content
            raise CorruptModelError(f"{path} could not be read: {e}") from None
    return weights

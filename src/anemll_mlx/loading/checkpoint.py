"""Reading LUT checkpoints: model folders whose quantized weights are stored as tables and indices.

The QAT trainer (``anemll_mlx.qat``) writes them; every command loads them as a model.  The
format, beside an ordinary Hugging Face folder (config.json, tokenizer files):

- ``model.safetensors``: for every LUT-quantized target ``NAME`` (``DecoderModel.lut_targets``),
  ``NAME.lut`` float16 (groups, 2**bits) and ``NAME.indices`` uint8 of the weight's shape, and no
  ``NAME.weight``; every other weight under its HF name, in HF's convention (Gemma norms as w, not
  1 + w), in the dtype it was trained in;
- ``qat.json``: {"format": "anemll-mlx-qat", "version": 1, "lut": {part: "BITS,GROUP" or null},
  ...the trainer's own keys}.

A checkpoint loads as a ``DecoderModel`` whose quantized holders carry ``LUTWeight.dequantize()``
(the fp16 values the export materialises, cast to the requested dtype), with ``model.lut`` set to
the checkpoint's ``LUTConfig`` and the tables themselves in ``model.lut_weights`` for the export,
which emits them as they are.  The tables' indices are memory-mapped from the file and the dense
weights are lazy MLX gathers, so a lazy load (export) still reads a weight only when it is used.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import BadArgumentError, CorruptModelError
from ..models import build_model
from ..quant.lut import LUTConfig, LUTWeight, parse_lut_spec
from .safetensors import checkpoint_files

QAT_FILE = "qat.json"
FORMAT = "anemll-mlx-qat"
VERSION = 1
LUT_SUFFIX = ".lut"
INDICES_SUFFIX = ".indices"
WEIGHT_SUFFIX = ".weight"


def lut_config_to_json(lut: LUTConfig) -> dict[str, str | None]:
    """qat.json's ``lut``: each part's spec in its flag form ("4,8", "6,t"), or null."""
    return {part: None if spec is None else str(spec) for part, spec in lut.items()}


def read_qat_info(folder: Path) -> dict[str, Any]:
    """qat.json of a checkpoint folder, checked (format, version, lut); CorruptModelError otherwise."""
    path = folder / QAT_FILE
    if not path.is_file():
        raise CorruptModelError(f"{folder} holds LUT tables and indices but no {QAT_FILE}: not a whole checkpoint")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CorruptModelError(f"{path} is not an anemll-mlx QAT checkpoint description (format != {FORMAT!r})")
    if info.get("version") != VERSION:
        raise CorruptModelError(f"{path} has version {info.get('version')!r}; this anemll-mlx reads version {VERSION}")
    parse_lut_config(info.get("lut"), path)
    return info


def parse_lut_config(block: Any, where: Path | str) -> LUTConfig:
    """qat.json's ``lut`` object as a ``LUTConfig``; a malformed one is a CorruptModelError."""
    from ..format import PARTS

    if not isinstance(block, dict) or set(block) - set(PARTS):
        raise CorruptModelError(f"{where}: 'lut' must be an object with keys among {', '.join(PARTS)}")
    specs = {}
    for part in PARTS:
        value = block.get(part)
        if value is not None and not isinstance(value, str):
            raise CorruptModelError(f"{where}: lut.{part} must be a spec string like \"4,8\" or null, not {value!r}")
        try:
            specs[part] = None if value is None else parse_lut_spec(value)
        except BadArgumentError as e:
            raise CorruptModelError(f"{where}: lut.{part}: {e}") from None
    return LUTConfig(**specs)


def checkpoint_lut(source: str | Path) -> LUTConfig | None:
    """The ``LUTConfig`` of the checkpoint at ``source``, or None when it is not a checkpoint folder
    (a plain HF folder, a GGUF file, a hub id): what the CLI needs before loading any weight."""
    folder = Path(str(source)).expanduser()
    if not folder.is_dir() or not (folder / QAT_FILE).exists():
        return None
    return parse_lut_config(read_qat_info(folder)["lut"], folder / QAT_FILE)


def is_lut_tensor(name: str) -> bool:
    return name.endswith((LUT_SUFFIX, INDICES_SUFFIX))


@dataclass
class LUTCheckpoint:
    """What a checkpoint folder adds to its plain weights: its config and its tables."""

    lut: LUTConfig
    luts: dict[str, LUTWeight]  # by LUT target name
    info: dict[str, Any]


def split_checkpoint(folder: Path, config: dict, weights: dict[str, mx.array]) -> LUTCheckpoint | None:
    """If ``folder`` is a LUT checkpoint: check its tables against ``config``'s model, replace every
    ``NAME.lut``/``NAME.indices`` pair in ``weights`` by ``NAME.weight`` (dequantized, fp16, lazy)
    and return the tables; None for a plain folder.  Any inconsistency is one CorruptModelError line."""
    lut_names = sorted(k for k in weights if is_lut_tensor(k))
    if not lut_names and not (folder / QAT_FILE).exists():
        return None
    info = read_qat_info(folder)
    where = folder / QAT_FILE
    lut = parse_lut_config(info["lut"], where)
    config = dict(config)
    if "lm_head.weight" not in weights and "lm_head" + INDICES_SUFFIX not in weights:
        config["tie_word_embeddings"] = True
    skeleton = build_model(config)
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for target in skeleton.lut_targets():
        if lut[target.part] is None:
            continue
        if target.name in expected:
            raise CorruptModelError(
                f"{where} quantizes the {expected[target.name][0]} and the {target.part} of a model with tied "
                "embeddings: one table cannot serve both parts"
            )
        expected[target.name] = (target.part, tuple(target.holder.weight.shape))
    stored = {name.rsplit(".", 1)[0] for name in lut_names}
    extra = sorted(stored - set(expected))
    if extra:
        raise CorruptModelError(
            f"{folder} holds LUT tensors for {extra[0]} that {QAT_FILE}'s lut ({lut}) does not quantize"
        )
    arrays = _lut_arrays(folder)
    luts: dict[str, LUTWeight] = {}
    for name, (part, shape) in expected.items():
        spec = lut[part]
        assert spec is not None
        table_key, index_key = name + LUT_SUFFIX, name + INDICES_SUFFIX
        if index_key not in weights or table_key not in weights:
            have = "indices without a table" if index_key in weights else "a table without indices" if table_key in weights else "no table and no indices"
            raise CorruptModelError(f"{folder}: {name} has {have} ({QAT_FILE} quantizes the {part} as {spec})")
        if name + WEIGHT_SUFFIX in weights:
            raise CorruptModelError(f"{folder}: {name} has both a dense weight and LUT tensors")
        table, indices = arrays[table_key], arrays[index_key]
        if indices.dtype != np.uint8 or indices.shape != shape:
            raise CorruptModelError(
                f"{folder}: {index_key} is {indices.dtype} {tuple(indices.shape)}, the model needs uint8 {shape}"
            )
        if table.dtype != np.float16 or table.ndim != 2:
            raise CorruptModelError(f"{folder}: {table_key} is {table.dtype} {tuple(table.shape)}, not a 2-D float16 table")
        groups, entries = table.shape
        rows = shape[0]
        if groups < 1 or rows % groups:
            raise CorruptModelError(f"{folder}: {table_key} has {groups} groups, which do not divide the {rows} rows")
        fits = spec.group_size is None or rows % spec.group_size == 0
        if entries != spec.entries or not fits or groups != spec.num_groups(rows):
            raise CorruptModelError(
                f"{folder}: {table_key} of shape {tuple(table.shape)} does not match {QAT_FILE}'s {part} spec {spec} "
                f"(which needs ({_groups(spec, rows)}, {spec.entries}))"
            )
        top = int(indices.max()) if indices.size else 0
        if top >= spec.entries:
            raise CorruptModelError(f"{folder}: {index_key} holds index {top}, past the {spec.entries} entries of {spec.bits}-bit tables")
        lw = LUTWeight(indices=indices, lut=table, spec=spec)
        luts[name] = lw
        weights[name + WEIGHT_SUFFIX] = _dense(weights.pop(table_key), weights.pop(index_key), lw.rows_per_group)
    return LUTCheckpoint(lut, luts, info)


def _groups(spec, rows: int) -> str:
    return "1" if spec.group_size is None else f"{rows}/{spec.group_size}"


def _dense(table: mx.array, indices: mx.array, rows_per_group: int) -> mx.array:
    """``LUTWeight.dequantize()`` as a lazy MLX gather (fp16, bit for bit the same values)."""
    rows = indices.shape[0]
    flat = indices.reshape(rows, -1).astype(mx.uint32)
    dense = mx.take_along_axis(mx.repeat(table, rows_per_group, axis=0), flat, axis=1)
    return dense.reshape(indices.shape)


def _lut_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every ``*.lut``/``*.indices`` tensor of the folder's safetensors, memory-mapped read-only
    (the files were checked whole by ``load_safetensors`` before)."""
    out: dict[str, np.ndarray] = {}
    for path in checkpoint_files(folder):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name == "__metadata__" or not is_lut_tensor(name):
                continue
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CorruptModelError(f"{path}: {name} is {entry.get('dtype')}; LUT tables are F16, indices U8")
            start, stop = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            if stop - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise CorruptModelError(f"{path}: {name}'s byte range does not fit its shape {shape}")
            if stop == start:
                out[name] = np.zeros(shape, dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + start, shape=shape)
    return out


_DTYPES = {"F16": np.float16, "U8": np.uint8}

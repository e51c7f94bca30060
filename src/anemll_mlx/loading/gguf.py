"""GGUF files (llama.cpp's single-file format) -> Hugging Face config, weights and tokenizer.

The rest of the project speaks Hugging Face: config.json keys, HF tensor names and layouts, a
``tokenizers.Tokenizer``.  This module translates a GGUF file into exactly that, so a GGUF source
goes through the same model code and export path as a safetensors folder.

Reading is split in two on purpose:

* a small pure-Python parser reads the header (metadata and tensor table).  It runs first, so a
  file that is not GGUF, is cut short, or holds a tensor type we cannot dequantize fails with one
  clear line naming the file and tensor, before MLX's C++ reader sees it;
* ``mx.load`` then reads the Q4_0/Q4_1/Q8_0 tensors, as MLX affine triples (packed uint32 + scales
  + biases, group 32) that ``mx.dequantize`` turns into floats.  F32/F16/BF16 tensors are read with
  numpy at their header offsets, because mx.load narrows BF16 to float16.

Layout differences undone here (facts from llama.cpp's convert_hf_to_gguf.py):

* architecture ``llama``: the converter permutes the rows of q and k so each head's rotary pairs are
  interleaved (GPT-J style); HF's rotate_half wants the two halves, so the permutation is inverted;
* ``gemma3``: every ``*norm.weight`` is stored as HF's ``w + 1``; we subtract 1 so the loader's
  Gemma fold (which adds 1) sees HF values;
* Llama-3 rope scaling is not stored as parameters but as a ``rope_freqs`` tensor of per-frequency
  divisors; it is mapped back to HF's ``rope_scaling`` dict when it matches the Llama-3.1 rule.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import CorruptModelError, ModelNotFoundError, UnsupportedError

SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma3")
# families we load from Hugging Face folders but not yet from GGUF: why, and what to do instead
NOT_YET = {
    "gemma4": "llama.cpp's gemma4 names (per-layer head sizes, per-layer inputs, KV sharing, fused experts) "
    "are not mapped; load the Hugging Face folder (gemma4 / gemma4_text) instead",
}

# ggml's type ids (ggml.h ``enum ggml_type``); gaps are ids ggml removed.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# (weights per block, bytes per block) of the types we read: enough to know where each tensor ends.
_BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34),
}  # fmt: skip
_QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_QUANT_GROUP = 32

# GGUF metadata value types: scalar struct formats and numpy dtypes for arrays of them.
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<B",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_ARRAY_DTYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
    7: np.uint8, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_FLOAT32 = 6


@dataclass
class GGUFModel:
    """Everything a Hugging Face folder would have given us, rebuilt from one GGUF file."""

    config: dict  # config.json equivalent
    weights: dict[str, mx.array]  # HF tensor names, dequantized to the requested dtype
    tokenizer: tokenizers.Tokenizer
    tokenizer_config: dict  # tokenizer_config.json equivalent
    metadata: dict  # GGUF key/values that are plain str/int/float/bool (for `info` and provenance)


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table."""

    name: str
    shape: tuple[int, ...]  # row-major, as numpy/MLX/HF see it (GGUF lists dims fastest-first)
    type_name: str
    offset: int  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        """Size on disk; only defined for the types we read."""
        per_block, block_bytes = _BLOCK_LAYOUT[self.type_name]
        return int(np.prod(self.shape, dtype=np.int64)) // per_block * block_bytes


@dataclass
class GGUFHeader:
    """What the pure-Python parser reads: everything but the tensor data."""

    version: int
    metadata: dict[str, Any]  # arrays as Python lists
    tensors: dict[str, TensorInfo]
    file_size: int


# --- public entry points ------------------------------------------------------------------------


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name (``Q4_1``, ``Q6_K``...), from the header alone."""
    return {t.name: t.type_name for t in read_header(path).tensors.values()}


def read_gguf(path: str | Path, dtype: mx.Dtype = mx.float32, lazy: bool = False) -> GGUFModel:
    """Read a GGUF file into an HF config, HF-named ``dtype`` weights and a tokenizer.

    Cheap checks come first (header, tensor types, architecture, tokenizer) so a bad or
    unsupported file fails before any tensor data is read.  ``lazy`` leaves each weight as an
    unevaluated dequantization of the file's (small, quantized) data, done when it is first used.
    """
    path = Path(path)
    header = read_header(path)
    check_tensors(path, header)
    config = hf_config(path, header)
    tokenizer, tokenizer_config = build_tokenizer(path, header.metadata)
    weights = hf_weights(path, header, config, dtype, lazy)
    return GGUFModel(config, weights, tokenizer, tokenizer_config, plain_metadata(header.metadata))


def plain_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The scalar key/values: arrays (vocabulary, merges...) are too big to show or record."""
    return {k: v for k, v in metadata.items() if isinstance(v, (str, int, float))}


# --- header parsing -----------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian GGUF fields from a byte buffer, refusing to run past its end."""

    def __init__(self, buffer: mmap.mmap | bytes, path: Path):
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buffer):
            raise CorruptModelError(
                f"{self.path}: truncated or corrupt GGUF header (needs {n} bytes at offset {self.pos}, "
                f"file has {len(self.buffer)})"
            )
        data = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return self.scalar("<I")

    def u64(self) -> int:
        return self.scalar("<Q")

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        if value_type not in _SCALAR_FORMATS:
            raise CorruptModelError(
                f"{self.path}: unknown GGUF metadata value type {value_type} at offset {self.pos}"
            )
        value = self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _BOOL:
            return value != 0
        if value_type == _FLOAT32:
            return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
        return value

    def array(self) -> list:
        item_type, count = self.u32(), self.u64()
        if item_type in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[item_type]).newbyteorder("<")
            values = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
            return (values != 0).tolist() if item_type == _BOOL else values.tolist()
        if count > len(self.buffer) - self.pos:  # every string or array item takes at least 8 bytes
            raise CorruptModelError(
                f"{self.path}: corrupt GGUF header (array of {count} items at offset {self.pos})"
            )
        return [self.value(item_type) for _ in range(count)]


def read_header(path: str | Path) -> GGUFHeader:
    """Parse magic, version, metadata and the tensor table; raises typed errors naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such GGUF file: {path}")
    size = path.stat().st_size
    if size < 24:
        raise CorruptModelError(f"{path} is not a GGUF file (only {size} bytes)")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return _parse_header(_Cursor(buffer, path), size)


def _parse_header(cursor: _Cursor, size: int) -> GGUFHeader:
    path = cursor.path
    magic = cursor.take(4)
    if magic != b"GGUF":
        raise CorruptModelError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    version = cursor.u32()
    if version not in (2, 3):  # v1 used 32-bit counts; a byte-swapped 3 means a big-endian file
        raise UnsupportedError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors, n_keys = cursor.u64(), cursor.u64()
    if n_tensors > size or n_keys > size:
        raise CorruptModelError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_keys} metadata keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.u32())
    infos = [_tensor_info(cursor) for _ in range(n_tensors)]
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise CorruptModelError(f"{path}: invalid general.alignment {alignment!r}")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, type_name, offset in infos:
        if name in tensors:
            raise CorruptModelError(f"{path}: tensor '{name}' appears twice in the GGUF tensor table")
        tensors[name] = TensorInfo(name, shape, type_name, data_start + offset)
    return GGUFHeader(version, metadata, tensors, size)


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], str, int]:
    name = cursor.string()
    n_dims = cursor.u32()
    if n_dims > 8:
        raise CorruptModelError(f"{cursor.path}: tensor '{name}' claims {n_dims} dimensions (corrupt header)")
    dims = [cursor.u64() for _ in range(n_dims)]
    type_id = cursor.u32()
    offset = cursor.u64()
    return name, tuple(reversed(dims)), GGML_TYPE_NAMES.get(type_id, f"type {type_id}"), offset


def check_tensors(path: Path, header: GGUFHeader) -> None:
    """Every tensor has a type we can dequantize, whole blocks per row, and data inside the file."""
    for info in header.tensors.values():
        if info.type_name not in SUPPORTED_GGUF_TYPES:
            raise UnsupportedError(
                f"{path}: tensor '{info.name}' has GGML type {info.type_name}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)}); use a GGUF quantized with one of those"
            )
    for info in header.tensors.values():
        per_block = _BLOCK_LAYOUT[info.type_name][0]
        if info.shape and info.shape[-1] % per_block:
            raise CorruptModelError(
                f"{path}: tensor '{info.name}' rows of {info.shape[-1]} are not whole {info.type_name} blocks"
            )
        end = info.offset + info.nbytes
        if end > header.file_size:
            raise CorruptModelError(
                f"{path} is truncated: tensor '{info.name}' ends at byte {end} but the file has {header.file_size}"
            )


# --- config -------------------------------------------------------------------------------------

_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
}


def architecture(path: Path, metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch in NOT_YET:
        raise UnsupportedError(f"{path}: GGUF architecture '{arch}' is not supported yet: {NOT_YET[arch]}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"{path}: GGUF architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def hf_config(path: Path, header: GGUFHeader) -> dict:
    """The config.json a Hugging Face checkpoint of this model would carry (keys our models read)."""
    meta = header.metadata
    arch = architecture(path, meta)

    def key(suffix: str, default: Any = None) -> Any:
        return _per_model(path, f"{arch}.{suffix}", meta.get(f"{arch}.{suffix}", default))

    def required(suffix: str) -> Any:
        value = key(suffix)
        if value is None:
            raise CorruptModelError(f"{path} lacks the GGUF key '{arch}.{suffix}'")
        return value

    hidden, heads = required("embedding_length"), required("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    config: dict[str, Any] = {
        "model_type": _MODEL_TYPES[arch],
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0),
        "max_position_embeddings": key("context_length", 2048),
        "vocab_size": _vocab_size(path, header, arch),
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    rope_dims = key("rope.dimension_count")
    if rope_dims is not None and rope_dims != head_dim:
        raise UnsupportedError(
            f"{path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
        )
    config.update(_special_token_ids(meta))
    scaling = _rope_scaling(path, header, arch, config)
    if scaling:
        config["rope_scaling"] = scaling
    if arch == "qwen2":
        config["attention_bias"] = True
    if arch == "gemma3":
        config.update(_gemma3_config(path, meta, config))
    if arch == "qwen3moe":
        config.update(
            num_experts=required("expert_count"),
            num_experts_per_tok=required("expert_used_count"),
            moe_intermediate_size=required("expert_feed_forward_length"),
            # llama.cpp's qwen3moe graph always renormalises the top-k weights (build_moe_ffn's norm_w)
            norm_topk_prob=True,
            decoder_sparse_step=1,
            # llama.cpp routes every layer; a block with a plain ffn_gate instead of a router is dense
            mlp_only_layers=[
                i for i in range(config["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in header.tensors
            ],
        )
    return config


def _per_model(path: Path, name: str, value: Any) -> Any:
    """Some GGUFs store per-layer arrays (head counts, FFN sizes); ours need one value for all layers."""
    if not isinstance(value, list):
        return value
    if len(set(value)) != 1:
        raise UnsupportedError(
            f"{path}: '{name}' differs between layers ({sorted(set(value))}); not supported"
        )
    return value[0]


def _vocab_size(path: Path, header: GGUFHeader, arch: str) -> int:
    """The embedding's row count decides: weights must load.  Gemma3's GGUF drops HF's padding rows."""
    embedding = header.tensors.get("token_embd.weight")
    if embedding is not None:
        return embedding.shape[0]
    size = header.metadata.get(f"{arch}.vocab_size")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if size is None and tokens is None:
        raise CorruptModelError(f"{path} has neither token_embd.weight nor a vocabulary")
    return int(size) if size is not None else len(tokens or ())


def _special_token_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos/eos (and end-of-turn, which chat models stop on) as HF config ids."""
    out: dict[str, Any] = {}
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        out["bos_token_id"] = bos
    eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    if eos_ids:
        out["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return out


def _rope_scaling(path: Path, header: GGUFHeader, arch: str, config: dict) -> dict | None:
    """HF rope_scaling from GGUF: ``linear`` from keys, ``llama3`` recognised from rope_freqs."""
    meta = header.metadata
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta[f"{arch}.rope.scaling.factor"]}
    if kind not in ("none", None):
        raise UnsupportedError(f"{path}: rope scaling '{kind}' is not supported (none, linear, llama3 are)")
    if "rope_freqs.weight" in header.tensors:
        return llama3_scaling_from_factors(
            path, read_float_tensor(path, header.tensors["rope_freqs.weight"]), config
        )
    return None


def llama3_scaling_from_factors(path: Path, factors: np.ndarray, config: dict) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency divisors.

    The converter stores only the divisors (1 for short wavelengths, ``factor`` for long ones, a blend
    between).  ``factor`` is their maximum; the band edges are not stored, so we try Llama 3.1's
    (low 1, high 4, original context 8192) and accept them only if they reproduce every divisor.
    """
    from ..ops.vocabulary import rope_inv_freq

    if np.allclose(factors, 1.0):
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = rope_inv_freq(config["head_dim"], config["rope_theta"], None)
    expected = base / rope_inv_freq(config["head_dim"], config["rope_theta"], scaling)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise UnsupportedError(
            f"{path}: its rope_freqs tensor does not match Llama-3.1-style rope scaling; not supported"
        )
    return scaling


def _gemma3_config(path: Path, meta: dict[str, Any], config: dict) -> dict:
    """Gemma3 keys HF carries and GGUF mostly leaves to llama.cpp's code (defaults from there)."""
    layers = config["num_hidden_layers"]
    window = meta.get("gemma3.attention.sliding_window")
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if window is None:  # the converter omits the window when no layer slides
        layer_types = ["full_attention"] * layers
    elif isinstance(pattern, list):  # per-layer flags: True = sliding
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
        ]
    scale = meta.get("gemma3.attention.scale")
    if scale:
        scalar = 1.0 / scale**2
    elif layers == 62:  # Gemma3-27B scales queries by hidden/heads, not head_dim (llama.cpp does the same)
        scalar = config["hidden_size"] / config["num_attention_heads"]
    else:
        scalar = config["head_dim"]
    if meta.get("gemma3.final_logit_softcapping"):
        raise UnsupportedError(f"{path}: Gemma3 with final logit soft-capping is not supported")
    return {
        "sliding_window": window or 4096,
        "sliding_window_pattern": pattern if isinstance(pattern, int) else 6,
        "layer_types": layer_types,
        "rope_local_base_freq": meta.get("gemma3.rope.freq_base_swa", 10_000.0),
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
    }


# --- weights ------------------------------------------------------------------------------------

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma3 has four norms per block: GGUF's ffn_norm is the one before the MLP.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Qwen3-MoE: the router and the experts, stacked (experts, out, in) as mlx-lm holds them.
_QWEN3MOE_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
_BLOCK_TABLES = {"gemma3": _GEMMA3_BLOCK_NAMES, "qwen3moe": _QWEN3MOE_BLOCK_NAMES}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONFIG_TENSORS = {"rope_freqs.weight"}  # read into config["rope_scaling"], not a weight
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(name: str, arch: str) -> str | None:
    """HF name of a GGUF tensor, or None when HF has no such tensor."""
    if m := _BLOCK_TENSOR.fullmatch(name):
        layer, part, kind = m.groups()
        table = _BLOCK_TABLES.get(arch, _BLOCK_NAMES)
        return f"model.layers.{layer}.{table[part]}.{kind}" if part in table else None
    if (m := _TOP_TENSOR.fullmatch(name)) and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def read_float_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """An F32/F16/BF16 tensor as float32, read with numpy straight from the file.

    Not through mx.load: MLX converts BF16 GGUF tensors to float16, which turns values beyond
    65504 into inf and flushes tiny ones; and a small tensor (rope_freqs) needs no full read.
    """
    count = int(np.prod(info.shape, dtype=np.int64))
    if info.type_name == "BF16":  # the top half of a float32
        bits = np.fromfile(path, dtype="<u2", count=count, offset=info.offset)
        data = (bits.astype(np.uint32) << 16).view(np.float32)
    elif info.type_name in ("F32", "F16"):
        data = np.fromfile(
            path, dtype="<f4" if info.type_name == "F32" else "<f2", count=count, offset=info.offset
        )
    else:
        raise UnsupportedError(f"{path}: tensor '{info.name}' is {info.type_name}, not a float type")
    if data.size != count:
        raise CorruptModelError(f"{path} is truncated inside tensor '{info.name}'")
    return data.astype(np.float32).reshape(info.shape)


def hf_weights(path: Path, header: GGUFHeader, config: dict, dtype: mx.Dtype, lazy: bool = False) -> dict[str, mx.array]:
    """Read, dequantize, rename and re-layout every tensor; one at a time to bound peak memory
    (or, ``lazy``, each when it is first used)."""
    arch = header.metadata["general.architecture"]
    names: dict[str, str] = {}
    for name in header.tensors:  # every name is checked before any data is read
        if name in _CONFIG_TENSORS:
            continue
        target = hf_name(name, arch)
        if target is None:
            raise UnsupportedError(
                f"{path}: tensor '{name}' has no Hugging Face equivalent for architecture '{arch}'"
            )
        names[name] = target
    quantized = _load_quantized(path, header)
    weights: dict[str, mx.array] = {}
    for name, target in names.items():
        info = header.tensors[name]
        if info.type_name in _QUANT_BITS:
            value = _dequantized(path, quantized, info)
        else:
            value = mx.array(read_float_tensor(path, info))
        value = _to_hf_layout(value, name, arch, config)
        weights[target] = value.astype(dtype)
        if not lazy:
            mx.eval(weights[target])
    return weights


def _load_quantized(path: Path, header: GGUFHeader) -> dict[str, mx.array]:
    """mx.load's view of the file, only when some tensor is block-quantized."""
    if not any(info.type_name in _QUANT_BITS for info in header.tensors.values()):
        return {}
    try:
        loaded = mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError with its own wording
        raise CorruptModelError(f"{path}: MLX could not read the tensor data ({e})") from None
    assert isinstance(loaded, dict)
    return loaded


def _dequantized(path: Path, loaded: dict[str, mx.array], info: TensorInfo) -> mx.array:
    """Float32 values of a Q4_0/Q4_1/Q8_0 tensor, which mx.load returns as MLX affine triples.

    ``name`` holds the packed uint32 codes, ``base.scales`` and ``base.biases`` one fp16 pair per
    32 weights (Q4_0's bias is -8 d, Q4_1's is m).
    """
    base = info.name.removesuffix(".weight")
    names = (info.name, f"{base}.scales", f"{base}.biases")
    if any(name not in loaded for name in names):
        raise CorruptModelError(f"{path}: MLX did not return the quantized parts of tensor '{info.name}'")
    packed, scales, biases = (loaded.pop(name) for name in names)
    # scales and biases in float32 so d*q + m is not rounded to fp16 on the way
    value = mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=_QUANT_GROUP,
        bits=_QUANT_BITS[info.type_name],
    )
    if tuple(value.shape) != info.shape:
        raise CorruptModelError(
            f"{path}: tensor '{info.name}' read as {tuple(value.shape)}, header says {info.shape}"
        )
    return value


def _to_hf_layout(value: mx.array, name: str, arch: str, config: dict) -> mx.array:
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"]
        return unpermute_rope_rows(value, heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return value - 1.0
    return value


def permute_rope_rows(w: mx.array | np.ndarray, heads: int) -> Any:
    """llama.cpp's q/k permutation (HF halves -> interleaved pairs), per head: row 2i <- i, 2i+1 <- i + d/2."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: mx.array | np.ndarray, heads: int) -> Any:
    """Inverse of :func:`permute_rope_rows`: interleaved rotary pairs back to HF's two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- tokenizer ----------------------------------------------------------------------------------

# Pre-tokenizer split patterns of the HF tokenizer.json files (published data, needed verbatim).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> family of HF pre-tokenizer
_PRE_FAMILIES = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "smollm": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}
_CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 3, 4, 5, 6
# tokenizer_config.json name -> GGUF ``tokenizer.ggml.{key}_token_id``
_SPECIAL_TOKEN_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def build_tokenizer(path: Path, meta: dict[str, Any]) -> tuple[tokenizers.Tokenizer, dict]:
    """A ``tokenizers.Tokenizer`` equivalent to the model's HF tokenizer.json, plus tokenizer_config."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedError(f"{path} has no embedded tokenizer (tokenizer.ggml.tokens is missing)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CorruptModelError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(path, meta, tokens)
        default_bos = _PRE_FAMILIES.get(meta.get("tokenizer.ggml.pre", "default")) == "llama3"
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(path, meta, tokens, types)
        default_bos = True
    else:
        raise UnsupportedError(
            f"{path}: tokenizer model '{kind}' is not supported (gpt2 byte-level BPE and llama SentencePiece are)"
        )
    _add_special_tokens(tokenizer, tokens, types)
    config = _tokenizer_config(meta, tokens, default_bos)
    _add_post_processor(tokenizer, config, meta)
    return tokenizer, config


def _byte_level_bpe(path: Path, meta: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    family = _PRE_FAMILIES.get(pre)
    if family is None:
        known = ", ".join(sorted(_PRE_FAMILIES))
        raise UnsupportedError(f"{path}: BPE pre-tokenizer '{pre}' is not supported (supported: {known})")
    merges = [_split_merge(m) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=family == "llama3"))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(family)
    if family == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _split_merge(merge: str) -> tuple[str, str]:
    """``"Ġ t"`` -> ("Ġ", "t"); the separator is the first space after the first character."""
    i = merge.find(" ", 1)
    return (merge[:i], merge[i + 1 :]) if i > 0 else (merge, "")


def _byte_level_pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits":  # SmolLM: every digit its own word, then GPT-2's split
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    pattern = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_bpe(
    path: Path, meta: dict[str, Any], tokens: list[str], types: list[int]
) -> tokenizers.Tokenizer:
    """SentencePiece vocabularies (Llama 2, Gemma) as HF does them: BPE with merges ranked by score.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose union has the highest score;
    HF's BPE merges the lowest-ranked pair.  Ranking every (left, right) split of each piece by that
    piece's score makes the two agree.  Characters outside the vocabulary fall back to <0xNN> bytes.
    """
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    if len(scores) != len(tokens):
        raise CorruptModelError(f"{path}: {len(tokens)} tokens but {len(scores)} token scores")
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab,
        sentencepiece_merges(tokens, types, scores),
        unk_token=tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=_BYTE in types,
    )
    tokenizer = tokenizers.Tokenizer(model)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if prefix else decode)
    return tokenizer


def sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two vocabulary pieces, best-scored piece first."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] not in (_CONTROL, _BYTE, _UNUSED)}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tokenizer: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens; user-defined ones plain added tokens (as in HF).

    Either way they are matched whole before pre-tokenization, so ``<|im_start|>`` is one id.
    """
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    added = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if added:
        tokenizer.add_tokens(added)


def _tokenizer_config(meta: dict[str, Any], tokens: list[str], default_bos: bool) -> dict:
    config: dict[str, Any] = {}
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{name}_token"] = tokens[token_id]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _add_post_processor(tokenizer: tokenizers.Tokenizer, config: dict, meta: dict[str, Any]) -> None:
    """BOS/EOS around encoded text, only when the GGUF asks for them (HF's TemplateProcessing)."""
    wanted = [k for k in ("bos", "eos") if config[f"add_{k}_token"] and f"{k}_token" in config]
    if not wanted:
        return
    bos = [config["bos_token"]] if "bos" in wanted else []
    eos = [config["eos_token"]] if "eos" in wanted else []
    ids = {config[f"{k}_token"]: meta[f"tokenizer.ggml.{k}_token_id"] for k in wanted}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
        special_tokens=list(ids.items()),
    )


__all__ = [
    "GGUFModel",
    "SUPPORTED_GGUF_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "gguf_tensor_types",
    "read_gguf",
    "read_header",
]

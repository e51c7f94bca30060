"""The ANEMLL export format, owned here and nowhere else.

ANEMLL's runtimes (its chat.py, the Swift anemllcli, the ANEMLLChat app) load an export folder by
names: file stems, meta.yaml keys, function names, input/output and state names.  Those strings are
an interface, so they live in this one module: ``export/`` writes through it, ``runtime/`` reads
through it and ``inspect`` checks against it.  Facts from ANEMLL 0.3.5 (shared/notes/anemll-format.md);
what we add (our ``anemll_mlx`` section, Gemma3's split cache) is marked as ours.

Layout of a folder:
    {prefix}_embeddings[_lutB].mlpackage        input_ids (1, T) -> hidden_states (1, T, H)
    {prefix}_FFN_PF[_lutB]_chunk_NNofMM.mlpackage
        functions infer (T = 1) and prefill (T = batch), [infer_rotate, prefill_rotate]:
        hidden_states, position_ids, causal_mask, current_pos + the KV state -> output_hidden_states
    {prefix}_lm_head[_lutB].mlpackage           hidden_states (1, 1, H) -> logits1..N | argmax_idx/val
    meta.yaml, config.json, tokenizer files

Exports made by ANEMLL itself (0.3.5) differ in ways a host must follow (``shared/notes`` and
docs/ARCHITECTURE.md): the KV state may hold more positions than the context (at least 512), the
``causal_mask`` input is as wide as the program declares, and ``prefill`` may return a (1, 1, H)
placeholder instead of the batch's hidden states, so the host runs the last prompt token through
``infer`` again for its logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import BadArgumentError, CorruptModelError, ModelNotFoundError

# --- parts and their LUT settings ---------------------------------------------------------------

PARTS = ("embeddings", "ffn", "lm_head")  # the one name of each part: CLI, library and our meta
ANEMLL_LUT_NAMES = {"embeddings": "embeddings", "ffn": "ffn", "lm_head": "lmhead"}  # meta.yaml lut_{name}

# model_type -> what ANEMLL calls the architecture (meta.yaml, and the default file prefix)
ARCHITECTURES = {
    "llama": "llama",
    "qwen3": "qwen",
    "qwen2": "qwen25",
    "gemma3_text": "gemma3",
    "gemma4_text": "gemma4",  # not an ANEMLL 0.3.5 family: this name is ours
    "qwen3_moe": "qwen3_moe",  # ANEMLL 0.3.5 has no mixture-of-experts family: this name is ours
}


# --- file stems ---------------------------------------------------------------------------------

# meta.yaml names the compiled programs, as ANEMLL does: its Swift runtime opens those names verbatim
# (a bare stem is "not found"), and its Python chat falls back to the .mlpackage beside them
COMPILED = ".mlmodelc"


def _lut_tag(bits: int | None) -> str:
    return f"_lut{bits}" if bits else ""


@dataclass(frozen=True)
class PartFiles:
    """File stems of an export's programs (no suffix: .mlpackage, or .mlmodelc once compiled).

    The embeddings and the LM head are one program each, as ANEMLL names them, unless the size
    budget splits them (ours): then ``_NNofMM`` follows the name, and ANEMLL's keys name the first.
    """

    embeddings: list[str]
    chunks: list[str]
    lm_head: list[str]

    @classmethod
    def named(
        cls, prefix: str, lut_bits: dict[str, int | None], chunks: int, embeddings: int = 1, lm_heads: int = 1
    ) -> PartFiles:
        ffn = f"{prefix}_FFN_PF{_lut_tag(lut_bits.get('ffn'))}"
        return cls(
            embeddings=_numbered(f"{prefix}_embeddings{_lut_tag(lut_bits.get('embeddings'))}", embeddings),
            chunks=[f"{ffn}_chunk_{i + 1:02d}of{chunks:02d}" for i in range(chunks)],
            lm_head=_numbered(f"{prefix}_lm_head{_lut_tag(lut_bits.get('lm_head'))}", lm_heads),
        )

    def all(self) -> list[str]:
        return [*self.embeddings, *self.chunks, *self.lm_head]


def _numbered(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i + 1:02d}of{count:02d}" for i in range(count)]


def chunk_stems(first: str, total: int) -> list[str]:
    """ANEMLL names chunk NN of MM by replacing the ``_chunk_01ofMM`` of the first chunk's name."""
    first = _stem(first)
    marker = f"_chunk_01of{total:02d}"
    if marker not in first:
        raise CorruptModelError(f"meta.yaml ffn '{first}' does not end in {marker}")
    return [first.replace(marker, f"_chunk_{i + 1:02d}of{total:02d}") for i in range(total)]


def _stem(name: str) -> str:
    return name.removesuffix(COMPILED).removesuffix(".mlpackage")


# --- functions, inputs, outputs -----------------------------------------------------------------

INFER, PREFILL = "infer", "prefill"
ROTATE = "_rotate"  # Gemma3 past its sliding window (ours): infer_rotate, prefill_rotate

INPUT_IDS = "input_ids"
HIDDEN_STATES = "hidden_states"
POSITION_IDS = "position_ids"
CAUSAL_MASK = "causal_mask"
CURRENT_POS = "current_pos"
OUTPUT_HIDDEN_STATES = "output_hidden_states"
ARGMAX_IDX, ARGMAX_VAL = "argmax_idx", "argmax_val"
CHUNK_INPUTS = (HIDDEN_STATES, POSITION_IDS, CAUSAL_MASK, CURRENT_POS)


@dataclass(frozen=True)
class ChunkFunction:
    name: str
    tokens: int
    rotate: bool


def chunk_functions(batch: int, rotate: bool) -> list[ChunkFunction]:
    """The functions every FFN chunk holds: ``infer`` (1 token) and ``prefill`` (a batch), plus
    their ``_rotate`` variants when the export has a split cache (see ``split_window``)."""
    kinds = [ChunkFunction(INFER, 1, False), ChunkFunction(PREFILL, batch, False)]
    if rotate:
        kinds += [ChunkFunction(f.name + ROTATE, f.tokens, True) for f in kinds]
    return kinds


def host_function(kind: str, start: int, tokens: int, window: int | None) -> str:
    """Which function a host calls for ``tokens`` tokens at ``start``: the ``_rotate`` variant once
    the call starts at or past the sliding window ``window`` (a split-cache export), else ``kind``."""
    if window is None:
        return kind
    if start < window < start + tokens:
        raise BadArgumentError(
            f"a {tokens}-token call at position {start} straddles the sliding window {window}: "
            "the export's batch size must divide its window"
        )
    return kind + ROTATE if start >= window else kind


def straddles(start: int, tokens: int, window: int | None) -> bool:
    """Whether a ``tokens``-token call at ``start`` would cross the sliding window ``window`` (a
    split-cache export can only run it as single tokens up to the window)."""
    return window is not None and start < window < start + tokens


def returns_batch(output_rows: int, tokens: int) -> bool:
    """Whether a ``prefill`` returned the hidden states of its whole batch (ours) rather than
    ANEMLL's (1, 1, H) placeholder, after which the host runs the last token through ``infer``."""
    return output_rows >= tokens


def logits_name(piece: int) -> str:
    """Output name of LM-head piece ``piece`` (from 0): logits1, logits2, ..."""
    return f"logits{piece + 1}"


def logits_pieces(names: list[str]) -> list[str]:
    """The logits outputs among ``names``, in vocabulary order."""
    pieces = [n for n in names if n.startswith("logits") and n[len("logits") :].isdigit()]
    return sorted(pieces, key=lambda n: int(n[len("logits") :]))


# --- mixture-of-experts exports (ours: ANEMLL 0.3.5 has no MoE format) ------------------------

# A mixture-of-experts layer too large for one program (or exported for routed execution) becomes
# an attention part and expert packs, all numbered as FFN chunks in the order a host runs them.
# The layer's output is finished by whichever of its programs the host calls last ("the chain"),
# since a family may combine the experts nonlinearly (Gemma 4 norms their sum, adds its dense MLP
# and norms again):
#   attention part: the chunk interface -> OUTPUT_HIDDEN_STATES (the layer's output as if no other
#                   expert ran), MOE_RESIDUAL h (the residual after attention), EXPERT_WEIGHTS
#                   (1, T, experts: the router's weights, zero outside the top k), MOE_SHARED (the
#                   branch every token takes beside the experts, for families that have one) and,
#                   when the first experts fit beside the attention, their weighted sum EXPERT_SUM;
#   expert pack:    functions infer/prefill without a state: hidden_states (h), expert_weights,
#                   EXPERT_SUM_IN (the sum of the experts run so far; zeros first) [and MOE_SHARED]
#                   -> OUTPUT_HIDDEN_STATES (the layer's output with this pack's experts added)
#                   and EXPERT_SUM (the running sum, for the next pack).
# The host takes the layer's output from the last program it called.  Dense mode calls every pack;
# routed mode only the packs holding an expert of nonzero weight; gathered mode (an export made
# for it) decodes through the GATHER programs and prefills as routed.
EXPERT_WEIGHTS = "expert_weights"
EXPERT_SUM = "expert_sum"  # a running sum out
EXPERT_SUM_IN = "expert_sum_in"  # and in (a program's input and output cannot share a name)
MOE_RESIDUAL = "moe_residual"
MOE_SHARED = "moe_shared"
MOE_LAYOUT_VERSION = 2  # 1 (before the chain): the host summed the packs' outputs
# gathered mode (decode only): a GATHER program per sparse layer takes the chosen experts' weights
# as inputs, (k, I, H) gate and up and (k, H, I) down, with their routing weights (1, 1, k), and
# gives the layer's output; the host gathers them from the export's stacked weights, EXPERT_FILES
# per layer (fp16 .npy)
EXPERTS_GATE, EXPERTS_UP, EXPERTS_DOWN = "experts_gate", "experts_up", "experts_down"
LAYERS, ATTENTION, EXPERTS, GATHER = "layers", "attention", "experts", "gather"  # the kinds of chunk
MOE_MODES = ("dense", "routed", "gathered")


def expert_file(prefix: str, layer: int, projection: str) -> str:
    """The stacked weights of one projection (gate, up or down) of a sparse layer's experts,
    (experts, out, in) fp16, that a host gathers the chosen experts' weights from (ours)."""
    return f"{prefix}_experts_L{layer:02d}_{projection}.npy"


@dataclass(frozen=True)
class ChunkRole:
    """What one FFN chunk computes: a range of whole layers, a layer's attention part (with its
    router, and ``experts`` when some ride in it), or a pack of a layer's experts."""

    kind: str  # LAYERS | ATTENTION | EXPERTS
    layers: range
    experts: range | None = None  # an expert pack's experts

    def to_dict(self) -> dict:
        if self.kind == LAYERS:
            return {"kind": self.kind, "layers": [self.layers.start, self.layers.stop]}
        out: dict[str, Any] = {"kind": self.kind, "layer": self.layers.start}
        if self.experts is not None:
            out["experts"] = [self.experts.start, self.experts.stop]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ChunkRole:
        kind = str(d["kind"])
        if kind == LAYERS:
            return cls(kind, range(int(d["layers"][0]), int(d["layers"][1])))
        if kind not in (ATTENTION, EXPERTS, GATHER):
            raise ValueError(f"unknown chunk kind '{kind}'")
        layer = int(d["layer"])
        experts = range(int(d["experts"][0]), int(d["experts"][1])) if kind == EXPERTS or "experts" in d else None
        return cls(kind, range(layer, layer + 1), experts)


@dataclass(frozen=True)
class MoELayout:
    """meta.yaml's ``anemll_mlx.moe``: the role of every chunk, the execution mode hosts use by
    default, and whether the LM head applies the final norm (when the last chunk is an expert pack)."""

    roles: list[ChunkRole]
    mode: str  # MOE_MODES
    num_experts: int
    top_k: int
    final_norm_in_lm_head: bool
    shared_branch: bool = False  # the attention parts output MOE_SHARED and the packs take it

    def to_dict(self) -> dict:
        return {
            "version": MOE_LAYOUT_VERSION,
            "mode": self.mode,
            "num_experts": self.num_experts,
            "experts_per_token": self.top_k,
            "final_norm_in_lm_head": self.final_norm_in_lm_head,
            "shared_branch": self.shared_branch,
            "chunks": [r.to_dict() for r in self.roles],
        }

    @classmethod
    def from_dict(cls, d: dict) -> MoELayout:
        if d.get("version", 1) != MOE_LAYOUT_VERSION:
            raise ValueError(
                f"layout version {d.get('version', 1)}, this anemll-mlx runs version {MOE_LAYOUT_VERSION}: export the model again"
            )
        return cls(
            roles=[ChunkRole.from_dict(r) for r in d["chunks"]],
            mode=str(d["mode"]),
            num_experts=int(d["num_experts"]),
            top_k=int(d["experts_per_token"]),
            final_norm_in_lm_head=bool(d.get("final_norm_in_lm_head", False)),
            shared_branch=bool(d.get("shared_branch", False)),
        )


# --- the KV state -------------------------------------------------------------------------------

KV_STATE = "model.model.kv_cache_0"  # ANEMLL's name for the one shared state
KV_STATE_STORED = "model_model_kv_cache_0"  # ML Program names allow only [A-Za-z0-9_]
LOCAL_STATE, GLOBAL_STATE = "kv_cache_local", "kv_cache_global"  # ours: Gemma3 past its window


@dataclass(frozen=True)
class KVState:
    """One state: keys of its i-th layer in row i, values in row len(layers) + i."""

    name: str
    shape: tuple[int, int, int, int]  # (2 * layers, kv heads, context, head dim)
    layers: tuple[int, ...]  # the model layers it holds, in row order


def split_window(window: int | None, context: int, sliding: list[bool]) -> int | None:
    """The sliding window W when an export of ``context`` positions needs a split cache (some layer
    slides and the window bites within the context), else None: then one state serves every layer
    under the host's causal mask, which is exact because the window never bites."""
    if window is None or context <= window or not any(sliding):
        return None
    return int(window)


def kv_states(sliding: list[bool], kv_heads: int, head_dim: int, context: int, window: int | None) -> list[KVState]:
    """ANEMLL's one state, or with a split cache a local state (sliding layers) and a global one
    (the others), both over the whole context (positions are absolute); an empty one is left out."""
    layers = len(sliding)
    if split_window(window, context, sliding) is None:
        return [KVState(KV_STATE, (2 * layers, kv_heads, context, head_dim), tuple(range(layers)))]
    groups = {
        LOCAL_STATE: tuple(i for i in range(layers) if sliding[i]),
        GLOBAL_STATE: tuple(i for i in range(layers) if not sliding[i]),
    }
    return [KVState(name, (2 * len(rows), kv_heads, context, head_dim), rows) for name, rows in groups.items() if rows]


def stored_state_name(name: str) -> str:
    return name.replace(".", "_")


# --- masks --------------------------------------------------------------------------------------


def causal_mask(start: int, tokens: int, width: int, window: int | None = None) -> np.ndarray:
    """Additive mask (1, 1, tokens, width), float32: 0 where query ``start + t`` may see key ``j``,
    -inf elsewhere.  A key is visible when it is not in the future and, with a sliding ``window``,
    fewer than ``window`` positions back (the query itself included), as Hugging Face's Gemma3
    masks it.  Hosts pass it (cast to fp16) as ``causal_mask``; the MLX reference uses it too."""
    q = np.arange(start, start + tokens)[:, None]
    k = np.arange(width)[None]
    visible = k <= q
    if window is not None:
        visible &= k > q - window
    return np.where(visible, np.float32(0.0), np.float32(-np.inf))[None, None]


def band_mask(window: int, tokens: int) -> np.ndarray:
    """(1, 1, tokens, window + tokens) fp16 mask of a rotate function's sliding layers: key i is
    position current_pos - window + i, so query t sees it iff t < i <= window + t."""
    t = np.arange(tokens)[:, None]
    i = np.arange(window + tokens)[None]
    return np.where((i > t) & (i <= window + t), 0.0, -np.inf).astype(np.float16)[None, None]


# --- meta.yaml ----------------------------------------------------------------------------------

META = "meta.yaml"
_INFO = "model_info"
_PARAMS = "parameters"
_OURS = "anemll_mlx"
MODEL_INFO_KEYS = ("name", "version", "architecture", _PARAMS)
_REQUIRED = ("context_length", "batch_size", "num_chunks", "model_prefix", "embeddings", "lm_head", "ffn")


@dataclass(frozen=True)
class LUTSetting:
    """What meta.yaml says of one part's palettization: bits and output channels per table (None:
    one table for the whole tensor)."""

    bits: int
    group_size: int | None


@dataclass
class ExportMeta:
    """Everything meta.yaml holds, by meaning rather than by key.

    ``ours`` is False for exports made by ANEMLL itself (no ``anemll_mlx`` section); the fields
    of that section are then None.
    """

    name: str
    description: str
    license: str
    architecture: str
    context: int
    batch: int
    lut: dict[str, LUTSetting | None]  # part -> setting
    prefix: str
    files: PartFiles
    head_sizes: list[int] | None
    vocab_size: int | None
    argmax_in_model: bool = False
    sliding_window: int | None = None
    recommended_sampling: dict | None = None
    # the prefill writes its batch at any current_pos (ours always do); ANEMLL's Swift runtime
    # then prefills partial batches in one call instead of token by token
    prefill_dynamic_slice: bool = True
    version: str = ""
    # our own section
    ours: bool = True
    source: str | None = None
    source_sha256: str | None = None
    model_type: str | None = None
    fp16_scale: float | None = None
    attention_chunk: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    chunk_layers: list[range] | None = None
    kv_states: list[KVState] | None = None
    head_part_pieces: list[int] | None = None  # LM-head pieces in each LM-head program (when split)
    calibration: Calibration | None = None  # the LUTs were fitted weighted by these statistics
    # the LUTs of some parts are a LUT checkpoint's, exported as they are: {"checkpoint": folder,
    # "qat_json_sha256": sha256 of its qat.json, "parts": [the parts whose tables it gave]}
    lut_source: dict | None = None
    missing_info: list[str] = field(default_factory=list)  # model_info keys ANEMLL reads that are absent
    moe: MoELayout | None = None  # an export with attention parts and expert packs (ours)
    embeddings_rows: list[range] | None = None  # the vocabulary rows of each embeddings program (when split)

    @property
    def split_lm_head(self) -> int:
        return len(self.head_sizes) if self.head_sizes else 1

    @property
    def window(self) -> int | None:
        """The sliding window when the export has rotate functions (window < context), else None."""
        w = self.sliding_window
        return int(w) if w and int(w) < self.context else None

    # writing

    def to_yaml(self) -> str:
        params: dict[str, Any] = {"context_length": self.context, "batch_size": self.batch}
        for part in PARTS:
            key = f"lut_{ANEMLL_LUT_NAMES[part]}"
            setting = self.lut.get(part)
            params[key] = "none" if setting is None else setting.bits
            if setting is not None:
                params[f"{key}_per_channel"] = setting.group_size or 0
        params.update(
            {
                "num_chunks": len(self.files.chunks),
                "model_prefix": self.prefix,
                "embeddings": self.files.embeddings[0] + COMPILED,
                "lm_head": self.files.lm_head[0] + COMPILED,
                "ffn": self.files.chunks[0] + COMPILED,
                "split_lm_head": self.split_lm_head,
                "vocab_size": self.vocab_size,
                "lm_head_chunk_sizes": self.head_sizes,
                "argmax_in_model": self.argmax_in_model,
                "prefill_dynamic_slice": self.prefill_dynamic_slice,
            }
        )
        if self.sliding_window:
            params["sliding_window"] = self.sliding_window
        if self.recommended_sampling:
            params["recommended_sampling"] = self.recommended_sampling
        info = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "license": self.license,
            "author": "anemll-mlx",
            "framework": "Core ML",
            "language": "Python",
            "architecture": self.architecture,
            _PARAMS: params,
        }
        ours: dict[str, Any] = {
            "version": self.version,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "model_type": self.model_type,
            "fp16_scale": self.fp16_scale,
            "attention_chunk": self.attention_chunk,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "chunk_layers": [[r.start, r.stop] for r in self.chunk_layers or []],
        }
        if len(self.files.embeddings) > 1:  # split by the size budget: programs ANEMLL's runtimes do not know
            ours["embeddings_parts"] = self.files.embeddings
            if self.embeddings_rows:  # a host calls only the programs holding the ids it looks up
                ours["embeddings_rows"] = [[r.start, r.stop] for r in self.embeddings_rows]
        if len(self.files.lm_head) > 1:
            ours["lm_head_parts"] = self.files.lm_head
            ours["lm_head_part_pieces"] = self.head_part_pieces
        if self.calibration is not None:
            ours["calibration"] = {
                "source": self.calibration.source,
                "tokens": self.calibration.tokens,
                "statistic": self.calibration.statistic,
            }
        if self.lut_source is not None:
            ours["lut_source"] = self.lut_source
        if self.moe is not None:
            ours["moe"] = self.moe.to_dict()
        states = self.kv_states or []
        if len(states) == 1 and states[0].name == KV_STATE:
            ours["kv_state"] = {"name": KV_STATE, "shape": list(states[0].shape)}
        else:  # the split cache: hosts call the _rotate functions once current_pos >= sliding_window
            ours["kv_states"] = [{"name": s.name, "shape": list(s.shape), "layers": list(s.layers)} for s in states]
        return yaml.safe_dump({_INFO: info, _OURS: ours}, sort_keys=False)

    # reading

    @classmethod
    def from_yaml(cls, text: str, where: str) -> ExportMeta:
        """Read meta.yaml (ours or ANEMLL's); malformed files raise CorruptModelError."""
        try:
            meta = yaml.safe_load(text)
            info = meta[_INFO]
            params = info[_PARAMS]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise CorruptModelError(f"{where} is malformed ({type(e).__name__}: {e})") from None
        missing = [k for k in _REQUIRED if k not in params]
        if missing:
            raise CorruptModelError(f"{where} lacks {_INFO}.{_PARAMS}.{', '.join(missing)}")
        try:
            context, batch, chunks = int(params["context_length"]), int(params["batch_size"]), int(params["num_chunks"])
            sizes = params.get("lm_head_chunk_sizes")
            head_sizes = [int(s) for s in sizes] if sizes else None
            lut = {part: _read_lut(params, ANEMLL_LUT_NAMES[part]) for part in PARTS}
        except (TypeError, ValueError) as e:
            raise CorruptModelError(f"{where} has a malformed number ({e})") from None
        vocab = params.get("vocab_size")
        ours = meta.get(_OURS) or {}
        return cls(
            name=str(info.get("name", "")),
            description=str(info.get("description", "")),
            license=str(info.get("license", "")),
            architecture=str(info.get("architecture", "")),
            version=str(info.get("version", "")),
            context=context,
            batch=batch,
            lut=lut,
            prefix=str(params["model_prefix"]),
            files=PartFiles(
                embeddings=[_stem(str(s)) for s in ours.get("embeddings_parts") or [params["embeddings"]]],
                chunks=chunk_stems(str(params["ffn"]), chunks),
                lm_head=[_stem(str(s)) for s in ours.get("lm_head_parts") or [params["lm_head"]]],
            ),
            head_part_pieces=[int(n) for n in ours["lm_head_part_pieces"]] if ours.get("lm_head_part_pieces") else None,
            head_sizes=head_sizes,
            vocab_size=int(vocab) if vocab else (sum(head_sizes) if head_sizes else None),
            argmax_in_model=bool(params.get("argmax_in_model", False)),
            sliding_window=params.get("sliding_window"),
            recommended_sampling=params.get("recommended_sampling"),
            prefill_dynamic_slice=bool(params.get("prefill_dynamic_slice", bool(ours))),
            ours=bool(ours),
            source=ours.get("source"),
            source_sha256=ours.get("source_sha256"),
            model_type=ours.get("model_type"),
            fp16_scale=ours.get("fp16_scale"),
            attention_chunk=ours.get("attention_chunk"),
            hidden_size=ours.get("hidden_size"),
            num_layers=ours.get("num_layers"),
            chunk_layers=[range(a, b) for a, b in ours["chunk_layers"]] if ours.get("chunk_layers") else None,
            kv_states=_read_states(ours),
            calibration=_read_calibration(ours, where),
            lut_source=ours.get("lut_source") if isinstance(ours.get("lut_source"), dict) else None,
            missing_info=[k for k in MODEL_INFO_KEYS if k not in info],
            moe=_read_moe(ours, where, chunks),
            embeddings_rows=_read_rows(ours.get("embeddings_rows"), where),
        )


@dataclass(frozen=True)
class Calibration:
    """How the LUTs of a calibrated export were weighted: the statistic (per input feature of each
    quantized Linear), what text it was measured on and over how many tokens."""

    source: str
    tokens: int
    statistic: str = "mean_square_input"


def _read_calibration(ours: dict, where: str) -> Calibration | None:
    block = ours.get("calibration")
    if block is None:
        return None
    try:
        return Calibration(str(block["source"]), int(block["tokens"]), str(block.get("statistic", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptModelError(f"{where} calibration is malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class RecommendedSampling:
    """meta.yaml's optional ``recommended_sampling`` (read by ANEMLL's Swift runtime): None where
    it says nothing.  ``do_sample: false`` means greedy."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def recommended_sampling(meta: ExportMeta) -> RecommendedSampling:
    block = meta.recommended_sampling
    if not isinstance(block, dict):
        return RecommendedSampling()
    try:
        temp = block.get("temperature")
        if block.get("do_sample") is False:
            temp = 0.0
        top_p, top_k = block.get("top_p"), block.get("top_k")
        return RecommendedSampling(
            float(temp) if temp is not None else None,
            float(top_p) if top_p is not None else None,
            int(top_k) if top_k is not None else None,
        )
    except (TypeError, ValueError) as e:
        raise CorruptModelError(f"{META} recommended_sampling is malformed ({e})") from None


def _read_lut(params: dict, name: str) -> LUTSetting | None:
    bits = params.get(f"lut_{name}", "none")
    if bits in (None, "none", False):
        return None
    group = params.get(f"lut_{name}_per_channel")
    return LUTSetting(int(bits), int(group) if group else None)


def _read_rows(rows: Any, where: str) -> list[range] | None:
    if rows is None:
        return None
    try:
        return [range(int(a), int(b)) for a, b in rows]
    except (TypeError, ValueError) as e:
        raise CorruptModelError(f"{where} anemll_mlx.embeddings_rows is malformed ({e})") from None


def _read_moe(ours: dict, where: str, chunks: int) -> MoELayout | None:
    block = ours.get("moe")
    if block is None:
        return None
    try:
        layout = MoELayout.from_dict(block)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CorruptModelError(f"{where} anemll_mlx.moe is malformed ({type(e).__name__}: {e})") from None
    if len(layout.roles) != chunks or layout.mode not in MOE_MODES:
        raise CorruptModelError(f"{where} anemll_mlx.moe names {len(layout.roles)} chunks (num_chunks {chunks}) or a bad mode")
    return layout


def _read_states(ours: dict) -> list[KVState] | None:
    if "kv_state" in ours:
        state = ours["kv_state"]
        shape = tuple(state["shape"])
        return [KVState(state["name"], shape, tuple(range(shape[0] // 2)))]
    if "kv_states" in ours:
        return [KVState(s["name"], tuple(s["shape"]), tuple(s.get("layers", ()))) for s in ours["kv_states"]]
    return None


# --- an export folder on disk -------------------------------------------------------------------


@dataclass
class ExportFolder:
    """An export folder: its meta.yaml and the program files it names."""

    path: Path
    meta: ExportMeta
    embeddings: list[Path]  # one program, or several when the size budget split the table
    chunks: list[Path]
    lm_head: list[Path]  # likewise; their logits outputs continue one numbering (logits1..N)

    def programs(self) -> list[Path]:
        return [*self.embeddings, *self.chunks, *self.lm_head]


def _program(folder: Path, stem: str, prefer_compiled: bool, must_exist: bool) -> Path:
    """The .mlmodelc (when preferred and present) or .mlpackage for a file stem.  Without
    ``must_exist`` a missing program comes back as its .mlpackage path, for ``inspect`` to report."""
    order = (".mlmodelc", ".mlpackage") if prefer_compiled else (".mlpackage", ".mlmodelc")
    for suffix in order:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    if not must_exist:
        return folder / f"{stem}.mlpackage"
    raise CorruptModelError(f"{folder} lacks {stem}.mlpackage (named in {META})")


def read_export(folder: str | Path, prefer_compiled: bool = False, must_exist: bool = True) -> ExportFolder:
    """The export in ``folder``; ``must_exist=False`` tolerates missing programs (for ``inspect``)."""
    path = Path(folder)
    if path.is_file():
        raise BadArgumentError(f"{path} is a file, not an export folder (the folder export --out wrote)")
    if not path.is_dir():
        raise ModelNotFoundError(f"no such export folder: {path}")
    meta_path = path / META
    if not meta_path.exists():
        raise ModelNotFoundError(f"{path} has no {META}: not an export folder")
    meta = ExportMeta.from_yaml(meta_path.read_text(encoding="utf-8"), str(meta_path))
    files = meta.files
    return ExportFolder(
        path=path,
        meta=meta,
        embeddings=[_program(path, stem, prefer_compiled, must_exist) for stem in files.embeddings],
        chunks=[_program(path, stem, prefer_compiled, must_exist) for stem in files.chunks],
        lm_head=[_program(path, stem, prefer_compiled, must_exist) for stem in files.lm_head],
    )


def write_meta(folder: Path, meta: ExportMeta) -> None:
    (folder / META).write_text(meta.to_yaml(), encoding="utf-8")

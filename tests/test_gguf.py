"""GGUF loading: header parsing and errors, dequantization, HF names and layouts, configs, tokenizers.

Tiny files come from tests/gguf_writer.py (written independently of the reader); the real
SmolLM2-135M-Instruct Q4_1 file is used when it is in the cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from anemll_mlx.errors import CorruptModelError, ModelNotFoundError, UnsupportedError
from anemll_mlx.loading.gguf import (
    SUPPORTED_GGUF_TYPES,
    gguf_tensor_types,
    read_gguf,
    read_header,
)
from anemll_mlx.models import build_model
from gguf_writer import dequantize, raw_tensor, tensor, write_gguf

SMOLLM2 = Path.home() / ".cache/anemll-mlx/SmolLM2-135M-Instruct.Q4_1.gguf"

# --- tiny models --------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 128, 4, 2, 32, 96
BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3"]
BPE_TOKENS = BPE_SPECIALS + BYTE_ALPHABET + ["Ġt", "he", "Ġthe", "12", "123"]


def bpe_metadata(pre: str = "smollm", **extra) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": BPE_TOKENS,
        "tokenizer.ggml.token_type": [3] * len(BPE_SPECIALS) + [1] * (len(BPE_TOKENS) - len(BPE_SPECIALS)),
        "tokenizer.ggml.merges": BPE_MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{{ messages }}",
        **extra,
    }


def model_metadata(arch: str, layers: int = 2, vocab: int = len(BPE_TOKENS), **extra) -> dict:
    return {
        "general.architecture": arch,
        "general.name": f"tiny {arch}",
        f"{arch}.block_count": layers,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.key_length": HEAD_DIM,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.vocab_size": vocab,
        **bpe_metadata(),
        **extra,
    }


def hf_tensors(
    arch: str, layers: int = 2, vocab: int = len(BPE_TOKENS), seed: int = 0
) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face names and shapes (what read_gguf must give back)."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
        if arch == "qwen2":
            for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows * HEAD_DIM,)
        if arch in ("qwen3", "gemma3"):
            shapes |= {p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,)}
        if arch == "gemma3":
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (HIDDEN,),
                p + "post_feedforward_layernorm.weight": (HIDDEN,),
            }
    return {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}


# HF -> GGUF names, written out here independently of the reader's table.
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA3_GGUF_NAMES = GGUF_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(arch: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What llama.cpp's converter writes for these HF weights (names, q/k permutation, Gemma's w+1)."""
    out = {}
    table = GEMMA3_GGUF_NAMES if arch == "gemma3" else GGUF_NAMES
    for name, w in weights.items():
        if name == "model.embed_tokens.weight":
            gguf = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf = f"blk.{layer}.{table[module]}.{kind}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, HEADS)
        if arch == "llama" and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1
        out[gguf] = w
    return out


def write_model(
    path: Path, arch: str, weights: dict[str, np.ndarray], types: dict[str, str] | None = None, **meta
):
    """A tiny GGUF of ``arch`` holding ``weights`` (F32 unless ``types`` names another type)."""
    types = types or {}
    tensors = {name: tensor(w, types.get(name, "F32")) for name, w in to_gguf(arch, weights).items()}
    layers = 1 + max(int(n.split(".")[2]) for n in weights if n.startswith("model.layers."))
    return write_gguf(path, model_metadata(arch, layers=layers, **meta), tensors)


def assert_loads_into_model(config: dict, weights: dict[str, mx.array]) -> None:
    """Names and shapes are exactly what the project's model of this config holds."""
    model = build_model(config)
    weights = dict(weights)
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    model.load_weights(list(weights.items()), strict=True)


# --- header and errors --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    "content", [b"", b"GGU", b"PK\x03\x04" + bytes(100), b"not a gguf file at all, just text"]
)
def test_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    with pytest.raises(CorruptModelError, match="fake.gguf") as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_truncated_header(tmp_path: Path) -> None:
    good = write_model(tmp_path / "good.gguf", "llama", hf_tensors("llama"))
    for cut in (30, 200, 2000, 7000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(CorruptModelError, match=f"cut{cut}.gguf"):
            read_gguf(bad)


def test_truncated_data(tmp_path: Path) -> None:
    good = write_model(tmp_path / "good.gguf", "llama", hf_tensors("llama"))
    bad = tmp_path / "short.gguf"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CorruptModelError, match=r"short.gguf is truncated: tensor '.*' ends at byte"):
        read_gguf(bad)


def test_unsupported_version(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "v1.gguf", {"general.architecture": "llama"}, {}, version=1)
    with pytest.raises(UnsupportedError, match="GGUF version 1"):
        read_gguf(path)


def test_unsupported_tensor_type_names_tensor_type_and_supported_list(tmp_path: Path) -> None:
    weights = to_gguf("llama", hf_tensors("llama"))
    tensors = {name: tensor(w) for name, w in weights.items()}
    tensors["blk.1.ffn_down.weight"] = raw_tensor("Q5_K", (HIDDEN, 256))
    path = write_gguf(tmp_path / "k.gguf", model_metadata("llama"), tensors)
    assert gguf_tensor_types(path)["blk.1.ffn_down.weight"] == "Q5_K"
    with pytest.raises(UnsupportedError) as e:
        read_gguf(path)
    message = str(e.value)
    assert "'blk.1.ffn_down.weight'" in message and "Q5_K" in message
    assert all(t in message for t in SUPPORTED_GGUF_TYPES)


def test_unknown_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "phi.gguf", model_metadata("phi3"), {})
    with pytest.raises(UnsupportedError, match=r"'phi3'.*llama, qwen2, qwen3, qwen3moe, gemma3"):
        read_gguf(path)


def test_metadata_values_round_trip(tmp_path: Path) -> None:
    meta = {
        "a.str": "héllo",
        "a.int": 7,
        "a.big": -(2**40),
        "a.float": 0.1,
        "a.bool": True,
        "a.strings": ["x", "y z"],
        "a.ints": [1, -2, 3],
        "a.floats": np.array([0.5, -1.5], np.float32),
        "a.bools": [True, False],
        "a.nested": [[1, 2], [3]],
    }
    header = read_header(write_gguf(tmp_path / "m.gguf", meta, {}))
    assert header.version == 3
    assert header.metadata == {**meta, "a.floats": [0.5, -1.5]}


# --- weights: names, layouts, dequantization ----------------------------------------------------


def test_llama_q_k_permutation_is_undone(tmp_path: Path) -> None:
    original = hf_tensors("llama")
    model = read_gguf(write_model(tmp_path / "llama.gguf", "llama", original))
    assert set(model.weights) == set(original)
    for name, w in original.items():
        np.testing.assert_array_equal(np.array(model.weights[name]), w, err_msg=name)
    assert model.config["tie_word_embeddings"] is True
    assert_loads_into_model(model.config, model.weights)


def test_permutation_direction_on_one_head() -> None:
    """HF keeps a head's rotary pairs as (i, i + d/2); llama.cpp interleaves them as rows (2i, 2i+1)."""
    from anemll_mlx.loading.gguf import unpermute_rope_rows

    hf = np.arange(8, dtype=np.float32)[:, None]  # one head of dim 8: pairs (0,4) (1,5) (2,6) (3,7)
    stored = llama_cpp_permute(hf, 1)
    assert stored[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_array_equal(np.array(unpermute_rope_rows(mx.array(stored), 1)), hf)


@pytest.mark.parametrize("ggml_type", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantization_matches_numpy(tmp_path: Path, ggml_type: str) -> None:
    original = hf_tensors("llama", seed=1)
    if ggml_type == "BF16":  # values mx.load would turn into inf or 0 by narrowing to fp16
        original["model.layers.0.mlp.up_proj.weight"][0, :4] = [1e5, -3e5, 1e-9, 0.0]
    quantized = ["blk.0.ffn_up.weight", "blk.1.ffn_down.weight", "token_embd.weight", "blk.0.attn_k.weight"]
    path = write_model(tmp_path / "q.gguf", "llama", original, types=dict.fromkeys(quantized, ggml_type))
    stored = {
        name: tensor(w, ggml_type) for name, w in to_gguf("llama", original).items() if name in quantized
    }
    model = read_gguf(path)
    checks = {
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        "model.embed_tokens.weight": "token_embd.weight",
    }
    for hf, gguf in checks.items():
        t = stored[gguf]
        expected = dequantize(t.type, t.data, t.shape)
        np.testing.assert_allclose(np.array(model.weights[hf]), expected, rtol=1e-6, atol=1e-7, err_msg=hf)
    # a quantized, permuted k: dequantize, then undo the permutation
    t = stored["blk.0.attn_k.weight"]
    expected = dequantize(t.type, t.data, t.shape)
    from anemll_mlx.loading.gguf import unpermute_rope_rows

    got = np.array(model.weights["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_allclose(got, unpermute_rope_rows(expected, KV_HEADS), rtol=1e-6, atol=1e-7)
    if ggml_type == "BF16":
        up = np.array(model.weights["model.layers.0.mlp.up_proj.weight"])
        assert np.isfinite(up).all() and up[0, 2] != 0


def test_dtype_is_applied(tmp_path: Path) -> None:
    path = write_model(
        tmp_path / "d.gguf", "llama", hf_tensors("llama"), types={"blk.0.ffn_up.weight": "Q4_0"}
    )
    model = read_gguf(path, dtype=mx.float16)
    assert {w.dtype for w in model.weights.values()} == {mx.float16}


def test_untied_output(tmp_path: Path) -> None:
    weights = hf_tensors("llama")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 2
    model = read_gguf(write_model(tmp_path / "untied.gguf", "llama", weights))
    assert model.config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(np.array(model.weights["lm_head.weight"]), weights["lm_head.weight"])
    assert_loads_into_model(model.config, model.weights)


def test_qwen2_biases_and_no_permutation(tmp_path: Path) -> None:
    original = hf_tensors("qwen2")
    model = read_gguf(
        write_model(tmp_path / "qwen2.gguf", "qwen2", original, **{"tokenizer.ggml.pre": "qwen2"})
    )
    assert model.config["model_type"] == "qwen2" and model.config["attention_bias"] is True
    for name, w in original.items():
        np.testing.assert_array_equal(np.array(model.weights[name]), w, err_msg=name)
    assert_loads_into_model(model.config, model.weights)


def test_qwen3_qk_norms(tmp_path: Path) -> None:
    original = hf_tensors("qwen3")
    model = read_gguf(write_model(tmp_path / "qwen3.gguf", "qwen3", original))
    assert model.config["model_type"] == "qwen3" and model.config["head_dim"] == HEAD_DIM
    np.testing.assert_array_equal(
        np.array(model.weights["model.layers.1.self_attn.k_norm.weight"]),
        original["model.layers.1.self_attn.k_norm.weight"],
    )
    assert_loads_into_model(model.config, model.weights)


def test_gemma3_norms_names_and_config(tmp_path: Path) -> None:
    original = hf_tensors("gemma3", layers=6)
    path = write_model(
        tmp_path / "gemma3.gguf",
        "gemma3",
        original,
        **{"gemma3.attention.sliding_window": 16, "gemma3.rope.freq_base": 1_000_000.0},
    )
    model = read_gguf(path)
    for name, w in original.items():
        np.testing.assert_allclose(np.array(model.weights[name]), w, atol=1e-6, err_msg=name)
    config = model.config
    assert config["model_type"] == "gemma3_text"
    assert config["sliding_window"] == 16
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["query_pre_attn_scalar"] == HEAD_DIM
    assert config["rope_local_base_freq"] == 10000.0 and config["rope_theta"] == 1_000_000.0
    assert config["hidden_activation"] == "gelu_pytorch_tanh"
    assert_loads_into_model(config, model.weights)


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    tensors = {name: tensor(w) for name, w in to_gguf("llama", hf_tensors("llama")).items()}
    tensors["blk.0.attn_rot_embd.weight"] = tensor(np.zeros(32, np.float32))
    with pytest.raises(UnsupportedError, match="'blk.0.attn_rot_embd.weight'"):
        read_gguf(write_gguf(tmp_path / "x.gguf", model_metadata("llama"), tensors))


# --- config -------------------------------------------------------------------------------------


def test_llama_config(tmp_path: Path) -> None:
    model = read_gguf(write_model(tmp_path / "c.gguf", "llama", hf_tensors("llama")))
    assert model.config == {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "vocab_size": len(BPE_TOKENS),
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert model.metadata["general.name"] == "tiny llama"
    assert "tokenizer.ggml.tokens" not in model.metadata


def llama_cpp_rope_factors(
    head_dim: int, base: float, factor: float, low: float, high: float, old: int
) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf.py writes for HF's llama3 rope_scaling."""
    out = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    tensors = {name: tensor(w) for name, w in to_gguf("llama", hf_tensors("llama")).items()}
    factors = llama_cpp_rope_factors(HEAD_DIM, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert (factors == 1).any() and (factors == 8).any() and ((factors > 1) & (factors < 8)).any()
    tensors["rope_freqs.weight"] = tensor(factors)
    meta = model_metadata("llama", **{"llama.rope.freq_base": 500000.0})
    model = read_gguf(write_gguf(tmp_path / "l3.gguf", meta, tensors))
    assert model.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in str(list(model.weights))

    tensors["rope_freqs.weight"] = tensor(llama_cpp_rope_factors(HEAD_DIM, 500000.0, 8.0, 1.0, 2.0, 4096))
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        read_gguf(write_gguf(tmp_path / "odd.gguf", meta, tensors))


def test_linear_rope_scaling(tmp_path: Path) -> None:
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    model = read_gguf(write_model(tmp_path / "lin.gguf", "llama", hf_tensors("llama"), **extra))
    assert model.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# --- tokenizers ---------------------------------------------------------------------------------


def tokenizer_only(tmp_path: Path, **meta):
    """read_gguf on a tiny llama whose tokenizer metadata is overridden by ``meta``."""
    return read_gguf(
        write_model(tmp_path / "t.gguf", "llama", hf_tensors("llama", vocab=len(BPE_TOKENS)), **meta)
    )


def test_bpe_specials_merges_and_decode(tmp_path: Path) -> None:
    model = tokenizer_only(tmp_path)
    tok, ids = model.tokenizer, {t: i for i, t in enumerate(BPE_TOKENS)}
    assert tok.encode("<|im_start|> the<|im_end|>").ids == [1, ids["Ġthe"], 2]
    assert tok.encode("the").ids == [ids["t"], ids["he"]]
    assert tok.decode(tok.encode("hello the 123 ünïcode").ids) == "hello the 123 ünïcode"
    assert tok.decode([1, ids["Ġthe"], 2], skip_special_tokens=True) == " the"
    assert model.tokenizer_config == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": "{{ messages }}",
    }


@pytest.mark.parametrize(
    ("pre", "digits"),
    [("default", ["123"]), ("smollm", ["1", "2", "3"]), ("llama-bpe", ["123"]), ("qwen2", ["1", "2", "3"])],
)
def test_bpe_pre_tokenizer_families(tmp_path: Path, pre: str, digits: list[str]) -> None:
    """Digits: GPT-2 and Llama-3 keep up to 3 digits in one word, SmolLM and Qwen2 split each."""
    tok = tokenizer_only(tmp_path, **{"tokenizer.ggml.pre": pre}).tokenizer
    assert tok.encode("123").ids == [BPE_TOKENS.index(d) for d in digits]


def test_unknown_bpe_pre_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'mystery'"):
        tokenizer_only(tmp_path, **{"tokenizer.ggml.pre": "mystery"})


def test_bos_only_when_asked(tmp_path: Path) -> None:
    tok = tokenizer_only(tmp_path, **{"tokenizer.ggml.add_bos_token": True}).tokenizer
    assert tok.encode(" the").ids == [1, BPE_TOKENS.index("Ġthe")]
    assert tok.encode(" the", add_special_tokens=False).ids == [BPE_TOKENS.index("Ġthe")]


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="tokenizer model 'bert'"):
        tokenizer_only(tmp_path, **{"tokenizer.ggml.model": "bert"})


# A SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte pieces, then normal pieces with scores.
SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "he",
    "ll",
    "llo",
    "hello",
    "▁hello",
    "▁w",
    "or",
    "▁wor",
    "ld",
]
SPM_PIECES += ["▁world", "lo", "▁h", "<tool>"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_PIECES) - 1) + [4]
SPM_SCORES = [0.0] * (3 + 256) + [-float(i) for i in range(len(SPM_PIECES))]


def spm_metadata(**extra) -> dict:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": SPM_TOKENS,
        "tokenizer.ggml.token_type": SPM_TYPES,
        "tokenizer.ggml.scores": np.array(SPM_SCORES, np.float32),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        **extra,
    }


def spm_reference(text: str, add_space_prefix: bool = True) -> list[int]:
    """SentencePiece BPE as llama.cpp runs it: merge the best-scored adjacent pair until none is in the vocab."""
    ids = {t: i for i, t in enumerate(SPM_TOKENS) if SPM_TYPES[i] == 1}
    text = ("▁" if add_space_prefix else "") + text.replace(" ", "▁")
    symbols = list(text)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in ids and (best is None or SPM_SCORES[ids[merged]] > SPM_SCORES[ids[best[1]]]):
                best = (i, merged)
        if best is None:
            break
        i, merged = best
        symbols[i : i + 2] = [merged]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [SPM_TOKENS.index(f"<0x{b:02X}>") for b in s.encode()]
    return out


@pytest.mark.parametrize(
    "text", ["hello world", "hello", "world hello", "held low", "hé wo", "lol hello  world"]
)
def test_sentencepiece_matches_reference(tmp_path: Path, text: str) -> None:
    model = tokenizer_only(tmp_path, **spm_metadata())
    tok = model.tokenizer
    assert tok.encode(text).ids == [1, *spm_reference(text)]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_sentencepiece_specials_and_no_space_prefix(tmp_path: Path) -> None:
    model = tokenizer_only(tmp_path, **spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    tok, ids = model.tokenizer, {t: i for i, t in enumerate(SPM_TOKENS)}
    assert tok.encode("hello world").ids == [1, *spm_reference("hello world", add_space_prefix=False)]
    assert tok.encode("<s>hello<tool>", add_special_tokens=False).ids == [1, ids["hello"], ids["<tool>"]]
    assert tok.decode(tok.encode("hello world").ids, skip_special_tokens=True) == "hello world"
    assert model.tokenizer_config["unk_token"] == "<unk>"
    assert model.tokenizer_config["add_bos_token"] is True


# --- the real model -----------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} is not in the cache")


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(SMOLLM2)


@needs_smollm2
def test_smollm2_config(smollm2) -> None:
    assert smollm2.config == {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert smollm2.tokenizer_config["eos_token"] == "<|im_end|>"
    assert smollm2.tokenizer_config["pad_token"] == "<|im_end|>"
    assert smollm2.tokenizer_config["unk_token"] == "<|endoftext|>"
    assert smollm2.tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>assistant" in smollm2.tokenizer_config["chat_template"]
    assert smollm2.metadata["general.architecture"] == "llama"


# Ids from Hugging Face's tokenizer for HuggingFaceTB/SmolLM2 (published in several public test suites
# and llama-tokenize runs; e.g. "The capital of France is" -> [504, 3575, 282, 4649, 314]).
HF_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Once upon a time": [6403, 1980, 253, 655],
    "def add(a, b): return": [1604, 803, 24, 81, 28, 278, 727, 1003],
    "In 2026, the weather": [788, 216, 34, 32, 34, 38, 28, 260, 3947],
    "Hello world, this is": [19556, 905, 28, 451, 314],
}


@needs_smollm2
@pytest.mark.parametrize("text", list(HF_IDS))
def test_smollm2_encodes_like_hf(smollm2, text: str) -> None:
    assert smollm2.tokenizer.encode(text).ids == HF_IDS[text]


@needs_smollm2
def test_smollm2_chat_specials_and_round_trip(smollm2) -> None:
    tok = smollm2.tokenizer
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids) == "user\nHi"  # tokenizers skips special tokens by default
    for text in ["naïve café 東京 🙂", "x = [1, 22, 333]\n\tif x:  pass", "  leading spaces", "a\r\nb"]:
        assert tok.decode(tok.encode(text).ids) == text


@needs_smollm2
def test_smollm2_weights_have_hf_names_and_shapes(smollm2) -> None:
    shapes = {
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
    }
    expected = {f"model.layers.{i}.{k}": v for i in range(30) for k, v in shapes.items()}
    expected |= {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    assert {k: tuple(v.shape) for k, v in smollm2.weights.items()} == expected
    assert all(v.dtype == mx.float32 for v in smollm2.weights.values())
    assert_loads_into_model(smollm2.config, smollm2.weights)


def raw_block(info, row: int, block: int, block_bytes: int) -> bytes:
    """The bytes of one ggml block, located from the header: rows are whole blocks, stored in order."""
    blocks_per_row = info.shape[-1] // 32
    start = info.offset + (row * blocks_per_row + block) * block_bytes
    with SMOLLM2.open("rb") as f:
        f.seek(start)
        return f.read(block_bytes)


def hand_q4_1(data: bytes) -> np.ndarray:
    """Q4_1 block: fp16 d, fp16 m, 16 bytes; byte j holds weight j (low nibble) and j + 16 (high); x = d q + m."""
    d, m = np.frombuffer(data[:4], dtype="<f2").astype(np.float32)
    nibbles = np.frombuffer(data[4:], dtype=np.uint8)
    q = np.concatenate([nibbles & 15, nibbles >> 4]).astype(np.float32)
    return d * q + m


@needs_smollm2
def test_smollm2_q4_1_block_matches_hand_dequantization(smollm2) -> None:
    header = read_header(SMOLLM2)
    info = header.tensors["blk.3.ffn_up.weight"]
    assert info.type_name == "Q4_1"
    got = np.array(smollm2.weights["model.layers.3.mlp.up_proj.weight"])
    for row, block in [(0, 0), (5, 7), (1535, 17)]:
        expected = hand_q4_1(raw_block(info, row, block, 20))
        np.testing.assert_allclose(got[row, block * 32 : (block + 1) * 32], expected, rtol=1e-6, atol=1e-7)


@needs_smollm2
def test_smollm2_k_rows_are_unpermuted(smollm2) -> None:
    """File rows 2i and 2i+1 of a head are HF rows i and i + 32 (head_dim 64)."""
    info = read_header(SMOLLM2).tensors["blk.0.attn_k.weight"]
    got = np.array(smollm2.weights["model.layers.0.self_attn.k_proj.weight"])
    for file_row, hf_row in [(0, 0), (1, 32), (2, 1), (64 + 63, 64 + 63), (128 + 6, 128 + 3)]:
        np.testing.assert_allclose(got[hf_row, :32], hand_q4_1(raw_block(info, file_row, 0, 20)), rtol=1e-6)


@needs_smollm2
def test_smollm2_q8_0_embedding_block(smollm2) -> None:
    info = read_header(SMOLLM2).tensors["token_embd.weight"]
    assert info.type_name == "Q8_0"
    data = raw_block(info, 504, 2, 34)
    expected = np.frombuffer(data[:2], dtype="<f2").astype(np.float32) * np.frombuffer(
        data[2:], dtype=np.int8
    )
    got = np.array(smollm2.weights["model.embed_tokens.weight"])[504, 64:96]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_answers_paris() -> None:
    """End to end through the project's loader and model: wrong q/k layouts give gibberish here."""
    from anemll_mlx.generate import generate_tokens
    from anemll_mlx.loading import load
    from anemll_mlx.runtime.drivers import MLXDriver

    lm = load(SMOLLM2)
    ids = lm.tokenizer.encode_prompt("What is the capital of France?", chat=True)
    text = lm.tokenizer.decode([t for t, _ in generate_tokens(MLXDriver(lm, "mlx"), ids, 12)])
    assert "Paris" in text

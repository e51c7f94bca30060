"""qwen3_moe specifics beyond the shared parity and export tests: config keys we refuse, loading
(Hugging Face's per-expert tensors, mlx-lm's stacked ones, llama.cpp's GGUF names), what the
family declares (LUT targets, residual branch ends) and how the planner counts stacked experts."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from anemll_mlx.errors import CorruptModelError, UnsupportedError
from anemll_mlx.export.plan import layer_bytes, weight_bytes
from anemll_mlx.loading import load
from anemll_mlx.loading.gguf import read_gguf
from anemll_mlx.models import build_model
from anemll_mlx.ops.vocabulary import ExpertLinear
from anemll_mlx.quant.lut import parse_lut_spec
from cli_runner import assert_one_error, run_cli
from gguf_writer import dequantize, tensor, write_gguf
from test_gguf import bpe_metadata

PROMPT_IDS = [5, 17, 99, 230, 41, 8, 300, 12, 77, 150, 64, 3, 201, 9]


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def logits(model, ids: list[int] = PROMPT_IDS) -> np.ndarray:
    return np.array(model(mx.array([ids]), model.make_cache(64), 0))


# --- config keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("shared_expert_intermediate_size", 512), ("n_shared_experts", 1), ("use_sliding_window", True)],
)
def test_an_unsupported_moe_key_is_one_error_line(tiny_model_factory, key, value):
    """A knob we do not implement is named, as one `error:` line and exit 2, before any weight loads."""
    assert_key_refused(edit_config(tiny_model_factory("qwen3_moe"), **{key: value}), key)


def assert_key_refused(folder: Path, key: str) -> None:
    """The CLI names ``key`` in one `error:` line (exit 2) and loading raises UnsupportedError."""
    assert_one_error(run_cli("generate", folder, "--max-tokens", "2"), f"'{key}'")
    with pytest.raises(UnsupportedError, match=key):
        load(folder)


def test_neutral_values_of_those_keys_are_accepted(tiny_model_factory):
    folder = edit_config(tiny_model_factory("qwen3_moe"), shared_expert_intermediate_size=0, use_sliding_window=False)
    assert load(folder).architecture == "qwen3_moe"


def test_more_experts_per_token_than_experts_is_refused():
    config = {
        "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100, "num_experts": 4, "num_experts_per_tok": 5,
        "moe_intermediate_size": 32,
    }  # fmt: skip
    with pytest.raises(CorruptModelError, match="num_experts_per_tok 5"):
        build_model(config)


def test_qat_of_stacked_experts_is_refused_before_loading(tiny_models, tmp_path):
    result = run_cli("qat", tiny_models["qwen3_moe"], "--out", tmp_path / "ckpt", "--steps", "1")
    assert_one_error(result, "qat of a mixture-of-experts model")
    assert not (tmp_path / "ckpt").exists()


# --- loading ---------------------------------------------------------------------------------------


def test_sparse_and_dense_layers_follow_the_config(tiny_models):
    model = load(tiny_models["qwen3_moe"]).model
    kinds = ["gate" in layer.mlp for layer in model.model.layers]
    assert kinds == [True, False, True, True]  # mlp_only_layers [1]
    assert model.model.layers[0].mlp.switch_mlp.down_proj.weight.shape == (8, 64, 32)


def test_a_missing_expert_is_named(tiny_model_factory):
    folder = tiny_model_factory("qwen3_moe")
    path = folder / "model.safetensors"
    weights = mx.load(str(path))
    del weights["model.layers.2.mlp.experts.5.up_proj.weight"]
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})
    with pytest.raises(CorruptModelError, match=r"model\.layers\.2\.mlp\.experts lacks up_proj of experts \[5\]"):
        load(folder)


def test_stacked_checkpoint_loads_the_same_model(tiny_models, tmp_path):
    """A checkpoint already in mlx-lm's stacked layout (``switch_mlp.*``) gives the same logits."""
    source = tiny_models["qwen3_moe"]
    lm = load(source)
    folder = tmp_path / "stacked"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    flat = dict(tree_flatten(lm.model.parameters()))
    assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" in flat
    mx.save_safetensors(str(folder / "model.safetensors"), flat, metadata={"format": "pt"})
    np.testing.assert_array_equal(logits(load(folder).model), logits(lm.model))


def qwen3moe_gguf(folder: Path, path: Path, experts_type: str = "F32") -> Path:
    """What llama.cpp's converter writes for the tiny qwen3_moe folder: its names, the experts
    stacked (experts, out, in) as ``experts_type``, the expert keys; a dense layer keeps
    ffn_gate/up/down."""
    config = json.loads((folder / "config.json").read_text())
    hf = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    out["output.weight"] = hf["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for module, gguf in names.items():
            if p + module + ".weight" in hf:
                out[f"blk.{i}.{gguf}.weight"] = hf[p + module + ".weight"]
        for proj in ("gate", "up", "down"):
            experts = [hf.get(f"{p}mlp.experts.{e}.{proj}_proj.weight") for e in range(config["num_experts"])]
            if experts[0] is not None:
                out[f"blk.{i}.ffn_{proj}_exps.weight"] = np.stack(experts)
    arch = "qwen3moe"
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.key_length": config["head_dim"],
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{arch}.rope.freq_base": config["rope_theta"],
        f"{arch}.expert_count": config["num_experts"],
        f"{arch}.expert_used_count": config["num_experts_per_tok"],
        f"{arch}.expert_feed_forward_length": config["moe_intermediate_size"],
        **bpe_metadata(pre="qwen2"),
    }
    types = {name: experts_type if "_exps" in name else "F32" for name in out}
    return write_gguf(path, meta, {name: tensor(w, types[name]) for name, w in out.items()})


def test_gguf_with_llama_cpp_names_gives_mlx_lm_logits(tiny_models, tmp_path):
    """llama.cpp's qwen3moe GGUF (F32) loads into the same model: mlx-lm's logits on the HF folder."""
    folder = tiny_models["qwen3_moe"]
    lm = load(qwen3moe_gguf(folder, tmp_path / "tiny-qwen3moe.gguf"), "float32")
    assert lm.config["model_type"] == "qwen3_moe" and lm.config["mlp_only_layers"] == [1]
    assert lm.config["norm_topk_prob"] and lm.config["num_experts_per_tok"] == 4
    peer, _ = mlx_lm_load(str(folder))
    theirs = np.array(peer(mx.array([PROMPT_IDS]), cache=make_prompt_cache(peer)))
    ours = logits(lm.model)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_gguf_q8_0_experts_dequantize_as_ggml_does(tiny_models, tmp_path):
    """Block-quantized 3-D expert tensors: each expert's rows dequantized as ggml's reference does."""
    path = qwen3moe_gguf(tiny_models["qwen3_moe"], tmp_path / "q8.gguf", experts_type="Q8_0")
    weights = read_gguf(path).weights
    hf = mx.load(str(tiny_models["qwen3_moe"] / "model.safetensors"))
    stacked = np.stack([np.array(hf[f"model.layers.2.mlp.experts.{e}.down_proj.weight"]) for e in range(8)])
    stored = tensor(stacked, "Q8_0")
    expected = dequantize(stored.type, stored.data, stored.shape)
    ours = np.array(weights["model.layers.2.mlp.switch_mlp.down_proj.weight"])
    assert ours.shape == (8, 64, 32)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
    assert 0 < np.abs(ours - stacked).max() < 0.01  # really quantized


# --- what the family declares -------------------------------------------------------------------------


def test_lut_targets_and_branch_ends_include_the_experts(tiny_models):
    model = load(tiny_models["qwen3_moe"]).model
    names = {t.name: t for t in model.lut_targets() if t.layer == 0}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        target = names[f"model.layers.0.mlp.switch_mlp.{proj}"]
        assert isinstance(target.holder, ExpertLinear)
        assert target.rows == 8 * target.holder.weight.shape[1]  # experts x out
    assert "model.layers.0.mlp.gate" in names  # the router
    ends = model.model.layers[0].branch_outputs()
    assert ends[1] is model.model.layers[0].mlp.switch_mlp.down_proj
    assert model.model.layers[1].branch_outputs()[1] is model.model.layers[1].mlp.down_proj


def test_planner_counts_stacked_experts_as_rows_of_one_matrix(tiny_models):
    """At LUT 4 (group 8) a stacked (8, 64, 32) down_proj is 8 * 64 = 512 rows: 64 tables."""
    model = build_model(json.loads((tiny_models["qwen3_moe"] / "config.json").read_text()))
    spec = parse_lut_spec("4")
    fp16 = layer_bytes(model, 0, None)
    lut = layer_bytes(model, 0, spec)
    saved = 0
    for target in model.lut_targets():
        if target.layer == 0:
            w = target.holder.weight
            saved += 2 * w.size - weight_bytes(w.size, target.rows, spec)
    assert fp16 - lut == saved
    assert weight_bytes(8 * 64 * 32, 8 * 64, spec) == 8 * 64 * 32 // 2 + 64 * 16 * 2

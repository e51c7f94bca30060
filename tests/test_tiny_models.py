"""Self-test of the tiny model fixtures: mlx-lm loads every arch strictly, runs it, and the
tokenizer round-trips text and applies its chat template through mlx-lm's TokenizerWrapper."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.utils import load as utils_load

from tiny_models import ARCHS, make_tiny_model, scale_weights, tokenizer_json, write_corrupt_copies

TEXT = "Hello, world! Grüße, Привет, 你好 😀 def f(x): return 42"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Japan?"},
]


def test_build_all_fast(tmp_path):
    tokenizer_json.cache_clear()
    t0 = time.perf_counter()
    for arch in ARCHS:
        make_tiny_model(tmp_path, arch)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"building all tiny models took {elapsed:.2f}s"


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_tiny_model(tmp_path, "mamba")


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_loads_and_runs(tiny_models, arch):
    folder = tiny_models[arch]
    cfg = json.loads((folder / "config.json").read_text())
    model, tok = utils_load(str(folder))  # strict: no missing or extra tensors
    ids = list(range(5, 5 + 20))
    logits = model(mx.array([ids])).astype(mx.float32)
    assert logits.shape == (1, 20, cfg["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)))
    std = mx.std(logits[0], axis=-1).mean().item()
    assert 1.0 < std < 8.0, f"logit std {std}"
    # not degenerate: different positions predict different tokens
    assert len(set(mx.argmax(logits[0], axis=-1).tolist())) > 3

    # the KV-cached path agrees with the full forward
    cache = mlx_lm.models.cache.make_prompt_cache(model)
    first = model(mx.array([ids[:12]]), cache=cache)
    rest = [model(mx.array([[t]]), cache=cache) for t in ids[12:]]
    stepped = mx.concatenate([first, *rest], axis=1).astype(mx.float32)
    np.testing.assert_allclose(np.array(stepped), np.array(logits), atol=2e-4, rtol=1e-4)

    # tokenizer through mlx-lm's TokenizerWrapper
    assert cfg["vocab_size"] == len(tok.get_vocab())
    enc = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(enc) == TEXT
    full = tok.encode(TEXT)
    if arch in ("llama", "llama3_rope") or arch.startswith("gemma"):
        assert full == [tok.bos_token_id, *enc]
    else:
        assert full == enc
    detok = tok.detokenizer
    detok.reset()
    for t in enc:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == TEXT

    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert tok.decode(prompt_ids) == prompt
    if arch.startswith("gemma"):
        assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\nWhat is")
        assert prompt.endswith("<start_of_turn>model\n")
        assert prompt_ids.count(tok.bos_token_id) == 1
    else:
        assert "<|im_start|>system\nBe brief.<|im_end|>\n" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
    eos = {
        tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<eos>", "<end_of_turn>") if t in tok.get_vocab()
    }
    assert set(tok.eos_token_ids) & eos

    out = mlx_lm.generate(model, tok, prompt=prompt_ids, max_tokens=8, verbose=False)
    assert isinstance(out, str)


def test_arch_specifics(tiny_models):
    def tensors(arch):
        return mx.load(str(tiny_models[arch] / "model.safetensors"), return_metadata=True)

    for arch in ARCHS:
        w, meta = tensors(arch)
        assert meta.get("format") == "pt"
        assert all(v.dtype == mx.float32 for v in w.values())
        cfg = json.loads((tiny_models[arch] / "config.json").read_text())
        assert ("lm_head.weight" in w) == (not cfg["tie_word_embeddings"])

    w, _ = tensors("qwen2")
    assert mx.abs(w["model.layers.0.self_attn.k_proj.bias"]).min().item() > 0

    w, _ = tensors("qwen3")
    cfg = json.loads((tiny_models["qwen3"] / "config.json").read_text())
    assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]
    assert w["model.layers.0.self_attn.q_norm.weight"].shape == (cfg["head_dim"],)

    # qwen3_moe: per-expert tensors as HF stores them (mlx-lm stacks them); layer 1 dense
    w, _ = tensors("qwen3_moe")
    cfg = json.loads((tiny_models["qwen3_moe"] / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [1] and cfg["norm_topk_prob"]
    assert cfg["num_experts_per_tok"] < cfg["num_experts"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        assert (p + "gate.weight" in w) == (i != 1)
        assert (p + "gate_proj.weight" in w) == (i == 1)
    experts = [k for k in w if k.startswith("model.layers.0.mlp.experts.") and k.endswith("down_proj.weight")]
    assert len(experts) == cfg["num_experts"]
    assert w["model.layers.0.mlp.experts.7.down_proj.weight"].shape == (cfg["hidden_size"], cfg["moe_intermediate_size"])

    w, _ = tensors("gemma3")
    cfg = json.loads((tiny_models["gemma3"] / "config.json").read_text())
    assert set(cfg["layer_types"]) == {"sliding_attention", "full_attention"}
    assert cfg["query_pre_attn_scalar"] != cfg["head_dim"]
    assert abs(w["model.norm.weight"].mean().item()) < 0.2  # applied as (1 + w)

    # gemma4: global layers of another head shape (k = v, one KV head), KV-shared layers without
    # k/v, per-layer inputs; gemma4_moe: fused experts as HF stores them, one head shape
    w, _ = tensors("gemma4")
    cfg = json.loads((tiny_models["gemma4"] / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
    assert w["model.layers.3.self_attn.k_proj.weight"].shape == (cfg["global_head_dim"], cfg["hidden_size"])
    assert "model.layers.3.self_attn.v_proj.weight" not in w and "model.layers.4.self_attn.v_proj.weight" in w
    assert not any(k.startswith(("model.layers.5.self_attn.k", "model.layers.6.self_attn.k")) for k in w)
    assert w["model.layers.5.mlp.gate_proj.weight"].shape[0] == 2 * cfg["intermediate_size"]
    assert w["model.embed_tokens_per_layer.weight"].shape == (cfg["vocab_size"], 7 * cfg["hidden_size_per_layer_input"])
    assert abs(w["model.norm.weight"].mean().item() - 1.0) < 0.2  # the gain itself
    w, _ = tensors("gemma4_moe")
    cfg = json.loads((tiny_models["gemma4_moe"] / "config.json").read_text())
    assert cfg["enable_moe_block"] and cfg["top_k_experts"] < cfg["num_experts"]
    E, moe, H = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    assert w["model.layers.0.experts.gate_up_proj"].shape == (E, 2 * moe, H)
    assert w["model.layers.0.experts.down_proj"].shape == (E, H, moe)
    assert w["model.layers.0.router.per_expert_scale"].shape == (E,)

    # the llama3 blend keeps the highest frequency, smooths one and scales the rest
    from mlx_lm.models.rope_utils import initialize_rope

    cfg = json.loads((tiny_models["llama3_rope"] / "config.json").read_text())
    hd = cfg["head_dim"]
    rope = initialize_rope(hd, cfg["rope_theta"], False, cfg["rope_scaling"], cfg["max_position_embeddings"])
    base = cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ratio = np.array(rope._freqs) / base
    factor = cfg["rope_scaling"]["factor"]
    assert np.isclose(ratio[0], 1.0)
    assert np.isclose(ratio[-1], factor)
    assert np.any((ratio > 1.01) & (ratio < factor - 0.01))


def test_seed_and_overrides(tmp_path):
    a = make_tiny_model(tmp_path, "llama", seed=1)
    b = make_tiny_model(tmp_path, "llama", seed=1)
    c = make_tiny_model(tmp_path, "llama", seed=2)
    assert a != b
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    d = make_tiny_model(tmp_path, "qwen2", num_hidden_layers=3, vocab_size=512, max_position_embeddings=128)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (3, 512, 128)
    model, _ = mlx_lm.load(str(d))
    assert len(model.layers) == 3
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 512)

    g = make_tiny_model(tmp_path, "gemma3", num_hidden_layers=12)
    cfg = json.loads((g / "config.json").read_text())
    assert cfg["layer_types"].count("full_attention") == 2
    mlx_lm.load(str(g))


def test_scale_weights(tiny_model_factory):
    folder = tiny_model_factory("llama")
    before = mx.load(str(folder / "model.safetensors"))
    mx.eval(before)
    scale_weights(folder, r"mlp\.down_proj", 1000.0)
    after = mx.load(str(folder / "model.safetensors"))
    for k in before:
        factor = 1000.0 if "mlp.down_proj" in k else 1.0
        assert mx.allclose(after[k], before[k] * factor).item(), k
    with pytest.raises(ValueError, match="matches"):
        scale_weights(folder, "no_such_tensor", 2.0)
    # a large enough factor overflows fp16 activations but not fp32 ones
    scale_weights(folder, r"mlp\.down_proj", 100.0)  # 1e5 in all
    model, _ = mlx_lm.load(str(folder))
    x = mx.array([list(range(3, 40))])
    assert bool(mx.all(mx.isfinite(model(x))))
    model.set_dtype(mx.float16)
    assert not bool(mx.all(mx.isfinite(model(x))))


def test_corrupt_copies(tiny_models, tmp_path):
    bad = write_corrupt_copies(tiny_models["llama"], tmp_path)
    assert set(bad) == {"no_config", "truncated_weights", "unknown_arch"}
    assert not (bad["no_config"] / "config.json").exists()
    assert json.loads((bad["unknown_arch"] / "config.json").read_text())["model_type"] == "mamba_xyz"
    for folder in bad.values():
        with pytest.raises(Exception):  # noqa: B017
            mlx_lm.load(str(folder))
    assert (tiny_models["llama"] / "config.json").exists()  # the original is untouched

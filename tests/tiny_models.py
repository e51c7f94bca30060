"""Tiny random Hugging Face model folders, built in code, for tests.

Every folder looks like a real checkpoint on the hub: ``config.json`` with the key names the
real models use, ``model.safetensors`` (float32, HF tensor names, ``format: pt`` metadata),
``tokenizer.json`` (a real byte-level BPE trained here on a small multilingual corpus),
``tokenizer_config.json`` (special tokens, ``add_bos_token``, a jinja ``chat_template``) and
``generation_config.json``. mlx-lm loads each of them strictly (see ``test_tiny_models.py``).

Weights are random with a fixed seed, scaled so that logits are well spread (std of a few
units) and attention is far from uniform, which makes numerical comparisons meaningful.

    >>> folder = make_tiny_model(tmp_path, "qwen3", num_hidden_layers=3)
    >>> scale_weights(folder, r"mlp\\.down_proj", 1e4)  # force fp16 overflow

Architectures (``ARCHS``):

- ``llama``: Llama-2/3 style, GQA 4/2 heads, untied ``lm_head``, BOS added by the tokenizer.
- ``llama3_rope``: as llama plus ``rope_scaling`` of type ``llama3`` (the blend changes the
  low and medium frequencies at head_dim 16), rope_theta 5e5, tied like Llama-3.2.
- ``llama_tied``: SmolLM2-like, tied embeddings (no ``lm_head.weight`` in the file), no BOS.
- ``qwen2``: q/k/v biases (non-zero), tied, rope_theta 1e6, ``use_sliding_window`` false.
- ``qwen3``: q_norm/k_norm, explicit ``head_dim`` 32 != hidden/heads (16), untied.
- ``qwen3_moe``: qwen3 plus routed experts: 4 layers, 8 experts of moe_intermediate_size 32, top-4
  with ``norm_topk_prob``, ``mlp_only_layers`` [1] (layer 1 keeps the dense MLP); per-expert
  tensors ``mlp.experts.N.*`` and the router ``mlp.gate`` as Hugging Face checkpoints store them.
  Top-4, not top-2: a router whose k-th and (k+1)-th logits are nearly tied picks another expert
  under a tiny perturbation (fp16, LUT weights), and with top-2 of 8 the expert swapped in or
  out carries a large weight (measured, LUT 8: KL 1.5e-2 at top-2, 2e-4 at top-4).
- ``gemma3``: ``gemma3_text``, 7 layers (5 sliding, 1 global, 1 sliding), sliding_window 8,
  query_pre_attn_scalar 24 (!= head_dim), four norms per layer plus q/k norms, norms stored
  as offsets from 1 (the model applies ``1 + w``), tied, BOS added by the tokenizer.
- ``gemma4``: ``gemma4_text`` dense with every feature mlx-lm's gemma4_text has: 7 layers
  (S S S G S S G: sliding_window 8, the last layer global as transformers requires), global layers with their own head dim (32 vs
  16), one KV head and keys as values (``attention_k_eq_v``), proportional RoPE rotating a quarter
  of the global head; per-layer inputs of 8 per layer; the last 2 layers KV-shared (one global,
  one sliding: layers 5 and 6 read the keys of 4 and 3) with double-wide MLPs; layer scalars; final logit soft-capping at 10; norms store
  their gain itself (near 1); tied; Gemma's tokenizer.
- ``gemma4_moe``: ``gemma4_text`` with ``enable_moe_block``: 4 layers (S S S G), each the dense MLP plus 8
  gelu experts of moe_intermediate_size 32, top-4, as HF stores them (fused
  ``experts.gate_up_proj`` (E, 2 * moe, hidden), ``experts.down_proj``, ``router.{proj,scale,
  per_expert_scale}``); one head shape, no per-layer inputs and no KV sharing, so it exports.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

__all__ = [
    "ARCHS",
    "CORPUS",
    "CHATML_SPECIALS",
    "GEMMA_SPECIALS",
    "LLAMA_SPECIALS",
    "arch_config",
    "make_tiny_model",
    "scale_weights",
    "tokenizer_json",
    "write_corrupt_copies",
]

ARCHS = ("llama", "llama3_rope", "llama_tied", "qwen2", "qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma4_moe")

VOCAB_TARGET = 448

# --- tokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs "
    "into the forest. Once upon a time there was a little model that wanted to run on the "
    "Neural Engine. It learned to count: one, two, three, four, five, six, seven, eight, nine, "
    "ten. Numbers like 0 1 2 3 4 5 6 7 8 9, 42, 3.14159, 2025-01-31 and 1,000,000 appear too.\n"
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is "
    "the capital of France. What is the capital of Japan? Tokyo is the capital of Japan.\n"
    "You are a helpful assistant. The user asks a question and the assistant answers it. "
    "The system prompt tells the model how to behave. user assistant system model\n"
    "Le renard brun rapide saute par-dessus le chien paresseux. Bonjour, comment allez-vous ? "
    "Je vais très bien, merci. C'est une journée magnifique à Paris, près de la Seine.\n"
    "Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München! Die Straße ist "
    "schön, und das Wetter ist heute größtenteils sonnig.\n"
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Cómo estás? ¡Muy bien, gracias! "
    "La niña come una manzana en el jardín.\n"
    "Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела? Спасибо, хорошо.\n"
    "敏捷的棕色狐狸跳过了懒狗。你好，今天天气很好。我们一起去学习机器学习吧。\n"
    "素早い茶色の狐がのろまな犬を飛び越える。こんにちは、元気ですか？ありがとうございます。\n"
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요, 반갑습니다.\n"
    "Ελληνικά: Γεια σου κόσμε. العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया.\n"
    "Emoji: 😀 🚀 🦊 🐶 ❤️ 👍🏽 ✨\n"
    "def forward(self, x):\n    h = self.embed(x)\n    for layer in self.layers:\n"
    "        h = layer(h)\n    return self.norm(h)\n"
    'import numpy as np\nprint("hello, world")\nif a == b and c != d: return {"key": [1, 2, 3]}\n'
    "for i in range(10):\n\tprint(i * 2 + 1)  # comment\n"
)

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIALS = (*CHATML_SPECIALS, "<|begin_of_text|>")
GEMMA_SPECIALS = (*CHATML_SPECIALS, "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")

CHATML_TEMPLATE = (
    "{{ bos_token if add_bos else '' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@functools.cache
def tokenizer_json(specials: tuple[str, ...] = CHATML_SPECIALS, bos: str | None = None) -> str:
    """A byte-level BPE ``tokenizer.json`` (as text) trained on ``CORPUS``; cached per process.

    ``specials`` get ids 0..n-1 in order. With ``bos`` the post-processor prepends it, as the
    Llama-3 and Gemma tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None:
        tok.post_processor = byte_level
    else:
        bos_id = tok.token_to_id(bos)
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    return tok.to_str()


# --- configs

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
    "torch_dtype": "float32",
    "transformers_version": "4.56.0",
}


def _tok_spec(arch: str) -> dict[str, Any]:
    """Special tokens and template for each family (ids refer to the trained vocab)."""
    if arch in ("llama", "llama3_rope"):
        return {
            "specials": LLAMA_SPECIALS,
            "bos": "<|begin_of_text|>",
            "eos": "<|im_end|>",
            "pad": "<|endoftext|>",
            "add_bos": True,
            "template": CHATML_TEMPLATE,
            "gen_eos": ["<|im_end|>", "<|endoftext|>"],
        }
    if arch == "llama_tied":  # SmolLM2: bos <|im_start|>, eos <|im_end|>, nothing added
        return {
            "specials": CHATML_SPECIALS,
            "bos": "<|im_start|>",
            "eos": "<|im_end|>",
            "pad": "<|im_end|>",
            "add_bos": False,
            "template": CHATML_TEMPLATE,
            "gen_eos": ["<|im_end|>"],
        }
    if arch in ("qwen2", "qwen3", "qwen3_moe"):  # Qwen: no bos token at all
        return {
            "specials": CHATML_SPECIALS,
            "bos": None,
            "eos": "<|im_end|>",
            "pad": "<|endoftext|>",
            "add_bos": False,
            "template": CHATML_TEMPLATE,
            "gen_eos": ["<|im_end|>", "<|endoftext|>"],
        }
    if arch in ("gemma3", "gemma4", "gemma4_moe"):
        return {
            "specials": GEMMA_SPECIALS,
            "bos": "<bos>",
            "eos": "<eos>",
            "pad": "<|endoftext|>",
            "add_bos": True,
            "template": GEMMA_TEMPLATE,
            "gen_eos": ["<eos>", "<end_of_turn>"],
        }
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")


def arch_config(arch: str, vocab_size: int, ids: dict[str, int | None]) -> dict[str, Any]:
    """The default ``config.json`` of ``arch`` (before overrides)."""
    bos_id, eos_id = ids["bos"], ids["eos"]
    if arch in ("llama", "llama3_rope", "llama_tied"):
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_COMMON,
            "head_dim": 16,
            "vocab_size": vocab_size,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
        }
        if arch == "llama3_rope":
            # wavelengths 2*pi*theta^(2i/16): 6.3 (kept), 32 (blended), >64 (scaled by 8)
            cfg.update(
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                tie_word_embeddings=True,
            )
        elif arch == "llama_tied":
            cfg.update(rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=ids["pad"])
        return cfg
    if arch == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **_COMMON,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": 256,
            "max_window_layers": 2,
            "tie_word_embeddings": True,
            "bos_token_id": ids["endoftext"],
            "eos_token_id": eos_id,
        }
    if arch == "qwen3":
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            **_COMMON,
            "rms_norm_eps": 1e-6,
            "head_dim": 32,
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 2,
            "tie_word_embeddings": False,
            "bos_token_id": ids["endoftext"],
            "eos_token_id": eos_id,
        }
    if arch == "qwen3_moe":
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **_COMMON,
            "num_hidden_layers": 4,
            "rms_norm_eps": 1e-6,
            "head_dim": 32,
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 4,
            "num_experts": 8,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "tie_word_embeddings": False,
            "bos_token_id": ids["endoftext"],
            "eos_token_id": eos_id,
        }
    if arch == "gemma3":
        cfg = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            **_COMMON,
            "hidden_act": None,
            "hidden_activation": "gelu_pytorch_tanh",
            "num_key_value_heads": 1,
            "head_dim": 16,
            "num_hidden_layers": 7,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "sliding_window_pattern": 6,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "attention_bias": False,
            "cache_implementation": "hybrid",
            "tie_word_embeddings": True,
            "pad_token_id": ids["pad"],
            "bos_token_id": bos_id,
            "eos_token_id": [eos_id, ids["end_of_turn"]],
        }
        del cfg["hidden_act"]
        return cfg
    if arch in ("gemma4", "gemma4_moe"):
        cfg = {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            **_COMMON,
            "hidden_activation": "gelu_pytorch_tanh",
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "num_hidden_layers": 7,
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": vocab_size,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab_size,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
            "sliding_window": 8,
            "sliding_window_pattern": 4,
            "final_logit_softcapping": 10.0,
            "enable_moe_block": False,
            "num_experts": None,
            "top_k_experts": None,
            "moe_intermediate_size": None,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "pad_token_id": ids["pad"],
            "bos_token_id": bos_id,
            "eos_token_id": [eos_id, ids["end_of_turn"]],
        }
        del cfg["hidden_act"]
        if arch == "gemma4_moe":
            cfg.update(
                num_hidden_layers=4,
                global_head_dim=16,
                num_global_key_value_heads=None,
                attention_k_eq_v=False,
                num_kv_shared_layers=0,
                hidden_size_per_layer_input=0,
                enable_moe_block=True,
                num_experts=8,
                top_k_experts=4,
                moe_intermediate_size=32,
            )
        return cfg
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")


def _gemma_layer_types(n_layers: int, pattern: int) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


# --- weights


def _weights(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    if cfg["model_type"] == "gemma4_text":
        return _gemma4_weights(cfg, seed)
    rng = np.random.default_rng(seed)
    gemma = cfg["model_type"].startswith("gemma")
    H = cfg["hidden_size"]
    n_h, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // n_h
    inter, V = cfg["intermediate_size"], cfg["vocab_size"]

    def linear(out_f: int, in_f: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) * (gain / np.sqrt(in_f))).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        # gemma stores w and applies (1 + w): keep w near 0; llama/qwen store the scale near 1
        w = rng.uniform(-0.2, 0.2, size=n)
        return (w if gemma else 1.0 + w).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    # tied heads read logits straight off the embedding: std 0.3 * sqrt(64) ~ 2.4 logit std
    w["model.embed_tokens.weight"] = (rng.standard_normal((V, H)) * (0.25 if gemma else 0.3)).astype(
        np.float32
    )
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm(H)
            w[p + "post_feedforward_layernorm.weight"] = norm(H)
        # q/k gain > 1 so that attention is peaked rather than uniform
        w[p + "self_attn.q_proj.weight"] = linear(n_h * hd, H, 1.5)
        w[p + "self_attn.k_proj.weight"] = linear(n_kv * hd, H, 1.5)
        w[p + "self_attn.v_proj.weight"] = linear(n_kv * hd, H)
        w[p + "self_attn.o_proj.weight"] = linear(H, n_h * hd)
        if cfg["model_type"] == "qwen2" or cfg.get("attention_bias"):
            for name, n in (("q", n_h * hd), ("k", n_kv * hd), ("v", n_kv * hd)):
                w[p + f"self_attn.{name}_proj.bias"] = (rng.standard_normal(n) * 0.2).astype(np.float32)
            if cfg["model_type"] != "qwen2":  # llama's attention_bias also covers o_proj
                w[p + "self_attn.o_proj.bias"] = (rng.standard_normal(H) * 0.2).astype(np.float32)
        if cfg["model_type"] in ("qwen3", "qwen3_moe") or gemma:
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        if _is_sparse(cfg, i):
            # router logits of std ~3: each token's weight goes mostly to a few experts
            w[p + "mlp.gate.weight"] = linear(cfg["num_experts"], H, 3.0)
            moe = cfg["moe_intermediate_size"]
            for e in range(cfg["num_experts"]):
                w[p + f"mlp.experts.{e}.gate_proj.weight"] = linear(moe, H)
                w[p + f"mlp.experts.{e}.up_proj.weight"] = linear(moe, H)
                w[p + f"mlp.experts.{e}.down_proj.weight"] = linear(H, moe)
            continue
        w[p + "mlp.gate_proj.weight"] = linear(inter, H)
        w[p + "mlp.up_proj.weight"] = linear(inter, H)
        w[p + "mlp.down_proj.weight"] = linear(H, inter)
        if cfg.get("mlp_bias"):
            for name, n in (("gate", inter), ("up", inter), ("down", H)):
                w[p + f"mlp.{name}_proj.bias"] = (rng.standard_normal(n) * 0.1).astype(np.float32)
    w["model.norm.weight"] = norm(H)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = (rng.standard_normal((V, H)) * 0.3).astype(np.float32)
    return w


def _gemma4_weights(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Gemma 4's tensors as Hugging Face names them (per-layer head shapes, KV-shared layers without
    k/v, fused experts); norms store their gain itself (near 1)."""
    rng = np.random.default_rng(seed)
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    n_h, inter = cfg["num_attention_heads"], cfg["intermediate_size"]
    P = cfg.get("hidden_size_per_layer_input") or 0
    first_shared = L - (cfg.get("num_kv_shared_layers") or 0)

    def linear(*shape: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * (gain / np.sqrt(shape[-1]))).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.uniform(-0.2, 0.2, size=n)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": (rng.standard_normal((V, H)) * 0.25).astype(np.float32)}
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        full = kind == "full_attention"
        hd = cfg["global_head_dim"] if full else cfg["head_dim"]
        k_eq_v = full and cfg.get("attention_k_eq_v")
        n_kv = cfg["num_global_key_value_heads"] if k_eq_v and cfg.get("num_global_key_value_heads") else cfg["num_key_value_heads"]
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            w[p + name + ".weight"] = norm(H)
        w[p + "self_attn.q_proj.weight"] = linear(n_h * hd, H, gain=1.5)
        w[p + "self_attn.q_norm.weight"] = norm(hd)
        if i < first_shared:
            w[p + "self_attn.k_proj.weight"] = linear(n_kv * hd, H, gain=1.5)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
            if not k_eq_v:
                w[p + "self_attn.v_proj.weight"] = linear(n_kv * hd, H)
        w[p + "self_attn.o_proj.weight"] = linear(H, n_h * hd)
        width = inter * (2 if cfg.get("use_double_wide_mlp") and i >= first_shared else 1)
        w[p + "mlp.gate_proj.weight"] = linear(width, H)
        w[p + "mlp.up_proj.weight"] = linear(width, H)
        w[p + "mlp.down_proj.weight"] = linear(H, width)
        if cfg.get("enable_moe_block"):
            E, moe = cfg["num_experts"], cfg["moe_intermediate_size"]
            # the router reads rms_norm(x) * scale / sqrt(hidden): logits of std ~3, as qwen3_moe's
            w[p + "router.proj.weight"] = linear(E, H, gain=3.0 * np.sqrt(H))
            w[p + "router.scale"] = norm(H)
            w[p + "router.per_expert_scale"] = norm(E)
            w[p + "experts.gate_up_proj"] = linear(E, 2 * moe, H)
            w[p + "experts.down_proj"] = linear(E, H, moe)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                w[p + name + ".weight"] = norm(H)
        if P:
            w[p + "per_layer_input_gate.weight"] = linear(P, H)
            w[p + "per_layer_projection.weight"] = linear(H, P)
            w[p + "post_per_layer_input_norm.weight"] = norm(H)
        w[p + "layer_scalar"] = rng.uniform(0.6, 1.4, size=1).astype(np.float32)
    w["model.norm.weight"] = norm(H)
    if P:
        w["model.embed_tokens_per_layer.weight"] = (rng.standard_normal((cfg["vocab_size_per_layer_input"], L * P))).astype(np.float32)
        w["model.per_layer_model_projection.weight"] = linear(L * P, H)
        w["model.per_layer_projection_norm.weight"] = norm(P)
    if not cfg.get("tie_word_embeddings", False):
        w["lm_head.weight"] = (rng.standard_normal((V, H)) * 0.3).astype(np.float32)
    return w


def _is_sparse(cfg: dict[str, Any], layer: int) -> bool:
    """Whether a qwen3_moe layer routes over experts (Hugging Face's rule)."""
    return (
        cfg["model_type"] == "qwen3_moe"
        and cfg["num_experts"] > 0
        and layer not in cfg["mlp_only_layers"]
        and (layer + 1) % cfg["decoder_sparse_step"] == 0
    )


def _save(path: Path, weights: dict[str, np.ndarray | mx.array]) -> None:
    arrays = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}
    mx.save_safetensors(str(path), arrays, metadata={"format": "pt"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- public API


def make_tiny_model(root: Path, arch: str, *, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny random HF model of ``arch`` under ``root`` and return its folder.

    ``config_overrides`` update ``config.json`` before the weights are drawn, so shapes follow
    them (e.g. ``num_hidden_layers=3``, ``vocab_size=512`` to pad the embedding past the
    tokenizer like real Qwen checkpoints, ``tie_word_embeddings=False``). For gemma3,
    ``layer_types`` follows ``num_hidden_layers``/``sliding_window_pattern`` unless given;
    mlx-lm's gemma3 needs at least ``sliding_window_pattern`` layers.
    The folder is ``root / f"{arch}-s{seed}"`` (suffixed further if it already exists).
    """
    spec = _tok_spec(arch)
    text = tokenizer_json(spec["specials"], spec["bos"] if spec["add_bos"] else None)
    vocab = json.loads(text)["model"]["vocab"]
    vocab_size = len(vocab)
    tok_id = {t: vocab[t] for t in spec["specials"]}
    ids = {
        "bos": tok_id.get(spec["bos"]) if spec["bos"] else None,
        "eos": tok_id[spec["eos"]],
        "pad": tok_id[spec["pad"]],
        "endoftext": tok_id["<|endoftext|>"],
        "end_of_turn": tok_id.get("<end_of_turn>"),
    }
    cfg = arch_config(arch, vocab_size, ids)
    cfg.update(config_overrides)
    if cfg["model_type"] in ("gemma3_text", "gemma4_text") and "layer_types" not in config_overrides:
        cfg["layer_types"] = _gemma_layer_types(cfg["num_hidden_layers"], cfg["sliding_window_pattern"])
        if cfg["model_type"] == "gemma4_text":  # transformers' Gemma 4 config makes the last layer global
            cfg["layer_types"][-1] = "full_attention"
    if cfg["vocab_size"] < vocab_size:
        raise ValueError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {vocab_size}")

    root = Path(root)
    folder = root / f"{arch}-s{seed}"
    n = 1
    while folder.exists():
        folder = root / f"{arch}-s{seed}-{n}"
        n += 1
    folder.mkdir(parents=True)

    _write_json(folder / "config.json", cfg)
    _save(folder / "model.safetensors", _weights(cfg, seed))
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")

    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": spec["pad"],
        "unk_token": None,
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": spec["template"].replace("add_bos", "true" if spec["add_bos"] else "false"),
        "added_tokens_decoder": {
            str(tok_id[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in spec["specials"]
        },
    }
    _write_json(folder / "tokenizer_config.json", tok_cfg)
    gen = {
        "bos_token_id": ids["bos"],
        "eos_token_id": [tok_id[t] for t in spec["gen_eos"]],
        "pad_token_id": ids["pad"],
        "do_sample": False,
        "transformers_version": cfg["transformers_version"],
    }
    if gen["bos_token_id"] is None:
        del gen["bos_token_id"]
    _write_json(folder / "generation_config.json", gen)
    return folder


def scale_weights(folder: Path, pattern: str, factor: float, index: int | None = None) -> None:
    """Multiply, in place, every tensor of ``folder/model.safetensors`` whose name matches
    ``pattern`` (``re.search``); with ``index``, only that entry of its first axis (one expert of
    a stacked tensor). Raises ``ValueError`` if nothing matches."""
    path = Path(folder) / "model.safetensors"
    weights = mx.load(str(path))
    rx = re.compile(pattern)
    hits = [k for k in weights if rx.search(k)]
    if not hits:
        raise ValueError(f"no tensor in {path} matches {pattern!r}")
    for k in hits:
        if index is None:
            weights[k] = weights[k] * factor
        else:
            weights[k][index] = weights[k][index] * factor
    mx.eval(weights)  # mx.load is lazy: read everything before replacing the file
    tmp = path.with_name(".scaling." + path.name)  # mx.save_safetensors wants the suffix
    _save(tmp, weights)
    os.replace(tmp, path)  # a new inode, so arrays others still map stay valid


def write_corrupt_copies(folder: Path, tmp: Path) -> dict[str, Path]:
    """Broken copies of a model folder, under ``tmp``.

    Keys: ``"no_config"`` (config.json removed), ``"truncated_weights"`` (model.safetensors cut
    to half its size), ``"unknown_arch"`` (model_type ``"mamba_xyz"``).
    """
    folder, tmp = Path(folder), Path(tmp)
    out: dict[str, Path] = {}
    for name in ("no_config", "truncated_weights", "unknown_arch"):
        dst = tmp / f"{folder.name}-{name}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(folder, dst)
        out[name] = dst
    (out["no_config"] / "config.json").unlink()
    st = out["truncated_weights"] / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    cfg_path = out["unknown_arch"] / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["model_type"] = "mamba_xyz"
    cfg["architectures"] = ["MambaXyzForCausalLM"]
    _write_json(cfg_path, cfg)
    return out

"""Parity with mlx-lm: the same checkpoint gives the same logits, generations and token ids.

mlx-lm is an independent implementation of every supported architecture, so agreement with it
guards the model definitions (RoPE scaling, biases, q/k norms, Gemma's norms, scaling and sliding
window), the loaders (safetensors and GGUF) and the tokenizer with its chat template.

Logits are compared in float32 relative to the logit scale:
``max|ours - theirs| <= 1e-4 * max|theirs|``.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes
from mlx_lm.utils import load as mlx_lm_load

from anemll_mlx.generate import generate_tokens
from anemll_mlx.loading import LoadedModel, load
from anemll_mlx.runtime.drivers import MLXDriver
from tiny_models import ARCHS

REL_TOL = 1e-4

# Out-of-corpus text, so the tiny BPE splits it into 20-40 tokens (longer than Gemma's window of 8).
PROMPT = "Grüße aus München! The weather in Tokyo is sunny today."
TOKENIZER_TEXTS = [
    PROMPT,
    "Digits after a space: 42 foxes, 3.14159 and 1,000,000 dogs.",
    "e\u0301 versus \u00e9: café",
    "Hello, world! Grüße, Привет, 你好 😀 def f(x): return 42",
    "  leading spaces,\ttabs\nand new lines  ",
]


def relative_max_diff(ours: mx.array, theirs: mx.array) -> float:
    """max |ours - theirs| over the largest |theirs|: the tolerance is relative to the logit scale."""
    ours, theirs = np.array(ours, dtype=np.float64), np.array(theirs, dtype=np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def load_pair(folder: Path) -> tuple[LoadedModel, object, object]:
    """Our model and mlx-lm's (model, tokenizer) for the same folder, both float32."""
    lm = load(folder, "float32")
    peer, peer_tokenizer = mlx_lm_load(str(folder))
    return lm, peer, peer_tokenizer


def prompt_ids(lm: LoadedModel) -> list[int]:
    ids = lm.tokenizer.encode(PROMPT)
    assert 20 <= len(ids) <= 40, f"the parity prompt should be 20-40 tokens, got {len(ids)}"
    return ids


# --- logits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_mlx_lm(tiny_models, arch):
    """A full-prompt forward gives mlx-lm's logits at every position (1e-4 of the logit scale)."""
    lm, peer, _ = load_pair(tiny_models[arch])
    ids = prompt_ids(lm)
    ours = lm.model(mx.array([ids]), lm.model.make_cache(64), 0)
    theirs = peer(mx.array([ids]), cache=make_prompt_cache(peer))
    assert ours.shape == theirs.shape == (1, len(ids), lm.config["vocab_size"])
    diff = relative_max_diff(ours, theirs)
    assert diff <= REL_TOL, f"{arch}: relative max diff {diff:.2e}"
    assert (np.array(greedy(ours)) == np.array(greedy(theirs))).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_steps_match_mlx_lm(tiny_models, arch):
    """Prefill 12 tokens, then decode the rest one token at a time through the KV cache: every
    step's logits match mlx-lm's (for Gemma3 the steps run well past its sliding window of 8)."""
    lm, peer, _ = load_pair(tiny_models[arch])
    ids = prompt_ids(lm)
    prefill = 12
    cache, peer_cache = lm.model.make_cache(64), make_prompt_cache(peer)
    ours = [lm.model(mx.array([ids[:prefill]]), cache, 0)]
    theirs = [peer(mx.array([ids[:prefill]]), cache=peer_cache)]
    for pos in range(prefill, len(ids)):
        ours.append(lm.model(mx.array([[ids[pos]]]), cache, pos))
        theirs.append(peer(mx.array([[ids[pos]]]), cache=peer_cache))
    ours, theirs = mx.concatenate(ours, axis=1), mx.concatenate(theirs, axis=1)
    assert ours.shape[1] == len(ids)
    diff = relative_max_diff(ours, theirs)
    assert diff <= REL_TOL, f"{arch}: relative max diff {diff:.2e} over cached decode steps"


@pytest.mark.parametrize(
    ("arch", "change"),
    [
        ("llama3_rope", {"rope_scaling": None}),
        ("gemma3", {"sliding_window": 256}),
        ("qwen3_moe", {"norm_topk_prob": False}),
        ("qwen3_moe", {"num_experts_per_tok": 8}),  # every expert, no routing
        ("gemma4", {"final_logit_softcapping": None}),
        ("gemma4", {"sliding_window": 256}),
        ("gemma4", {"rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"}}}),
        ("gemma4_moe", {"top_k_experts": 8}),
    ],
)
def test_comparison_sees_rope_scaling_and_sliding_window(tiny_model_factory, tiny_models, arch, change):
    """The tolerance is tight enough to notice a missing llama3 RoPE scaling, a missing sliding
    window, routing done otherwise (no renormalisation of the top-k weights, no top-k), Gemma 4
    without its logit soft-capping or with its global layers fully rotated: the same weights with
    that feature switched off are far from mlx-lm's logits."""
    lm = load(tiny_model_factory(arch, **change), "float32")  # same seed, so the same weights
    peer, _ = mlx_lm_load(str(tiny_models[arch]))
    ids = prompt_ids(lm)
    ours = lm.model(mx.array([ids]), lm.model.make_cache(64), 0)
    theirs = peer(mx.array([ids]), cache=make_prompt_cache(peer))
    assert relative_max_diff(ours, theirs) > 100 * REL_TOL


def test_qwen3_moe_without_norm_topk_prob_matches_mlx_lm(tiny_model_factory):
    """norm_topk_prob false (the top-k softmax weights used as they are), prompt and cached steps."""
    lm, peer, _ = load_pair(tiny_model_factory("qwen3_moe", norm_topk_prob=False))
    ids = prompt_ids(lm)
    cache, peer_cache = lm.model.make_cache(64), make_prompt_cache(peer)
    ours = [lm.model(mx.array([ids[:12]]), cache, 0)]
    theirs = [peer(mx.array([ids[:12]]), cache=peer_cache)]
    for pos in range(12, len(ids)):
        ours.append(lm.model(mx.array([[ids[pos]]]), cache, pos))
        theirs.append(peer(mx.array([[ids[pos]]]), cache=peer_cache))
    diff = relative_max_diff(mx.concatenate(ours, axis=1), mx.concatenate(theirs, axis=1))
    assert diff <= REL_TOL, f"relative max diff {diff:.2e}"


# --- greedy generation --------------------------------------------------------------------------

# The tied tiny Gemmas repeat one token forever; with its own LM head its greedy text varies,
# which makes the comparison meaningful (the sliding window of 8 is unchanged).
GREEDY_OVERRIDES = {arch: {"tie_word_embeddings": False} for arch in ("gemma3", "gemma4", "gemma4_moe")}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_tokens_match_mlx_lm(tiny_model_factory, arch):
    """Greedy decoding of 32 tokens (EOS ignored) yields exactly mlx-lm's generate_step tokens."""
    lm, peer, _ = load_pair(tiny_model_factory(arch, **GREEDY_OVERRIDES.get(arch, {})))
    lm.tokenizer.eos_token_ids = set()
    ids = prompt_ids(lm)
    ours = [token for token, _ in generate_tokens(MLXDriver(lm, "mlx"), ids, 32)]
    theirs = [int(t) for t, _ in generate_step(mx.array(ids), peer, max_tokens=32, sampler=greedy)]
    assert len(ours) == 32
    assert ours == theirs
    assert len(set(ours)) >= 3, f"{arch}: degenerate generation {ours} makes the comparison weak"


# --- tokenizer ----------------------------------------------------------------------------------


# Real Qwen2/2.5 tokenizer.json pre-tokenization: NFC, then a regex that splits digits one by one.
QWEN2_NORMALIZER = {"type": "NFC"}
QWEN2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
}


def with_qwen2_pre_tokenizer(folder: Path) -> Path:
    """Give a tiny qwen2 folder the pre-tokenizer real Qwen2 checkpoints ship.

    transformers >= 5 builds ``Qwen2Tokenizer`` for model_type qwen2 and imposes this
    pre-tokenizer whatever tokenizer.json says; the tiny fixture's GPT-2 regex (which keeps
    " 42" whole) would then differ from the file.  We follow tokenizer.json, as real Qwen2
    files make both agree.
    """
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["normalizer"], spec["pre_tokenizer"] = QWEN2_NORMALIZER, QWEN2_PRE_TOKENIZER
    path.write_text(json.dumps(spec), encoding="utf-8")
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_matches_mlx_lm(tiny_models, tiny_model_factory, arch):
    """encode_prompt gives mlx-lm's (transformers') ids with and without the chat template, and
    decoding gives the same text back."""
    folder = with_qwen2_pre_tokenizer(tiny_model_factory(arch)) if arch == "qwen2" else tiny_models[arch]
    ours = load(folder).tokenizer
    _, theirs = mlx_lm_load(str(folder))
    for text in TOKENIZER_TEXTS:
        plain = ours.encode_prompt(text, chat=False)
        assert plain == theirs.encode(text)
        chat = ours.encode_prompt(text, chat=True)
        messages = [{"role": "user", "content": text}]
        assert chat == theirs.apply_chat_template(messages, add_generation_prompt=True)
        assert ours.decode(chat) == theirs.decode(chat)
        normalized = unicodedata.normalize("NFC", text) if arch == "qwen2" else text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == normalized


# --- a real model: SmolLM2-135M from its GGUF ---------------------------------------------------

SMOLLM2_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the old farmer watches quietly from the wooden porch of his house.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
    "In 1969, Neil Armstrong became the first person to walk on the Moon during Apollo 11.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """Our SmolLM2 from the GGUF (float32) and mlx-lm's model class holding the same weights."""
    lm = load(smollm2_gguf, "float32")
    model_class, args_class = _get_classes(lm.config)
    peer = model_class(args_class.from_dict(lm.config))
    peer.load_weights(list(tree_flatten(lm.model.parameters())), strict=True)
    mx.eval(peer.parameters())
    return lm, peer


def log_softmax(logits: mx.array) -> np.ndarray:
    x = np.array(logits, dtype=np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.slow
def test_smollm2_logits_match_mlx_lm(smollm2):
    """On SmolLM2's dequantized weights, every position of several prompts has mlx-lm's argmax and
    KL(mlx-lm || ours) < 1e-4."""
    lm, peer = smollm2
    for text in SMOLLM2_PROMPTS:
        ids = lm.tokenizer.encode(text)
        assert 20 <= len(ids) <= 60
        ours = lm.model(mx.array([ids]), lm.model.make_cache(len(ids)), 0)[0]
        theirs = peer(mx.array([ids]), cache=make_prompt_cache(peer))[0]
        assert (np.array(greedy(ours)) == np.array(greedy(theirs))).all(), text
        p_log, q_log = log_softmax(theirs), log_softmax(ours)
        kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
        assert kl.max() < 1e-4, f"max KL {kl.max():.2e} for {text!r}"
        assert relative_max_diff(ours, theirs) <= REL_TOL


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    """Greedy decoding of "The capital of France is" (no chat template) continues with " Paris"."""
    lm, _ = smollm2
    ids = lm.tokenizer.encode_prompt("The capital of France is", chat=False)
    tokens = [token for token, _ in generate_tokens(MLXDriver(lm, "mlx"), ids, 3)]
    assert lm.tokenizer.decode(tokens).startswith(" Paris")

"""``apply_fp16_scale`` is exact: logits unchanged, residual stream exactly alpha times the original.

Also the recipes (published scales of known models) and the recommendation rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from anemll_mlx.errors import BadArgumentError
from anemll_mlx.loading import load
from anemll_mlx.probe import (
    ProbeOps,
    decide_fp16_scale,
    find_recipe,
    load_recipes,
    recommend_scale,
)
from anemll_mlx.probe.recipes import Recipe, model_names
from anemll_mlx.transforms import apply_fp16_scale
from tiny_models import ARCHS, scale_weights

IDS = [3, 17, 42, 99, 150, 7, 250, 31, 64, 128, 5, 200]


def run(lm, ops=None) -> np.ndarray:
    cache = lm.model.make_cache(len(IDS))
    return np.array(lm.model(mx.array([IDS]), cache, 0, ops=ops)[0])


@pytest.fixture(scope="module")
def variants(tiny_model_factory) -> dict[str, Path]:
    """Every tiny family, plus llama with biases on o_proj and the MLP (they must scale too)."""
    folders = {arch: tiny_model_factory(arch) for arch in ARCHS}
    folders["llama_biases"] = tiny_model_factory("llama", attention_bias=True, mlp_bias=True)
    return folders


@pytest.mark.parametrize("name", [*ARCHS, "llama_biases"])
@pytest.mark.parametrize("alpha", [0.1875, 0.48])
def test_scaling_keeps_logits_and_scales_the_residual_stream(variants, name, alpha):
    lm = load(variants[name], "float32")
    before_ops, after_ops = ProbeOps(), ProbeOps()
    before = run(lm, before_ops)
    before_ops.flush()
    apply_fp16_scale(lm.model, alpha)
    after = run(lm, after_ops)
    after_ops.flush()

    assert np.abs(after - before).max() / np.abs(before).max() <= 1e-4
    assert (after.argmax(-1) == before.argmax(-1)).all()
    for (layer, site), peak in before_ops.peaks.items():
        if site in ("embedding", "residual", "attn_out", "mlp_out"):  # the stream and what feeds it
            assert after_ops.peaks[(layer, site)] == pytest.approx(alpha * peak, rel=1e-4), (layer, site)
        else:  # behind a norm: untouched
            assert after_ops.peaks[(layer, site)] == pytest.approx(peak, rel=1e-4), (layer, site)


def test_scaling_touches_the_right_weights(variants):
    lm = load(variants["llama_biases"], "float32")
    block = lm.model.model.layers[0]
    table = lm.model.model.embed_tokens.weight
    o_bias, down, q = block.self_attn.o_proj.bias, block.mlp.down_proj.weight, block.self_attn.q_proj.weight
    apply_fp16_scale(lm.model, 0.5)
    assert lm.model.fp16_scale == 0.5
    assert lm.model.embed_scale == 0.5
    assert mx.array_equal(lm.model.model.embed_tokens.weight, table)  # never the table (a tied head shares it)
    assert mx.allclose(block.self_attn.o_proj.bias, o_bias * 0.5)
    assert mx.allclose(block.mlp.down_proj.weight, down * 0.5)
    assert mx.array_equal(block.self_attn.q_proj.weight, q)


def test_gemma_scales_post_norm_gains_and_embed_scale(variants):
    lm = load(variants["gemma3"], "float32")
    block = lm.model.model.layers[3]
    gains = {n: getattr(block, n).weight for n in ("post_attention_layernorm", "post_feedforward_layernorm", "input_layernorm")}
    embed_scale = lm.model.embed_scale
    apply_fp16_scale(lm.model, 0.25)
    assert lm.model.embed_scale == pytest.approx(0.25 * embed_scale)
    assert mx.allclose(block.post_attention_layernorm.weight, 0.25 * gains["post_attention_layernorm"])
    assert mx.allclose(block.post_feedforward_layernorm.weight, 0.25 * gains["post_feedforward_layernorm"])
    assert mx.array_equal(block.input_layernorm.weight, gains["input_layernorm"])


def test_scaling_in_float16_keeps_the_dtype(variants):
    lm = load(variants["qwen3"], "float16")
    apply_fp16_scale(lm.model, 0.5)
    assert lm.model.model.layers[0].mlp.down_proj.weight.dtype == mx.float16


def test_refuses_twice_and_bad_alphas(variants):
    lm = load(variants["qwen2"], "float32")
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(BadArgumentError):
            apply_fp16_scale(lm.model, bad)
    apply_fp16_scale(lm.model, 0.5)
    with pytest.raises(BadArgumentError, match="already scaled"):
        apply_fp16_scale(lm.model, 0.5)


def test_recommended_scale_has_a_short_mantissa():
    for peak in (65504 * 0.8, 104162, 292969, 1e7):
        alpha = recommend_scale(peak)
        assert 0.5 * 50000 / peak < alpha <= 50000 / peak
        assert alpha * 2**20 == int(alpha * 2**20) and bin(int(alpha * 2**20)).rstrip("0").count("1") <= 4
        assert float(np.float16(alpha)) == alpha
    assert recommend_scale(104162) == 0.46875


# --- recipes


def test_published_recipes_are_recorded():
    recipes = {r.name: r for r in load_recipes()}
    assert recipes["gemma-3-270m-it"].fp16_scale == 0.48
    assert recipes["gemma-3-1b-it"].fp16_scale == 0.82
    assert recipes["gemma-3-4b-it-qat"].fp16_scale == 0.1875
    assert recipes["llama-3.2-1b"].fp16_scale is None and recipes["llama-3.2-1b"].published_peak == 410
    assert recipes["qwen3-1.7b"].published_peak == 14858


class FakeArgs:
    def __init__(self, layers: int):
        self.num_hidden_layers = layers


class FakeModel:
    def __init__(self, layers: int):
        self.args = FakeArgs(layers)


class FakeLM:
    """Just what recipe matching reads of a LoadedModel."""

    def __init__(self, source: str, architecture: str, layers: int):
        self.source, self.architecture, self.model = source, architecture, FakeModel(layers)
        self.gguf_path, self.config = None, {}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("google/gemma-3-270m-it", "gemma-3-270m-it"),
        ("/models/hub/models--google--gemma-3-270m-it/snapshots/abc123", "gemma-3-270m-it"),
        ("/data/gemma-3-270m-it-Q4_K_M", "gemma-3-270m-it"),
        ("/data/gemma-3-270m-it-finetuned-on-poems", None),
        ("google/gemma-3-2700m-it", None),
    ],
)
def test_recipe_matching_by_name(source, expected):
    recipe = find_recipe(FakeLM(source, "gemma3_text", 18))  # type: ignore[arg-type]
    assert (recipe.name if recipe else None) == expected


def test_recipe_needs_architecture_and_layers_to_agree():
    assert find_recipe(FakeLM("google/gemma-3-270m-it", "gemma3_text", 7)) is None  # type: ignore[arg-type]
    assert find_recipe(FakeLM("google/gemma-3-270m-it", "llama", 18)) is None  # type: ignore[arg-type]


def test_smollm2_gguf_from_pypi_has_a_recipe():
    """The demo's model: export --fp16-scale auto must not have to run the probe."""
    lm = FakeLM("/cache/SmolLM2-135M-Instruct.Q4_1.gguf", "llama", 30)
    recipe = find_recipe(lm)  # type: ignore[arg-type]
    assert recipe is not None and recipe.name == "smollm2-135m-instruct"
    assert recipe.fp16_scale is None and recipe.published_peak < 65504


def test_recipe_longest_name_wins():
    short = Recipe("short", "gemma3_text", 34, ("gemma-3-4b-it",), 1.0, 0.5)
    long = Recipe("long", "gemma3_text", 34, ("gemma-3-4b-it-qat",), 1.0, 0.25)
    lm = FakeLM("org/gemma-3-4b-it-qat", "gemma3_text", 34)
    assert find_recipe(lm, [short, long]).name == "long"  # type: ignore[arg-type]
    assert "org/gemma-3-4b-it-qat" in model_names(lm)  # type: ignore[arg-type]


def test_auto_scale_without_a_recipe_probes(variants):
    lm = load(variants["llama_tied"], "float32")
    decision = decide_fp16_scale(lm, "auto", prompts=["Hello! How are you today?"], max_tokens=2)
    assert decision.value is None and decision.source.startswith("probe, peak ")  # FP16-safe


def test_auto_scale_reuses_the_probe_of_the_same_weights(tiny_model_factory, tmp_path):
    """Same weights under another name: reused; other weights or other prompts: probed afresh."""
    import shutil

    folder = tiny_model_factory("llama", seed=3)
    scale_weights(folder, r"layers\.0\.mlp\.down_proj", 1e5)  # needs a scale: the answer is not trivially none
    prompts = ["Hello! How are you today?"]
    first = decide_fp16_scale(load(folder, "float32"), "auto", prompts=prompts, max_tokens=2)
    assert first.value is not None and first.value < 1 and "reused" not in first.source
    renamed = tmp_path / "another-name"
    shutil.copytree(folder, renamed)
    again = decide_fp16_scale(load(renamed, "float32"), "auto", prompts=prompts, max_tokens=2)
    assert again.value == first.value and again.source.endswith("reused")
    other_prompts = decide_fp16_scale(load(renamed, "float32"), "auto", prompts=["Bonjour !"], max_tokens=2)
    assert "reused" not in other_prompts.source
    scale_weights(renamed, r"layers\.0\.mlp\.down_proj", 0.5)
    changed = decide_fp16_scale(load(renamed, "float32"), "auto", prompts=prompts, max_tokens=2)
    assert "reused" not in changed.source

"""gemma4 specifics beyond the shared parity, probe, scale and export tests: config keys we refuse,
the multimodal ``gemma4`` config and checkpoint names, the checkpoint-name round trip, GGUF, and
what the probe says about per-layer inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load as mlx_lm_load

from anemll_mlx.errors import UnsupportedError
from anemll_mlx.loading import load
from anemll_mlx.probe import probe
from anemll_mlx.transforms import apply_fp16_scale
from cli_runner import assert_one_error, run_cli
from gguf_writer import tensor, write_gguf
from test_gguf import model_metadata
from test_probe import PROMPTS, spike
from test_qwen3_moe import PROMPT_IDS as IDS
from test_qwen3_moe import assert_key_refused, edit_config, logits


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attn_logit_softcapping", 50.0),
        ("rope_traditional", True),
        ("rope_parameters", {"full_attention": {"rope_type": "yarn", "factor": 8.0}}),
        ("layer_types", ["chunked_attention"] * 4),
        ("hidden_activation", "silu"),
    ],
)
def test_an_unsupported_key_is_one_error_line(tiny_model_factory, key, value):
    """What mlx-lm's gemma4_text does not do either, or we do not, is named before any weight loads."""
    assert_key_refused(edit_config(tiny_model_factory("gemma4_moe"), **{key: value}), key)


def test_a_kv_shared_layer_without_an_earlier_layer_of_its_kind_is_refused(tiny_model_factory):
    # 4 layers S S S G, the last 2 shared: layer 3 (global) has no global layer before layer 2
    folder = tiny_model_factory("gemma4", num_hidden_layers=4, hidden_size_per_layer_input=0, num_kv_shared_layers=0)
    edit_config(folder, num_kv_shared_layers=2)
    with pytest.raises(UnsupportedError, match="num_kv_shared_layers"):
        load(folder)


def test_null_softcapping_means_none(tiny_model_factory):
    folder = tiny_model_factory("gemma4_moe", final_logit_softcapping=None)
    assert load(folder).model.args.final_logit_softcapping is None


def multimodal_copy(folder: Path, dest: Path) -> Path:
    """``folder`` as a multimodal ``gemma4`` checkpoint: the text config under text_config, the
    language model under ``model.language_model.``, plus vision and audio tensors to be dropped."""
    shutil.copytree(folder, dest)
    text = json.loads((folder / "config.json").read_text())
    config = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": {k: v for k, v in text.items() if k not in ("architectures", "vocab_size")},
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 8},
        "vocab_size": text["vocab_size"],
        "tie_word_embeddings": True,
    }
    (dest / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(folder / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    renamed["model.vision_tower.encoder.weight"] = mx.zeros((4, 4))
    renamed["model.embed_vision.embedding_projection.weight"] = mx.zeros((4, 4))
    renamed["model.audio_tower.layers.0.weight"] = mx.zeros((4,))
    mx.save_safetensors(str(dest / "model.safetensors"), renamed, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("arch", ["gemma4", "gemma4_moe"])
def test_the_multimodal_gemma4_checkpoint_loads_its_text_model(tiny_models, tmp_path, arch):
    """config.json with text_config, weights under model.language_model.*, vision and audio
    tensors beside them: the text model's logits, and mlx-lm's for the same folder."""
    text = load(tiny_models[arch], "float32")
    folder = multimodal_copy(tiny_models[arch], tmp_path / "mm")
    multimodal = load(folder, "float32")
    assert multimodal.architecture == "gemma4_text"
    ours = logits(multimodal.model)
    np.testing.assert_array_equal(ours, logits(text.model))
    peer, _ = mlx_lm_load(str(folder))  # mlx-lm's gemma4 wrapper, strictly: it drops the towers too
    theirs = np.array(peer(mx.array([IDS]), cache=make_prompt_cache(peer)))
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.parametrize("arch", ["gemma4", "gemma4_moe"])
def test_unsanitize_gives_the_checkpoint_names_back(tiny_models, arch):
    """The model's weights in the checkpoint's convention load back to the same arrays."""
    from mlx.utils import tree_flatten

    lm = load(tiny_models[arch], "float32")
    ours = dict(tree_flatten(lm.model.parameters()))
    back = lm.model.sanitize(lm.model.unsanitize(ours))
    assert sorted(back) == sorted(ours)
    for name, value in ours.items():
        np.testing.assert_allclose(np.array(back[name]), np.array(value), rtol=1e-6, err_msg=name)
    stored = mx.load(str(tiny_models[arch] / "model.safetensors"))
    assert {k for k in lm.model.unsanitize(ours) if "experts" not in k} == {k for k in stored if "experts" not in k}


def test_gguf_gemma4_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "g4.gguf", model_metadata("gemma4"), {"token_embd.weight": tensor(np.zeros((4, 4)))})
    assert_one_error(run_cli("info", path), "GGUF architecture 'gemma4' is not supported yet")


def test_fp16_scale_is_exact_with_per_layer_inputs(tiny_models):
    """The per-layer input gate reads the stream itself (divided by the scale) and the per-layer
    projection norm reads the scaled embeddings (eps * alpha^2): the scaled model's logits match."""
    lm = load(tiny_models["gemma4"], "float32")
    before = logits(lm.model)
    apply_fp16_scale(lm.model, 1 / 64)
    np.testing.assert_allclose(logits(lm.model), before, atol=2e-4)


def test_the_probe_reports_a_spike_the_per_layer_gate_overflows_at_any_scale(tiny_models):
    """A residual spike flows unnormalised into the per-layer input gate, so the exact scale leaves
    the gate's fp16 input as large as before: the probe recommends a scale and says it still
    overflows, rather than promising a fix."""
    lm = load(tiny_models["gemma4"], "float32")
    spike(lm, 2, 1e5)
    report = probe(lm, PROMPTS, max_tokens=4)
    assert report["needs_scaling"] and report["recommended_fp16_scale"] is not None
    assert report["scaled"]["overflow"] is True


def test_a_lut_checkpoint_of_gemma4_loads_back_exactly(tiny_models, tmp_path):
    """Every weight keeps its checkpoint name (layer scalars included), so a LUT checkpoint stores
    and loads the model's own arrays: the same parameters, the same logits."""
    from mlx.utils import tree_flatten

    from anemll_mlx.qat.checkpoint import ptq_luts, write_lut_checkpoint
    from anemll_mlx.quant.lut import LUTConfig, LUTSpec

    lm = load(tiny_models["gemma4"], "float32")
    lut = LUTConfig(ffn=LUTSpec(4, 8))
    out = write_lut_checkpoint(lm, ptq_luts(lm, lut), lut, tmp_path / "ckpt")
    stored = mx.load(str(out / "model.safetensors"))
    assert "model.layers.0.layer_scalar" in stored and "model.layers.0.mlp.down_proj.lut" in stored
    loaded = load(out, "float32")
    ours = {k: np.array(v) for k, v in tree_flatten(loaded.model.parameters())}
    expected = {k: np.array(v) for k, v in tree_flatten(open_lut_model(tiny_models["gemma4"]).parameters())}
    assert set(ours) == set(expected)
    for k, v in ours.items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def open_lut_model(folder: Path):
    """The MLX model of ``folder`` with the export's LUT 4,8 weights of the FFN (``apply_lut``)."""
    from anemll_mlx.quant.lut import LUTConfig, LUTSpec
    from anemll_mlx.transforms import apply_lut

    return apply_lut(load(folder, "float32").model, LUTConfig(ffn=LUTSpec(4, 8)))

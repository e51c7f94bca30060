"""export: the tiny gemma4_moe model (dense MLP plus 8 gelu experts, top-4, in every layer; global
layers partially rotated; soft-capped logits) through the mil driver against MLX float32, and the
Gemma 4 features the export refuses rather than get wrong.

The accuracy exports use a sliding window of 128 (> context 64: ANEMLL's single-state layout, as
test_export.py's gemma3); the split local/global cache is exercised with the default window of 8,
context 32 and batch 4 (as test_export_gemma.py does for Gemma 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from anemll_mlx.errors import UnsupportedError
from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.loading import load
from anemll_mlx.quant.lut import LUTConfig, parse_lut_spec
from cli_runner import assert_one_error, run_cli
from test_export import N_PROMPTS, STEPS, _logits_run, compare_export, long_ids, options

WIDE = {"sliding_window": 128}


@pytest.fixture(scope="module")
def folder(tiny_model_factory) -> Path:
    return tiny_model_factory("gemma4_moe", **WIDE)


@pytest.fixture(scope="module")
def exports(folder, tmp_path_factory) -> dict[str, Path]:
    """fp16 in 1, 2 and 3 chunks, and LUT 8 (FFN) in one."""
    root = tmp_path_factory.mktemp("gemma4_exports")
    out = {}
    for name, kwargs in (
        ("fp16", {}),
        ("chunks2", {"chunk": 2}),
        ("chunks3", {"chunk": 3}),
        ("lut8", {"lut": LUTConfig(ffn=parse_lut_spec("8"))}),
    ):
        out[name] = root / name
        export_model(load(folder, "float32"), out[name], options(**kwargs))
    return out


@pytest.mark.slow
def test_fp16_export_matches_mlx_fp32(folder, exports):
    s = compare_export(folder, exports["fp16"])
    assert s["steps"] == N_PROMPTS * STEPS
    # measured: KL mean 1.5e-5, max 6.7e-5, max |logit diff| 0.056, every argmax the same
    assert s["kl_mean"] < 1e-3 and s["kl_max"] < 1e-2, s
    assert s["match_rate"] == 1.0 and s["max_abs_diff"] < 0.15, s


@pytest.mark.slow
def test_lut8_export_stays_close_to_mlx_fp32(folder, exports):
    s = compare_export(folder, exports["lut8"])
    assert s["kl_mean"] < 1e-2 and s["match_rate"] >= 0.95, s
    fp16 = compare_export(folder, exports["fp16"], steps=4)
    assert s["kl_mean"] > fp16["kl_mean"]  # the LUTs really changed the weights


@pytest.mark.slow
def test_two_and_three_chunks_give_the_logits_of_one(folder, exports):
    """4 layers in 1, 2 ([0-1], [2-3]) and 3 chunks: the same fp16 ops in the same order."""
    ids = long_ids(folder, 21)
    one = _logits_run(exports["fp16"], ids, 4)
    assert np.isfinite(one).all()
    for chunks, layers in ((2, [[0, 2], [2, 4]]), (3, [[0, 2], [2, 3], [3, 4]])):
        out = exports[f"chunks{chunks}"]
        meta = yaml.safe_load((out / "meta.yaml").read_text())
        assert meta["model_info"]["parameters"]["num_chunks"] == chunks
        assert meta["anemll_mlx"]["chunk_layers"] == layers
        diff = float(np.abs(_logits_run(out, ids, 4) - one).max())
        assert diff <= 1e-3, f"{chunks} chunks: max |logit diff| {diff}"


@pytest.mark.slow
def test_context_past_the_sliding_window_matches_mlx_fp32(tiny_model_factory, tmp_path):
    """The split cache (window 8 < context 32, rotate functions): sliding layers attend over their
    window, at every step KL < 1e-3 against MLX float32."""
    folder = tiny_model_factory("gemma4_moe")
    out = tmp_path / "window8"
    export_model(load(folder, "float32"), out, ExportOptions(context=32, batch=4))
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    assert meta["model_info"]["parameters"]["sliding_window"] == 8
    s = compare_export(folder, out, steps=16, context=32, limit=12)
    assert s["kl_max"] < 1e-3 and s["match_rate"] == 1.0, s


# --- global layers of another KV shape


@pytest.mark.slow
@pytest.mark.parametrize(
    ("window", "context", "batch", "states"),
    [
        # one state as large as the largest layer: sliding layers use its leading (2, 16) block
        (128, 64, 16, {"model.model.kv_cache_0": [14, 2, 64, 32]}),
        # split cache: each state sized to its own layers
        (8, 32, 4, {"kv_cache_local": [10, 2, 32, 16], "kv_cache_global": [4, 1, 32, 32]}),
    ],
)
def test_global_layers_of_another_kv_shape_export(tiny_model_factory, tmp_path, window, context, batch, states):
    """The tiny gemma4 without per-layer inputs and KV sharing: global layers of head dim 32 with
    one KV head used as keys and values (attention_k_eq_v), sliding ones of 16 with two KV heads."""
    folder = tiny_model_factory(
        "gemma4", hidden_size_per_layer_input=0, num_kv_shared_layers=0, sliding_window=window
    )
    out = tmp_path / "out"
    export_model(load(folder, "float32"), out, ExportOptions(context=context, batch=batch))
    meta = yaml.safe_load((out / "meta.yaml").read_text())["anemll_mlx"]
    found = meta["kv_states"] if "kv_states" in meta else [meta["kv_state"]]
    assert {state["name"]: state["shape"] for state in found} == states
    parts, problems = inspect_export(out)
    assert problems == [] and [p.problems for p in parts if p.problems] == []
    # measured: KL mean 1.0e-5 / 5.7e-6, max |logit diff| 0.048 / 0.028
    steps, limit = (32, 24) if context == 64 else (16, 12)
    s = compare_export(folder, out, steps=steps, context=context, limit=limit)
    assert s["kl_mean"] < 1e-3 and s["kl_max"] < 1e-2 and s["match_rate"] == 1.0 and s["max_abs_diff"] < 0.15, s


# --- what the export refuses


@pytest.mark.parametrize(
    ("arch", "overrides", "key"),
    [
        ("gemma4", {}, "hidden_size_per_layer_input"),
        ("gemma4", {"hidden_size_per_layer_input": 0}, "num_kv_shared_layers"),
    ],
)
def test_features_the_export_lacks_are_refused(tiny_model_factory, tmp_path, arch, overrides, key):
    """Per-layer inputs and KV-shared layers are named, as one `error:` line and exit 2, and
    nothing is written."""
    folder = tiny_model_factory(arch, **overrides)
    with pytest.raises(UnsupportedError, match=key):
        export_model(load(folder, "float32"), tmp_path / "out", options())
    assert not (tmp_path / "out").exists()
    assert_one_error(run_cli("export", folder, "--out", tmp_path / "cli", "--context", "64"), key)
    assert not (tmp_path / "cli").exists()


def test_expert_packs_are_refused_until_the_family_declares_its_parts(folder, tmp_path):
    """Routed execution (expert packs) needs a family's attention and expert parts; Gemma 4 does
    not declare them yet: one line naming what to do instead, nothing written."""
    result = run_cli("export", folder, "--out", tmp_path / "cli", "--context", "64", "--moe-mode", "routed")
    assert_one_error(result, "expert packs")
    assert not (tmp_path / "cli").exists()

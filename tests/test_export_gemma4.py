"""export: the tiny gemma4_moe model (dense MLP plus 8 gelu experts, top-4, in every layer; global
layers partially rotated; soft-capped logits) through the mil driver against MLX float32, and the
Gemma 4 features the export refuses rather than get wrong.

The accuracy exports use a sliding window of 128 (> context 64: ANEMLL's single-state layout, as
test_export.py's gemma3); the split local/global cache is exercised with the default window of 8,
context 32 and batch 4 (as test_export_gemma.py does for Gemma 3).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from anemll_mlx import format as fmt
from anemll_mlx.errors import UnsupportedError
from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.loading import load
from anemll_mlx.quant.lut import LUTConfig, parse_lut_spec
from anemll_mlx.runtime.drivers import open_driver
from cli_runner import assert_one_error, run_cli
from test_export import (
    FOUR_LAYERS_SPLIT,
    N_PROMPTS,
    STEPS,
    assert_chunks_give_the_logits_of_one,
    compare_export,
    long_ids,
    options,
)
from tiny_models import scale_weights

WIDE = {"sliding_window": 128}


@pytest.fixture(scope="module")
def folder(tiny_model_factory) -> Path:
    return tiny_model_factory("gemma4_moe", **WIDE)


def _export_each(folder: Path, root: Path, variants: dict[str, dict]) -> dict[str, Path]:
    """``folder`` exported once per variant (ExportOptions overrides), under ``root/NAME``."""
    for name, kwargs in variants.items():
        export_model(load(folder, "float32"), root / name, options(**kwargs))
    return {name: root / name for name in variants}


@pytest.fixture(scope="module")
def exports(folder, tmp_path_factory) -> dict[str, Path]:
    """fp16 in 1, 2 and 3 chunks, and LUT 8 (FFN) in one."""
    variants = {"fp16": {}, "chunks2": {"chunk": 2}, "chunks3": {"chunk": 3}, "lut8": {"lut": LUTConfig(ffn=parse_lut_spec("8"))}}
    return _export_each(folder, tmp_path_factory.mktemp("gemma4_exports"), variants)


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
    split = {n: exports[f"chunks{n}"] for n in FOUR_LAYERS_SPLIT}
    assert_chunks_give_the_logits_of_one(long_ids(folder, 21), exports["fp16"], split, FOUR_LAYERS_SPLIT)


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


# --- expert packs: the attention part (attention, dense MLP, router) and packs that finish the layer

# 16 experts of 12 KB, top-4; at 0.09 MB an attention part (72 KB with the dense MLP) holds one
# expert beside it and a pack holds 5: 1 + 5 + 5 + 5 in each of the 4 layers
PACKED = {"num_experts": 16, **WIDE}
PACK_MB = 0.09


@pytest.fixture(scope="module")
def moe16(tiny_model_factory) -> Path:
    return tiny_model_factory("gemma4_moe", **PACKED)


@pytest.fixture(scope="module")
def packed(moe16, tmp_path_factory) -> dict[str, Path]:
    """Packs (default mode) and the gathered layout."""
    variants = {"packs": {"max_chunk_mb": PACK_MB}, "gathered": {"max_chunk_mb": PACK_MB, "moe_mode": "gathered"}}
    return _export_each(moe16, tmp_path_factory.mktemp("gemma4_packs"), variants)


def test_packs_layout_and_interfaces(packed):
    """meta.yaml records the split and the dense MLP riding beside the experts (``shared_branch``);
    inspect checks every part against the chain's interface."""
    meta = fmt.read_export(packed["packs"]).meta
    assert meta.moe is not None and meta.moe.shared_branch and meta.moe.final_norm_in_lm_head
    roles = [(r.kind, r.layers.start, r.experts) for r in meta.moe.roles]
    packs = [range(1, 6), range(6, 11), range(11, 16)]
    assert roles == [x for i in range(4) for x in [(fmt.ATTENTION, i, range(0, 1)), *[(fmt.EXPERTS, i, p) for p in packs]]]
    for name in ("packs", "gathered"):
        parts, problems = inspect_export(packed[name], PACK_MB)
        assert problems == [] and [p.problems for p in parts if p.problems] == [], name


@pytest.mark.slow
def test_packs_match_mlx_fp32_in_every_mode(moe16, packed):
    """Dense, routed and gathered execution against MLX float32: KL < 1e-3, every argmax the same;
    routed gives dense's logits bit for bit with fewer calls."""
    summaries, runs, calls = {}, {}, {}
    ids = long_ids(moe16, 21)
    for mode, folder in (("dense", packed["packs"]), ("routed", packed["packs"]), ("gathered", packed["gathered"])):
        summaries[mode] = s = compare_export(moe16, f"{folder}+moe={mode}")
        assert s["kl_mean"] < 1e-3 and s["kl_max"] < 1e-2 and s["match_rate"] == 1.0, (mode, s)
        host = open_driver(f"mil:{folder}+moe={mode}")
        runs[mode] = np.stack([host.prefill(ids), host.decode(7)])
        calls[mode] = host.calls
    print({m: {k: s[k] for k in ("kl_mean", "kl_max", "match_rate")} for m, s in summaries.items()}, calls)
    np.testing.assert_array_equal(runs["dense"], runs["routed"])
    assert calls["routed"] < calls["dense"]


@pytest.mark.slow
def test_golden_gate_passes_and_fails_when_one_expert_is_perturbed(moe16, packed, tmp_path):
    golden = tmp_path / "golden.npz"
    prompts = ["--prompt", "Hello there", "--prompt", "What is the capital of France?"]
    done = run_cli("compare", "--reference", f"mlx:{moe16}", "--save-golden", golden, *prompts, "--max-tokens", "6")
    assert done.exit_code == 0, done.stdout
    for candidate in (f"mil:{packed['packs']}+moe=routed", f"mil:{packed['gathered']}"):
        done = run_cli("compare", "--golden", golden, "--candidate", candidate)
        assert done.exit_code == 0 and "greedy tokens identical" in done.stdout, done.stdout
    perturbed = tmp_path / "perturbed"
    shutil.copytree(moe16, perturbed)
    scale_weights(perturbed, r"layers\.0\.experts\.(gate_up|down)_proj", 10.0, index=5)  # one expert
    out = tmp_path / "perturbed-export"
    export_model(load(perturbed, "float32"), out, options(max_chunk_mb=PACK_MB))
    done = run_cli("compare", "--golden", golden, "--candidate", f"mil:{out}")
    assert done.exit_code == 1 and "gate:" in done.stdout, done.stdout


@pytest.mark.slow
def test_lut8_packs_stay_close_to_the_lut8_model(moe16, tmp_path):
    """Each pack fits its own experts' rows; with 8 output channels per table no table spans two
    experts, so the export is as close to ``mlx:MODEL+lut=8`` as an FP16 export is to float32."""
    out = tmp_path / "lut8"
    export_model(load(moe16, "float32"), out, options(max_chunk_mb=PACK_MB, lut=LUTConfig(ffn=parse_lut_spec("8"))))
    assert fmt.read_export(out).meta.moe is not None
    s = compare_export(moe16, f"{out}+moe=routed", ref_spec=f"mlx:{moe16}+lut=8")
    assert s["kl_mean"] < 1e-4 and s["match_rate"] >= 0.95, s
    plain = compare_export(moe16, f"{out}+moe=routed", steps=8)
    assert plain["kl_mean"] < 1e-2, plain  # and LUT 8 itself stays close to float32

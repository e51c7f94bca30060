"""Mixture-of-experts exports in parts: each sparse layer an attention part (attention + router)
and expert packs under the size budget, run by the export host in dense mode (every pack), routed
mode (only the packs holding a chosen expert) and gathered mode (the chosen experts' weights passed
to one gather program per layer); ``plan`` from a config alone, the real Qwen3-30B-A3B config
within the default budget, and an expert larger than the budget refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from anemll_mlx import format as fmt
from anemll_mlx.errors import BadArgumentError
from anemll_mlx.eval.compare import compare
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.export.plan import MB, Speed, plan_export
from anemll_mlx.loading import load
from anemll_mlx.models import build_model
from anemll_mlx.quant.lut import LUTConfig, parse_lut_spec
from anemll_mlx.runtime.drivers import MLXDriver, open_driver
from cli_runner import assert_one_error, run_cli
from tiny_models import scale_weights

DATA = Path(__file__).parent / "data"
QWEN3_30B = DATA / "qwen3_30b_a3b_config.json"
GEMMA4_26B = DATA / "gemma4_26b_a4b_config.json"
CLI = Path(sys.executable).parent / "anemll-mlx"
# 16 experts of 12 KB, top-4; layer 1 dense (a 32-unit MLP).  At 0.07 MB an attention part
# (~50 KB) holds one expert beside it and a pack holds 5: 1 + 5 + 5 + 5 per sparse layer.
OVERRIDES = {"num_experts": 16, "intermediate_size": 32}
BUDGET_MB = 0.07
CONTEXT, BATCH, STEPS, PROMPTS, PROMPT_TOKENS = 64, 16, 24, 3, 24


@pytest.fixture(scope="module")
def moe(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3_moe", **OVERRIDES)


@pytest.fixture(scope="module")
def packed(moe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "packed"
    export_model(load(moe, "float32"), out, ExportOptions(context=CONTEXT, batch=BATCH, max_chunk_mb=BUDGET_MB))
    return out


def test_the_plan_splits_sparse_layers_into_attention_and_packs(moe):
    plan = plan_export(load(moe).model, "auto", BUDGET_MB, LUTConfig(), "auto")
    kinds = [(r.kind, r.layers.start, r.experts) for r in plan.roles]
    packs = [range(1, 6), range(6, 11), range(11, 16)]
    expected = [(fmt.ATTENTION, 0, range(0, 1)), *[(fmt.EXPERTS, 0, p) for p in packs], (fmt.LAYERS, 1, None)]
    for layer in (2, 3):
        expected += [(fmt.ATTENTION, layer, range(0, 1)), *[(fmt.EXPERTS, layer, p) for p in packs]]
    assert kinds == expected
    assert max(plan.chunk_bytes + plan.head_bytes + plan.embed_bytes) <= BUDGET_MB * MB
    assert plan.final_norm_in_head  # the last chunk is a pack: the LM head normalises the sum
    # routed: a pack of 5 of 16 experts is skipped when none of the top 4 is in it (the expert
    # beside the attention always runs)
    p_call = 1 - (11 * 10 * 9 * 8) / (16 * 15 * 14 * 13)
    dense, routed = plan.estimate("dense"), plan.estimate("routed")
    assert dense.calls == 1 + len(plan.chunks) + 1 == 15
    assert routed.calls == pytest.approx(dense.calls - 9 * (1 - p_call))
    assert routed.weight_bytes < dense.weight_bytes and plan.moe_mode == "routed"  # the faster


def test_meta_records_the_layout_and_inspect_accepts_it(packed):
    meta = yaml.safe_load((packed / "meta.yaml").read_text())
    moe = meta["anemll_mlx"]["moe"]
    assert moe["mode"] == "routed" and moe["num_experts"] == 16 and moe["experts_per_token"] == 4
    assert moe["final_norm_in_lm_head"] is True
    assert moe["chunks"][:2] == [
        {"kind": "attention", "layer": 0, "experts": [0, 1]},
        {"kind": "experts", "layer": 0, "experts": [1, 6]},
    ]
    assert moe["chunks"][4] == {"kind": "layers", "layers": [1, 2]}
    assert meta["model_info"]["parameters"]["num_chunks"] == len(moe["chunks"]) == 13
    parts, problems = inspect_export(packed, BUDGET_MB)
    assert problems == [] and all(not p.problems for p in parts), [p.problems for p in parts]
    done = run_cli("inspect", packed, "--max-chunk-mb", BUDGET_MB)
    assert done.exit_code == 0, done.stdout
    assert "  dense: 15.0 calls" in done.stdout and "  routed: " in done.stdout  # 1 + 13 + 1 programs


def test_an_export_of_the_first_layout_version_is_refused(packed, tmp_path):
    """Layout 1 summed the packs on the host; its packs lack the chain's inputs: one line asking for a new export."""
    old = tmp_path / "old"
    shutil.copytree(packed, old)
    meta = yaml.safe_load((old / "meta.yaml").read_text())
    del meta["anemll_mlx"]["moe"]["version"]  # as layout 1 wrote it
    (old / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    assert_one_error(run_cli("generate", f"mil:{old}", "--prompt", "Hi", "--max-tokens", "2"), "export the model again")


def _prompts(folder: Path) -> list[list[int]]:
    tok = load(folder, "float32").tokenizer
    return [tok.encode_prompt(text, chat=False)[:PROMPT_TOKENS] for text in default_prompts()[:PROMPTS]]


@pytest.mark.slow
def test_fp16_export_in_both_modes_matches_mlx_fp32(moe, packed):
    """Dense and routed execution of the same packs: KL < 1e-3 and every greedy token as MLX
    float32's; routed computes exactly what dense does (a skipped pack's weights are all zero)
    with fewer calls."""
    prompts = _prompts(moe)
    results, calls = {}, {}
    for mode in ("dense", "routed"):
        reference = MLXDriver(load(moe, "float32"), "mlx@fp32", context=CONTEXT)
        host = open_driver(f"mil:{packed}+moe={mode}")
        assert host.moe_mode == mode
        summary = compare(reference, host, prompts, STEPS).summary
        print(mode, {k: summary[k] for k in ("kl_mean", "kl_max", "match_rate")}, "calls", host.calls)
        assert summary["kl_mean"] < 1e-3 and summary["match_rate"] == 1.0, summary
        host.reset()
        first = host.prefill(prompts[0])
        before = host.calls
        results[mode] = [first, host.decode(int(np.argmax(first)))]
        calls[mode] = host.calls - before
    np.testing.assert_array_equal(results["dense"][0], results["routed"][0])
    np.testing.assert_array_equal(results["dense"][1], results["routed"][1])
    assert calls["dense"] == 1 + 13 + 1 and calls["routed"] < calls["dense"], calls


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_golden_gate_passes_and_fails_when_one_expert_is_perturbed(moe, packed, gathered, tmp_path):
    golden = tmp_path / "golden.npz"
    prompts = ["--prompt", "Hello there", "--prompt", "What is the capital of France?"]
    done = _cli("compare", "--reference", f"mlx:{moe}", "--save-golden", golden, *prompts, "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    for candidate in (f"mil:{packed}+moe=dense", f"mil:{packed}+moe=routed", f"mil:{gathered}"):
        done = _cli("compare", "--golden", golden, "--candidate", candidate)
        assert done.returncode == 0 and "greedy tokens identical" in done.stdout, done.stdout + done.stderr
    perturbed = tmp_path / "perturbed"
    shutil.copytree(moe, perturbed)
    scale_weights(perturbed, r"layers\.0\.mlp\.experts\.5\.", 10.0)  # gate, up and down of one expert
    out = tmp_path / "perturbed-export"
    export_model(load(perturbed, "float32"), out, ExportOptions(context=CONTEXT, batch=BATCH, max_chunk_mb=BUDGET_MB))
    done = _cli("compare", "--golden", golden, "--candidate", f"mil:{out}")
    assert done.returncode == 1 and "gate:" in done.stdout, done.stdout + done.stderr


# --- plan from a config alone ---------------------------------------------------------------------


def test_plan_of_qwen3_30b_a3b_keeps_every_part_within_250_mb():
    """128 experts of 9 MiB (fp16) per layer: 23 beside the attention (36.5 MiB), then 4 packs
    of 26-27; at LUT 4, 64 beside the attention and one pack of 64.  48 layers."""
    model = build_model(json.loads(QWEN3_30B.read_text()))
    for lut in (LUTConfig(), LUTConfig(ffn=parse_lut_spec("4"), lm_head=parse_lut_spec("4"))):
        plan = plan_export(model, "auto", 250.0, lut, "auto")
        sizes = plan.embed_bytes + plan.chunk_bytes + plan.head_bytes
        assert max(sizes) <= 250 * MB
        assert sum(1 for r in plan.roles if r.kind == fmt.ATTENTION) == 48
        dense, routed = plan.estimate("dense"), plan.estimate("routed")
        assert routed.seconds < dense.seconds
    fp16 = plan_export(model, "auto", 250.0, LUTConfig(), "auto")
    assert len(fp16.chunks) == 48 * 5 and [len(r.experts or ()) for r in fp16.roles[:5]] == [23, 27, 26, 26, 26]
    assert fp16.estimate("dense", Speed(120, 3)).calls == 1 + 240 + 3  # one embeddings program of 3 per token
    lut4 = plan_export(model, "auto", 250.0, LUTConfig(ffn=parse_lut_spec("4")), "auto")
    assert len(lut4.chunks) == 48 * 2 and [len(r.experts or ()) for r in lut4.roles[:2]] == [64, 64]


def test_plan_of_gemma4_26b_a4b_keeps_every_part_within_250_mb_and_beats_the_field_report():
    """30 layers of a dense MLP beside 128 experts of 704 (top 8).  The field report decoded at
    29 s/token; the estimates (120 GB/s, 3 ms per call) must be far below 0.6 s in fp16 gathered
    and at LUT 4 routed, and every part within 250 MB in every mode."""
    config = json.loads(GEMMA4_26B.read_text())
    model = build_model(config["text_config"])
    assert model.experts_per_token() == 8
    seconds = {}
    for name, lut, mode in (
        ("fp16 routed", LUTConfig(), "routed"),
        ("fp16 gathered", LUTConfig(), "gathered"),
        ("lut4 routed", LUTConfig(ffn=parse_lut_spec("4")), "routed"),
    ):
        plan = plan_export(model, "auto", 250.0, lut, "auto", mode)
        assert max(plan.embed_bytes + plan.chunk_bytes + plan.head_bytes) <= 250 * MB, name
        assert sum(1 for r in plan.roles if r.kind == fmt.ATTENTION) == 30, name
        seconds[name] = plan.estimate(mode, Speed(120, 3)).seconds
    assert seconds["fp16 gathered"] < 0.6 and seconds["lut4 routed"] < 0.6, seconds
    assert seconds["fp16 routed"] < 29 / 30, seconds  # 30x the report even without gathering
    done = run_cli("plan", GEMMA4_26B)
    assert done.exit_code == 0, done.stdout + done.stderr
    assert "expert packs: 180 over 30 layers (128 experts, top 8)" in done.stdout


def test_plan_cli_prints_parts_and_estimates_per_mode():
    done = run_cli("plan", QWEN3_30B, "--bandwidth", "120", "--call-ms", "3")
    assert done.exit_code == 0, done.stdout + done.stderr
    out = done.stdout
    assert "246 programs (3 embeddings, 240 FFN chunks, 3 lm_head)" in out
    assert "expert packs: 192 over 48 layers (128 experts, top 8); default mode routed" in out
    assert "dense: 244.0 calls" in out and "routed: 215.1 calls" in out and "at 120 GB/s and 3 ms per call" in out


def test_plan_cli_works_for_a_dense_family_from_its_folder(tiny_models):
    done = run_cli("plan", tiny_models["llama"])
    assert done.exit_code == 0, done.stdout + done.stderr
    assert "FFN chunk 01of01" in done.stdout and "dense:" in done.stdout and "routed" not in done.stdout


def test_an_expert_larger_than_the_budget_is_one_error_naming_it(tiny_model_factory, tmp_path):
    """Experts of 3 x 512 x 64 (192 KB) against a 0.1 MB budget, which the attention part fits."""
    folder = tiny_model_factory("qwen3_moe", moe_intermediate_size=512)
    assert_one_error(run_cli("plan", folder / "config.json", "--max-chunk-mb", "0.1"), "expert 0 of layer 0 (one of its 8) needs 0.188 MB")
    done = run_cli("export", folder, "--out", tmp_path / "out", "--max-chunk-mb", "0.1", "--fp16-scale", "none", "--context", "64")
    assert_one_error(done, "expert 0 of layer 0")
    assert not (tmp_path / "out").exists()


def test_routed_needs_packs_and_bad_modes_are_refused(tiny_models, tmp_path):
    assert_one_error(run_cli("plan", tiny_models["qwen3_moe"], "--moe-mode", "sparse"), "--moe-mode must be one of")
    plan = plan_export(load(tiny_models["qwen3_moe"]).model, "auto", 250.0, LUTConfig(), "auto", "routed")
    assert plan.split_experts and plan.moe_mode == "routed"
    whole = plan_export(load(tiny_models["qwen3_moe"]).model, "auto", 250.0, LUTConfig(), "auto", "dense")
    assert not whole.split_experts and whole.modes() == ["dense"]
    with pytest.raises(BadArgumentError, match="--chunk applies to exports of whole layers"):
        plan_export(load(tiny_models["qwen3_moe"]).model, 2, 250.0, LUTConfig(), "auto", "routed")


def test_plan_of_a_hub_id_fetches_config_json_only(monkeypatch, tmp_path):
    from anemll_mlx.loading import hub

    asked = []
    (tmp_path / "config.json").write_text(QWEN3_30B.read_text())

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    assert hub.looks_like_hub_id("Qwen/Qwen3-30B-A3B")
    done = run_cli("plan", "Qwen/Qwen3-30B-A3B", "--lut", "4")
    assert done.exit_code == 0, done.stdout + done.stderr
    assert asked == [("Qwen/Qwen3-30B-A3B", ["config.json"])]
    assert "102 programs" in done.stdout and "dense: 100.0 calls" in done.stdout


@pytest.mark.slow
def test_lut8_packs_compute_with_the_luts_of_the_whole_stack(moe, tmp_path):
    """Each pack fits LUTs to its own experts' rows; with 8 output channels per table no table
    spans two experts, so the packs' tables are those of the whole stack: the export is as close
    to ``mlx:MODEL+lut=8`` as an FP16 export is to float32."""
    out = tmp_path / "lut8"
    lut = LUTConfig(ffn=parse_lut_spec("8"))
    export_model(load(moe, "float32"), out, ExportOptions(context=CONTEXT, batch=BATCH, max_chunk_mb=BUDGET_MB, lut=lut))
    assert yaml.safe_load((out / "meta.yaml").read_text())["anemll_mlx"]["moe"]["chunks"][1]["kind"] == "experts"
    reference = open_driver(f"mlx:{moe}+lut=8", CONTEXT)
    summary = compare(reference, open_driver(f"mil:{out}+moe=routed"), _prompts(moe)[:2], 16).summary
    # measured KL 1.7e-5 and one flip of 32 steps at a near-tie (fp16's error, as for FP16 exports)
    assert summary["kl_mean"] < 1e-4 and summary["match_rate"] >= 0.95, summary


def test_generate_runs_an_export_with_packs_like_a_dense_one(moe, packed):
    """The commands that run exports (generate, chat, serve) share the export host: greedy text of
    the routed export is the MLX model's."""
    text = {}
    for spec in (f"mil:{packed}+moe=routed", f"mlx:{moe}"):
        done = run_cli("generate", spec, "--prompt", "Hello there", "--max-tokens", "6", "--temp", "0")
        assert done.exit_code == 0, done.stdout + done.stderr
        text[spec] = done.stdout.split("==========")[0]
    assert len(set(text.values())) == 1, text
    assert_one_error(run_cli("generate", f"mil:{packed}+moe=sparse", "--prompt", "Hi"), "bad +moe=sparse")


# --- gathered mode: the chosen experts' weights passed in ----------------------------------------


@pytest.fixture(scope="module")
def gathered(moe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "gathered"
    options = ExportOptions(context=CONTEXT, batch=BATCH, max_chunk_mb=BUDGET_MB, moe_mode="gathered")
    export_model(load(moe, "float32"), out, options)
    return out


def test_gathered_layout_has_a_gather_program_after_each_layers_packs(gathered):
    meta = fmt.read_export(gathered).meta
    assert meta.moe is not None and meta.moe.mode == "gathered"
    roles = [(r.kind, r.layers.start, r.experts) for r in meta.moe.roles]
    packs = [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    layer0 = [(fmt.ATTENTION, 0, None), *[(fmt.EXPERTS, 0, p) for p in packs], (fmt.GATHER, 0, None)]
    assert roles[:7] == [*layer0, (fmt.LAYERS, 1, None)]  # no expert rides in the attention part
    for name in ("gate", "up", "down"):
        stack = np.load(gathered / fmt.expert_file("qwen3_moe", 2, name))
        assert stack.dtype == np.float16 and stack.shape[0] == 16
    parts, problems = inspect_export(gathered, BUDGET_MB)
    assert problems == [] and all(not p.problems for p in parts), [p.problems for p in parts]


@pytest.mark.slow
def test_gathered_mode_matches_mlx_fp32_with_two_calls_per_sparse_layer(moe, gathered):
    """Decode through the gather programs (prefill through the packs, routed): KL < 1e-3, every
    greedy token as MLX float32's; a decoded token calls embeddings, attention + gather per sparse
    layer, the dense layer's chunk and the LM head."""
    reference = MLXDriver(load(moe, "float32"), "mlx@fp32", context=CONTEXT)
    host = open_driver(f"mil:{gathered}")
    assert host.moe_mode == "gathered"
    summary = compare(reference, host, _prompts(moe), STEPS).summary
    print({k: summary[k] for k in ("kl_mean", "kl_max", "match_rate")}, "calls", host.calls)
    assert summary["kl_mean"] < 1e-3 and summary["match_rate"] == 1.0, summary
    host.reset()
    first = host.prefill(_prompts(moe)[0])
    before = host.calls
    host.decode(int(np.argmax(first)))
    assert host.calls - before == 1 + 2 + 1 + 2 + 2 + 1
    routed = open_driver(f"mil:{gathered}+moe=routed")  # the same export runs routed too
    np.testing.assert_array_equal(routed.prefill(_prompts(moe)[0]), first)  # prefill runs the packs, routed


def test_gathered_mode_plan_of_qwen3_30b_a3b_and_its_limits(tmp_path):
    model = build_model(json.loads(QWEN3_30B.read_text()))
    plan = plan_export(model, "auto", 250.0, LUTConfig(), "auto", "gathered")
    assert max(plan.embed_bytes + plan.chunk_bytes + plan.head_bytes) <= 250 * MB
    estimate = plan.estimate("gathered")
    assert estimate.calls == 1 + 48 * 2 + 3 and estimate.seconds < 0.6  # 0.351 s/token at 120 GB/s, 3 ms
    assert_one_error(run_cli("plan", QWEN3_30B, "--moe-mode", "gathered", "--lut", "4"), "export it without --lut")


@pytest.mark.slow
def test_expert_convs_keep_within_the_channel_limit(moe, monkeypatch, tmp_path):
    """With the ANE's output-channel limit lowered to 64 (so one 32-unit expert's gate/up, but not
    two, fits one conv; down has 64 outputs per expert), every conv of a pack has at most 64
    outputs and the export still computes what MLX float32 does."""
    from anemll_mlx.export import programs
    from anemll_mlx.ops import mil_ops

    monkeypatch.setattr(mil_ops, "ANE_MAX_CHANNELS", 64)
    model = load(moe, "float32").model
    role = fmt.ChunkRole(fmt.EXPERTS, range(0, 1), range(0, 5))
    functions = fmt.chunk_functions(BATCH, rotate=False)
    program = programs.chunk_program(model, mil_ops.MILOps(8, context=CONTEXT), range(0, 1), functions, CONTEXT, False, role)
    convs = [op for f in program.functions.values() for op in f.operations if op.op_type == "conv"]
    assert len(convs) == 2 * 3 * 5  # infer and prefill, gate/up/down, one expert per group
    assert max(op.outputs[0].shape[1] for op in convs) == 64
    out = tmp_path / "narrow"
    export_model(load(moe, "float32"), out, ExportOptions(context=CONTEXT, batch=BATCH, max_chunk_mb=BUDGET_MB))
    reference = MLXDriver(load(moe, "float32"), "mlx@fp32", context=CONTEXT)
    summary = compare(reference, open_driver(f"mil:{out}+moe=dense"), _prompts(moe)[:2], 8).summary
    assert summary["kl_mean"] < 1e-3 and summary["match_rate"] == 1.0, summary

"""The FP16 probe: peaks, overflow location, token match, recommendation, clamp sweep, CLI.

Overflow is forced by a single-channel spike (one row of a layer's down_proj, or one channel of
Gemma's post-feedforward norm gain, times a large factor), the way real models carry their
massive activations: a few channels, not all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from anemll_mlx.loading import load
from anemll_mlx.ops.mlx_ops import MLXOps
from anemll_mlx.probe import FP16_MAX, ProbeOps, calibration_prompts, probe
from anemll_mlx.probe.plot import plot_peaks
from tiny_models import ARCHS, scale_weights

PROMPTS = [
    "Hello! How are you today?",
    "def forward(self, x):\n    return self.norm(x)",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
]
SPIKE_LAYER = 2
REPORT_KEYS = {
    "model", "architecture", "num_layers", "fp16_max", "peak", "peak_layer", "peak_site", "ratio",
    "needs_scaling", "recommended_fp16_scale", "layers", "fp16", "bf16", "scaled", "clamp_sweep",
    "prompts", "tokens", "seconds",
}  # fmt: skip


def spike(lm, layer: int, factor: float, channel: int = 5) -> None:
    """Make one residual channel of ``layer``'s MLP branch ``factor`` times larger."""
    block = lm.model.model.layers[layer]
    holder = block.post_feedforward_layernorm if "post_feedforward_layernorm" in block else block.mlp.down_proj
    w = holder.weight
    rows = (mx.arange(w.shape[0]) == channel).reshape(-1, *([1] * (w.ndim - 1)))
    holder.weight = w * mx.where(rows, factor, 1.0)


@pytest.fixture(scope="module")
def folders(tiny_model_factory) -> dict[str, Path]:
    """Each family with at least 4 layers, so the spike at layer 2 has layers on both sides.
    gemma4 without per-layer inputs: their gate reads the stream itself, so a spike overflows it
    at any scale (test_gemma4.py shows the probe saying so)."""
    overrides = {"gemma3": {}, "gemma4": {"hidden_size_per_layer_input": 0}}
    return {arch: tiny_model_factory(arch, **overrides.get(arch, {"num_hidden_layers": 4})) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_untouched_tiny_models_are_fp16_safe(folders, arch):
    report = probe(load(folders[arch], "float32"), PROMPTS, max_tokens=4)
    assert report["verdict"] == "FP16-safe"
    assert not report["needs_scaling"] and report["recommended_fp16_scale"] is None
    assert not report["fp16"]["overflow"] and report["fp16"]["first_overflow"] is None
    assert report["fp16"]["token_match"] >= 0.97
    assert 0 < report["peak"] < 1000
    assert report["scaled"] == {"fp16_scale": None, "overflow": None, "token_match": None}


@pytest.mark.parametrize("arch", ARCHS)
def test_overflow_is_found_at_its_layer_and_the_scale_fixes_it(folders, arch):
    lm = load(folders[arch], "float32")
    spike(lm, SPIKE_LAYER, 1e5)
    report = probe(lm, PROMPTS, max_tokens=4)

    assert report["needs_scaling"]
    assert report["fp16"]["overflow"]
    assert report["fp16"]["first_overflow"] == {"layer": SPIKE_LAYER, "site": "mlp_out"}
    assert report["fp16"]["token_match"] < 0.5  # inf/NaN wrecks everything after it
    residual = [row["residual"] for row in report["layers"]]
    assert residual[SPIKE_LAYER - 1] < FP16_MAX < residual[SPIKE_LAYER]
    assert report["peak"] > FP16_MAX and report["peak_layer"] >= SPIKE_LAYER and report["peak_site"] == "residual"

    alpha = report["recommended_fp16_scale"]
    assert 0 < alpha * report["peak"] <= 50000 and alpha * report["peak"] > 25000
    assert report["verdict"] == f"needs --fp16-scale {alpha}"
    assert report["scaled"]["fp16_scale"] == alpha
    assert report["scaled"]["overflow"] is False
    assert report["scaled"]["token_match"] >= 0.99


def test_report_contract_and_clamp_sweep(folders, tmp_path):
    lm = load(folders["qwen3"], "float32")
    spike(lm, SPIKE_LAYER, 1e5)
    report = probe(lm, PROMPTS, max_tokens=4)

    assert REPORT_KEYS <= set(report)
    assert json.loads(json.dumps(report, allow_nan=False)) == report  # strict JSON: no inf/NaN
    assert report["num_layers"] == 4 == len(report["layers"])
    assert set(report["layers"][0]) == {"index", "residual", "attn_out", "mlp_hidden", "mlp_out", "attn_scores"}
    assert all(row[site] > 0 for row in report["layers"] for site in row if site != "index")
    assert report["prompts"] == len(PROMPTS) and report["tokens"] > 3 * len(PROMPTS)
    assert report["ratio"] == pytest.approx(report["peak"] / FP16_MAX)
    assert [c["threshold"] for c in report["clamp_sweep"]] == [65504, 32768, 16384, 8192]
    # clamping at 65504 turns the inf into a finite value: better than the plain fp16 run
    assert report["clamp_sweep"][0]["token_match"] > report["fp16"]["token_match"]
    assert 0 <= report["bf16"]["token_match"] <= 1

    png = plot_peaks(report, tmp_path / "peaks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_leaves_the_model_as_found(folders):
    lm = load(folders["gemma3"], "float32")
    spike(lm, SPIKE_LAYER, 1e5)
    before = {k: np.array(v) for k, v in _flat(lm.model.parameters())}
    eps = [m.eps for m in lm.model.modules() if hasattr(m, "eps")]
    embed_scale = lm.model.embed_scale
    report = probe(lm, PROMPTS[:1], max_tokens=2)
    assert report["scaled"]["fp16_scale"] is not None  # the scaled run happened
    after = dict(_flat(lm.model.parameters()))
    assert all(after[k].dtype == mx.float32 and np.array_equal(np.array(after[k]), v) for k, v in before.items())
    assert lm.model.embed_scale == embed_scale
    assert [m.eps for m in lm.model.modules() if hasattr(m, "eps")] == eps
    assert getattr(lm.model, "fp16_scale", None) is None


def test_progress_reaches_its_total(folders):
    calls = []
    probe(load(folders["llama"], "float32"), PROMPTS[:2], max_tokens=2, progress=lambda *a: calls.append(a))
    stages = [stage for stage, _, _ in calls]
    assert stages[0] == "float32" and {"float16", "bfloat16"} <= set(stages)  # float32 generates too
    assert calls[-1][1] == calls[-1][2]
    done = [d for _, d, _ in calls]
    assert done == sorted(done) and done[0] == 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_probe_ops_compute_what_mlx_ops_compute(folders, arch, dtype):
    """Explicit attention and the CPU half-product route change nothing but what is seen."""
    lm = load(folders[arch], "float32" if dtype == mx.float32 else "float16")
    ids = mx.array([[3, 17, 42, 99, 150, 7, 250, 31, 64, 128, 5, 200]])
    ops = ProbeOps()
    ref = lm.model(ids, lm.model.make_cache(12), 0, ops=MLXOps()).astype(mx.float32)
    got = lm.model(ids, lm.model.make_cache(12), 0, ops=ops).astype(mx.float32)
    ops.flush()
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert mx.abs(ref - got).max().item() <= tol * mx.abs(ref).max().item()
    layers = lm.model.args.num_hidden_layers
    assert {(i, s) for i, s in ops.peaks} == {(-1, "embedding")} | {
        (i, s) for i in range(layers) for s in ("attn_scores", "attn_out", "mlp_hidden", "mlp_out", "residual")
    }


def test_first_nonfinite_is_the_earliest_in_forward_order():
    ops = ProbeOps()
    inf = mx.array([1.0, float("inf")])
    ops.tap("embedding", -1, mx.array([1.0]))
    ops.tap("mlp_out", 3, inf)
    ops.tap("residual", 3, inf)
    ops.flush()
    ops.tap("attn_out", 3, inf)  # a later call, earlier in the forward
    ops.tap("residual", 5, mx.array([float("nan")]))
    ops.flush()
    assert ops.first_nonfinite == (3, "attn_out")
    assert ops.peaks[(3, "residual")] == float("inf") and (5, "residual") not in ops.peaks


def test_clamp_applies_to_the_residual_only():
    ops = ProbeOps(clamp=100.0)
    x = mx.array([-500.0, 5.0, 500.0])
    assert ops.tap("mlp_out", 0, x).tolist() == [-500.0, 5.0, 500.0]
    assert ops.tap("residual", 0, x).tolist() == [-100.0, 5.0, 100.0]
    ops.flush()
    assert ops.peaks[(0, "residual")] == 500.0  # what the layer produced, before the clamp


def test_calibration_set_is_varied():
    prompts = calibration_prompts()
    assert len(prompts) >= 8
    assert any(len(p) > 800 for p in prompts)  # a long prose paragraph
    assert any("def " in p or "SQL" in p for p in prompts)
    assert any(any(ord(c) > 0x2E80 for c in p) for p in prompts)  # CJK
    assert any("é" in p or "ä" in p for p in prompts)


# --- command line


def _cli(*args: str):
    from anemll_mlx.cli import app

    return CliRunner().invoke(app, ["probe", *args], env={"COLUMNS": "200"})


def test_cli_on_a_tiny_model(folders, tmp_path):
    out, png = tmp_path / "report.json", tmp_path / "peaks.png"
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-tokens", "2"]
    result = _cli(str(folders["llama_tied"]), *args, "--out", str(out), "--plot", str(png))
    assert result.exit_code == 0, result.stderr + result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "FP16-safe"
    assert "residual" in result.stdout and "attn_scores" in result.stdout and "token match" in result.stdout
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report) and report["prompts"] == 2
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_says_which_scale_a_spiked_model_needs(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    scale_weights(folder, r"layers\.1\.mlp\.down_proj", 3e4)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:2]) + "\n")
    result = _cli(str(folder), "--prompts", str(prompts), "--max-tokens", "2")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("needs --fp16-scale 0.")
    assert "inf/NaN first at layer 1" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no prompts"),
        ('{"prompt": "fine"}\n{"promt": "typo"}\n', "line 2"),
        ('{"prompt": "unterminated"\n', "line 1"),
    ],
)
def test_cli_rejects_bad_prompt_files(folders, tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    result = _cli(str(folders["llama"]), "--prompts", str(path))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_rejects_an_unknown_model(tmp_path):
    result = _cli(str(tmp_path / "no-such-model"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error:")


# --- the real model


@pytest.mark.slow
def test_smollm2_is_fp16_safe_with_its_attention_sink_spike(smollm2_gguf):
    report = probe(load(smollm2_gguf, "float32"), PROMPTS[:1], max_tokens=2)
    assert report["verdict"] == "FP16-safe"
    assert not report["fp16"]["overflow"]
    assert 15000 < report["peak"] < 0.75 * FP16_MAX  # the sink channel, near 25k
    assert report["peak_site"] == "residual" and 0 <= report["peak_layer"] < report["num_layers"]
    assert report["fp16"]["token_match"] >= 0.95


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)

"""Calibrated LUT fits: the calibration files, the statistics (E[x^2] per input feature of every LUT
target), the export that fits its LUTs weighted by them, and the CLI's refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from anemll_mlx import format as fmt
from anemll_mlx.errors import BadArgumentError
from anemll_mlx.eval.compare import compare
from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.loading import load
from anemll_mlx.ops.mlx_ops import MLXOps
from anemll_mlx.probe import calibrate
from anemll_mlx.probe.calibrate import (
    BUILT_IN,
    CalibrationSample,
    CalibrationSet,
    calibration_set,
    collect_input_moments,
)
from anemll_mlx.quant.lut import LUTConfig, LUTSpec, fit_lut
from anemll_mlx.runtime.drivers import MLXDriver, open_driver

TEXT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama", num_hidden_layers=2)


# --- calibration files


def test_built_in_set_is_the_calibration_prompts_not_the_eval_prompts() -> None:
    from anemll_mlx.eval.prompts import default_prompts

    built_in = calibration_set()
    assert built_in.source == BUILT_IN and all(s.chat for s in built_in.samples)
    assert not {s.text for s in built_in.samples} & set(default_prompts())


def test_txt_and_jsonl_files(tmp_path: Path) -> None:
    txt = tmp_path / "doc.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps({"prompt": "asked"}) + "\n", encoding="utf-8")
    found = calibration_set([txt, jsonl])
    assert found.samples == [
        CalibrationSample("line one\nline two\n", chat=False),
        CalibrationSample("plain", chat=False),
        CalibrationSample("asked", chat=True),
    ]
    assert found.source == f"{txt}, {jsonl}"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "calibration file not found"),
        ("data.csv", "a,b", "must be .txt (plain text) or .jsonl"),
        ("empty.txt", "  \n", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\n{"promt": "typo"}\n', 'bad.jsonl line 2: expected a JSON object with a non-empty "text"'),
        ("notjson.jsonl", "just words\n", "line 1: expected a JSON object"),
    ],
)
def test_bad_calibration_files(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(BadArgumentError) as info:
        calibration_set([path])
    assert message in str(info.value) and "\n" not in str(info.value)


# --- the statistics


def _mean_square(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return np.mean(flat * flat, axis=0)


def test_moments_match_a_direct_computation(llama: Path) -> None:
    lm = load(llama, "float32")
    ids = lm.tokenizer.encode_prompt(TEXT, chat=False)
    moments = collect_input_moments(lm, CalibrationSet([CalibrationSample(TEXT, chat=False)], "test"))
    assert moments.tokens == len(ids) and moments.source == "test"
    model = lm.model

    # layer 0's attention projections read input_layernorm(embedding), computed here in numpy
    table = np.array(model.model.embed_tokens.weight, dtype=np.float64)
    block = model.model.layers[0]
    h = table[ids]
    eps, gain = block.input_layernorm.eps, np.array(block.input_layernorm.weight, dtype=np.float64)
    x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * gain
    for proj in ("q_proj", "k_proj", "v_proj"):
        got = moments.importance("ffn", f"model.layers.0.self_attn.{proj}")
        np.testing.assert_allclose(got, _mean_square(x), rtol=1e-4)
        # and the whole second moment E[x x^T], which the compensated indices use
        full = moments.second_moment("ffn", f"model.layers.0.self_attn.{proj}")
        assert full is not None and full.dtype == np.float32
        np.testing.assert_allclose(full, x.T @ x / len(ids), rtol=1e-4, atol=1e-5 * float(np.abs(x).max()) ** 2)

    # the LM head reads the final norm's output: the plain MLX forward's, up to the head
    ops, cache = MLXOps(), model.make_cache(len(ids))
    hidden = model.forward_layers(ops, model.embed(ops, mx.array(ids)[None]), model.mlx_step(0, len(ids), cache))
    head_input = np.array(model.final_norm(ops, hidden))
    np.testing.assert_allclose(moments.importance("lm_head", "lm_head"), _mean_square(head_input), rtol=1e-4)

    # every Linear target has statistics of its input width; the embedding table (a lookup) has none
    for target in model.lut_targets():
        found = moments.importance(target.part, target.name)
        if target.part == "embeddings":
            assert found is None
        else:
            assert found is not None and found.shape == (target.holder.weight.shape[1],) and (found > 0).all()


def test_long_texts_run_in_segments(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text longer than a segment is measured whole, a segment at a time from position 0."""
    lm = load(llama, "float32")
    ids = lm.tokenizer.encode_prompt(TEXT, chat=False)
    sample = CalibrationSet([CalibrationSample(TEXT, chat=False)], "test")
    monkeypatch.setattr(calibrate, "SEGMENT", 16)
    segmented = collect_input_moments(lm, sample)
    assert segmented.tokens == len(ids) > 16
    monkeypatch.setattr(calibrate, "SEGMENT", 4096)
    one_pass = collect_input_moments(lm, sample)
    # layer 0's projections read the embeddings (no position in them): the same as one pass
    name = "model.layers.0.self_attn.q_proj"
    np.testing.assert_allclose(segmented.importance("ffn", name), one_pass.importance("ffn", name), rtol=1e-5)
    later = "model.layers.1.self_attn.q_proj"  # after attention: the cut changes what layer 1 sees
    assert not np.allclose(segmented.importance("ffn", later), one_pass.importance("ffn", later), rtol=1e-6)


def test_chat_samples_are_continued_greedily(llama: Path) -> None:
    lm = load(llama, "float32")
    prompt = "Hello there"
    ids = lm.tokenizer.encode_prompt(prompt, chat=True)
    moments = collect_input_moments(lm, CalibrationSet([CalibrationSample(prompt, chat=True)], "t"), continuation=5)
    assert len(ids) < moments.tokens <= len(ids) + 5


# --- the export


def _lut_table(package: Path, weight_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The fp16 table and the indices of one palettized weight, as the saved package holds them."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    spec = ct.utils.load_spec(str(package))
    program = load_milproto(spec, spec.specificationVersion, str(package / "Data/com.apple.CoreML/weights"))
    wanted = weight_name.replace(".", "_") + "_palettized"
    for function in program.functions.values():
        for op in function.find_ops(op_type="constexpr_lut_to_dense"):
            if op.name == wanted:
                return np.asarray(op.lut.val), np.asarray(op.indices.val)
    raise AssertionError(f"no LUT named {wanted} in {package.name}")


@pytest.mark.slow
def test_calibrated_export_holds_the_weighted_fits_and_runs(llama: Path, tmp_path: Path) -> None:
    spec = LUTSpec(4, 4)
    lut = LUTConfig(ffn=spec, lm_head=spec)
    options = ExportOptions(context=64, batch=16, lut=lut, calibrate=True)
    out = tmp_path / "calibrated"
    export_model(load(llama, "float32"), out, options)

    meta = yaml.safe_load((out / fmt.META).read_text())["anemll_mlx"]["calibration"]
    assert meta["source"] == BUILT_IN and meta["tokens"] > 100
    exported = fmt.read_export(out)
    assert exported.meta.calibration == fmt.Calibration(BUILT_IN, meta["tokens"])

    # the chunk's tables are the weighted fits of the statistics the export measured (forked workers and all)
    lm = load(llama, "float32")
    moments = collect_input_moments(lm, calibration_set())
    assert moments.tokens == meta["tokens"]
    name = "model.layers.1.mlp.down_proj"
    weight = lm.model.model.layers[1].mlp.down_proj.weight
    weighted = fit_lut(weight, spec, importance=moments.importance("ffn", name))
    compensated = fit_lut(weight, spec, importance=moments.importance("ffn", name), second_moment=moments.second_moment("ffn", name))
    table, indices = _lut_table(exported.chunks[0], name)
    assert table.reshape(weighted.lut.shape).tobytes() == weighted.lut.tobytes() == compensated.lut.tobytes()
    assert table.tobytes() != fit_lut(weight, spec).lut.tobytes()  # weighting changed the fit
    assert np.array_equal(indices.reshape(-1), compensated.indices.reshape(-1))  # the compensated indices
    assert not np.array_equal(compensated.indices, weighted.indices)

    # and the mil driver runs the package: a 4-bit tiny model stays recognisably the same model
    tok = lm.tokenizer
    prompts = [tok.encode_prompt(t, chat=False)[:24] for t in ("Hello there, how are you", "The sky is blue")]
    summary = compare(MLXDriver(lm, "mlx@fp32", context=64), open_driver(f"mil:{out}"), prompts, 8).summary
    assert np.isfinite(summary["kl_mean"]) and summary["steps"] == 16, summary
    # measured: KL 0.33, match 44% (a random tiny model's distributions are flat: its argmax flips
    # easily, so KL is the measure)
    assert summary["kl_mean"] < 0.6 and summary["match_rate"] >= 0.3, summary


# --- the CLI


def _cli(*args: str):
    from anemll_mlx.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--calibrate"], "error: --calibrate weights the LUT fits of the FFN and the LM head, but neither is quantized"),
        (["--calibrate", "--lut-embeddings", "4"], "error: --calibrate weights the LUT fits"),
        (["--lut", "4,4", "--calibration-file", "nowhere.txt"], "error: calibration file not found: nowhere.txt"),
        (["--lut", "4,4", "--calibrate", "--calibration-file", "x.csv"], "error: calibration file not found: x.csv"),
    ],
)
def test_cli_refuses_bad_calibration_flags_before_loading(llama: Path, tmp_path: Path, flags, message) -> None:
    out = tmp_path / "never"
    result = _cli("export", str(llama), "--out", str(out), "--context", "64", "--batch", "16", *flags)
    assert result.exit_code == 2, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not out.exists()


def test_cli_refuses_a_malformed_jsonl(llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    result = _cli("export", str(llama), "--out", str(tmp_path / "o"), "--lut", "4,4", "--calibration-file", str(bad))
    assert result.exit_code == 2
    assert result.stderr.strip() == f'error: {bad} line 1: expected a JSON object with a non-empty "text" or "prompt" string or a "messages" list'


@pytest.mark.slow
def test_cli_export_with_a_calibration_file(llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "cli"
    result = _cli(
        "export", str(llama), "--out", str(out), "--context", "64", "--batch", "16",
        "--fp16-scale", "none", "--lut", "4,4", "--calibration-file", str(text),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    tokens = len(load(llama, "float32").tokenizer.encode_prompt(TEXT, chat=False))
    assert f"over {tokens} tokens of {text}" in "".join(result.stdout.split("\n"))
    assert fmt.read_export(out).meta.calibration == fmt.Calibration(str(text), tokens)

"""LUT checkpoints: written by ``qat.checkpoint``, loaded by every command as a model, exported exactly.

One tiny llama checkpoint (FFN 4-bit group 4, LM head 6-bit group 8) and its export through the CLI
are built once per module; the tests read them.  The export must hold the checkpoint's tables and
indices byte for byte, and run as the MLX model of the checkpoint does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from anemll_mlx import format as fmt
from anemll_mlx.errors import BadArgumentError, CorruptModelError
from anemll_mlx.eval.compare import compare
from anemll_mlx.export import ExportOptions
from anemll_mlx.export.weights import checkpoint_rows
from anemll_mlx.loading import load
from anemll_mlx.loading.checkpoint import QAT_FILE, checkpoint_lut
from anemll_mlx.models import build_model
from anemll_mlx.qat.checkpoint import ptq_luts, write_lut_checkpoint
from anemll_mlx.quant.lut import LUTConfig, LUTSpec, LUTWeight, fit_lut
from anemll_mlx.runtime.drivers import open_driver
from cli_runner import error_lines as _error_lines
from cli_runner import run_cli as _cli

CONTEXT = 64
LUT = LUTConfig(ffn=LUTSpec(4, 4), lm_head=LUTSpec(6, 8))




def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.fixture(scope="module")
def source(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", vocab_size=448)  # 448 rows: whole groups of 8 for the head


@pytest.fixture(scope="module")
def fitted(source: Path) -> dict[str, LUTWeight]:
    return ptq_luts(load(source, "float32"), LUT)


@pytest.fixture(scope="module")
def ckpt(source: Path, fitted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qat") / "ckpt"
    return write_lut_checkpoint(load(source, "float32"), fitted, LUT, out, {"step": 7, "trainer": {"lr": 1e-4}})


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory) -> Path:
    """The CLI's export of the checkpoint, no --lut: the checkpoint's own config and tables."""
    out = tmp_path_factory.mktemp("qat-export") / "export"
    result = _cli("export", ckpt, "--out", out, "--context", CONTEXT, "--batch", "16", "--fp16-scale", "none", "--compile", "no")
    assert result.exit_code == 0, result.output
    return out


# --- writing and loading


def test_checkpoint_round_trips_exactly(source, fitted, ckpt):
    assert not ckpt.with_name(".ckpt.partial").exists()
    stored = mx.load(str(ckpt / "model.safetensors"))
    for name, lw in fitted.items():
        assert f"{name}.weight" not in stored
        assert stored[f"{name}.lut"].dtype == mx.float16 and stored[f"{name}.indices"].dtype == mx.uint8
        assert np.array(stored[f"{name}.indices"]).tobytes() == lw.indices.tobytes()
    assert stored["model.norm.weight"].dtype == mx.float32
    info = json.loads((ckpt / QAT_FILE).read_text())
    assert info["format"] == "anemll-mlx-qat" and info["version"] == 1
    assert info["lut"] == {"ffn": "4,4", "lm_head": "6,8", "embeddings": None}
    assert info["step"] == 7 and info["trainer"] == {"lr": 1e-4}  # the trainer's keys are kept
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is False
    assert checkpoint_lut(ckpt) == LUT and checkpoint_lut(source) is None

    original, loaded = load(source, "float32"), load(ckpt, "float32")
    assert loaded.model.lut == LUT and set(loaded.model.lut_weights) == set(fitted)
    plain, got = _params(original.model), _params(loaded.model)
    assert set(plain) == set(got)
    for key, value in got.items():
        name = key.removesuffix(".weight")
        if name in fitted:  # exactly the fp16 values the export materialises
            assert value.tobytes() == fitted[name].dequantize().astype(np.float32).tobytes(), key
            lw = loaded.model.lut_weights[name]
            assert lw.lut.tobytes() == fitted[name].lut.tobytes() and lw.spec == fitted[name].spec
        else:
            assert value.dtype == plain[key].dtype and value.tobytes() == plain[key].tobytes(), key
    assert loaded.tokenizer.encode("Hello there") == original.tokenizer.encode("Hello there")

    lazy = load(ckpt, "float16", lazy=True)  # the export's way: nothing read until used
    w = lazy.model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == mx.float16
    assert np.array(w).tobytes() == fitted["model.layers.1.mlp.down_proj"].dequantize().tobytes()


def test_a_checkpoint_refuses_a_second_lut(ckpt):
    with pytest.raises(BadArgumentError, match="already holds LUT weights"):
        open_driver(f"mlx:{ckpt}+lut=4", CONTEXT)


def test_ptq_luts_are_the_export_fits_and_a_checkpoint_gives_back_its_own(source, fitted, ckpt):
    lm = load(source, "float32")
    w = lm.model.model.layers[0].self_attn.q_proj.weight
    assert fitted["model.layers.0.self_attn.q_proj"].indices.tobytes() == fit_lut(w, LUT.ffn).indices.tobytes()
    assert len(fitted) == 2 * 7 + 1
    again = ptq_luts(load(ckpt, "float32"), LUT)
    assert all(again[k].indices.tobytes() == fitted[k].indices.tobytes() for k in fitted)
    with pytest.raises(BadArgumentError):
        ptq_luts(load(ckpt, "float32"), LUTConfig(ffn=LUTSpec(8, 4)))


def test_wrong_luts_are_refused_before_writing(source, fitted, tmp_path):
    lm = load(source, "float32")
    missing = dict(fitted)
    missing.pop("lm_head")
    with pytest.raises(BadArgumentError, match="missing lm_head"):
        write_lut_checkpoint(lm, missing, LUT, tmp_path / "c")
    with pytest.raises(BadArgumentError, match="spec is 4,8"):
        write_lut_checkpoint(lm, fitted, LUTConfig(ffn=LUTSpec(4, 8), lm_head=LUT.lm_head), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_rewriting_a_checkpoint_swaps_it_whole(source, fitted, tmp_path, monkeypatch):
    lm = load(source, "float32")
    out = tmp_path / "ckpt"
    write_lut_checkpoint(lm, fitted, LUT, out, {"step": 1})
    write_lut_checkpoint(lm, fitted, LUT, out, {"step": 2})  # the trainer's periodic save
    assert json.loads((out / QAT_FILE).read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial or replaced folder left

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        write_lut_checkpoint(lm, fitted, LUT, out, {"step": 3})
    assert json.loads((out / QAT_FILE).read_text())["step"] == 2  # the previous checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load(out).model.lut == LUT


def test_a_checkpoint_can_rewrite_itself(ckpt, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    lm = load(copy, "float32")  # the trainer resuming from its own checkpoint
    write_lut_checkpoint(lm, dict(lm.model.lut_weights), LUT, copy, {"step": 8})
    again = load(copy, "float32")
    assert json.loads((copy / QAT_FILE).read_text())["step"] == 8
    assert _params(again.model).keys() == _params(lm.model).keys()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_params(again.model).values(), _params(lm.model).values()))


def test_gemma_norms_are_stored_unfolded_and_load_folded_once(tiny_model_factory, tmp_path):
    source = tiny_model_factory("gemma3", num_hidden_layers=2, sliding_window_pattern=2)
    lm = load(source, "float32")
    lut = LUTConfig(ffn=LUTSpec(4, 8))
    out = write_lut_checkpoint(lm, ptq_luts(lm, lut), lut, tmp_path / "gemma")
    raw, stored = mx.load(str(source / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    norms = [k for k in raw if k.endswith("norm.weight")]
    assert len(norms) == 2 * 6 + 1
    for k in norms:  # HF's w, not the loaded 1 + w: equal to the source's up to the low bits 1 + w dropped
        w, w0 = np.array(stored[k]), np.array(raw[k])
        np.testing.assert_allclose(w, w0, rtol=0, atol=2**-24)
        assert (w + np.float32(1)).tobytes() == (w0 + np.float32(1)).tobytes(), k
    original, loaded = _params(lm.model), _params(load(out, "float32").model)
    for k in original:
        if k.endswith("norm.weight"):
            assert loaded[k].tobytes() == original[k].tobytes(), k


# --- corrupt checkpoints


def _corrupt(ckpt: Path, dest: Path, how: str) -> Path:
    shutil.copytree(ckpt, dest)
    path = dest / "model.safetensors"
    tensors = dict(mx.load(str(path)))
    name = "model.layers.0.mlp.up_proj"
    if how == "indices_without_lut":
        del tensors[f"{name}.lut"]
    elif how == "shape_mismatch":
        tensors[f"{name}.indices"] = tensors[f"{name}.indices"][:, :-1]
    elif how == "index_past_table":
        tensors[f"{name}.indices"] = mx.full(tensors[f"{name}.indices"].shape, 16, mx.uint8)
    elif how == "groups_not_dividing":
        tensors[f"{name}.lut"] = mx.concatenate([tensors[f"{name}.lut"], tensors[f"{name}.lut"][:1]])
    elif how == "spec_mismatch":
        info = json.loads((dest / QAT_FILE).read_text())
        info["lut"]["ffn"] = "4,8"
        (dest / QAT_FILE).write_text(json.dumps(info))
    elif how == "qat_json_missing":
        (dest / QAT_FILE).unlink()
    elif how == "qat_json_invalid":
        (dest / QAT_FILE).write_text("{not json")
    elif how == "qat_json_bad_spec":
        (dest / QAT_FILE).write_text(json.dumps({"format": "anemll-mlx-qat", "version": 1, "lut": {"ffn": "5"}}))
    mx.eval(tensors)
    path.unlink()
    mx.save_safetensors(str(path), tensors)
    return dest


@pytest.mark.parametrize(
    "how, message",
    [
        ("indices_without_lut", "up_proj has indices without a table"),
        ("shape_mismatch", "up_proj.indices is uint8 (128, 63), the model needs uint8 (128, 64)"),
        ("index_past_table", "holds index 16, past the 16 entries"),
        ("groups_not_dividing", "33 groups, which do not divide the 128 rows"),
        ("spec_mismatch", "does not match qat.json's ffn spec 4,8"),
        ("qat_json_missing", "no qat.json"),
        ("qat_json_invalid", "qat.json is not valid JSON"),
        ("qat_json_bad_spec", "lut.ffn: bad LUT spec '5'"),
    ],
)
def test_corrupt_checkpoints_are_one_error_line(ckpt, tmp_path, how, message):
    broken = _corrupt(ckpt, tmp_path / how, how)
    with pytest.raises(CorruptModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(broken)
    result = _cli("info", broken)
    lines = _error_lines(result)
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr


# --- the export


def _lut_ops(package: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(table, indices) of every constexpr_lut_to_dense op of a saved package, by op name."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    spec = ct.utils.load_spec(str(package))
    program = load_milproto(spec, spec.specificationVersion, str(package / "Data/com.apple.CoreML/weights"))
    out = {}
    for function in program.functions.values():
        for op in function.find_ops(op_type="constexpr_lut_to_dense"):
            out[op.name] = (np.asarray(op.lut.val), np.asarray(op.indices.val))
    return out


def test_export_holds_the_checkpoint_tables_byte_for_byte(ckpt, fitted, exported):
    export = fmt.read_export(exported)
    assert export.meta.lut == {"ffn": fmt.LUTSetting(4, 4), "lm_head": fmt.LUTSetting(6, 8), "embeddings": None}
    source = export.meta.lut_source
    assert source is not None and source["checkpoint"] == str(ckpt) and source["parts"] == ["ffn", "lm_head"]
    assert len(source["qat_json_sha256"]) == 64
    ops = {}
    for package in [*export.chunks, *export.lm_head]:
        ops.update(_lut_ops(package))
    vocab = fitted["lm_head"].indices.shape[0]
    for name, lw in fitted.items():
        op = f"lm_head_0_{vocab}_palettized" if name == "lm_head" else name.replace(".", "_") + "_palettized"
        table, indices = ops.pop(op)
        assert table.astype(np.float16).tobytes() == lw.lut.tobytes(), name
        assert indices.astype(np.uint8).reshape(lw.indices.shape).tobytes() == lw.indices.tobytes(), name
    assert not ops  # nothing fitted besides the checkpoint's


def test_export_runs_as_the_checkpoint_does(ckpt, exported):
    reference = open_driver(f"mlx:{ckpt}", CONTEXT)
    tok = reference.tokenizer
    prompts = [tok.encode(t)[:16] for t in ("The quick brown fox jumps", "Hello! How are you today?")]
    summary = compare(reference, open_driver(f"mil:{exported}"), prompts, 8).summary
    assert summary["kl_mean"] < 1e-4 and summary["match_rate"] == 1.0, summary


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lut", "8"], "--lut 8,8 differs from the checkpoint's ffn LUT 4,4"),
        (["--lut", "none"], "--lut none differs from the checkpoint's ffn LUT 4,4"),
        (["--lut-lm-head", "4,8"], "--lut-lm-head 4,8 differs from the checkpoint's lm_head LUT 6,8"),
        (["--calibrate"], "nothing is left to fit"),
        (["--split-lm-head", "3"], "cut the checkpoint's LUT groups of 8 rows"),
    ],
)
def test_export_flags_against_the_checkpoint_are_one_error_line(ckpt, tmp_path, flags, message):
    result = _cli("export", ckpt, "--out", tmp_path / "o", "--context", CONTEXT, "--batch", "16", *flags)
    lines = _error_lines(result)
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_a_part_the_checkpoint_left_alone_may_take_a_fitted_lut(ckpt):
    options = ExportOptions(context=CONTEXT, batch=16, lut=LUTConfig(embeddings=LUTSpec(8, 8)))
    options.adopt_checkpoint(checkpoint_lut(ckpt), explicit={"embeddings"})
    assert options.lut == LUTConfig(ffn=LUTSpec(4, 4), lm_head=LUTSpec(6, 8), embeddings=LUTSpec(8, 8))
    skeleton = build_model(json.loads((ckpt / "config.json").read_text()))
    options.check_plan(options.plan(skeleton))  # one LM-head piece: nothing to cut


def test_row_pieces_of_a_checkpoint_lut_are_its_rows(fitted):
    lw = fitted["lm_head"]
    dense = lw.dequantize()
    for rows in (range(0, 224), range(224, 448), range(0, 448)):
        piece = checkpoint_rows(lw, rows)
        assert piece.dequantize().tobytes() == dense[rows.start : rows.stop].tobytes()
    with pytest.raises(BadArgumentError, match="cut the checkpoint's LUT groups"):
        checkpoint_rows(lw, range(0, 150))


def test_meta_yaml_says_where_the_luts_came_from(exported):
    ours = yaml.safe_load((exported / fmt.META).read_text())["anemll_mlx"]
    assert set(ours["lut_source"]) == {"checkpoint", "qat_json_sha256", "parts"}


# --- a GGUF source: tokenizer files rebuilt from the GGUF


@pytest.mark.slow
def test_a_gguf_model_makes_a_checkpoint_with_its_tokenizer(smollm2_gguf, tmp_path):
    lm = load(smollm2_gguf, "float32")
    lut = LUTConfig(ffn=LUTSpec(4, None))
    luts = {}
    for target in lm.model.lut_targets():  # a cheap, coarse per-tensor table: the files are the point here
        if target.part == "ffn":
            w = np.array(target.holder.weight)
            table = np.linspace(w.min(), w.max(), 16).astype(np.float16)[None, :]
            step = (float(w.max()) - float(w.min())) / 15 or 1.0
            indices = np.clip(np.rint((w - w.min()) / step), 0, 15).astype(np.uint8)
            luts[target.name] = LUTWeight(indices, table, lut.ffn)
    out = write_lut_checkpoint(lm, luts, lut, tmp_path / "smollm2")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    ck = load(out, "float32")
    text = "Hello! What is the capital of France?"
    assert ck.tokenizer.encode(text) == lm.tokenizer.encode(text)
    assert ck.tokenizer.encode_prompt(text, chat=True) == lm.tokenizer.encode_prompt(text, chat=True)
    assert ck.tokenizer.eos_token_ids == lm.tokenizer.eos_token_ids
    assert ck.model.lut == lut and ck.model.args == lm.model.args
    embed = ck.model.model.embed_tokens.weight
    assert np.array(embed).tobytes() == np.array(lm.model.model.embed_tokens.weight).tobytes()
    name = "model.layers.3.mlp.gate_proj"
    got = np.array(ck.model.model.layers[3].mlp.gate_proj.weight)
    assert got.tobytes() == luts[name].dequantize().astype(np.float32).tobytes()

"""The part-size budget: every program, the embeddings and the LM head included, stays within the
compiled bytes Core ML is known to keep on the Neural Engine (250 MB unless raised), split into
more programs when it would not, and the split export computes what the whole one does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from anemll_mlx.eval.compare import compare
from anemll_mlx.export import ExportOptions, export_model
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.export.plan import MB, plan_export
from anemll_mlx.loading import load
from anemll_mlx.models import build_model
from anemll_mlx.quant.lut import LUTConfig, parse_lut_spec
from anemll_mlx.runtime.drivers import MLXDriver, open_driver

CLI = Path(sys.executable).parent / "anemll-mlx"
# a vocabulary wide enough that a budget of a few hundred KB splits the table and the head
WIDE = {"vocab_size": 4096, "tie_word_embeddings": False}
BUDGET_MB = 0.2  # the table (4096 x 64 fp16) is 0.5 MB: 3 embeddings programs, 3 LM-head programs


GEMMA3_270M = {
    "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "sliding_window": 512, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
}  # fmt: skip


def test_every_part_of_gemma3_270m_fits_the_default_budget():
    """Its 262144 x 640 table is 320 MB in fp16: two embeddings programs, the tied head packed
    into programs of 16384-row pieces, every one within 250 MB."""
    plan = plan_export(build_model(GEMMA3_270M), "auto", 250.0, LUTConfig(), "auto")
    sizes = plan.embed_bytes + plan.chunk_bytes + plan.head_bytes
    assert max(sizes) <= 250 * MB
    assert len(plan.embed_parts) == 2 and sum(len(r) for r in plan.embed_parts) == 262144
    assert len(plan.head_parts) == 2 and max(plan.head_sizes) <= 16384 and sum(plan.head_sizes) == 262144
    raised = plan_export(build_model(GEMMA3_270M), "auto", 400.0, LUTConfig(), "auto")
    assert len(raised.embed_parts) == 1 and len(raised.head_parts) == 1  # one program each, as ANEMLL has


def test_a_lut_keeps_whole_groups_in_each_part():
    lut = LUTConfig(embeddings=parse_lut_spec("4,8"))
    plan = plan_export(build_model(GEMMA3_270M), "auto", 50.0, lut, "auto")
    assert len(plan.embed_parts) > 1 and all(r.start % 8 == 0 for r in plan.embed_parts)


@pytest.fixture(scope="module")
def split(tiny_model_factory, tmp_path_factory):
    folder = tiny_model_factory("llama", **WIDE)
    out = tmp_path_factory.mktemp("budget") / "split"
    options = ExportOptions(context=64, batch=16, max_chunk_mb=BUDGET_MB, fp16_scale=None)
    export_model(load(folder, "float32"), out, options)
    return folder, out


def test_split_parts_are_named_recorded_and_within_budget(split):
    _, out = split
    names = sorted(p.name for p in out.glob("*.mlpackage"))
    assert [n for n in names if "embeddings" in n] == [f"llama_embeddings_0{i}of03.mlpackage" for i in (1, 2, 3)]
    assert [n for n in names if "lm_head" in n] == [f"llama_lm_head_0{i}of03.mlpackage" for i in (1, 2, 3)]
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    params, ours = meta["model_info"]["parameters"], meta["anemll_mlx"]
    assert params["embeddings"] == "llama_embeddings_01of03.mlmodelc" and params["lm_head"] == "llama_lm_head_01of03.mlmodelc"
    assert len(ours["embeddings_parts"]) == 3 and len(ours["lm_head_parts"]) == 3
    rows = ours["embeddings_rows"]
    assert rows[0][0] == 0 and rows[-1][1] == 4096 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert sum(ours["lm_head_part_pieces"]) == params["split_lm_head"] == len(params["lm_head_chunk_sizes"])
    parts, problems = inspect_export(out)
    assert problems == [] and [p.problems for p in parts if p.problems] == []
    assert all(p.mb <= BUDGET_MB * 1.05 for p in parts if "embeddings" in p.name or "lm_head" in p.name)


def test_split_export_computes_what_the_model_does(split):
    folder, out = split
    reference = MLXDriver(load(folder, "float32"), "mlx@fp32", context=64)
    tok = reference.tokenizer
    prompts = [tok.encode_prompt(t, chat=False)[:20] for t in ("Hello there, how are you?", "The capital of France is")]
    host = open_driver(f"mil:{out}")
    summary = compare(reference, host, prompts, 8).summary
    assert summary["kl_mean"] < 1e-3 and summary["match_rate"] == 1.0
    host.reset()
    host.prefill(prompts[0])
    before = host.calls
    host.decode(5)
    assert host.calls - before == 1 + 1 + 3  # the embeddings program holding row 5, the chunk, 3 LM heads


def test_inspect_warns_but_passes_parts_over_the_threshold(split):
    _, out = split
    done = subprocess.run([str(CLI), "inspect", str(out), "--max-chunk-mb", "0.01"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) >= 3 and "Neural Engine" in warnings[0]
    assert "conforms to the ANEMLL layout" in done.stdout


def test_a_split_lut_table_matches_the_whole_lut_table(tiny_model_factory, tmp_path):
    """Each part holds whole LUT groups (4 rows here) and a group's table depends on its rows alone,
    so the split table's LUTs are the whole table's, and so are the logits, bit for bit."""
    folder = tiny_model_factory("llama", **WIDE)
    lut = LUTConfig(embeddings=parse_lut_spec("8,4"))
    outs = {}
    for name, budget in (("whole", 250.0), ("split", 0.15)):
        outs[name] = tmp_path / name
        options = ExportOptions(context=64, batch=16, max_chunk_mb=budget, lut=lut, fp16_scale=None)
        export_model(load(folder, "float32"), outs[name], options)
    whole, split = open_driver(f"mil:{outs['whole']}"), open_driver(f"mil:{outs['split']}")
    ids = load(folder, "float32").tokenizer.encode_prompt("Hello there, how are you?", chat=False)
    a, b = whole.prefill(ids), split.prefill(ids)
    assert len(list(outs["split"].glob("*embeddings*"))) > 1
    np.testing.assert_array_equal(a, b)

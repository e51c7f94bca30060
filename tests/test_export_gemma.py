"""export: Gemma3 with a context larger than its sliding window (split local/global KV states).

The default tiny gemma3 (7 layers: sliding x5, full, sliding; window W = 8) is exported with
context 32 and batch 4, and driven through the export's own host logic (``open_driver("mil:DIR")``)
against the MLX float32 model, whose sliding mask covers the full cache.  A 13-token prompt is
prefilled in batches at 0 and 4 (``prefill``) and 8 and 12 (``prefill_rotate``, the last one padded)
and 16 tokens are then decoded teacher-forced with ``infer_rotate`` (positions 13..28, more than
twice the window); a 3-token prompt is decoded with ``infer`` up to the window, then ``infer_rotate``.
A window off by one position moves this model's logits by KL 1e-2 to 1, so KL < 1e-3 at every step
pins the window down exactly.
"""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import yaml

from anemll_mlx import format as fmt
from anemll_mlx.errors import UserError
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.export import ExportOptions, export_model, programs
from anemll_mlx.export.conformance import inspect_export
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver, open_driver

CONTEXT, BATCH, WINDOW = 32, 4, 8
LOCAL_SHAPE, GLOBAL_SHAPE = [12, 1, CONTEXT, 16], [2, 1, CONTEXT, 16]  # 6 sliding layers, 1 global
FUNCTIONS = ["infer", "prefill", "infer_rotate", "prefill_rotate"]


@pytest.fixture(scope="module")
def folder(tiny_model_factory) -> Path:
    return tiny_model_factory("gemma3")


@pytest.fixture(scope="module")
def exports(folder, tmp_path_factory) -> dict[int, Path]:
    """chunks -> export folder (1 and 2 chunks; chunk 1 of 2 holds layers 0-3, all sliding)."""
    root = tmp_path_factory.mktemp("gemma_exports")
    out = {}
    for chunks in (1, 2):
        out[chunks] = root / f"chunks{chunks}"
        export_model(
            load(folder, "float32"), out[chunks], ExportOptions(context=CONTEXT, batch=BATCH, chunk=chunks)
        )
    return out


@pytest.fixture(scope="module")
def ids(folder) -> list[int]:
    tok = load(folder, "float32").tokenizer
    ids = tok.encode_prompt(" ".join(default_prompts()), chat=False)
    assert len(ids) >= CONTEXT
    return ids[:CONTEXT]


class CallLog:
    """Wraps a host's runner, keeping (function, current_pos) of every chunk call."""

    def __init__(self, runner):
        self.runner = runner
        self.calls: list[tuple[str, int]] = []

    def run(self, program, function, inputs):
        if function is not None:
            self.calls.append((function, int(inputs["current_pos"][0])))
        return self.runner.run(program, function, inputs)

    def reset_state(self):
        self.runner.reset_state()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    lp = p - p.max() - np.log(np.exp(p - p.max()).sum())
    lq = q - q.max() - np.log(np.exp(q - q.max()).sum())
    return float((np.exp(lp) * (lp - lq)).sum())


def run_both(folder: Path, out: Path, ids: list[int], prompt: int, end: int):
    """Prefill ids[:prompt] then decode ids[prompt:end] teacher-forced, on MLX fp32 and the export.
    Returns the logits rows of both and the export host's chunk calls (one entry per call)."""
    ref = MLXDriver(load(folder, "float32"), "mlx@fp32", context=CONTEXT)
    host = open_driver(f"mil:{out}")
    host.runner = log = CallLog(host.runner)
    rows_ref, rows_out = [ref.prefill(ids[:prompt])], [host.prefill(ids[:prompt])]
    for token in ids[prompt:end]:
        rows_ref.append(ref.decode(token))
        rows_out.append(host.decode(token))
    chunks = len(host.export.chunks)
    return np.stack(rows_ref), np.stack(rows_out), log.calls[::chunks]


def assert_close(ref: np.ndarray, out: np.ndarray) -> None:
    kls = [kl(r, o) for r, o in zip(ref, out)]
    assert max(kls) < 1e-3, kls
    assert (ref.argmax(-1) == out.argmax(-1)).all(), (ref.argmax(-1), out.argmax(-1))


@pytest.mark.slow
def test_partial_prompt_past_the_window_then_rotating_decode(folder, exports, ids):
    ref, out, calls = run_both(folder, exports[1], ids, 13, 29)
    assert len(ref) == 17 and np.isfinite(out).all()
    assert calls == [("prefill", 0), ("prefill", 4), ("prefill_rotate", 8), ("prefill_rotate", 12)] + [
        ("infer_rotate", p) for p in range(13, 29)
    ]
    assert_close(ref, out)


@pytest.mark.slow
def test_short_prompt_decoded_through_the_window(folder, exports, ids):
    ref, out, calls = run_both(folder, exports[1], ids, 3, 21)
    assert len(ref) == 19
    assert calls == [("prefill", 0)] + [("infer", p) for p in range(3, 8)] + [
        ("infer_rotate", p) for p in range(8, 21)
    ]
    assert_close(ref, out)


@pytest.mark.slow
def test_two_chunks_give_the_logits_of_one(folder, exports, ids):
    _, one, _ = run_both(folder, exports[1], ids, 13, 29)
    ref, two, calls = run_both(folder, exports[2], ids, 13, 29)
    assert calls[2] == ("prefill_rotate", 8)
    # the same fp16 ops in the same order: a chunk boundary only passes fp16 hidden states on
    assert float(np.abs(two - one).max()) <= 1e-3
    assert_close(ref, two)


@pytest.mark.parametrize("chunks", [1, 2])
def test_inspect_and_meta_name_both_states(exports, chunks):
    out = exports[chunks]
    parts, problems = inspect_export(out)
    assert problems == []
    assert [(p.name, p.problems) for p in parts if p.problems] == []
    for part in parts[1:-1]:
        assert part.functions == FUNCTIONS
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    assert meta["model_info"]["parameters"]["sliding_window"] == WINDOW
    assert "kv_state" not in meta["anemll_mlx"]
    assert meta["anemll_mlx"]["kv_states"] == [
        {"name": "kv_cache_local", "shape": LOCAL_SHAPE, "layers": [0, 1, 2, 3, 4, 6]},
        {"name": "kv_cache_global", "shape": GLOBAL_SHAPE, "layers": [5]},
    ]
    # every function of every chunk declares both states in full, also chunk 1 of 2, which has no
    # global layer (coremltools refuses an unused state input: the chunk rewrites one block of it)
    for chunk in sorted(out.glob("gemma3_FFN_PF_chunk_*.mlpackage")):
        spec = ct.utils.load_spec(str(chunk))
        for function in spec.description.functions:
            states = {s.name: list(s.type.stateType.arrayType.shape) for s in function.state}
            assert states == {"kv_cache_local": LOCAL_SHAPE, "kv_cache_global": GLOBAL_SHAPE}, (
                chunk.name,
                function.name,
            )


def test_inspect_flags_split_exports_that_do_not_conform(exports, tmp_path):
    """The checks above can fail: meta.yaml without kv_states, a state of another shape, and the same
    programs described as a single-state export (window past the context) are all reported."""
    import shutil

    def problems_with(edit) -> list[str]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(exports[1], copy)
        meta = yaml.safe_load((copy / "meta.yaml").read_text())
        edit(meta)
        (copy / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        parts, problems = inspect_export(copy)
        return problems + [p for part in parts for p in part.problems]

    assert any("lacks kv_states" in p for p in problems_with(lambda m: m["anemll_mlx"].pop("kv_states")))

    def reshape(meta):
        meta["anemll_mlx"]["kv_states"][1]["shape"] = [2, 1, 16, 16]

    assert any("kv_cache_global shape" in p for p in problems_with(reshape))

    def unsplit(meta):
        meta["model_info"]["parameters"]["sliding_window"] = 2 * CONTEXT

    assert any("no KV state" in p for p in problems_with(unsplit))


def test_split_cache_only_past_the_window(folder):
    model = load(folder, "float32").model
    assert programs.split_window(model, WINDOW) is None
    shapes = {s.name: s.shape for s in programs.kv_states(model, WINDOW)}
    assert shapes == {"model.model.kv_cache_0": (14, 1, WINDOW, 16)}
    assert [f.name for f in programs.chunk_functions(model, WINDOW, BATCH)] == ["infer", "prefill"]
    assert programs.split_window(model, CONTEXT) == WINDOW
    assert {s.name: s.shape for s in programs.kv_states(model, CONTEXT)} == {
        "kv_cache_local": tuple(LOCAL_SHAPE),
        "kv_cache_global": tuple(GLOBAL_SHAPE),
    }
    assert [f.name for f in programs.chunk_functions(model, CONTEXT, BATCH)] == FUNCTIONS


def test_band_mask_sees_the_last_window_positions():
    mask = fmt.band_mask(WINDOW, 3)[0, 0]
    assert mask.shape == (3, WINDOW + 3)
    # query t (position current_pos + t) sees keys current_pos - W + t + 1 ... current_pos + t
    for t in range(3):
        visible = np.flatnonzero(mask[t] == 0)
        assert visible.tolist() == list(range(t + 1, WINDOW + t + 1))
    assert np.isneginf(mask[mask != 0]).all()


def test_batch_that_does_not_divide_the_window_is_refused(folder, tmp_path):
    lm = load(folder, "float32")
    with pytest.raises(UserError, match="sliding window 8 needs the window to be a multiple of --batch 16"):
        export_model(lm, tmp_path / "out", ExportOptions(context=CONTEXT, batch=16))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

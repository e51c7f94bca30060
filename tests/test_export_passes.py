"""export: the few coremltools passes we run leave the programs' meaning as the default pipeline would.

``export.package`` converts with a short pass list instead of coremltools' default pipeline (whose
~90 passes and a validation after each were most of an export's time), and builds the ops those
passes would merge once per function while tracing.  Here the same tiny models are exported both
ways, the reference with ``ct.PassPipeline.DEFAULT``, and run through the export's own host logic
on our MIL executor: FP16 logits must be bit-identical, LUT logits within fp16 rounding.  Also
checked on the saved packages: the functions of a chunk share their weights (the weight file is
the size of one function's), no function reads a state twice, and projections stay 1x1 convs over
(B, C, 1, T).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest

from anemll_mlx import format as fmt
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.export import ExportOptions, export_model, package, programs
from anemll_mlx.loading import load
from anemll_mlx.quant.lut import LUTConfig, parse_lut_spec
from anemll_mlx.runtime.drivers import open_driver

# name -> (arch, config overrides, export options)
CASES = {
    # GQA, Q-chunked prefill (attention chunk 4 of a 16-token batch: mask rows sliced per chunk)
    "llama": ("llama", {"num_hidden_layers": 2}, {"context": 64, "batch": 16, "attention_chunk": 4}),
    "qwen2": ("qwen2", {}, {"context": 64, "batch": 16}),  # biases
    # context 32 > window 8: two states, four functions, the band mask, run-time window slices
    "gemma3_split": ("gemma3", {}, {"context": 32, "batch": 4}),
}
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def folders(tiny_model_factory) -> dict[str, Path]:
    return {name: tiny_model_factory(arch, **overrides) for name, (arch, overrides, _) in CASES.items()}


def export(folder: Path, out: Path, name: str, monkeypatch: pytest.MonkeyPatch, default: bool, lut: str | None = None) -> Path:
    """Export ``folder`` with our pass list, or with coremltools' default pipeline."""
    options = ExportOptions(**CASES[name][2], lut=LUTConfig(ffn=parse_lut_spec(lut) if lut else None))
    with monkeypatch.context() as patch:
        if default:
            patch.setattr(package, "pass_pipeline", lambda: ct.PassPipeline.DEFAULT)
        export_model(load(folder, "float32"), out, options)
    return out


def logits(out: Path, folder: Path, context: int) -> list[np.ndarray]:
    """A prefill over two batches and greedy decode steps through the export's host logic."""
    ids = load(folder, "float32").tokenizer.encode_prompt(" ".join(default_prompts()), chat=False)[: context // 2 + 3]
    driver = open_driver(f"mil:{out}")
    rows = [np.asarray(driver.prefill(ids), np.float32)]
    for _ in range(DECODE_STEPS):
        rows.append(np.asarray(driver.decode(int(np.argmax(rows[-1]))), np.float32))
    return rows


def chunk_package(out: Path) -> Path:
    (path,) = sorted(out.glob("*_FFN_PF*_chunk_01of01.mlpackage"))
    return path


def weight_file_bytes(path: Path) -> int:
    return (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size


def load_program(path: Path):
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = ct.utils.load_spec(str(path))
    return milproto_load(spec, spec.specificationVersion, str(path / "Data/com.apple.CoreML/weights"))


def test_the_pass_list_leaves_out_the_passes_we_replaced():
    assert package.pass_pipeline().passes == ["anemll_mlx::prepare_for_runtime"]
    passes = set(package.PASSES)
    assert not passes & {"common::remove_redundant_ops", "common::const_deduplication", "common::compose_conv1d",
                         "common::reduce_transposes"}  # fmt: skip
    assert {"common::add_int16_cast", "common::guard_negative_gather_indices"} <= passes


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_fp16_export_gives_the_default_pipelines_logits_bit_for_bit(folders, tmp_path, monkeypatch, name):
    folder, context = folders[name], CASES[name][2]["context"]
    ours = export(folder, tmp_path / "ours", name, monkeypatch, default=False)
    theirs = export(folder, tmp_path / "default", name, monkeypatch, default=True)
    # the reference really went through the default pipeline: compose_conv1d made conv1d of our convs
    infer = load_program(chunk_package(theirs)).functions[fmt.INFER]
    assert any(op.op_type == "conv" and op.x.rank == 3 for op in infer.operations)
    for step, (a, b) in enumerate(zip(logits(ours, folder, context), logits(theirs, folder, context))):
        assert np.array_equal(a, b), f"step {step}: max |diff| {np.abs(a - b).max()}"


@pytest.mark.slow
def test_lut_export_gives_the_default_pipelines_logits(folders, tmp_path, monkeypatch):
    folder, context = folders["llama"], CASES["llama"][2]["context"]
    ours = export(folder, tmp_path / "ours", "llama", monkeypatch, default=False, lut="4,4")
    theirs = export(folder, tmp_path / "default", "llama", monkeypatch, default=True, lut="4,4")
    for a, b in zip(logits(ours, folder, context), logits(theirs, folder, context)):
        # fp16 rounding of the logits: a couple of ulps at the largest magnitude
        assert np.abs(a - b).max() <= 2 * np.spacing(np.float16(np.abs(b).max()), dtype=np.float16)


@pytest.mark.slow
@pytest.mark.parametrize("lut", [None, "4,4"])
def test_infer_and_prefill_share_their_weights(folders, tmp_path, monkeypatch, lut):
    """The two-function chunk's weight file is exactly that of a chunk holding only ``infer``."""
    folder = folders["llama"]
    both = export(folder, tmp_path / "both", "llama", monkeypatch, default=False, lut=lut)
    with monkeypatch.context() as patch:
        patch.setattr(programs, "chunk_functions", lambda *a: [fmt.ChunkFunction(fmt.INFER, 1, False)])
        alone = export(folder, tmp_path / "infer", "llama", monkeypatch, default=False, lut=lut)
    assert load_program(chunk_package(both)).functions.keys() == {fmt.INFER, fmt.PREFILL}
    assert weight_file_bytes(chunk_package(both)) == weight_file_bytes(chunk_package(alone))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gemma3_split"])
def test_saved_functions_read_each_state_once_and_keep_4d_convs(folders, tmp_path, monkeypatch, name):
    out = export(folders[name], tmp_path / "ours", name, monkeypatch, default=False)
    program = load_program(chunk_package(out))
    for function_name, function in program.functions.items():
        ops = list(function.operations)
        reads = Counter(op.inputs["input"].name for op in ops if op.op_type == "read_state")
        assert reads and max(reads.values()) == 1, (function_name, reads)
        convs = [op for op in ops if op.op_type.startswith("conv")]
        assert convs and all(op.op_type == "conv" and op.x.rank == 4 and op.x.shape[2] == 1 for op in convs)

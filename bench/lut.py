"""Our LUT fit against coremltools' k-means palettization, on SmolLM2-135M weights and a gaussian.

Both sides see the same fp16 weight and group the same axis (output channels: coremltools'
per_grouped_channel picks axis 0 of a linear weight), so the reconstruction errors compare
directly.  coremltools fits one group after another in one worker (its default): with the exact
1-D k-means (kmeans1d, bundled in coremltools._deps) for groups of >= 10000 fp16 values, else with
scikit-learn's KMeans (k-means++, one init, tol 1e-2).  The "ct fit" column says which.  We fit all
groups at once.  Both sides run on one thread (OMP_NUM_THREADS=1 unless set).

Run: .venv/bin/python bench/lut.py [--quick]   (--quick: attention and gaussian only)
"""

from __future__ import annotations

import anemll_mlx  # noqa: F401  (first, before mlx.core: the fast BLAS goes under MLX, see blas.py)

# isort: split
import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would drown the table
# One thread on both sides (our numpy code is single-threaded; sklearn's OpenMP threads otherwise
# make its timings swing 10x on a shared machine).  Override by setting OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from anemll_mlx.quant.lut import LUTSpec, fit_lut  # noqa: E402

GGUF = Path(
    os.environ.get(
        "ANEMLL_MLX_SMOLLM2_GGUF", Path.home() / ".cache/anemll-mlx/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
)
REAL_TENSORS = ["blk.0.attn_q", "blk.0.ffn_up", "blk.0.ffn_down", "blk.20.ffn_gate"]
QUICK_TENSORS = ["blk.0.attn_q", "blk.20.attn_output"]
SPECS = [LUTSpec(4, 4), LUTSpec(4, 8), LUTSpec(6, 4)]


def ensure_sklearn() -> None:
    """coremltools' kmeans mode imports scikit-learn lazily and it is not one of our dependencies."""
    if importlib.util.find_spec("sklearn") is not None:
        return
    print("scikit-learn is missing (coremltools' k-means needs it): installing it with pip ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "scikit-learn"], check=False)
    if done.returncode != 0:
        sys.exit(f"error: could not install scikit-learn; run `{sys.executable} -m pip install scikit-learn`")


def load_weights(names: list[str]) -> dict[str, np.ndarray]:
    """Dequantize Q4_1 tensors of the GGUF to the fp16 weights a converter would see."""
    if not GGUF.exists():
        sys.exit(f"error: {GGUF} not found (set ANEMLL_MLX_SMOLLM2_GGUF or run `make model`)")
    gguf = mx.load(str(GGUF))
    out = {}
    for name in names:
        q = gguf[name + ".weight"]
        if name + ".scales" in gguf:
            q = mx.dequantize(q, gguf[name + ".scales"], gguf[name + ".biases"], group_size=32, bits=4)
        out[name] = np.array(q.astype(mx.float16))
    return out


def gaussian(shape: tuple[int, int], sigma: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(shape) * sigma).astype(np.float16)


def coremltools_fit(w: np.ndarray, spec: LUTSpec) -> str:
    """Which algorithm coremltools 9 picks for this weight's groups (see its quantization_utils)."""
    per_group = w.size // spec.num_groups(w.shape[0])
    return "exact" if per_group >= 10_000 and w.dtype == np.float16 else "sklearn"


def mse(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def ours(w: np.ndarray, spec: LUTSpec) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    lw = fit_lut(w, spec)
    seconds = time.perf_counter() - start
    return lw.dequantize(), seconds


def theirs(w: np.ndarray, spec: LUTSpec) -> tuple[np.ndarray, float]:
    """coremltools: a one-linear mlprogram, palettize_weights(kmeans), the materialised weight."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((1, w.shape[1]), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, name="y")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
    )
    granularity = "per_tensor" if spec.group_size is None else "per_grouped_channel"
    op_config = cto.OpPalettizerConfig(
        nbits=spec.bits,
        mode="kmeans",
        granularity=granularity,
        group_size=spec.group_size or 0,
        weight_threshold=0,
    )
    start = time.perf_counter()
    palettized = cto.palettize_weights(model, cto.OptimizationConfig(global_config=op_config))
    seconds = time.perf_counter() - start
    ops = palettized._mil_program.functions["main"].operations
    (lut_op,) = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    groups = lut_op.lut.val.shape[0]
    expected = 1 if spec.group_size is None else w.shape[0] // spec.group_size
    assert groups == expected and lut_op.lut.val.shape[1] == 1, "coremltools grouped another axis"
    return lut_op.materialized_val_inference(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small real tensors and the gaussian")
    args = parser.parse_args()
    ensure_sklearn()
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    weights = load_weights(QUICK_TENSORS if args.quick else REAL_TENSORS)
    weights["gaussian"] = gaussian((1024, 1024) if args.quick else (2048, 2048))
    fit_lut(gaussian((64, 64)), LUTSpec(4, 8))  # warm numpy up before timing

    header = f"{'tensor':<18} {'shape':>11} {'lut':>4} {'mse ours':>10} {'mse ct':>10} {'ours/ct':>7} {'ct fit':>7} {'t ours':>7} {'t ct':>7} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    ratios, t_ours, t_theirs = [], 0.0, 0.0
    for name, w in weights.items():
        for spec in SPECS:
            deq_o, sec_o = ours(w, spec)
            deq_t, sec_t = theirs(w, spec)
            e_o, e_t = mse(deq_o, w), mse(deq_t, w)
            ratios.append(e_o / e_t)
            t_ours, t_theirs = t_ours + sec_o, t_theirs + sec_t
            shape = f"{w.shape[0]}x{w.shape[1]}"
            print(
                f"{name:<18} {shape:>11} {str(spec):>4} {e_o:10.3e} {e_t:10.3e} {e_o / e_t:7.4f} {coremltools_fit(w, spec):>7} "
                f"{sec_o:6.2f}s {sec_t:6.2f}s {sec_t / sec_o:7.0f}x",
                flush=True,
            )
    worse = sum(r > 1.001 for r in ratios)
    geo = float(np.exp(np.mean(np.log(ratios))))
    print("-" * len(header))
    print(
        f"error ratio ours/ct: geometric mean {geo:.3f}, worst {max(ratios):.4f} "
        f"({worse} of {len(ratios)} worse by > 0.1%); "
        f"time {t_ours:.1f}s vs {t_theirs:.1f}s ({t_theirs / t_ours:.0f}x faster)"
    )


if __name__ == "__main__":
    main()

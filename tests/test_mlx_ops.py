"""MLXOps' half-precision products through float32 (the CPU fast path) give MLX's own half
results: the same arithmetic (exactly widened inputs, float32 accumulation, one rounding), only the
order of the float32 sums differs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from anemll_mlx.loading import load
from anemll_mlx.ops.mlx_ops import MLXOps
from anemll_mlx.ops.vocabulary import Linear


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_widened_half_products_equal_mlx_half_products(dtype, tokens):
    rng = np.random.default_rng(0)
    layer = Linear(576, 1536, bias=True)
    layer.weight = mx.array(rng.standard_normal((1536, 576)) * 0.05).astype(dtype)
    layer.bias = mx.array(rng.standard_normal(1536)).astype(dtype)
    x = mx.array(rng.standard_normal((1, tokens, 576))).astype(dtype)
    native = np.array(MLXOps(widen_half=False).linear(x, layer).astype(mx.float32))
    widened = np.array(MLXOps(widen_half=True).linear(x, layer).astype(mx.float32))
    scale = np.abs(native).max()
    step = np.spacing(np.float16(scale)) if dtype == mx.float16 else scale * 2.0**-7  # one rounding at the top
    assert (native == widened).mean() >= 0.98
    assert np.abs(native - widened).max() <= step


def test_widened_half_model_gives_mlx_half_logits(tiny_models):
    lm = load(tiny_models["llama"], "float16")
    ids = mx.array([[3, 17, 42, 99, 150, 7, 250, 31]])
    native = lm.model(ids, lm.model.make_cache(8), 0, ops=MLXOps(widen_half=False)).astype(mx.float32)
    widened = lm.model(ids, lm.model.make_cache(8), 0, ops=MLXOps(widen_half=True)).astype(mx.float32)
    assert mx.all(mx.argmax(native, -1) == mx.argmax(widened, -1)).item()
    assert mx.abs(native - widened).max().item() <= 1e-2 * mx.abs(native).max().item()

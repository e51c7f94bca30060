"""Transforms of a model's weights, in one place, each recorded in a field the model declares.

- ``apply_fp16_scale`` (``DecoderModel.fp16_scale``): the exact FP16 scaling of the residual stream;
- ``apply_lut`` (``DecoderModel.lut``): the declared LUT targets replaced by their fitted tables,
  dequantized, so MLX computes with exactly the weights ``export --lut`` writes.

Both walk only what the family declares (``Block.branch_outputs``/``stream_norms`` and
``DecoderModel.lut_targets``), so a new family needs no change here.

The fp16 scale: the Neural Engine computes in fp16 (max 65504), and some models (Gemma 3 above all,
whose post-norm gains let the residual grow) carry residual values past that.  Every read of the
residual stream goes through an RMSNorm, which is blind to a uniform scale, so multiplying the
embedding output and every residual-branch output by ``alpha`` makes the stream ``alpha`` times
the original while every norm output, and thus the logits, stays the same.  The embedding output
is scaled through ``model.embed_scale``, never through the table, which a tied LM head shares.
The norms that read the stream get eps * alpha^2: rms(alpha x) with that eps is exactly rms(x)
times alpha, so the transform is exact rather than exact up to eps.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .errors import BadArgumentError, UnsupportedError
from .models.base import DecoderModel, lut_matrix
from .ops.vocabulary import Embedding, Linear, Norm
from .quant.lut import LUTConfig, LUTWeight, fit_lut


def apply_fp16_scale(model: DecoderModel, alpha: float) -> DecoderModel:
    """Scale ``model``'s residual stream by ``alpha`` in place; recorded as ``model.fp16_scale``.

    Refuses a second application (the scales would compound unnoticed) and any alpha that is not a
    finite positive number.  Returns the model for chaining.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise BadArgumentError(f"fp16 scale must be a finite number > 0, got {alpha}")
    if model.fp16_scale is not None:
        raise BadArgumentError(f"this model is already scaled by fp16_scale {model.fp16_scale}: scaling twice compounds")
    blocks = model.blocks
    outputs = [holder for block in blocks for holder in block.branch_outputs()]  # all known before any change
    readers = [norm for block in blocks for norm in block.stream_norms()] + model.stream_norms()
    # projections that read the stream itself (not through a norm) get 1 / alpha: same outputs
    inputs = [linear for block in blocks for linear in getattr(block, "stream_linears", list)()]
    for holder in outputs:
        _scale_holder(holder, alpha)
    for linear in inputs:
        linear.weight = (linear.weight.astype(mx.float32) / alpha).astype(linear.weight.dtype)
    _scale_checkpoint_tables(model, {id(holder) for holder in outputs}, alpha)
    for norm in readers:
        norm.eps = norm.eps * alpha * alpha
    model.embed_scale = model.embed_scale * alpha
    model.fp16_scale = alpha  # the scaled weights are computed on first use (a lazy model stays lazy)
    return model


def _scale_holder(holder: Linear | Norm, alpha: float) -> None:
    """Multiply the weight (and bias) in float32, then store it back in its own dtype."""
    for name in ("weight", "bias"):
        if name in holder:
            value = getattr(holder, name)
            setattr(holder, name, (value.astype(mx.float32) * alpha).astype(value.dtype))


def _scale_checkpoint_tables(model: DecoderModel, scaled: set[int], alpha: float) -> None:
    """A LUT checkpoint's tables of the scaled holders, scaled too (float32 product rounded to
    fp16: what the export of the scaled dense weight would hold), so the export emits the scaled
    weights whether it reads the holder or the table."""
    for target in model.lut_targets():
        lw = model.lut_weights.get(target.name)
        if lw is not None and id(target.holder) in scaled:
            table = (lw.lut.astype(np.float32) * np.float32(alpha)).astype(np.float16)
            model.lut_weights[target.name] = LUTWeight(lw.indices, table, lw.spec)


def apply_lut(model: DecoderModel, config: LUTConfig) -> DecoderModel:
    """Replace the weights of every part ``config`` quantizes with their fitted LUTs, dequantized.

    The fit is the export's own deterministic ``fit_lut``, so the MLX model then computes with
    exactly the export's weights: comparing the two separates what quantization costs from what
    the export adds.  A tied table serves both the embeddings and the LM head, which an export
    quantizes separately; MLX cannot, so a LUT on either of them needs untied weights.
    """
    if model.lut is not None:
        raise BadArgumentError(f"this model already holds LUT weights ({model.lut})")
    for target in model.lut_targets():
        spec = config[target.part]
        if spec is None:
            continue
        if isinstance(target.holder, Embedding) and "lm_head" not in model:
            raise UnsupportedError(
                "LUT weights for the embeddings or the LM head of a model with tied embeddings "
                "cannot be applied in MLX (the export quantizes the two copies separately)"
            )
        holder = target.holder
        dense = fit_lut(lut_matrix(holder.weight), spec).dequantize().reshape(holder.weight.shape)
        holder.weight = mx.array(dense).astype(holder.weight.dtype)
    mx.eval(model.parameters())
    model.lut = config
    return model

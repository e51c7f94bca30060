"""The exact FP16 scaling transform: shrink the whole residual stream by ``alpha``.

The Neural Engine computes in fp16 (max 65504), and some models (Gemma 3 above all, whose post-norm
(1 + w) gains let the residual grow) carry residual values past that.  Every read of the residual
stream goes through an RMSNorm, which is blind to a uniform scale, so multiplying the embedding
output and every residual-branch output by ``alpha`` makes the stream ``alpha`` times the original
while every norm output, and thus the logits, stays the same (up to the norm's eps).

Which weights carry the branch outputs depends on the block shape:
- pre-norm blocks (llama, qwen2, qwen3): ``o_proj`` and ``down_proj`` (weights and any biases);
- post-norm blocks (gemma3): the post-attention and post-feedforward norm gains, (1 + w) -> alpha (1 + w).
The embedding output is scaled through ``model.embed_scale``, never through the table, which a tied
LM head shares.  The norms that read the stream get eps * alpha^2: rms(alpha x) with that eps is
exactly rms(x) times alpha, so the transform is exact rather than exact up to eps.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..errors import BadArgumentError, UnsupportedError
from ..models.base import DecoderModel, Linear, Norm


def apply_fp16_scale(model: DecoderModel, alpha: float) -> DecoderModel:
    """Scale ``model``'s residual stream by ``alpha`` in place; records it as ``model.fp16_scale``.

    Refuses a second application (the scales would compound unnoticed) and any alpha that is not a
    finite positive number.  Returns the model for chaining.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise BadArgumentError(f"fp16 scale must be a finite number > 0, got {alpha}")
    applied = getattr(model, "fp16_scale", None)
    if applied is not None:
        raise BadArgumentError(f"this model is already scaled by fp16_scale {applied}: scaling twice compounds")
    layers = model.model.layers
    outputs = [holder for layer in layers for holder in _branch_outputs(layer)]  # all known before any change
    readers = [norm for layer in layers for norm in _stream_readers(layer)] + [model.model.norm]
    for holder in outputs:
        _scale_holder(holder, alpha)
    for norm in readers:
        norm.eps = norm.eps * alpha * alpha
    model.embed_scale = model.embed_scale * alpha
    mx.eval(model.parameters())
    model.fp16_scale = alpha
    return model


def _branch_outputs(block) -> list[Linear | Norm]:
    """The last op of each residual branch of ``block``, whichever block shape it has."""
    if _post_norm(block):
        # post-norm (Gemma): each branch ends in its own norm, so its gain is the branch's output scale
        return [block.post_attention_layernorm, block.post_feedforward_layernorm]
    if "self_attn" in block and "mlp" in block:
        attn, mlp = block.self_attn, block.mlp
        if "o_proj" in attn and "down_proj" in mlp:
            return [attn.o_proj, mlp.down_proj]
    raise UnsupportedError(f"fp16 scaling does not know the block shape {type(block).__module__}.{type(block).__name__}")


def _stream_readers(block) -> list[Norm]:
    """The norms whose input is the residual stream itself (the final norm aside)."""
    if _post_norm(block):
        return [block.input_layernorm, block.pre_feedforward_layernorm]
    return [block.input_layernorm, block.post_attention_layernorm]  # pre-norm: this one precedes the MLP


def _post_norm(block) -> bool:
    return "post_feedforward_layernorm" in block and "post_attention_layernorm" in block


def _scale_holder(holder: Linear | Norm, alpha: float) -> None:
    """Multiply the weight (and bias) in float32, then store it back in its own dtype."""
    for name in ("weight", "bias"):
        if name in holder:
            value = getattr(holder, name)
            setattr(holder, name, (value.astype(mx.float32) * alpha).astype(value.dtype))

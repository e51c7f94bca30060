"""The three kinds of program an export holds, traced from the model code through ``MILOps``.

- embeddings: ``input_ids`` (1, 1) or (1, batch) -> ``hidden_states`` (1, T, hidden);
- one FFN chunk per layer range, a function per token count (``infer`` 1, ``prefill`` batch):
  ``hidden_states``, ``position_ids``, ``causal_mask``, ``current_pos`` and the shared KV state ->
  ``output_hidden_states`` (the last chunk applies the final norm);
- lm_head: ``hidden_states`` (1, 1, hidden) -> ``logits1`` ... ``logitsN``, or per-piece
  ``argmax_idx`` / ``argmax_val`` when the argmax runs in the model.
Names and shapes are those ANEMLL's runtimes feed (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

from ..models.base import DecoderModel, Step
from ..ops.mil_ops import MILKVCache, MILOps

STATE_NAME = "model.model.kv_cache_0"


def _opset():
    import coremltools as ct

    return ct.target.iOS18


def _program(specs: dict, body) -> Program:
    """One-function program with inputs named exactly as ``specs`` (mb.program would use arg names)."""
    with Function(specs, opset_version=_opset()) as function:
        outputs = body(function.inputs)
        function.set_outputs(outputs)
    program = Program()
    program.add_function("main", function)
    return program


def kv_state_shape(model: DecoderModel, context: int) -> tuple[int, int, int, int]:
    a = model.args
    return (2 * a.num_hidden_layers, a.num_key_value_heads, context, a.head_dim)


def embeddings_program(model: DecoderModel, ops: MILOps) -> Program:
    """Token ids of any length T (the converter pins T to 1 and batch) -> (1, T, hidden)."""
    specs = {"input_ids": mb.TensorSpec((1, get_new_symbol()), dtype=types.int32)}
    return _program(specs, lambda i: [mb.identity(x=model.embed(ops, i["input_ids"]), name="hidden_states")])


def chunk_program(
    model: DecoderModel, ops: MILOps, layers: range, tokens: int, context: int, last: bool
) -> Program:
    """Layers ``layers`` over ``tokens`` new tokens at ``current_pos``, reading/writing the KV state."""
    hidden = model.args.hidden_size
    specs = {
        "hidden_states": mb.TensorSpec((1, tokens, hidden), dtype=types.fp16),
        "position_ids": mb.TensorSpec((tokens,), dtype=types.int32),
        "causal_mask": mb.TensorSpec((1, 1, tokens, context), dtype=types.fp16),
        "current_pos": mb.TensorSpec((1,), dtype=types.int32),
        STATE_NAME: mb.StateTensorSpec(kv_state_shape(model, context), dtype=types.fp16),
    }

    def body(i):
        cache = MILKVCache(i[STATE_NAME], model.args.num_hidden_layers, i["current_pos"])
        masks = {"global": i["causal_mask"], "sliding": i["causal_mask"]}
        step = Step(positions=i["position_ids"], masks=masks, cache=cache)
        h = model.forward_layers(ops, i["hidden_states"], step, layers)
        if last:
            h = model.final_norm(ops, h)
        return [mb.identity(x=h, name="output_hidden_states")]

    return _program(specs, body)


def lm_head_program(model: DecoderModel, ops: MILOps, sizes: list[int], argmax: bool) -> Program:
    """Final hidden state (1, 1, hidden) -> logits in pieces, or each piece's argmax and its value."""
    specs = {"hidden_states": mb.TensorSpec((1, 1, model.args.hidden_size), dtype=types.fp16)}

    def body(i):
        pieces = model.logits(ops, i["hidden_states"], sizes)
        if not argmax:
            return [mb.identity(x=p, name=f"logits{n + 1}") for n, p in enumerate(pieces)]
        flat = [mb.reshape(x=p, shape=[1, -1]) for p in pieces]
        idx = [mb.reduce_argmax(x=p, axis=-1, keep_dims=False) for p in flat]
        val = [mb.reduce_max(x=p, axes=[-1], keep_dims=False) for p in flat]
        return [
            mb.identity(x=mb.concat(values=idx, axis=0), name="argmax_idx"),
            mb.identity(x=mb.concat(values=val, axis=0), name="argmax_val"),
        ]

    return _program(specs, body)


def host_causal_mask(start: int, tokens: int, context: int, window: int | None = None) -> np.ndarray:
    """The (1, 1, tokens, context) fp16 mask a host passes: 0 where visible, -inf elsewhere."""
    q = np.arange(start, start + tokens)[:, None]
    k = np.arange(context)[None]
    visible = k <= q
    if window is not None:
        visible &= k > q - window
    return np.where(visible, 0.0, -np.inf).astype(np.float16)[None, None]

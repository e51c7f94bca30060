"""The three kinds of program an export holds, traced from the model code through ``MILOps``.

- embeddings: ``input_ids`` (1, 1) or (1, batch) -> ``hidden_states`` (1, T, hidden);
- one FFN chunk per layer range, a function per token count (``infer`` 1, ``prefill`` batch):
  ``hidden_states``, ``position_ids``, ``causal_mask``, ``current_pos`` and the shared KV state ->
  ``output_hidden_states`` (the last chunk applies the final norm); Gemma3 with a context past its
  sliding window W has two states (``kv_cache_local``, ``kv_cache_global``) and two more functions,
  ``infer_rotate`` and ``prefill_rotate``, for calls at current_pos >= W (see ``function_kinds``);
- lm_head: ``hidden_states`` (1, 1, hidden) -> ``logits1`` ... ``logitsN``, or per-piece
  ``argmax_idx`` / ``argmax_val`` when the argmax runs in the model.
Names and shapes are those ANEMLL's runtimes feed (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

from ..models.base import DecoderModel, Step
from ..ops.mil_ops import MILKVCache, MILOps, MILWindowedKVCache

STATE_NAME = "model.model.kv_cache_0"
LOCAL_STATE, GLOBAL_STATE = "kv_cache_local", "kv_cache_global"


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


def split_window(model: DecoderModel, context: int) -> int | None:
    """The sliding window W when an export of ``context`` needs Gemma3's split cache (context > W
    and some layer slides), else None: then one state serves every layer with the causal mask,
    which is exact because the window never bites."""
    window = getattr(model, "sliding_window", None)
    if window is None or context <= window:
        return None
    if not any(model.args.is_sliding(i) for i in range(model.args.num_hidden_layers)):
        return None
    return int(window)


def kv_state_shapes(model: DecoderModel, context: int) -> dict[str, tuple[int, int, int, int]]:
    """Name -> shape of each KV state the chunks declare: ANEMLL's one state, or with a split cache
    ``kv_cache_local`` (2 * sliding layers) and ``kv_cache_global`` (2 * full-attention layers),
    both over the whole context (positions are absolute; a state with no layers is left out)."""
    if split_window(model, context) is None:
        return {STATE_NAME: kv_state_shape(model, context)}
    a = model.args
    n_local = sum(a.is_sliding(i) for i in range(a.num_hidden_layers))
    counts = {LOCAL_STATE: n_local, GLOBAL_STATE: a.num_hidden_layers - n_local}
    return {name: (2 * n, a.num_key_value_heads, context, a.head_dim) for name, n in counts.items() if n}


def function_kinds(model: DecoderModel, context: int, batch: int) -> list[tuple[str, int, bool]]:
    """(function name, tokens, rotate) of every chunk function: ``infer`` and ``prefill``, plus
    ``infer_rotate`` and ``prefill_rotate`` (hosts call them once current_pos >= W) with a split cache."""
    kinds = [("infer", 1, False), ("prefill", batch, False)]
    if split_window(model, context) is not None:
        kinds += [("infer_rotate", 1, True), ("prefill_rotate", batch, True)]
    return kinds


def band_mask(window: int, tokens: int) -> np.ndarray:
    """(1, 1, tokens, window + tokens) fp16 mask of a rotate function's sliding layers: key i is
    position current_pos - window + i, so query t sees it iff t < i <= window + t."""
    t = np.arange(tokens)[:, None]
    i = np.arange(window + tokens)[None]
    return np.where((i > t) & (i <= window + t), 0.0, -np.inf).astype(np.float16)[None, None]


def embeddings_program(model: DecoderModel, ops: MILOps) -> Program:
    """Token ids of any length T (the converter pins T to 1 and batch) -> (1, T, hidden)."""
    specs = {"input_ids": mb.TensorSpec((1, get_new_symbol()), dtype=types.int32)}
    return _program(specs, lambda i: [mb.identity(x=model.embed(ops, i["input_ids"]), name="hidden_states")])


def _chunk_inputs(model: DecoderModel, tokens: int, context: int) -> dict:
    """The tensor inputs every chunk function takes, named as ANEMLL's runtimes pass them."""
    return {
        "hidden_states": mb.TensorSpec((1, tokens, model.args.hidden_size), dtype=types.fp16),
        "position_ids": mb.TensorSpec((tokens,), dtype=types.int32),
        "causal_mask": mb.TensorSpec((1, 1, tokens, context), dtype=types.fp16),
        "current_pos": mb.TensorSpec((1,), dtype=types.int32),
    }


def chunk_program(
    model: DecoderModel,
    ops: MILOps,
    layers: range,
    tokens: int,
    context: int,
    last: bool,
    rotate: bool = False,
) -> Program:
    """Layers ``layers`` over ``tokens`` new tokens at ``current_pos``, reading/writing the KV state.

    With a split cache (``split_window``), ``rotate`` picks the sliding layers' window: the first W
    positions (infer/prefill) or the W + tokens positions from current_pos - W (the rotate functions).
    """
    window = split_window(model, context)
    if window is not None:
        return _split_chunk_program(model, ops, layers, tokens, context, last, window, rotate)
    if rotate:
        raise ValueError("rotate functions exist only for a split cache (context > sliding window)")
    specs = _chunk_inputs(model, tokens, context)
    specs[STATE_NAME] = mb.StateTensorSpec(kv_state_shape(model, context), dtype=types.fp16)

    def body(i):
        cache = MILKVCache(i[STATE_NAME], model.args.num_hidden_layers, i["current_pos"])
        masks = {"global": i["causal_mask"], "sliding": i["causal_mask"]}
        step = Step(positions=i["position_ids"], masks=masks, cache=cache)
        h = model.forward_layers(ops, i["hidden_states"], step, layers)
        if last:
            h = model.final_norm(ops, h)
        return [mb.identity(x=h, name="output_hidden_states")]

    return _program(specs, body)


def _split_chunk_program(
    model: DecoderModel,
    ops: MILOps,
    layers: range,
    tokens: int,
    context: int,
    last: bool,
    window: int,
    rotate: bool,
) -> Program:
    """``chunk_program`` for Gemma3 past its window: both states declared in full by every chunk."""
    if tokens > window:
        raise ValueError(f"{tokens} tokens per call exceed the sliding window {window}")
    a = model.args
    specs = _chunk_inputs(model, tokens, context)
    shapes = kv_state_shapes(model, context)
    for name, shape in shapes.items():
        specs[name] = mb.StateTensorSpec(shape, dtype=types.fp16)

    def body(i):
        states = {
            kind: i[name]
            for kind, name in (("local", LOCAL_STATE), ("global", GLOBAL_STATE))
            if name in shapes
        }
        sliding = [a.is_sliding(n) for n in range(a.num_hidden_layers)]
        cache = MILWindowedKVCache(states, sliding, i["current_pos"], window, rotate)
        if rotate:
            local_mask = band_mask(window, tokens)
        else:
            local_mask = mb.slice_by_index(x=i["causal_mask"], begin=[0, 0, 0, 0], end=[1, 1, tokens, window])
        masks = {"global": i["causal_mask"], "sliding": local_mask}
        step = Step(positions=i["position_ids"], masks=masks, cache=cache)
        h = model.forward_layers(ops, i["hidden_states"], step, layers)
        cache.touch_unused()
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

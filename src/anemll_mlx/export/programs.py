"""The three kinds of program an export holds, traced from the model code through ``MILOps``.

- embeddings: token ids (1, 1) or (1, batch) -> hidden states (1, T, hidden);
- one FFN chunk per layer range, a function per token count (``infer`` 1, ``prefill`` batch):
  hidden states, positions, the host's causal mask, ``current_pos`` and the shared KV state ->
  hidden states (the last chunk applies the final norm); Gemma3 with a context past its sliding
  window W has two states and two more functions, for calls at current_pos >= W;
- lm_head: the final hidden state (1, 1, hidden) -> logits in pieces, or per-piece argmax.
Every name and shape comes from ``anemll_mlx.format``, the one owner of the export format.
"""

from __future__ import annotations

import dataclasses

import coremltools as ct
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

from .. import format as fmt
from ..models.base import DecoderModel
from ..ops.mil_ops import MILKVCache, MILOps, MILWindowedKVCache
from ..ops.vocabulary import Step


def _function(specs: dict, body) -> Function:
    """A function with inputs named exactly as ``specs`` (mb.program would use arg names)."""
    with Function(specs, opset_version=ct.target.iOS18) as function:
        outputs = body(function.inputs)
        function.set_outputs(outputs)
    return function


def _program(functions: dict[str, Function], default: str = "main") -> Program:
    """A program of ``functions``; with more than one it is saved as a multifunction package
    whose default function is ``default`` (converted once, weights shared by ``weight_id``)."""
    program = Program()
    for name, function in functions.items():
        program.add_function(name, function)
    program.default_function_name = default
    program.export_as_multifunction = len(functions) > 1
    return program


def split_window(model: DecoderModel, context: int) -> int | None:
    """The sliding window W when an export of ``context`` needs a split cache (``format.split_window``)."""
    return fmt.split_window(model.sliding_window, context, model.sliding())


def kv_states(model: DecoderModel, context: int) -> list[fmt.KVState]:
    """The KV state(s) every chunk declares (``format.kv_states``)."""
    a = model.args
    states = fmt.kv_states(model.sliding(), a.num_key_value_heads, a.head_dim, context, split_window(model, context))
    # each state as large as the largest KV shape of its layers (a smaller layer uses a leading block)
    shaped = []
    for s in states:
        heads, dim = (max(model.kv_shape(i)[j] for i in s.layers) for j in (0, 1))
        shaped.append(dataclasses.replace(s, shape=(s.shape[0], heads, s.shape[2], dim)))
    return shaped


def chunk_functions(model: DecoderModel, context: int, batch: int) -> list[fmt.ChunkFunction]:
    return fmt.chunk_functions(batch, rotate=split_window(model, context) is not None)


def embeddings_program(model: DecoderModel, ops: MILOps, rows: range | None = None) -> Program:
    """Token ids of any length T (the converter pins T to 1 and batch) -> (1, T, hidden); with
    ``rows``, one program of a split table (zeros for ids outside its rows: the host sums them)."""
    specs = {fmt.INPUT_IDS: mb.TensorSpec((1, get_new_symbol()), dtype=types.int32)}
    body = lambda i: [mb.identity(x=model.embed(ops, i[fmt.INPUT_IDS], rows), name=fmt.HIDDEN_STATES)]  # noqa: E731
    return _program({"main": _function(specs, body)})


def _chunk_inputs(model: DecoderModel, tokens: int, context: int) -> dict:
    """The tensor inputs every chunk function takes, named as ANEMLL's runtimes pass them."""
    return {
        fmt.HIDDEN_STATES: mb.TensorSpec((1, tokens, model.args.hidden_size), dtype=types.fp16),
        fmt.POSITION_IDS: mb.TensorSpec((tokens,), dtype=types.int32),
        fmt.CAUSAL_MASK: mb.TensorSpec((1, 1, tokens, context), dtype=types.fp16),
        fmt.CURRENT_POS: mb.TensorSpec((1,), dtype=types.int32),
    }


def chunk_program(
    model: DecoderModel,
    ops: MILOps,
    layers: range,
    functions: list[fmt.ChunkFunction],
    context: int,
    last: bool,
    role: fmt.ChunkRole | None = None,
) -> Program:
    """One FFN chunk: a function per entry of ``functions`` (``chunk_functions``), ``infer`` the
    default; with a ``role`` of a mixture-of-experts layer, its attention part or an expert pack."""
    if role is not None and role.kind == fmt.GATHER:  # decode only: one token
        return _program({"main": gather_function(model, ops, role.layers.start)})
    if role is not None and role.kind == fmt.EXPERTS:
        assert role.experts is not None
        traced = {f.name: experts_function(model, ops, role.layers.start, role.experts, f.tokens) for f in functions}
    else:
        attention = role is not None and role.kind == fmt.ATTENTION
        riding = role.experts if role is not None and attention else None
        traced = {
            f.name: chunk_function(model, ops, layers, f.tokens, context, last, f.rotate, attention, riding)
            for f in functions
        }
    return _program(traced, default=fmt.INFER)


def _moe_specs(model: DecoderModel, layer: int, tokens: int) -> dict:
    """Inputs every later part of a split MoE layer takes: the residual after attention and,
    for a family with one, the shared branch's output (``format``: the chain)."""
    hidden = model.args.hidden_size
    specs = {fmt.HIDDEN_STATES: mb.TensorSpec((1, tokens, hidden), dtype=types.fp16)}
    if model.has_shared_branch(layer):
        specs[fmt.MOE_SHARED] = mb.TensorSpec((1, tokens, hidden), dtype=types.fp16)
    return specs


def gather_function(model: DecoderModel, ops: MILOps, layer: int) -> Function:
    """A gather program (gathered mode, one token): the residual after attention, the k chosen
    experts' routing weights (1, 1, k) and their weights as inputs (``format.EXPERTS_GATE`` ...)
    -> the layer's output, the experts as batched matmuls over the k experts (no weight
    constants but the norms)."""
    experts = model.experts_in(layer)
    assert experts is not None
    _, inter, hidden = experts.gate_proj.weight.shape
    k = model.experts_per_token()
    specs = {
        **_moe_specs(model, layer, 1),
        fmt.EXPERT_WEIGHTS: mb.TensorSpec((1, 1, k), dtype=types.fp16),
        fmt.EXPERTS_GATE: mb.TensorSpec((k, inter, hidden), dtype=types.fp16),
        fmt.EXPERTS_UP: mb.TensorSpec((k, inter, hidden), dtype=types.fp16),
        fmt.EXPERTS_DOWN: mb.TensorSpec((k, hidden, inter), dtype=types.fp16),
    }

    def body(i):
        h = i[fmt.HIDDEN_STATES]
        column = mb.reshape(x=model.experts_input(ops, h, layer), shape=[hidden, 1])  # broadcast over the k experts
        gate = mb.matmul(x=i[fmt.EXPERTS_GATE], y=column)  # (k, I, 1)
        up = mb.matmul(x=i[fmt.EXPERTS_UP], y=column)
        weights = mb.reshape(x=i[fmt.EXPERT_WEIGHTS], shape=[k, 1, 1])
        act = mb.mul(x=mb.mul(x=ops.expert_activation(experts, gate), y=up), y=weights)
        y = mb.reduce_sum(x=mb.matmul(x=i[fmt.EXPERTS_DOWN], y=act), axes=[0])  # (H, 1)
        total = mb.reshape(x=y, shape=[1, 1, hidden])
        out = model.finish_experts(ops, h, i.get(fmt.MOE_SHARED), total, layer)
        return [mb.identity(x=out, name=fmt.OUTPUT_HIDDEN_STATES)]

    return _function(specs, body)


def experts_function(model: DecoderModel, ops: MILOps, layer: int, experts: range, tokens: int) -> Function:
    """An expert pack (no state): the residual after attention, the router's weights and the
    running sum of the experts before it -> the layer's output with ``experts`` added, and the
    new running sum (``format``: the chain)."""
    count = model.experts_in(layer)
    assert count is not None
    specs = {
        **_moe_specs(model, layer, tokens),
        fmt.EXPERT_WEIGHTS: mb.TensorSpec((1, tokens, count.count), dtype=types.fp16),
        fmt.EXPERT_SUM_IN: mb.TensorSpec((1, tokens, model.args.hidden_size), dtype=types.fp16),
    }

    def body(i):
        h = i[fmt.HIDDEN_STATES]
        total = mb.add(x=i[fmt.EXPERT_SUM_IN], y=model.forward_experts(ops, h, i[fmt.EXPERT_WEIGHTS], layer, experts))
        out = model.finish_experts(ops, h, i.get(fmt.MOE_SHARED), total, layer)
        return [mb.identity(x=out, name=fmt.OUTPUT_HIDDEN_STATES), mb.identity(x=total, name=fmt.EXPERT_SUM)]

    return _function(specs, body)


def chunk_function(
    model: DecoderModel,
    ops: MILOps,
    layers: range,
    tokens: int,
    context: int,
    last: bool,
    rotate: bool = False,
    attention: bool = False,
    experts: range | None = None,
) -> Function:
    """Layers ``layers`` over ``tokens`` new tokens at ``current_pos``, reading/writing the KV state(s).

    With a split cache (``split_window``), ``rotate`` picks the sliding layers' window: the first W
    positions (infer/prefill) or the W + tokens positions from current_pos - W (the rotate functions).
    """
    window = split_window(model, context)
    if rotate and window is None:
        raise ValueError("rotate functions exist only for a split cache (context > sliding window)")
    if window is not None and tokens > window:
        raise ValueError(f"{tokens} tokens per call exceed the sliding window {window}")
    states = kv_states(model, context)
    specs = _chunk_inputs(model, tokens, context)
    for state in states:
        # Named as stored (ML Program names allow only [A-Za-z0-9_]; coremltools' renaming pass
        # only visits single-function programs).
        specs[fmt.stored_state_name(state.name)] = mb.StateTensorSpec(state.shape, dtype=types.fp16)

    def body(i):
        mask = i[fmt.CAUSAL_MASK]
        windowed = None
        if window is None:
            cache: MILKVCache | MILWindowedKVCache = MILKVCache(
                i[fmt.KV_STATE_STORED], model.args.num_hidden_layers, i[fmt.CURRENT_POS]
            )
            masks = {"global": mask, "sliding": mask}
        else:
            kinds = {fmt.LOCAL_STATE: "local", fmt.GLOBAL_STATE: "global"}
            cache = windowed = MILWindowedKVCache(
                {kinds[s.name]: i[fmt.stored_state_name(s.name)] for s in states}, model.sliding(), i[fmt.CURRENT_POS], window, rotate
            )
            local = ops.const(f"band_mask_{window}_{tokens}", lambda: fmt.band_mask(window, tokens)) if rotate else (
                mb.slice_by_index(x=mask, begin=[0, 0, 0, 0], end=[1, 1, tokens, window])
            )  # fmt: skip
            masks = {"global": mask, "sliding": local}
        step = Step(positions=i[fmt.POSITION_IDS], masks=masks, cache=cache)
        if attention:  # a mixture-of-experts layer's attention part (``format``: the chain)
            layer = layers.start
            h, weights, shared = model.forward_attention(ops, i[fmt.HIDDEN_STATES], step, layer)
            total = None if experts is None else model.forward_experts(ops, h, weights, layer, experts)
            out = [
                mb.identity(x=model.finish_experts(ops, h, shared, total, layer), name=fmt.OUTPUT_HIDDEN_STATES),
                mb.identity(x=h, name=fmt.MOE_RESIDUAL),
                mb.identity(x=weights, name=fmt.EXPERT_WEIGHTS),
            ]
            if shared is not None:
                out.append(mb.identity(x=shared, name=fmt.MOE_SHARED))
            if total is not None:  # the first experts, beside the attention
                out.append(mb.identity(x=total, name=fmt.EXPERT_SUM))
            return out
        h = model.forward_layers(ops, i[fmt.HIDDEN_STATES], step, layers)
        if windowed is not None:
            windowed.touch_unused()
        if last:
            h = model.final_norm(ops, h)
        return [mb.identity(x=h, name=fmt.OUTPUT_HIDDEN_STATES)]

    return _function(specs, body)


def lm_head_program(
    model: DecoderModel,
    ops: MILOps,
    sizes: list[int],
    argmax: bool,
    first_piece: int = 0,
    first_row: int = 0,
    final_norm: bool = False,
) -> Program:
    """Final hidden state (1, 1, hidden) -> logits in pieces, or each piece's argmax and its value.

    One program of a split head holds the pieces from ``first_piece`` (whose rows start at
    ``first_row``), and its outputs continue the numbering: logits{first_piece + 1}, ...
    With ``final_norm`` (the last chunk is an expert pack) it applies the model's final norm first.
    """
    specs = {fmt.HIDDEN_STATES: mb.TensorSpec((1, 1, model.args.hidden_size), dtype=types.fp16)}

    def body(i):
        h = model.final_norm(ops, i[fmt.HIDDEN_STATES]) if final_norm else i[fmt.HIDDEN_STATES]
        pieces = model.logits(ops, h, sizes, first_row)
        if not argmax:
            return [mb.identity(x=p, name=fmt.logits_name(first_piece + n)) for n, p in enumerate(pieces)]
        flat = [mb.reshape(x=p, shape=[1, -1]) for p in pieces]
        idx = [mb.reduce_argmax(x=p, axis=-1, keep_dims=False) for p in flat]
        val = [mb.reduce_max(x=p, axes=[-1], keep_dims=False) for p in flat]
        return [
            mb.identity(x=mb.concat(values=idx, axis=0), name=fmt.ARGMAX_IDX),
            mb.identity(x=mb.concat(values=val, axis=0), name=fmt.ARGMAX_VAL),
        ]

    return _program({"main": _function(specs, body)})

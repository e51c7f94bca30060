"""The op vocabulary on coremltools' MIL builder: tracing a model forward into a Core ML program.

Called inside an ``@mb.program`` function with MIL variables where MLXOps gets MLX arrays.
Choices made for the Neural Engine (see docs/ARCHITECTURE.md):
- everything fp16 with static shapes; hidden states (B, T, C) at program boundaries;
- projections are 1x1 convolutions over (B, C, 1, T), weights fp16 or LUT-palettized;
- RMSNorm as layer_norm over [x, -x]: the mean of that concatenation is zero, so layer_norm's
  variance is mean(x^2); computed inside one op, it avoids squaring x in fp16 (overflow past 256);
- RoPE tables are constants gathered by the ``position_ids`` input;
- an op several layers would repeat is built once per function (the transposed input of q/k/v
  and of gate/up, the RoPE rows, current_pos + T and the KV write bounds, the mask slices), and
  every array constant (weights, norm gains, biases, RoPE tables, band masks) is emitted once per
  function with a ``weight_id``, so the functions of a package store it once: the programs come
  out as coremltools' ``remove_redundant_ops`` and ``const_deduplication`` would leave them,
  without running those passes (see ``export/package.py``);
- attention is explicit (matmul, mask add, softmax, matmul) with GQA folded into a reshape and the
  queries split into chunks of ``attention_chunk`` rows (prefill), so no score matrix exceeds
  chunk x context;
- the KV cache is one fp16 state in ANEMLL's layout, written with slice_update at ``current_pos``;
  after a write only the value coreml_update_state returns is used (never a second read_state);
  Gemma3 with a context past its sliding window splits it in a local and a global state
  (``MILWindowedKVCache``), the sliding layers attending over a window slice of theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil.block import curr_block

from .vocabulary import Embedding, Experts, Linear, Norm, RoPE, Step

ANE_MAX_CHANNELS = 16384  # the most output channels of one Neural Engine conv


def to_numpy(a: mx.array, dtype=np.float16) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(dtype)


# (part, holder, shape, rows) -> the weight as a MIL value: a plain fp16 array, or a LUT op
WeightFor = Callable[[str, "Linear | Embedding", tuple[int, ...], "range | None"], Any]


def fp16_weight(part: str, holder: Linear | Embedding, shape: tuple[int, ...], rows: range | None = None) -> np.ndarray:
    """Every weight stored as fp16 (the default without LUTs)."""
    weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
    return to_numpy(weight).reshape(shape)


def shared_const(value: np.ndarray, weight_id: str, name: str | None = None) -> Any:
    """A const op whose data every function of the package shares.

    coremltools writes one blob per ``weight_id`` when it lowers a multifunction program, so the
    infer and prefill functions point at the same bytes without a deduplication pass comparing
    every constant (``const_deduplication``, ``save_multifunction``).  Emit only byte-identical
    values under one id.
    """
    var = mb.const(val=value, name=name) if name else mb.const(val=value)
    var.op.weight_id = weight_id
    return var


class FunctionMemo:
    """Values built once per traced function: the first call builds, later calls of the same key
    in the same function get the same MIL variable.

    A new function (another current pymil block) starts empty, so nothing leaks across functions.
    Keys may hold MIL variables: they compare by identity, and the memo keeps them alive.
    """

    def __init__(self) -> None:
        self._block: Any = None
        self._values: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        block = curr_block()
        if block is not self._block:
            self._block, self._values = block, {}
        if key not in self._values:
            self._values[key] = build()
        return self._values[key]

    def clear(self) -> None:
        self._block, self._values = None, {}


class MILOps:
    """Emits MIL ops for each vocabulary call (``vocabulary.Ops``).

    ``weight_for(part, holder, shape, rows)`` decides how a weight of an export part
    ("embeddings", "ffn", "lm_head") is stored: fp16 by default; the exporter passes a store that
    emits the LUTs the model declares (``DecoderModel.lut_targets``), memoised so every function of
    a package gets byte-identical (shared) weights.
    """

    def __init__(self, attention_chunk: int | None = None, weight_for: WeightFor | None = None, context: int | None = None):
        self.attention_chunk = attention_chunk
        self.context = context  # RoPE tables need only this many rows
        self.weight_for: WeightFor = weight_for or fp16_weight
        self._memo = FunctionMemo()
        self._arrays: dict[str, np.ndarray] = {}  # constants' values, made once per export

    def release(self) -> None:
        """Forget the constants' values and the last function (call between packages)."""
        self._memo.clear()
        self._arrays.clear()

    def const(self, key: str, make: Callable[[], np.ndarray]) -> Any:
        """The constant ``key`` (value from ``make``, called once per export): one const op per
        function, one blob per package (``shared_const``)."""

        def build() -> Any:
            if key not in self._arrays:
                self._arrays[key] = make()
            return shared_const(self._arrays[key], key)

        return self._memo.get(("const", key), build)

    def _vector(self, holder: Any, name: str) -> Any:
        """A per-channel vector of the model (norm gain, bias) as a shared fp16 constant."""
        array = holder[name]
        return self.const(f"{name}_{id(array)}", lambda: to_numpy(array))

    # --- projections and norms

    def channels_first(self, x):
        """(B, T, C) -> (B, C, 1, T), the layout of the 1x1 convs; once per input and function
        (q/k/v read one, gate/up another)."""
        return self._memo.get(("channels_first", x), lambda: mb.expand_dims(x=mb.transpose(x=x, perm=[0, 2, 1]), axes=[2]))

    def linear(self, x, layer: Linear):
        """(B, T, Cin) -> (B, T, Cout) as a 1x1 conv over (B, Cin, 1, T)."""
        cout, cin = layer.weight.shape
        bias = self._vector(layer, "bias") if "bias" in layer else None
        weight = self.weight_for("ffn", layer, (cout, cin, 1, 1), None)
        y = mb.conv(x=self.channels_first(x), weight=weight, bias=bias)
        return mb.transpose(x=mb.squeeze(x=y, axes=[2]), perm=[0, 2, 1])

    def rms_norm(self, x, norm: Norm):
        both = mb.concat(values=[x, mb.mul(x=x, y=np.float16(-1))], axis=-1)
        normed = mb.layer_norm(x=both, axes=[-1], epsilon=np.float16(max(norm.eps, 1e-7)))
        size = x.shape[-1]
        begin = [0] * x.rank
        end = list(x.shape[:-1]) + [size]
        half = mb.slice_by_index(x=normed, begin=begin, end=end)
        return mb.mul(x=half, y=self._vector(norm, "weight")) if "weight" in norm else half

    def embed(self, ids, table: Embedding, scale: float, rows: range | None = None):
        vocab, hidden = table.weight.shape
        if rows is None or (rows.start == 0 and rows.stop == vocab):
            h = mb.gather(x=self.weight_for("embeddings", table, (vocab, hidden), None), indices=ids, axis=0)
        else:  # one program of a split table: its own rows, zeros for the ids it does not hold
            local = mb.sub(x=ids, y=np.int32(rows.start))
            inside = mb.logical_and(
                x=mb.greater_equal(x=local, y=np.int32(0)), y=mb.less(x=local, y=np.int32(len(rows)))
            )
            safe = mb.select(cond=inside, a=local, b=np.int32(0))
            h = mb.gather(x=self.weight_for("embeddings", table, (len(rows), hidden), rows), indices=safe, axis=0)
            h = mb.mul(x=h, y=mb.expand_dims(x=mb.cast(x=inside, dtype="fp16"), axes=[-1]))
        return h if scale == 1.0 else mb.mul(x=h, y=np.float16(scale))

    def lm_head(self, x, head: Linear | Embedding, sizes: list[int] | None = None, first_row: int = 0) -> list:
        """Logit pieces (B, T, size) for consecutive row ranges of the head's weight, each a 1x1 conv."""
        vocab, hidden = head.weight.shape
        bounds = np.cumsum([first_row] + list(sizes or [vocab - first_row]))
        x4 = self.channels_first(x)
        out = []
        for rows in (range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])):
            w = self.weight_for("lm_head", head, (len(rows), hidden, 1, 1), rows)
            y = mb.conv(x=x4, weight=w)
            out.append(mb.transpose(x=mb.squeeze(x=y, axes=[2]), perm=[0, 2, 1]))
        return out

    # --- elementwise

    def add(self, a, b):
        return mb.add(x=a, y=b)

    def mul(self, a, b):
        return mb.mul(x=a, y=b)

    def silu(self, x):
        return mb.silu(x=x)

    def gelu_tanh(self, x):
        return mb.gelu(x=x, mode="TANH_APPROXIMATION")

    def gain(self, x, holder: Any, name: str, factor: float = 1.0):
        array = holder[name]
        vector = self.const(f"gain_{name}_{id(array)}_{factor}", lambda: to_numpy(array.astype(mx.float32) * factor))
        return mb.mul(x=x, y=vector)

    def softcap(self, x, cap: float):
        return mb.mul(x=mb.tanh(x=mb.mul(x=x, y=np.float16(1.0 / cap))), y=np.float16(cap))

    # --- mixture of experts

    def route(self, logits, top_k: int, renormalize: bool):
        """Softmax, times a mask of the logits at least the k-th largest (topk's values), divided
        by its sum when renormalising: static shapes, no gather."""
        E = logits.shape[-1]
        weights = mb.softmax(x=logits, axis=-1)
        if top_k < E:
            values = mb.topk(x=logits, k=top_k, axis=-1)[0]
            kth = mb.reduce_min(x=values, axes=[-1], keep_dims=True)
            chosen = mb.cast(x=mb.greater_equal(x=logits, y=kth), dtype="fp16")
            weights = mb.mul(x=weights, y=chosen)
        if renormalize:
            weights = mb.real_div(x=weights, y=mb.reduce_sum(x=weights, axes=[-1], keep_dims=True))
        return weights

    def expert_activation(self, experts: Experts, x):
        """The experts' gate activation (``Experts.activation``)."""
        return self.silu(x) if experts.activation == "silu" else self.gelu_tanh(x)

    def experts(self, x, experts: Experts, weights, layer: int, select: range | None = None):
        """Experts ``select`` (all by default) as 1x1 convs over (B, C, 1, T): gate and up with
        every expert's rows stacked, the hidden units weighted per expert, down as a conv of one
        group per expert (expert e reads its own hidden units), the outputs summed.  The experts
        go in groups whose convs keep within the Neural Engine's 16384 output channels."""
        E_all, hidden_size, dims = experts.gate_proj.weight.shape
        chosen = select if select is not None else range(E_all)
        B, T, _ = x.shape
        x4 = self.channels_first(x)
        per_group = max(1, ANE_MAX_CHANNELS // max(hidden_size, dims))
        total = None
        for start in range(chosen.start, chosen.stop, per_group):
            group = range(start, min(chosen.stop, start + per_group))
            rows = None if len(group) == E_all else group  # the whole stack keeps its one weight
            E = len(group)
            stacked = (E * hidden_size, dims, 1, 1)
            gate = mb.conv(x=x4, weight=self.weight_for("ffn", experts.gate_proj, stacked, rows))
            up = mb.conv(x=x4, weight=self.weight_for("ffn", experts.up_proj, stacked, rows))
            act = self.expert_activation(experts, gate)
            hidden = mb.reshape(x=mb.mul(x=act, y=up), shape=[B, E, hidden_size, T])
            w = weights if rows is None else mb.slice_by_index(
                x=weights, begin=[0, 0, group.start], end=[B, T, group.stop]
            )  # fmt: skip
            per_expert = mb.expand_dims(x=mb.transpose(x=w, perm=[0, 2, 1]), axes=[2])  # (B, E, 1, T)
            hidden = mb.reshape(x=mb.mul(x=hidden, y=per_expert), shape=[B, E * hidden_size, 1, T])
            down = self.weight_for("ffn", experts.down_proj, (E * dims, hidden_size, 1, 1), rows)
            y = mb.reduce_sum(x=mb.reshape(x=mb.conv(x=hidden, weight=down, groups=E), shape=[B, E, dims, T]), axes=[1])
            total = y if total is None else mb.add(x=total, y=y)
        return mb.transpose(x=total, perm=[0, 2, 1])

    # --- shapes

    def split_heads(self, x, heads: int, head_dim: int):
        B, T, _ = x.shape
        return mb.transpose(x=mb.reshape(x=x, shape=[B, T, heads, head_dim]), perm=[0, 2, 1, 3])

    def merge_heads(self, x):
        B, H, T, D = x.shape
        return mb.reshape(x=mb.transpose(x=x, perm=[0, 2, 1, 3]), shape=[B, T, H * D])

    # --- attention

    def _rope_rows(self, rope: RoPE, positions, T: int, D: int) -> tuple[Any, Any]:
        """cos and sin rows (1, 1, T, D) of ``positions``: gathered once per function and table
        (q and k of every layer share them), from tables stored once per package."""

        def table(which: int) -> Any:
            make = lambda: rope.tables()[which][: self.context].astype(np.float16)  # noqa: E731
            return self.const(f"rope_{'cs'[which]}_{id(rope)}", make)

        def rows() -> tuple[Any, Any]:
            gathered = (mb.gather(x=table(i), indices=positions, axis=0) for i in (0, 1))
            return tuple(mb.reshape(x=g, shape=[1, 1, T, D]) for g in gathered)

        return self._memo.get(("rope", id(rope), positions, T, D), rows)

    def rope(self, x, rope: RoPE, step: Step):
        """x * cos + rotate_half(x) * sin with rows of constant tables picked by position."""
        T, D = x.shape[2], x.shape[3]
        cos, sin = self._rope_rows(rope, step.positions, T, D)
        first, second = mb.split(x=x, num_splits=2, axis=-1)
        rotated = mb.concat(values=[mb.mul(x=second, y=np.float16(-1)), first], axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin))

    def attention(self, q, k, v, mask: Any, scale: float):
        """Softmax(q k^T * scale + mask) v over the whole fixed-size cache, queries in chunks."""
        B, H, T, D = q.shape
        kv_heads, context = k.shape[1], k.shape[2]
        group = H // kv_heads
        q = mb.mul(x=q, y=np.float16(scale))
        chunk = min(self.attention_chunk or T, T)
        outputs = []
        for start in range(0, T, chunk):
            size = min(chunk, T - start)
            qc = q if size == T else mb.slice_by_index(x=q, begin=[0, 0, start, 0], end=[B, H, start + size, D])
            mc = mask if size == T else self._mask_rows(mask, start, size)
            # GQA: the `group` query heads of one KV head become extra rows of one matmul.
            qg = mb.reshape(x=qc, shape=[B, kv_heads, group * size, D])
            scores = mb.reshape(x=mb.matmul(x=qg, y=k, transpose_y=True), shape=[B, H, size, context])
            weights = mb.softmax(x=mb.add(x=scores, y=mc), axis=-1)
            wg = mb.reshape(x=weights, shape=[B, kv_heads, group * size, context])
            outputs.append(mb.reshape(x=mb.matmul(x=wg, y=v), shape=[B, H, size, D]))
        return outputs[0] if len(outputs) == 1 else mb.concat(values=outputs, axis=2)

    def _mask_rows(self, mask, start: int, size: int):
        """Rows start..start+size of the mask, sliced once per function for all layers."""
        context = mask.shape[-1]
        slice_rows = lambda: mb.slice_by_index(x=mask, begin=[0, 0, start, 0], end=[1, 1, start + size, context])  # noqa: E731
        return self._memo.get(("mask_rows", mask, start, size), slice_rows)

    def tap(self, site: str, layer: int, x):
        return x


class MILKVCache:
    """The KV cache as ANEMLL lays it out: one fp16 state (2 * layers, kv_heads, context, head_dim).
    A layer of fewer KV heads or a smaller head dim (Gemma 4's global layers differ from its sliding
    ones) uses the leading block of its rows: the state has the largest shape of its layers.

    Keys of layer i live in row i, values in row layers + i.  Each update writes the T new rows at
    ``current_pos`` and hands the written value on, so later layers never read the state again.
    """

    def __init__(self, state, num_layers: int, current_pos, memo: FunctionMemo | None = None):
        self.state = state
        self.num_layers = num_layers
        self.current_pos = current_pos
        self.memo = memo or FunctionMemo()  # shared by the two caches of a split cache
        self.value = mb.read_state(input=state)

    def _bounds(self, row: int, heads: int, T: int, D: int) -> tuple[Any, Any]:
        """begin/end of a write of T positions at current_pos into ``row``: built once per
        function (current_pos + T serves every row; a split cache's two states share rows)."""
        pos = self.current_pos

        def end_pos() -> Any:
            return self.memo.get(("kv_end", pos, T), lambda: mb.add(x=pos, y=np.int32(T)))

        def build() -> tuple[Any, Any]:
            zero = np.array([0], dtype=np.int32)
            begin = mb.concat(values=[np.array([row, 0], dtype=np.int32), pos, zero], axis=0)
            end = mb.concat(
                values=[np.array([row + 1, heads], dtype=np.int32), end_pos(), np.array([D], dtype=np.int32)], axis=0
            )
            return begin, end

        return self.memo.get(("kv_bounds", pos, row, heads, T, D), build)

    def _write(self, row: int, update):
        _, heads, T, D = update.shape
        begin, end = self._bounds(row, heads, T, D)
        self.value = mb.slice_update(x=self.value, update=update, begin=begin, end=end)

    def _rows(self, row: int, like: Any = None):
        """Row ``row`` over the whole context; with ``like`` (a layer's k or v), only its heads and
        head dim: a layer of a smaller KV shape than the state's uses the leading block of its row."""
        _, heads, context, D = self.value.shape
        if like is not None:
            heads, D = like.shape[1], like.shape[3]
        return mb.slice_by_index(x=self.value, begin=[row, 0, 0, 0], end=[row + 1, heads, context, D])

    def update(self, layer: int, k, v, step: Step):
        self._write(layer, k)
        self._write(self.num_layers + layer, v)
        self.value = mb.coreml_update_state(state=self.state, value=self.value)
        return self._rows(layer, k), self._rows(self.num_layers + layer, v)


class MILWindowedKVCache:
    """Gemma3's split cache when the context exceeds the sliding window: two fp16 states.

    ``local`` (2 * n_local, kv_heads, context, head_dim) holds the sliding-window layers, ``global``
    (2 * n_global, ...) the full-attention layers; in each, keys of its i-th layer sit in row i and
    values in row n + i.  Positions are absolute in both (nothing is ever shifted): a write lands at
    ``current_pos`` as in ``MILKVCache``, so the padding of a partial prefill batch only fills future
    positions, which the masks hide and later writes overwrite.

    Global layers attend over the whole context.  Sliding layers attend over a slice of their rows:
    - ``rotate=False`` (functions infer/prefill, used while current_pos + T <= window): the first
      ``window`` positions, a static slice; no position has left the window yet;
    - ``rotate=True`` (infer_rotate/prefill_rotate, used once current_pos >= window): the
      ``window + T`` positions from current_pos - window, a slice_by_size with a run-time begin and
      a static size; key i is position current_pos - window + i, so the mask is a constant band.
    A state is read only by the first layer of the chunk that uses it (see ``MILKVCache``).  Every
    chunk declares both states (the host makes them once and passes them to every chunk), but
    coremltools fails on a state input that no op uses (``handle_unused_inputs``), so a chunk
    without layers of one kind rewrites one row of that state with itself (``touch_unused``).
    """

    def __init__(self, states: dict[str, Any], sliding: list[bool], current_pos, window: int, rotate: bool):
        self.states = states  # "local" / "global" -> state input var
        self.window = window
        self.rotate = rotate
        self.current_pos = current_pos
        self.layout: dict[int, tuple[str, int]] = {}
        counts = {"local": 0, "global": 0}
        for layer, is_sliding in enumerate(sliding):
            kind = "local" if is_sliding else "global"
            self.layout[layer] = (kind, counts[kind])
            counts[kind] += 1
        self.counts = counts
        self._memo = FunctionMemo()
        self._caches: dict[str, MILKVCache] = {}
        self._begin: tuple[Any, dict[int, Any]] | None = None  # (current_pos - window, row -> begin)

    def _cache(self, kind: str) -> MILKVCache:
        if kind not in self._caches:
            self._caches[kind] = MILKVCache(self.states[kind], self.counts[kind], self.current_pos, self._memo)
        return self._caches[kind]

    def _window_rows(self, value, row: int, like: Any):
        """The window of row ``row`` for a layer whose k or v is ``like`` (its heads and head dim)."""
        heads, tokens, D = like.shape[1], like.shape[2], like.shape[3]
        if not self.rotate:
            return mb.slice_by_index(x=value, begin=[row, 0, 0, 0], end=[row + 1, heads, self.window, D])
        if self._begin is None:
            start = mb.sub(x=self.current_pos, y=np.int32(self.window))
            self._begin = (start, {})
        start, begins = self._begin
        if row not in begins:
            zero = np.array([0], dtype=np.int32)
            begins[row] = mb.concat(values=[np.array([row, 0], dtype=np.int32), start, zero], axis=0)
        return mb.slice_by_size(x=value, begin=begins[row], size=[1, heads, self.window + tokens, D])

    def update(self, layer: int, k, v, step: Step):
        kind, index = self.layout[layer]
        cache = self._cache(kind)
        cache._write(index, k)
        cache._write(cache.num_layers + index, v)
        cache.value = mb.coreml_update_state(state=cache.state, value=cache.value)
        if kind == "global":
            return cache._rows(index, k), cache._rows(cache.num_layers + index, v)
        keys = self._window_rows(cache.value, index, k)
        return keys, self._window_rows(cache.value, cache.num_layers + index, v)

    def touch_unused(self) -> None:
        """Keep each state no layer of this chunk used alive: its first (1, 1, 1, head_dim) block,
        written back unchanged (bit-exact whatever it holds)."""
        for kind, state in self.states.items():
            if kind in self._caches:
                continue
            value = mb.read_state(input=state)
            _, _, _, D = value.shape
            begin, end = [0, 0, 0, 0], [1, 1, 1, D]
            block = mb.slice_by_index(x=value, begin=begin, end=end)
            value = mb.slice_update(x=value, update=block, begin=begin, end=end)
            mb.coreml_update_state(state=state, value=value)

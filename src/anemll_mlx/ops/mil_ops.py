"""The op vocabulary on coremltools' MIL builder: tracing a model forward into a Core ML program.

Called inside an ``@mb.program`` function with MIL variables where MLXOps gets MLX arrays.
Choices made for the Neural Engine (see docs/ARCHITECTURE.md):
- everything fp16 with static shapes; hidden states (B, T, C) at program boundaries;
- projections are 1x1 convolutions over (B, C, 1, T), weights fp16 or LUT-palettized;
- RMSNorm as layer_norm over [x, -x]: the mean of that concatenation is zero, so layer_norm's
  variance is mean(x^2); computed inside one op, it avoids squaring x in fp16 (overflow past 256);
- RoPE tables are constants gathered by the ``position_ids`` input;
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

from .vocabulary import Embedding, Linear, Norm, RoPE, Step


def to_numpy(a: mx.array, dtype=np.float16) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(dtype)


# (part, holder, shape, rows) -> the weight as a MIL value: a plain fp16 array, or a LUT op
WeightFor = Callable[[str, "Linear | Embedding", tuple[int, ...], "range | None"], Any]


def fp16_weight(part: str, holder: Linear | Embedding, shape: tuple[int, ...], rows: range | None = None) -> np.ndarray:
    """Every weight stored as fp16 (the default without LUTs)."""
    weight = holder.weight if rows is None else holder.weight[rows.start : rows.stop]
    return to_numpy(weight).reshape(shape)


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
        self._rope_tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # --- projections and norms

    def linear(self, x, layer: Linear):
        """(B, T, Cin) -> (B, T, Cout) as a 1x1 conv over (B, Cin, 1, T)."""
        cout, cin = layer.weight.shape
        x4 = mb.expand_dims(x=mb.transpose(x=x, perm=[0, 2, 1]), axes=[2])
        bias = to_numpy(layer.bias) if "bias" in layer else None
        y = mb.conv(x=x4, weight=self.weight_for("ffn", layer, (cout, cin, 1, 1), None), bias=bias)
        return mb.transpose(x=mb.squeeze(x=y, axes=[2]), perm=[0, 2, 1])

    def rms_norm(self, x, norm: Norm):
        both = mb.concat(values=[x, mb.mul(x=x, y=np.float16(-1))], axis=-1)
        normed = mb.layer_norm(x=both, axes=[-1], epsilon=np.float16(max(norm.eps, 1e-7)))
        size = x.shape[-1]
        begin = [0] * x.rank
        end = list(x.shape[:-1]) + [size]
        half = mb.slice_by_index(x=normed, begin=begin, end=end)
        return mb.mul(x=half, y=to_numpy(norm.weight))

    def embed(self, ids, table: Embedding, scale: float):
        h = mb.gather(x=self.weight_for("embeddings", table, tuple(table.weight.shape), None), indices=ids, axis=0)
        return h if scale == 1.0 else mb.mul(x=h, y=np.float16(scale))

    def lm_head(self, x, head: Linear | Embedding, sizes: list[int] | None = None) -> list:
        """Logit pieces (B, T, size) for consecutive row ranges of the head's weight, each a 1x1 conv."""
        vocab, hidden = head.weight.shape
        bounds = np.cumsum([0] + list(sizes or [vocab]))
        x4 = mb.expand_dims(x=mb.transpose(x=x, perm=[0, 2, 1]), axes=[2])
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

    # --- shapes

    def split_heads(self, x, heads: int, head_dim: int):
        B, T, _ = x.shape
        return mb.transpose(x=mb.reshape(x=x, shape=[B, T, heads, head_dim]), perm=[0, 2, 1, 3])

    def merge_heads(self, x):
        B, H, T, D = x.shape
        return mb.reshape(x=mb.transpose(x=x, perm=[0, 2, 1, 3]), shape=[B, T, H * D])

    # --- attention

    def rope(self, x, rope: RoPE, step: Step):
        """x * cos + rotate_half(x) * sin with rows of constant tables picked by position."""
        if id(rope) not in self._rope_tables:
            cos, sin = (t[: self.context] for t in rope.tables())
            self._rope_tables[id(rope)] = (cos.astype(np.float16), sin.astype(np.float16))
        cos_table, sin_table = self._rope_tables[id(rope)]
        T, D = x.shape[2], x.shape[3]
        cos = mb.reshape(x=mb.gather(x=cos_table, indices=step.positions, axis=0), shape=[1, 1, T, D])
        sin = mb.reshape(x=mb.gather(x=sin_table, indices=step.positions, axis=0), shape=[1, 1, T, D])
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
            mc = mask if size == T else mb.slice_by_index(x=mask, begin=[0, 0, start, 0], end=[1, 1, start + size, context])
            # GQA: the `group` query heads of one KV head become extra rows of one matmul.
            qg = mb.reshape(x=qc, shape=[B, kv_heads, group * size, D])
            scores = mb.reshape(x=mb.matmul(x=qg, y=k, transpose_y=True), shape=[B, H, size, context])
            weights = mb.softmax(x=mb.add(x=scores, y=mc), axis=-1)
            wg = mb.reshape(x=weights, shape=[B, kv_heads, group * size, context])
            outputs.append(mb.reshape(x=mb.matmul(x=wg, y=v), shape=[B, H, size, D]))
        return outputs[0] if len(outputs) == 1 else mb.concat(values=outputs, axis=2)

    def tap(self, site: str, layer: int, x):
        return x


class MILKVCache:
    """The KV cache as ANEMLL lays it out: one fp16 state (2 * layers, kv_heads, context, head_dim).

    Keys of layer i live in row i, values in row layers + i.  Each update writes the T new rows at
    ``current_pos`` and hands the written value on, so later layers never read the state again.
    """

    def __init__(self, state, num_layers: int, current_pos):
        self.state = state
        self.num_layers = num_layers
        self.current_pos = current_pos
        self.value = mb.read_state(input=state)

    def _write(self, row: int, update):
        _, heads, T, D = update.shape
        zero = np.array([0], dtype=np.int32)
        begin = mb.concat(values=[np.array([row, 0], dtype=np.int32), self.current_pos, zero], axis=0)
        end = mb.concat(
            values=[np.array([row + 1, heads], dtype=np.int32), mb.add(x=self.current_pos, y=np.int32(T)), np.array([D], dtype=np.int32)],
            axis=0,
        )
        self.value = mb.slice_update(x=self.value, update=update, begin=begin, end=end)

    def _rows(self, row: int):
        _, heads, context, D = self.value.shape
        return mb.slice_by_index(x=self.value, begin=[row, 0, 0, 0], end=[row + 1, heads, context, D])

    def update(self, layer: int, k, v, step: Step):
        self._write(layer, k)
        self._write(self.num_layers + layer, v)
        self.value = mb.coreml_update_state(state=self.state, value=self.value)
        return self._rows(layer), self._rows(self.num_layers + layer)


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
        self._caches: dict[str, MILKVCache] = {}
        self._begin: tuple[Any, dict[int, Any]] | None = None  # (current_pos - window, row -> begin)

    def _cache(self, kind: str) -> MILKVCache:
        if kind not in self._caches:
            self._caches[kind] = MILKVCache(self.states[kind], self.counts[kind], self.current_pos)
        return self._caches[kind]

    def _window_rows(self, value, row: int, tokens: int):
        _, heads, _, D = value.shape
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
            return cache._rows(index), cache._rows(cache.num_layers + index)
        tokens = k.shape[2]
        keys = self._window_rows(cache.value, index, tokens)
        return keys, self._window_rows(cache.value, cache.num_layers + index, tokens)

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

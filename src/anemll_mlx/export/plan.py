"""Planning an export: which layers go in which chunk, and how the LM head is split.

A Core ML program that is too large silently falls off the Neural Engine (reports put the limit
between ~250 MB and ~1 GB per program), and no ANE conv may have more than 16384 output
channels.  Both limits are applied here, from byte counts, before anything is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BadArgumentError, UserError
from ..models.base import DecoderModel, parameter_arrays
from ..quant.lut import LUTConfig, LUTSpec

ANE_MAX_CHANNELS = 16384
MB = 1024 * 1024


def weight_bytes(count: int, rows: int, spec: LUTSpec | None) -> int:
    """Bytes of a (rows, count/rows) weight stored fp16, or as LUT indices plus fp16 tables."""
    if spec is None:
        return 2 * count
    groups = 1 if spec.group_size is None else math.ceil(rows / spec.group_size)
    return math.ceil(count * spec.bits / 8) + groups * (2**spec.bits) * 2


def layer_bytes(model: DecoderModel, layer: int, lut: LUTSpec | None) -> int:
    """Stored size of one decoder layer: its declared LUT targets at ``lut``, the rest in fp16."""
    total = sum(2 * value.size for value in parameter_arrays(model.model.layers[layer]))
    if lut is not None:
        for target in model.lut_targets():
            if target.part == "ffn" and target.layer == layer:
                w = target.holder.weight
                total += weight_bytes(w.size, w.shape[0], lut) - 2 * w.size
    return total


@dataclass
class ExportPlan:
    chunks: list[range]  # contiguous layer ranges, one program each
    chunk_bytes: list[int]
    embed_bytes: int
    head_sizes: list[int]  # output channels of each LM-head piece
    head_bytes: int
    budget_bytes: int

    def rows(self) -> list[tuple[str, str, float]]:
        """(part, layers, MB) for the table printed before building."""
        out = [("embeddings", "-", self.embed_bytes / MB)]
        n = len(self.chunks)
        for i, (r, b) in enumerate(zip(self.chunks, self.chunk_bytes)):
            out.append((f"FFN chunk {i + 1:02d}of{n:02d}", f"{r.start}-{r.stop - 1}", b / MB))
        out.append((f"lm_head ({len(self.head_sizes)} pieces)", "-", self.head_bytes / MB))
        return out


def split_layers(num_layers: int, chunks: int) -> list[range]:
    """``chunks`` contiguous ranges whose lengths differ by at most one (earlier ones longer)."""
    bounds = np.array_split(np.arange(num_layers), chunks)
    return [range(int(b[0]), int(b[-1]) + 1) for b in bounds]


def head_split(vocab: int, requested: int | str) -> list[int]:
    """Sizes of the LM-head pieces: the fewest equal-as-possible pieces of <= 16384 rows."""
    minimum = math.ceil(vocab / ANE_MAX_CHANNELS)
    if requested == "auto":
        pieces = minimum
    else:
        pieces = int(requested)
        if pieces < minimum:
            raise BadArgumentError(
                f"--split-lm-head {pieces} leaves pieces over {ANE_MAX_CHANNELS} rows for vocab {vocab}; use >= {minimum}"
            )
        if pieces > vocab:
            raise BadArgumentError(f"--split-lm-head {pieces} exceeds the vocabulary size {vocab}")
    return [len(p) for p in np.array_split(np.arange(vocab), pieces)]


def plan_export(
    model: DecoderModel, chunks: int | str, max_chunk_mb: float, lut: LUTConfig, split_lm_head: int | str
) -> ExportPlan:
    """Fewest chunks under the budget (``chunks='auto'``) or exactly ``chunks``.

    Needs only shapes: a model built from config.json alone (no weights) plans the same.
    """
    n_layers = len(model.model.layers)
    sizes = [layer_bytes(model, i, lut.ffn) for i in range(n_layers)]
    norm_bytes = 2 * model.model.norm.weight.size  # the final norm rides in the last chunk
    budget = int(max_chunk_mb * MB)

    def chunk_sizes(ranges: list[range]) -> list[int]:
        out = [sum(sizes[i] for i in r) for r in ranges]
        out[-1] += norm_bytes
        return out

    if chunks == "auto":
        if max(sizes) + norm_bytes > budget:
            raise UserError(
                f"one decoder layer needs {max(sizes) / MB:.1f} MB, over --max-chunk-mb {max_chunk_mb:g}: "
                "raise the budget or quantize with --lut"
            )
        count = next(n for n in range(1, n_layers + 1) if max(chunk_sizes(split_layers(n_layers, n))) <= budget)
    else:
        count = int(chunks)
        if not 1 <= count <= n_layers:
            raise BadArgumentError(f"--chunk {count} must be between 1 and the number of layers ({n_layers})")
    ranges = split_layers(n_layers, count)
    table = model.model.embed_tokens.weight
    head_sizes = head_split(model.args.vocab_size, split_lm_head)
    head = model.head.weight
    return ExportPlan(
        chunks=ranges,
        chunk_bytes=chunk_sizes(ranges),
        embed_bytes=weight_bytes(table.size, table.shape[0], lut.embeddings),
        head_sizes=head_sizes,
        head_bytes=sum(weight_bytes(n * head.shape[1], n, lut.lm_head) for n in head_sizes),
        budget_bytes=budget,
    )

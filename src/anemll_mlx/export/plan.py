"""Planning an export: which layers go in which chunk, and how the embeddings and the LM head are
split, from shapes alone (a model built from config.json plans the same as a loaded one).

The budget is the bytes a compiled program holds: its weights as stored (fp16, or LUT indices
plus tables), which is what the .mlmodelc's weight file is.  A field report (Gemma-4-26B-A4B on
an M4 Max) saw Core ML run compiled parts of 364 and 398 MB on the GPU without a word, while parts
of 182-216 MB ran on the Neural Engine; the only check that caught it was the compiled size on
disk.  So every part (the embeddings and the LM head too) stays within the budget, 250 MB unless
``--max-chunk-mb`` raises it; each extra program costs one more call per token (~2-4 ms).  No ANE
conv may have more than 16384 output channels either: LM-head pieces stay within that.
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
DEFAULT_BUDGET_MB = 250.0  # the largest parts seen running on the Neural Engine were ~216 MB


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
                total += weight_bytes(w.size, target.rows, lut) - 2 * w.size
    return total


@dataclass
class ExportPlan:
    chunks: list[range]  # contiguous layer ranges, one program each
    chunk_bytes: list[int]
    embed_parts: list[range]  # vocabulary rows of each embeddings program (one unless over budget)
    embed_bytes: list[int]
    head_parts: list[list[int]]  # per LM-head program, the row counts of its pieces (outputs)
    head_bytes: list[int]
    budget_bytes: int

    @property
    def head_sizes(self) -> list[int]:
        """Every LM-head piece in vocabulary order (the ``logitsN`` outputs across programs)."""
        return [n for part in self.head_parts for n in part]

    def rows(self) -> list[tuple[str, str, float]]:
        """(part, layers or rows, MB) for the table printed before building."""
        out = []
        for i, (rows, nbytes) in enumerate(zip(self.embed_parts, self.embed_bytes)):
            label = "embeddings" + (f" {i + 1:02d}of{len(self.embed_parts):02d}" if len(self.embed_parts) > 1 else "")
            out.append((label, "-" if len(self.embed_parts) == 1 else f"rows {rows.start}-{rows.stop - 1}", nbytes / MB))
        n = len(self.chunks)
        for i, (r, b) in enumerate(zip(self.chunks, self.chunk_bytes)):
            out.append((f"FFN chunk {i + 1:02d}of{n:02d}", f"{r.start}-{r.stop - 1}", b / MB))
        for i, (part, nbytes) in enumerate(zip(self.head_parts, self.head_bytes)):
            label = "lm_head" + (f" {i + 1:02d}of{len(self.head_parts):02d}" if len(self.head_parts) > 1 else "")
            out.append((f"{label} ({len(part)} pieces)", "-", nbytes / MB))
        return out


def split_layers(num_layers: int, chunks: int) -> list[range]:
    """``chunks`` contiguous ranges whose lengths differ by at most one (earlier ones longer)."""
    bounds = np.array_split(np.arange(num_layers), chunks)
    return [range(int(b[0]), int(b[-1]) + 1) for b in bounds]


def head_split(vocab: int, requested: int | str, minimum: int = 1) -> list[int]:
    """Sizes of the LM-head pieces: the fewest equal-as-possible pieces of <= 16384 rows (and at
    least ``minimum``, so that one piece fits the budget), or exactly ``requested``."""
    fewest = max(minimum, math.ceil(vocab / ANE_MAX_CHANNELS))
    if requested == "auto":
        pieces = fewest
    else:
        pieces = int(requested)
        if pieces < math.ceil(vocab / ANE_MAX_CHANNELS):
            raise BadArgumentError(
                f"--split-lm-head {pieces} leaves pieces over {ANE_MAX_CHANNELS} rows for vocab {vocab}; use >= {fewest}"
            )
        if pieces > vocab:
            raise BadArgumentError(f"--split-lm-head {pieces} exceeds the vocabulary size {vocab}")
    return [len(p) for p in np.array_split(np.arange(vocab), pieces)]


def pack(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive items grouped greedily into the fewest groups whose sums stay within ``budget``."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def split_rows(rows: int, parts: int, align: int) -> list[range]:
    """``parts`` consecutive row ranges of near-equal size, each a multiple of ``align`` rows
    (a LUT's group of output channels) but the last."""
    blocks = math.ceil(rows / align)
    bounds = [min(rows, align * len(b)) for b in np.array_split(np.arange(blocks), parts)]
    starts = np.cumsum([0] + bounds[:-1])
    return [range(int(a), int(min(rows, a + n))) for a, n in zip(starts, bounds)]


def plan_export(
    model: DecoderModel, chunks: int | str, max_chunk_mb: float, lut: LUTConfig, split_lm_head: int | str
) -> ExportPlan:
    """Fewest chunks under the budget (``chunks='auto'``) or exactly ``chunks``; embeddings and
    LM head split into the fewest programs within the budget.

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
    vocab, hidden = table.shape
    embed_total = weight_bytes(table.size, vocab, lut.embeddings)
    align = lut.embeddings.group_size or 1 if lut.embeddings else 1  # a part keeps whole LUT groups
    embed_parts = split_rows(vocab, math.ceil(embed_total / budget), align)

    head = model.head.weight
    head_total = weight_bytes(head.size, head.shape[0], lut.lm_head)
    head_sizes = head_split(model.args.vocab_size, split_lm_head, math.ceil(head_total / budget))
    piece_bytes = [weight_bytes(n * hidden, n, lut.lm_head) for n in head_sizes]
    if max(piece_bytes) > budget:
        raise UserError(
            f"an LM-head piece of {max(head_sizes)} rows needs {max(piece_bytes) / MB:.1f} MB, over --max-chunk-mb "
            f"{max_chunk_mb:g}: raise the budget, --split-lm-head more pieces, or quantize with --lut-lm-head"
        )
    head_groups = pack(piece_bytes, budget)
    return ExportPlan(
        chunks=ranges,
        chunk_bytes=chunk_sizes(ranges),
        embed_parts=embed_parts,
        embed_bytes=[weight_bytes(len(r) * hidden, len(r), lut.embeddings) for r in embed_parts],
        head_parts=[[head_sizes[i] for i in group] for group in head_groups],
        head_bytes=[sum(piece_bytes[i] for i in group) for group in head_groups],
        budget_bytes=budget,
    )

"""Planning an export: which layers go in which chunk, and how the embeddings and the LM head are
split, from shapes alone (a model built from config.json plans the same as a loaded one).

The budget is the bytes a compiled program holds: its weights as stored (fp16, or LUT indices
plus tables), which is what the .mlmodelc's weight file is.  A field report (Gemma-4-26B-A4B on
an M4 Max) saw Core ML run compiled parts of 364 and 398 MB on the GPU without a word, while parts
of 182-216 MB ran on the Neural Engine; the only check that caught it was the compiled size on
disk.  So every part (the embeddings and the LM head too) stays within the budget, 250 MB unless
``--max-chunk-mb`` raises it; each extra program costs one more call per token (~2-4 ms).  No ANE
conv may have more than 16384 output channels either: LM-head pieces stay within that.

A mixture-of-experts layer that does not fit the budget whole (or any, for routed execution)
becomes an attention part (attention and router) and expert packs of as many experts as fit
(``format.ChunkRole``).  ``ExportPlan.estimate`` gives, per decoded token and execution mode,
the program calls, the weight bytes read and the tokens/s they allow at a stated bandwidth and
call overhead: seconds = calls x call overhead + bytes / bandwidth (decode is memory-bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .. import format as fmt
from ..errors import BadArgumentError, UserError
from ..models.base import DecoderModel, parameter_arrays
from ..quant.lut import LUTConfig, LUTSpec

ANE_MAX_CHANNELS = 16384
MB = 1024 * 1024
DEFAULT_BUDGET_MB = 250.0  # the largest parts seen running on the Neural Engine were ~216 MB
DEFAULT_BANDWIDTH_GBS = 120.0  # the ANE's on an M4 Max (anemll-bench; ane-limits.md), in 1e9 bytes/s
DEFAULT_CALL_MS = 3.0  # Core ML's overhead per prediction (2-4 ms measured)
MOE_MODES = ("auto", *fmt.MOE_MODES)


@dataclass(frozen=True)
class Speed:
    """What the estimates assume: the bandwidth weights are read at and the cost of one call."""

    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS
    call_ms: float = DEFAULT_CALL_MS


@dataclass(frozen=True)
class Estimate:
    """Per decoded token: program calls and weight bytes read (expected values in routed mode,
    experts chosen uniformly at random), and the seconds they take at ``speed``."""

    mode: str
    calls: float
    weight_bytes: float
    speed: Speed

    @property
    def seconds(self) -> float:
        return self.calls * self.speed.call_ms / 1000 + self.weight_bytes / (self.speed.bandwidth_gbs * 1e9)

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds

    def line(self) -> str:
        return (
            f"{self.mode}: {self.calls:.1f} calls, {self.weight_bytes / 1e9:.2f} GB of weights read -> "
            f"{self.seconds:.3f} s/token, {self.tokens_per_second:.2f} tokens/s "
            f"(at {self.speed.bandwidth_gbs:g} GB/s and {self.speed.call_ms:g} ms per call)"
        )


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
    # what each chunk computes (format.ChunkRole): whole layers unless a mixture-of-experts layer
    # is split into its attention part and expert packs
    roles: list[fmt.ChunkRole] = field(default_factory=list)
    moe_mode: str | None = None  # the default execution mode of an export with expert packs
    num_experts: int = 0
    top_k: int = 0
    final_norm_in_head: bool = False  # the last chunk is an expert pack: the LM head applies the norm
    embed_row_bytes: int = 0  # one row of the table: what a lookup reads
    expert_bytes: list[int] = field(default_factory=list)  # per chunk: one expert's bytes for a gather program
    shared_branch: bool = False  # the MoE layers have a branch beside the experts (format.MOE_SHARED)

    @property
    def split_experts(self) -> bool:
        return any(r.kind != fmt.LAYERS for r in self.roles)

    def moe_layout(self) -> fmt.MoELayout | None:
        if not self.split_experts:
            return None
        assert self.moe_mode is not None
        return fmt.MoELayout(
            self.roles, self.moe_mode, self.num_experts, self.top_k, self.final_norm_in_head, self.shared_branch
        )

    def modes(self) -> list[str]:
        """The execution modes this layout allows: routed needs expert packs, gathered its programs."""
        if not self.split_experts:
            return ["dense"]
        return ["dense", "routed"] + (["gathered"] if any(r.kind == fmt.GATHER for r in self.roles) else [])

    def estimate(self, mode: str = "dense", speed: Speed = Speed()) -> Estimate:
        """Calls and weight bytes per decoded token (see ``estimate_parts``)."""
        if mode not in self.modes():
            raise BadArgumentError(f"--moe-mode {mode} needs expert packs: this plan has none")
        return estimate_parts(
            len(self.embed_parts), self.embed_row_bytes, self.chunk_bytes, self.head_bytes,
            self.roles, self.num_experts, self.top_k, mode, speed, self.expert_bytes or None,
        )  # fmt: skip

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
            role = self.roles[i] if self.roles else fmt.ChunkRole(fmt.LAYERS, r)
            what = f"{r.start}-{r.stop - 1}"
            if role.kind == fmt.ATTENTION:
                what = f"{r.start} attention+router"
                if role.experts is not None:
                    what += f"+experts {role.experts.start}-{role.experts.stop - 1}"
            elif role.experts is not None:
                what = f"{r.start} experts {role.experts.start}-{role.experts.stop - 1}"
            elif role.kind == fmt.GATHER:
                what = f"{r.start} gather ({self.top_k} experts' weights in)"
            out.append((f"FFN chunk {i + 1:02d}of{n:02d}", what, b / MB))
        for i, (part, nbytes) in enumerate(zip(self.head_parts, self.head_bytes)):
            label = "lm_head" + (f" {i + 1:02d}of{len(self.head_parts):02d}" if len(self.head_parts) > 1 else "")
            out.append((f"{label} ({len(part)} pieces)", "-", nbytes / MB))
        return out


def call_probability(role: fmt.ChunkRole | None, num_experts: int, top_k: int) -> float:
    """How likely a decoded token calls a chunk in routed mode: for a pack of p of E experts with
    k chosen uniformly at random, 1 - C(E - p, k) / C(E, k); 1 for any other chunk."""
    if role is None or role.kind != fmt.EXPERTS or role.experts is None:
        return 1.0  # an attention part (with the experts beside it, if any) always runs
    p = len(role.experts)
    return 1.0 - math.comb(num_experts - p, top_k) / math.comb(num_experts, top_k)


def estimate_parts(
    embed_programs: int,
    embed_row_bytes: int,
    chunk_bytes: list[int],
    head_bytes: list[int],
    roles: list[fmt.ChunkRole] | None,
    num_experts: int,
    top_k: int,
    mode: str,
    speed: Speed,
    expert_bytes: list[int] | None = None,
) -> Estimate:
    """Per decoded token: one embeddings program is called (the host calls the one holding the
    token's row) and reads one row; every chunk is
    called and read whole (routed mode: an expert pack with ``call_probability``); every LM-head
    program reads all its weights.  Gathered mode: no expert pack is called, each gather program is,
    reading the k chosen experts' weights (``expert_bytes``: one expert's, per chunk) as inputs."""

    def probability(role: fmt.ChunkRole | None) -> float:
        kind = role.kind if role else fmt.LAYERS
        if kind == fmt.GATHER:
            return 1.0 if mode == "gathered" else 0.0
        if kind == fmt.EXPERTS and mode == "gathered":
            return 0.0
        return call_probability(role, num_experts, top_k) if mode == "routed" else 1.0

    p = [probability(roles[i] if roles else None) for i in range(len(chunk_bytes))]
    gathered = [top_k * b if mode == "gathered" else 0 for b in expert_bytes or [0] * len(chunk_bytes)]
    calls = min(1, embed_programs) + sum(p) + len(head_bytes)
    read = embed_row_bytes + sum(q * (b + g) for q, b, g in zip(p, chunk_bytes, gathered)) + sum(head_bytes)
    return Estimate(mode, calls, read, speed)


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


def expert_bytes(model: DecoderModel, layer: int, lut: LUTSpec | None) -> int:
    """Stored size of one expert of ``layer`` (its rows of each stacked projection)."""
    experts = model.experts_in(layer)
    assert experts is not None
    E = experts.count
    total = 0
    for holder in (experts.gate_proj, experts.up_proj, experts.down_proj):
        size = holder.weight.size // E
        total += weight_bytes(size, size // holder.weight.shape[-1], lut)
    return total


def plan_export(
    model: DecoderModel,
    chunks: int | str,
    max_chunk_mb: float,
    lut: LUTConfig,
    split_lm_head: int | str,
    moe_mode: str = "auto",
    speed: Speed = Speed(),
) -> ExportPlan:
    """Fewest chunks under the budget (``chunks='auto'``) or exactly ``chunks``; embeddings and
    LM head split into the fewest programs within the budget.  A mixture-of-experts model gets
    expert packs when a layer does not fit whole or ``moe_mode`` is routed; ``auto`` takes the
    layout and mode of the smaller estimated decode time at ``speed``.

    Needs only shapes: a model built from config.json alone (no weights) plans the same.
    """
    if moe_mode not in MOE_MODES:
        raise BadArgumentError(f"--moe-mode must be one of {', '.join(MOE_MODES)}, not '{moe_mode}'")
    n_layers = len(model.model.layers)
    sizes = [layer_bytes(model, i, lut.ffn) for i in range(n_layers)]
    norm_bytes = 2 * model.model.norm.weight.size  # the final norm rides in the last chunk
    budget = int(max_chunk_mb * MB)
    sparse = [i for i in range(n_layers) if model.experts_in(i) is not None]
    head = _plan_ends(model, max_chunk_mb, lut, split_lm_head)
    if not sparse:
        return _whole_layers(model, chunks, max_chunk_mb, sizes, norm_bytes, head)
    whole_fits = max(sizes) + norm_bytes <= budget
    experts = model.experts_in(sparse[0])
    assert experts is not None
    E, k = experts.count, model.experts_per_token() or experts.count
    candidates: list[ExportPlan] = []
    if moe_mode != "routed" and whole_fits:
        candidates.append(_whole_layers(model, chunks, max_chunk_mb, sizes, norm_bytes, head, moe_mode="dense", num_experts=E, top_k=k))
    elif chunks != "auto":
        raise BadArgumentError(
            "--chunk applies to exports of whole layers; with expert packs the planner chooses the parts (leave --chunk auto)"
        )
    if moe_mode == "gathered":
        if lut.ffn is not None:
            raise BadArgumentError("--moe-mode gathered passes the experts' fp16 weights in: export it without --lut")
        return _with_mode(_expert_packs(model, max_chunk_mb, lut, sizes, norm_bytes, head, sparse, E, k, gather=True), "gathered")
    if moe_mode != "dense" or not whole_fits:
        split = _expert_packs(model, max_chunk_mb, lut, sizes, norm_bytes, head, sparse, E, k)
        modes = ["dense", "routed"] if moe_mode == "auto" else [moe_mode]
        for mode in modes:
            candidates.append(_with_mode(split, mode))
    return min(candidates, key=lambda p: p.estimate(p.moe_mode or "dense", speed).seconds)


def _with_mode(plan: ExportPlan, mode: str) -> ExportPlan:
    return replace(plan, moe_mode=mode)


def _whole_layers(
    model: DecoderModel,
    chunks: int | str,
    max_chunk_mb: float,
    sizes: list[int],
    norm_bytes: int,
    head: dict,
    moe_mode: str | None = None,
    num_experts: int = 0,
    top_k: int = 0,
) -> ExportPlan:
    n_layers = len(sizes)
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
    return ExportPlan(
        chunks=ranges,
        chunk_bytes=chunk_sizes(ranges),
        budget_bytes=budget,
        roles=[fmt.ChunkRole(fmt.LAYERS, r) for r in ranges],
        moe_mode=moe_mode,
        num_experts=num_experts,
        top_k=top_k,
        **head,
    )


def _expert_packs(
    model: DecoderModel,
    max_chunk_mb: float,
    lut: LUTConfig,
    sizes: list[int],
    norm_bytes: int,
    head: dict,
    sparse: list[int],
    num_experts: int,
    top_k: int,
    gather: bool = False,
) -> ExportPlan:
    """With ``gather``, no expert rides in the attention part and a gather program follows each
    sparse layer's packs (gathered mode decodes through it, prefills through the packs).

    Runs of dense layers chunked as usual; each sparse layer an attention part (attention,
    both norms, router, and the first experts when some fit beside them) and balanced packs of
    as many experts as fit the budget (each pack holds its norms too): the fewest
    programs per layer, so the fewest calls."""
    budget = int(max_chunk_mb * MB)
    roles: list[fmt.ChunkRole] = []
    nbytes: list[int] = []
    gathered: list[int] = []
    run: list[int] = []

    def flush() -> None:
        if not run:
            return
        part = [sizes[i] for i in run]
        count = next(n for n in range(1, len(run) + 1) if max(sum(part[j] for j in r) for r in split_layers(len(run), n)) <= budget)
        for r in split_layers(len(run), count):
            roles.append(fmt.ChunkRole(fmt.LAYERS, range(run[r.start], run[r.start] + len(r))))
            nbytes.append(sum(part[j] for j in r))
        run.clear()

    for i in range(len(sizes)):
        if i not in sparse:
            if sizes[i] > budget:
                raise UserError(
                    f"decoder layer {i} needs {sizes[i] / MB:.3g} MB, over --max-chunk-mb {max_chunk_mb:g}: "
                    "raise the budget or quantize with --lut"
                )
            run.append(i)
            continue
        flush()
        experts = model.experts_in(i)
        assert experts is not None
        one = expert_bytes(model, i, lut.ffn)
        E = experts.count
        attention = sizes[i] - E * one
        if attention > budget:
            raise UserError(
                f"the attention part of layer {i} needs {attention / MB:.3g} MB, over --max-chunk-mb {max_chunk_mb:g}: "
                "raise the budget or quantize with --lut"
            )
        pack_norm = sum(2 * n.weight.size for n in model.pack_norms(i))
        fit = (budget - pack_norm) // one
        if fit < 1:
            raise UserError(
                f"expert 0 of layer {i} (one of its {E}) needs {one / MB:.3g} MB, over --max-chunk-mb {max_chunk_mb:g}: no expert "
                "pack can hold it (raise the budget or quantize with --lut)"
            )
        first, others = expert_split(E, 0 if gather else max(0, (budget - attention) // one), fit)
        layer = range(i, i + 1)
        roles.append(fmt.ChunkRole(fmt.ATTENTION, layer, range(0, first) if first else None))
        nbytes.append(attention + first * one)
        start = first
        for count in others:
            roles.append(fmt.ChunkRole(fmt.EXPERTS, layer, range(start, start + count)))
            nbytes.append(pack_norm + count * one)
            start += count
        if gather:
            roles.append(fmt.ChunkRole(fmt.GATHER, layer))
            nbytes.append(pack_norm)
            gathered += [0] * (len(roles) - 1 - len(gathered)) + [expert_bytes(model, i, None)]
    flush()
    final_in_head = roles[-1].kind != fmt.LAYERS
    if final_in_head:  # the LM head normalises the packs' sum: each of its programs holds the norm
        head = {**head, "head_bytes": [b + norm_bytes for b in head["head_bytes"]]}
    else:
        nbytes[-1] += norm_bytes
    return ExportPlan(
        chunks=[r.layers for r in roles],
        chunk_bytes=nbytes,
        budget_bytes=budget,
        roles=roles,
        moe_mode="dense",
        num_experts=num_experts,
        top_k=top_k,
        final_norm_in_head=final_in_head,
        expert_bytes=gathered + [0] * (len(roles) - len(gathered)) if gather else [],
        shared_branch=model.has_shared_branch(sparse[0]),
        **head,
    )


def expert_split(experts: int, first_fits: int, fit: int) -> tuple[int, list[int]]:
    """How many experts ride in the attention part (``first_fits`` would fit beside it) and the
    sizes of the packs (``fit`` fit in one): the fewest programs, as even as they can be."""
    n = 1
    while min(first_fits, experts) + (n - 1) * fit < experts:
        n += 1
    even = math.ceil(experts / n)
    first = min(first_fits, even)
    rest = experts - first
    if n == 1:
        return first, []
    return first, [len(g) for g in np.array_split(np.arange(rest), n - 1) if len(g)]


def _plan_ends(model: DecoderModel, max_chunk_mb: float, lut: LUTConfig, split_lm_head: int | str) -> dict:
    """The embeddings and LM-head programs (``ExportPlan`` fields)."""
    budget = int(max_chunk_mb * MB)
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
    bits = lut.embeddings.bits if lut.embeddings else 16
    return {
        "embed_parts": embed_parts,
        "embed_bytes": [weight_bytes(len(r) * hidden, len(r), lut.embeddings) for r in embed_parts],
        "head_parts": [[head_sizes[i] for i in group] for group in head_groups],
        "head_bytes": [sum(piece_bytes[i] for i in group) for group in head_groups],
        "embed_row_bytes": math.ceil(hidden * bits / 8),
    }

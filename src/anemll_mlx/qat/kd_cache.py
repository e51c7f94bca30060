"""The teacher's top-k logits over training text, computed once, for knowledge-distillation QAT.

A LUT-quantized student is trained to match its float32 teacher's next-token distribution.
Running the teacher inside the training loop would double each step's cost and keep both models
in memory, so the teacher's answer is cached: for each sample (``max_length`` tokens) and each
position t, the ``top_k`` largest raw logits (temperature 1, float32 weights) for predicting token
t+1 from tokens[:t+1], sorted descending, with their token ids.  Top-k because the full
distribution would be ``vocab`` floats per position (49152 for SmolLM2: 25 MB per 128-token
sample); the top 64 hold nearly all of the probability mass of a trained model.

The text is the user's (``--data``: ``.txt`` cut into ``max_length``-token pieces, ``.jsonl``
"text" likewise, "messages" rendered by the chat template and cut to ``max_length``, "prompt"
chat-templated and continued by the teacher), or, without data, the teacher's own (as LLM-QAT
does): seeded temperature-1 samples continuing the built-in training prompts
(``data/training.jsonl``: ~100 chat, fact, code, math, writing and translation prompts in ten
languages, in a fixed shuffled order) through the chat template.  Never the eval prompts
(``data/prompts.jsonl``): what ``compare`` measures must not be what the student was trained on.  A sampled continuation stops at the teacher's EOS (the EOS is
the sample's last token, so the target that predicts it is kept): past it a chat model writes the
next turn, which is not what it is asked to do.  The logits the cache needs are exactly those the
generation computes, so they are captured at each decode step, never recomputed; ``GROUP``
continuations of one prompt run as one batch, sharing the prompt's prefill (a batch of different
prompts would need left padding and masks the forward does not take).

On disk (``FORMAT`` version 2), in ``DIR``::

    manifest.json           {"format", "version", "teacher": {"source", "sha256", "vocab_size"},
                             "data": {"source", "sha256"}, "samples", "max_length", "top_k",
                             "seed", "shards": [{"file", "samples"}], "complete"}
    shard-00000.safetensors tokens int32 (n, L) padded with 0, lengths int32 (n,),
                            topk_ids int32 (n, L, K), topk_logits float16 (n, L, K)

Entries at t >= length - 1 (no next token) are zero.  Shards of ``SHARD_SAMPLES`` are written
under a temporary name and renamed; the manifest is rewritten (atomically) after each, so a
stopped run resumes from its last whole shard, and ``complete`` turns true with the last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from .. import interrupts
from ..distributed import SINGLE, World
from ..errors import BadArgumentError
from ..eval.prompts import parse_prompts
from ..loading import LoadedModel, files_sha256
from ..models.base import BaseArgs, DecoderModel
from ..output import MARKER, OutputFile, OutputFolder, marker_text
from ..probe.calibrate import CalibrationSample, read_samples

FORMAT = "anemll-mlx-kd-cache"
VERSION = 2  # 2: data-free samples from data/training.jsonl, GROUP 16 (1: calibration prompts, 64)
MANIFEST = "manifest.json"
KIND = "kd-cache"
BUILT_IN = "teacher samples from built-in prompts"
# Continuations of one prompt per batched forward.  Measured on SmolLM2-135M (2 CPU cores, decode
# at 128 positions): 107 ms/token at 1, 33 at 8, 18 at 16, 14 at 32, 10 at 64.  Fewer rows per
# prompt mean more prompts per cache (the default 1024 samples: 32 prompts at 32, 4 at 64 with
# 256), which is what the student generalises from; 32 keeps the default cache within ~27 min.
# Changing it changes which prompt and which random key each sample gets: bump VERSION.
GROUP = 32
TRAINING = "training.jsonl"
SHARD_SAMPLES = 64  # a multiple of GROUP: a batch never straddles two shards
TEXT_BATCH = 8  # pieces of given text per forward: bounds its (B, L, vocab) float32 logits
HELD_OUT_FRACTION = 8  # 1/8 of the samples (the last ones) are the validation set

Progress = Callable[[int, int], None]  # (samples done, samples total)


@dataclass
class KDBatch:
    """A training batch: the student reads ``tokens`` and matches, where ``mask`` is 1, the
    teacher's ``topk_logits`` at ``topk_ids`` (float32 here, float16 on disk)."""

    tokens: mx.array  # int32 (B, L)
    mask: mx.array  # float32 (B, L): 1 where position t has a target (t < length - 1)
    topk_ids: mx.array  # int32 (B, L, K)
    topk_logits: mx.array  # float32 (B, L, K), descending along K


@dataclass(frozen=True)
class _Spec:
    """One sample to make: ``ids`` as they are (``sampled`` false), or a prompt the teacher
    continues by sampling with random key number ``key`` (samples sharing a prompt and a key are
    the rows of one batch, each row drawing its own tokens)."""

    ids: tuple[int, ...]
    sampled: bool
    key: int = 0


# --- reading a cache


class KDCache:
    """A KD cache folder: its manifest, and the samples as training and validation batches.

    The last ``held_out`` samples (``samples // 8``, at least 1 when there are 2 or more) are the
    validation set: ``batches`` never yields them, ``validation`` returns (some of) them.  The
    shards are read into memory on first use (1024 x 128 x 64 entries are 50 MB).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], built: int = 0):
        self.path = Path(path)
        self.manifest = manifest
        self.built = built  # samples the call that returned this made (0: found complete)
        self._data: dict[str, np.ndarray] | None = None

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def held_out(self) -> int:
        n = self.samples
        return 0 if n < 2 else max(1, n // HELD_OUT_FRACTION)

    @property
    def tokens(self) -> int:
        """Tokens over all samples (reads the shards)."""
        return int(self._arrays()["lengths"].sum())

    @property
    def nbytes(self) -> int:
        """Bytes on disk (manifest and shards)."""
        names = [MANIFEST] + [s["file"] for s in self.manifest["shards"]]
        return sum((self.path / n).stat().st_size for n in names if (self.path / n).exists())

    def read(self) -> None:
        """Read the shards into memory now, so that a missing or damaged one fails here."""
        self._arrays()

    def check_teacher(self, lm: LoadedModel) -> None:
        """Refuse a model other than the one whose logits these are: the targets would be another
        model's, and the student would be trained towards them silently."""
        teacher = self.manifest["teacher"]
        if teacher["sha256"] != lm.content_sha256:
            raise BadArgumentError(
                f"KD cache {self.path} was made by another model (teacher sha256 {teacher['sha256'][:12]}..., "
                f"{lm.source} is {lm.content_sha256[:12]}...)"
            )
        if int(teacher["vocab_size"]) != lm.model.args.vocab_size:
            raise BadArgumentError(
                f"KD cache {self.path} was made by another model (teacher vocab {teacher['vocab_size']}, "
                f"{lm.source} has {lm.model.args.vocab_size})"
            )

    def batches(self, batch_size: int, seed: int, start: int = 0, part: slice | None = None) -> Iterator[KDBatch]:
        """Training batches without end: the training samples in a fresh order each epoch (drawn
        from ``seed`` and the epoch number), read as one stream cut into ``batch_size`` pieces, so
        batch ``start`` is found without drawing the ones before it (a resumed trainer passes the
        number of batches it has already seen and gets the same data as an unbroken run).

        ``part``: the rows of each batch this rank trains on (data-parallel ranks split every
        global batch, so the stream, and a resumed run, do not depend on the number of ranks)."""
        if batch_size < 1:
            raise BadArgumentError(f"batch size must be >= 1, got {batch_size}")
        if start < 0:
            raise BadArgumentError(f"start must be >= 0, got {start}")
        train = self.samples - self.held_out
        if train < 1:
            raise BadArgumentError(f"KD cache {self.path} has {self.samples} sample(s): too few to train on")
        orders: dict[int, np.ndarray] = {}

        def order(epoch: int) -> np.ndarray:
            if epoch not in orders:
                orders.clear()  # a batch spans at most a few epochs: keep the latest
                orders[epoch] = np.random.default_rng([seed, epoch]).permutation(train)
            return orders[epoch]

        b = start
        while True:
            stream = np.arange(b * batch_size, (b + 1) * batch_size)
            index = np.array([order(int(j // train))[j % train] for j in stream])
            yield self._batch(index if part is None else index[part])
            b += 1

    def validation(self, count: int) -> KDBatch:
        """The last ``min(count, held_out)`` samples, which ``batches`` never yields."""
        if count < 1:
            raise BadArgumentError(f"validation count must be >= 1, got {count}")
        if self.held_out == 0:
            raise BadArgumentError(f"KD cache {self.path} has {self.samples} sample(s): none held out for validation")
        n = min(count, self.held_out)
        return self._batch(np.arange(self.samples - n, self.samples))

    def _batch(self, index: np.ndarray) -> KDBatch:
        data = self._arrays()
        lengths = data["lengths"][index]
        mask = (np.arange(self.max_length)[None, :] < lengths[:, None] - 1).astype(np.float32)
        return KDBatch(
            tokens=mx.array(data["tokens"][index]),
            mask=mx.array(mask),
            topk_ids=mx.array(data["topk_ids"][index]),
            topk_logits=mx.array(data["topk_logits"][index].astype(np.float32)),
        )

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._data is None:
            parts = [_read_shard(self.path, s, self.max_length, self.top_k) for s in self.manifest["shards"]]
            self._data = {k: np.concatenate([p[k] for p in parts]) for k in SHARD_ARRAYS}
        return self._data


SHARD_ARRAYS = ("tokens", "lengths", "topk_ids", "topk_logits")


def _read_shard(folder: Path, shard: dict[str, Any], length: int, k: int) -> dict[str, np.ndarray]:
    path = folder / shard["file"]
    n = int(shard["samples"])
    try:
        arrays = mx.load(str(path), format="safetensors")
        assert isinstance(arrays, dict)  # a safetensors file loads as a dict (without metadata)
        data = {name: np.array(arrays[name]) for name in SHARD_ARRAYS}
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise BadArgumentError(f"KD cache shard {path} cannot be read ({e})") from None
    shapes = {"tokens": (n, length), "lengths": (n,), "topk_ids": (n, length, k), "topk_logits": (n, length, k)}
    for name, shape in shapes.items():
        if data[name].shape != shape:
            raise BadArgumentError(f"KD cache shard {path}: {name} is {data[name].shape}, the manifest says {shape}")
    return data


def open_kd_cache(path: Path) -> KDCache:
    """A complete KD cache; one clear line for anything else (missing, corrupt, incomplete)."""
    path = Path(path)
    if not path.is_dir():
        raise BadArgumentError(f"KD cache {path} not found (make it with anemll-mlx kd-cache MODEL --out {path})")
    manifest = _read_manifest(path)
    if manifest is None:
        raise BadArgumentError(f"{path} is not a KD cache: it has no {MANIFEST}")
    if not manifest["complete"]:
        done = sum(int(s["samples"]) for s in manifest["shards"])
        raise BadArgumentError(
            f"KD cache {path} is incomplete ({done} of {manifest['samples']} samples): "
            "rerun kd-cache with the same settings to finish it"
        )
    return KDCache(path, manifest)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, checked; None when there is none; BadArgumentError when it is not ours
    or is damaged, or a shard it lists is missing."""
    file = folder / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadArgumentError(f"KD cache manifest {file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadArgumentError(f"{file} is not a KD cache manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise BadArgumentError(f"KD cache {folder} has format version {manifest.get('version')}; this version reads {VERSION}")
    try:
        for key in ("samples", "max_length", "top_k", "seed"):
            int(manifest[key])
        str(manifest["teacher"]["sha256"]), int(manifest["teacher"]["vocab_size"]), str(manifest["data"]["sha256"])
        shards = [(str(s["file"]), int(s["samples"])) for s in manifest["shards"]]
        bool(manifest["complete"])
    except (KeyError, TypeError, ValueError):
        raise BadArgumentError(f"KD cache manifest {file} is damaged (a key is missing or malformed)") from None
    for name, _ in shards:
        if Path(name).name != name or not (folder / name).is_file():
            raise BadArgumentError(f"KD cache {folder} lacks its shard {name}")
    if manifest["complete"] and sum(n for _, n in shards) != int(manifest["samples"]):
        raise BadArgumentError(f"KD cache manifest {file} is damaged (its shards do not add up to its samples)")
    return manifest


# --- building a cache


def check_settings(args: BaseArgs, samples: int, max_length: int, top_k: int) -> None:
    """The numeric settings against the model's shape (its config is enough: before loading)."""
    if samples < 1:
        raise BadArgumentError(f"--samples must be >= 1, got {samples}")
    if not 2 <= max_length <= args.max_position_embeddings:
        raise BadArgumentError(
            f"--max-length must be between 2 and the model's context {args.max_position_embeddings}, got {max_length}"
        )
    if not 1 <= top_k <= args.vocab_size:
        raise BadArgumentError(f"--top-k must be between 1 and the vocabulary size {args.vocab_size}, got {top_k}")


def check_out(out: Path, protect: list[Path | str | None] | None = None) -> None:
    """``out`` may become a KD cache: new, empty, or a KD cache already (resumed or reused, once
    its settings are compared); anything else is refused before the model loads."""
    out = Path(out)
    if out.is_dir() and not out.is_symlink() and (out / MANIFEST).exists():
        _read_manifest(out)
        return
    if out.is_dir() and any(out.iterdir()):
        raise BadArgumentError(f"--out {out} exists and is not a KD cache: name a new or empty folder")
    OutputFolder.check(out, kind=KIND, protect=protect or [])


def build_kd_cache(
    lm: LoadedModel,
    out: Path,
    data: list[Path] | None = None,
    samples: int = 1024,
    max_length: int = 128,
    top_k: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    world: World = SINGLE,
) -> KDCache:
    """Make (or finish, or find complete) the KD cache of ``lm`` in ``out``; see the module doc.

    A folder holding a cache made with other settings or another model is refused, naming what
    differs; one holding this very cache, incomplete, is finished from its last whole shard.

    Several ranks (``world``) make the shards round-robin, W at a time; rank 0 gathers each round
    and writes it, so the cache is the one a single process makes (a shard depends only on its
    samples and the seed), and only rank 0 touches ``out``.  ``progress`` is called on rank 0.
    """
    out = Path(out)
    args = lm.model.args
    check_settings(args, samples, max_length, top_k)
    main = world.main
    with world.together():
        if main:
            check_out(out, [lm.path])
        specs, source, data_sha = _plan(lm, data, samples, max_length, seed)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"source": lm.source, "sha256": lm.content_sha256, "vocab_size": args.vocab_size},
        "data": {"source": source, "sha256": data_sha},
        "samples": len(specs),
        "max_length": max_length,
        "top_k": top_k,
        "seed": seed,
        "shards": [],
        "complete": False,
    }
    with world.together():
        found = _read_manifest(out) if main and out.is_dir() else None
        if found is not None:
            _compare(out, found, manifest)
            manifest["shards"] = found["shards"]
    done = sum(s["samples"] for s in manifest["shards"])
    done = int(world.broadcast_numbers([float(done)])[0])
    if main and progress is not None:
        progress(done, len(specs))
    if done == len(specs):
        return KDCache(out, found if found is not None else _finished(manifest))
    if main:
        out.mkdir(parents=True, exist_ok=True)
    eos = set(lm.tokenizer.eos_token_ids)
    first_shard, shards = done // SHARD_SAMPLES, -(-len(specs) // SHARD_SAMPLES)
    with _float32(lm):
        for round_start in range(first_shard, shards, world.size):
            interrupts.check()
            mine = round_start + world.rank
            if mine < shards:
                rows = specs[mine * SHARD_SAMPLES : (mine + 1) * SHARD_SAMPLES]
                shard = _make_shard(lm.model, rows, max_length, top_k, seed, eos)
            else:  # past the end: this rank's place in the last round holds nothing
                shard = _empty(0, max_length, top_k)
            made = _gather_shards(world, shard, max_length, top_k)
            if not main:
                continue
            for index, shard in enumerate(made, start=round_start):
                if index >= shards:
                    break
                name = f"shard-{index:05d}.safetensors"
                with OutputFile.check(out / name, force=True).build() as partial:
                    mx.save_safetensors(str(partial), {k: mx.array(v) for k, v in shard.items()})
                manifest["shards"].append({"file": name, "samples": len(shard["lengths"])})
                manifest["complete"] = index == shards - 1
                _write_manifest(out, manifest)
                if progress is not None:
                    progress(min((index + 1) * SHARD_SAMPLES, len(specs)), len(specs))
    if not main:
        manifest = _finished(manifest)
    return KDCache(out, manifest, built=len(specs) - done)


def _finished(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest rank 0 writes for ``manifest``'s samples once every shard is made (its shards
    are cut the same way on every rank)."""
    n = int(manifest["samples"])
    shards = [
        {"file": f"shard-{i:05d}.safetensors", "samples": min(SHARD_SAMPLES, n - i * SHARD_SAMPLES)}
        for i in range(-(-n // SHARD_SAMPLES))
    ]
    return {**manifest, "shards": shards, "complete": True}


def _gather_shards(world: World, shard: dict[str, np.ndarray], length: int, k: int) -> list[dict[str, np.ndarray]]:
    """Every rank's shard of this round, in rank order (each padded to ``SHARD_SAMPLES`` rows for
    the exchange, cut back to its real rows after)."""
    if world.size == 1:
        return [shard]
    padded = _empty(SHARD_SAMPLES, length, k)
    rows = len(shard["lengths"])
    for name in SHARD_ARRAYS:
        padded[name][:rows] = shard[name]
    arrays = {name: mx.array(v) for name, v in padded.items()} | {"rows": mx.array([rows], mx.int32)}
    gathered = world.gather(arrays)
    out = []
    for one in gathered:
        n = int(one["rows"][0])
        out.append({name: np.array(one[name][:n]) for name in SHARD_ARRAYS})
    return out


def _compare(out: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to mix two caches in one folder, naming what differs."""
    if found["teacher"]["sha256"] != wanted["teacher"]["sha256"]:
        raise BadArgumentError(
            f"KD cache {out} was made by another model (teacher sha256 {found['teacher']['sha256'][:12]}..., "
            f"{wanted['teacher']['source']} is {wanted['teacher']['sha256'][:12]}...): choose another --out"
        )
    if found["data"]["sha256"] != wanted["data"]["sha256"]:
        raise BadArgumentError(
            f"KD cache {out} was made from other data ({found['data']['source']}, sha256 "
            f"{found['data']['sha256'][:12]}...): choose another --out"
        )
    for key, flag in (("max_length", "--max-length"), ("top_k", "--top-k"), ("seed", "--seed"), ("samples", "--samples")):
        if int(found[key]) != int(wanted[key]):
            what = "samples (of the data)" if key == "samples" else flag
            raise BadArgumentError(
                f"KD cache {out} was made with {what} {found[key]}, not {wanted[key]}: choose another --out"
            )


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """The marker (so other commands' --force may replace the folder), then the manifest, each
    written beside and renamed over the old one."""
    entries = [MANIFEST] + [s["file"] for s in manifest["shards"]]
    OutputFile.check(out / MARKER, force=True).write_text(marker_text(KIND, entries))
    OutputFile.check(out / MANIFEST, force=True).write_text(json.dumps(manifest, indent=2) + "\n")


class _float32:
    """The teacher in float32 for the duration (as loaded by the CLI, a no-op); put back after."""

    def __init__(self, lm: LoadedModel):
        self.model = lm.model
        self.original = lm.model.parameters() if lm.dtype != mx.float32 else None

    def __enter__(self) -> None:
        if self.original is not None:
            to32 = lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p  # noqa: E731
            self.model.update(tree_map(to32, self.original))

    def __exit__(self, *exc: object) -> None:
        if self.original is not None:
            self.model.update(self.original)


# --- what the samples are


def _plan(
    lm: LoadedModel, data: list[Path] | None, samples: int, max_length: int, seed: int
) -> tuple[list[_Spec], str, str]:
    """The samples to make, the data's name and its sha256."""
    if not data:
        prompts = training_prompts()
        ids = [_prompt_ids(lm.tokenizer.encode_prompt(p, chat=True), max_length) for p in prompts]
        # batch b (GROUP samples) continues prompt b mod P with random key b
        specs = [_Spec(ids[(i // GROUP) % len(ids)], True, i // GROUP) for i in range(samples)]
        digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
        return specs, BUILT_IN, digest
    files = [Path(p) for p in data]
    pieces: list[_Spec] = []
    for sample in read_samples(files, noun="data file"):
        pieces += _pieces(lm, sample, max_length)
    if not pieces:
        raise BadArgumentError(f"the data ({', '.join(map(str, files))}) holds no piece of 2 tokens or more")
    order = np.random.default_rng(seed).permutation(len(pieces))[:samples]  # an even draw from all files
    specs = [pieces[int(i)] for i in order]
    # each prompt gets its own random key: its number among the chosen samples
    specs = [_Spec(s.ids, s.sampled, i) for i, s in enumerate(specs)]
    return specs, ", ".join(str(p) for p in files), files_sha256(files)


def training_prompts() -> list[str]:
    """The built-in training prompts (data-free KD): many kinds of request in many languages, none
    of them ``compare``'s eval prompts."""
    text = resources.files("anemll_mlx").joinpath("data", TRAINING).read_text(encoding="utf-8")
    return parse_prompts(text, f"anemll_mlx/data/{TRAINING}")


def _pieces(lm: LoadedModel, sample: CalibrationSample, max_length: int) -> list[_Spec]:
    """A data sample as cache samples: plain text cut into ``max_length``-token pieces (each
    document on its own: no attention across documents), a conversation cut to ``max_length``,
    a prompt to be continued.  A piece under 2 tokens has no target and is dropped."""
    ids = sample.ids(lm.tokenizer)
    if sample.messages is not None:
        cut = [ids[:max_length]]
    elif sample.chat:
        return [_Spec(_prompt_ids(ids, max_length), True)] if ids else []
    else:
        cut = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [_Spec(tuple(p), False) for p in cut if len(p) >= 2]


def _prompt_ids(ids: list[int], max_length: int) -> tuple[int, ...]:
    """A prompt leaves at least half the sample to the teacher: a longer one keeps its end (the
    question and the assistant header), since what is wanted is the teacher's answer."""
    return tuple(ids[-max(1, max_length // 2) :])


# --- computing the logits


def _make_shard(
    model: DecoderModel, specs: list[_Spec], length: int, k: int, seed: int, eos: set[int]
) -> dict[str, np.ndarray]:
    """One shard's arrays, job by job: runs of sampled specs sharing prompt and key are one batch,
    runs of given texts go ``TEXT_BATCH`` at a time."""
    parts: list[dict[str, np.ndarray]] = []
    i = 0
    while i < len(specs):
        interrupts.check()
        j = i + 1
        if specs[i].sampled:
            while j < len(specs) and specs[j] == specs[i]:
                j += 1
            parts.append(_continue(model, specs[i], j - i, length, k, seed, eos))
        else:
            while j < len(specs) and j - i < TEXT_BATCH and not specs[j].sampled:
                j += 1
            parts.append(_forward([s.ids for s in specs[i:j]], model, length, k))
        i = j
    shard = {name: np.concatenate([p[name] for p in parts]) for name in SHARD_ARRAYS}
    # entries without a next token are zero, whatever the forward left there
    dead = np.arange(length)[None, :] >= shard["lengths"][:, None] - 1
    shard["topk_ids"][dead] = 0
    shard["topk_logits"][dead] = 0
    return shard


def _top_k(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The ``k`` largest logits along the last axis and their ids, sorted descending."""
    ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    values = mx.take_along_axis(logits, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def _empty(rows: int, length: int, k: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((rows, length), np.int32),
        "lengths": np.zeros(rows, np.int32),
        "topk_ids": np.zeros((rows, length, k), np.int32),
        "topk_logits": np.zeros((rows, length, k), np.float16),
    }


def _forward(pieces: list[tuple[int, ...]], model: DecoderModel, length: int, k: int) -> dict[str, np.ndarray]:
    """Given texts, right-padded into one batch: a causal forward never lets a position see the
    padding after it, so each row's logits are its own."""
    out = _empty(len(pieces), length, k)
    width = max(len(p) for p in pieces)
    for r, p in enumerate(pieces):
        out["tokens"][r, : len(p)] = p
        out["lengths"][r] = len(p)
    cache = model.make_cache(width).repeat(len(pieces))
    logits = model(mx.array(out["tokens"][:, :width]), cache, 0)
    ids, values = _top_k(logits, k)
    out["topk_ids"][:, :width] = np.array(ids)
    out["topk_logits"][:, :width] = np.array(values).astype(np.float16)
    return out


def _continue(
    model: DecoderModel, spec: _Spec, rows: int, length: int, k: int, seed: int, eos: set[int]
) -> dict[str, np.ndarray]:
    """``rows`` sampled continuations of one prompt to ``length`` tokens (or EOS), the top-k of
    every logits row the generation computes: the prompt's from its one prefill (shared by all
    rows), then one per decode step."""
    out = _empty(rows, length, k)
    prompt = list(spec.ids)
    p = len(prompt)
    out["tokens"][:, :p] = prompt
    out["lengths"][:] = p
    cache = model.make_cache(length)
    logits = model(mx.array(prompt)[None], cache, 0)  # (1, p, V)
    ids, values = _top_k(logits[0], k)
    out["topk_ids"][:, :p] = np.array(ids)
    out["topk_logits"][:, :p] = np.array(values).astype(np.float16)
    if p >= length:
        return out
    cache = cache.repeat(rows)
    last = mx.repeat(logits[:, -1], rows, axis=0)  # (rows, V): predicts position p
    state = np.random.SeedSequence([seed, spec.key]).generate_state(1, np.uint64)[0]
    keys = mx.random.split(mx.random.key(int(state)), length)
    alive = np.ones(rows, bool)
    for pos in range(p, length):
        interrupts.check()
        token = mx.random.categorical(last, key=keys[pos])  # temperature 1, each row its own draw
        drawn = np.array(token).astype(np.int32)
        out["tokens"][alive, pos] = drawn[alive]
        out["lengths"][alive] = pos + 1
        alive &= ~np.isin(drawn, list(eos))
        if pos == length - 1 or not alive.any():
            break
        logits = model(token[:, None].astype(mx.int32), cache, pos)  # (rows, 1, V): predicts pos + 1
        ids, values = _top_k(logits[:, 0], k)
        out["topk_ids"][alive, pos] = np.array(ids)[alive]
        out["topk_logits"][alive, pos] = np.array(values).astype(np.float16)[alive]
        last = logits[:, 0]
    return out


__all__ = ["KDBatch", "KDCache", "build_kd_cache", "open_kd_cache", "check_settings", "check_out", "FORMAT", "VERSION"]

"""Writing LUT checkpoints: a model folder every command loads (``loading/checkpoint.py`` reads it,
and documents the format) and the export emits exactly, tables and indices as they are.

``ptq_luts`` is the trainer's starting point (each target fitted by ``fit_lut``, optionally weighted
by calibration statistics); ``write_lut_checkpoint`` writes a model with its LUTs, atomically, and
replaces an earlier checkpoint in one swap, as the trainer does every few steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import BadArgumentError, UnsupportedError
from ..loading import LoadedModel
from ..loading.checkpoint import (
    FORMAT,
    INDICES_SUFFIX,
    LUT_SUFFIX,
    QAT_FILE,
    VERSION,
    WEIGHT_SUFFIX,
    lut_config_to_json,
)
from ..loading.safetensors import SINGLE_NAME
from ..loading.tokenizer import write_tokenizer
from ..models.base import DecoderModel, LUTTarget
from ..ops.vocabulary import Embedding
from ..output import OutputFolder
from ..quant.lut import LUTConfig, LUTWeight, fit_lut

if TYPE_CHECKING:
    from ..probe.calibrate import InputMoments

CHECKPOINT_KIND = "qat-checkpoint"


def quantized_targets(model: DecoderModel, lut: LUTConfig) -> list[LUTTarget]:
    """The LUT targets ``lut`` quantizes; a LUT on the embeddings or the LM head of a model with tied
    embeddings is refused (one table would serve two parts, which the export quantizes apart)."""
    targets = [t for t in model.lut_targets() if lut[t.part] is not None]
    stacked = [t.name for t in targets if t.holder.weight.ndim != 2]
    if stacked:
        raise UnsupportedError(f"LUT checkpoints of stacked expert weights ({stacked[0]}) are not supported yet")
    if "lm_head" not in model and any(isinstance(t.holder, Embedding) for t in targets):
        raise UnsupportedError(
            "a LUT checkpoint cannot quantize the embeddings or the LM head of a model with tied "
            "embeddings (one table serves both; the export quantizes them separately)"
        )
    return targets


def ptq_luts(lm: LoadedModel, lut: LUTConfig, moments: InputMoments | None = None) -> dict[str, LUTWeight]:
    """Post-training LUTs of every target ``lut`` quantizes, by target name: the export's own
    deterministic ``fit_lut``, weighted by ``moments`` (``probe.calibrate.collect_input_moments``)
    where it has statistics for a target, its indices error-compensated where they hold the whole
    second moment.  A model loaded from a checkpoint gives back its own tables (its holders carry
    them already), provided ``lut`` agrees with the checkpoint's."""
    model = lm.model
    targets = quantized_targets(model, lut)
    if model.lut_weights:
        if model.lut != lut:
            raise BadArgumentError(f"this model holds a checkpoint's LUTs ({model.lut}), not {lut}")
        return {t.name: model.lut_weights[t.name] for t in targets}
    out = {}
    for target in targets:
        spec = lut[target.part]
        assert spec is not None
        importance, second = (None, None) if moments is None else moments.stats(target.part, target.name)
        out[target.name] = fit_lut(target.holder.weight, spec, importance=importance, second_moment=second)
    return out


def blank_luts(model: DecoderModel, lut: LUTConfig) -> dict[str, LUTWeight]:
    """Zero tables and indices of the right shapes for every target ``lut`` quantizes: a placeholder
    for a trainer whose state is loaded (``--resume``) or received from rank 0, not a fit."""
    out = {}
    for target in quantized_targets(model, lut):
        spec = lut[target.part]
        assert spec is not None
        rows, columns = target.holder.weight.shape
        out[target.name] = LUTWeight(
            indices=np.zeros((rows, columns), np.uint8),
            lut=np.zeros((spec.num_groups(rows), 2**spec.bits), np.float16),
            spec=spec,
        )
    return out


def write_lut_checkpoint(
    lm: LoadedModel,
    luts: dict[str, LUTWeight],
    lut: LUTConfig,
    out: Path,
    info: dict | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``lm`` with ``luts`` (by target name, one for every target ``lut`` quantizes) as a
    checkpoint folder at ``out``; returns its path.

    Plain weights come from ``lm.model`` in their own dtype (in the family's checkpoint convention:
    ``DecoderModel.unsanitize``), the quantized ones from ``luts`` (tables and indices only).
    ``info``: more keys for qat.json (the trainer's: steps, data, losses...); format, version and
    lut are ours.  The folder is built beside ``out`` and swapped in whole (``output.OutputFolder``):
    an earlier checkpoint there is replaced in one rename, never left half written, and a folder
    holding files anemll-mlx did not write is refused.  ``extra`` writes more files into the folder
    before the swap (the trainer's state for ``--resume``, its loss plot).
    """
    model = lm.model
    if model.fp16_scale is not None:
        raise BadArgumentError(
            "a checkpoint holds the model's own weights: write it before the fp16 scale is applied "
            f"(this model is scaled by {model.fp16_scale})"
        )
    targets = quantized_targets(model, lut)
    _check_luts(targets, luts, lut)
    same = lm.path.resolve() == Path(out).expanduser().resolve()
    if same and lm.lazy:
        raise BadArgumentError(f"{out} is where this lazily loaded model reads its weights: load it whole to rewrite it")
    target = OutputFolder.check(out, kind=CHECKPOINT_KIND, force=True, protect=[] if same else [lm.path], flag="checkpoint")

    quantized = {t.name + WEIGHT_SUFFIX for t in targets}
    flat = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    plain = {k: v for k, v in flat if k not in quantized}
    stored = model.unsanitize(plain)
    _check_round_trip(model, plain, stored)
    tensors: dict[str, mx.array] = dict(stored)
    for t in targets:
        lw = luts[t.name]
        tensors[t.name + LUT_SUFFIX] = mx.array(np.ascontiguousarray(lw.lut, dtype=np.float16))
        tensors[t.name + INDICES_SUFFIX] = mx.array(np.ascontiguousarray(lw.indices, dtype=np.uint8))
    config = dict(lm.config)
    config["tie_word_embeddings"] = "lm_head" not in model
    description: dict[str, Any] = dict(info or {})
    description.update(format=FORMAT, version=VERSION, lut=lut_config_to_json(lut))
    description.setdefault("source", lm.source)

    with target.build() as scratch:
        mx.save_safetensors(str(scratch / SINGLE_NAME), tensors, metadata={"format": "pt"})
        write_tokenizer(lm.tokenizer, lm.folder, scratch)
        (scratch / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (scratch / QAT_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        if extra is not None:
            extra(scratch)
    return target.path


def _check_luts(targets: list[LUTTarget], luts: dict[str, LUTWeight], lut: LUTConfig) -> None:
    """Every quantized target has a LUT of its part's spec and its weight's shape, and nothing else."""
    names = {t.name for t in targets}
    missing, extra = sorted(names - set(luts)), sorted(set(luts) - names)
    if missing or extra:
        raise BadArgumentError(
            f"the LUTs do not match {lut}: " + "; ".join(
                part for part in (
                    f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
                    f"not quantized: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "",
                ) if part
            )
        )  # fmt: skip
    for t in targets:
        lw, spec = luts[t.name], lut[t.part]
        assert spec is not None
        shape = tuple(t.holder.weight.shape)
        rows = shape[0]
        if lw.spec != spec:
            raise BadArgumentError(f"{t.name}: its LUT is {lw.spec}, the {t.part} spec is {spec}")
        if tuple(lw.indices.shape) != shape or lw.indices.dtype != np.uint8:
            raise BadArgumentError(f"{t.name}: indices {lw.indices.dtype} {tuple(lw.indices.shape)}, the weight is {shape}")
        if lw.lut.dtype != np.float16 or tuple(lw.lut.shape) != (spec.num_groups(rows), spec.entries):
            raise BadArgumentError(
                f"{t.name}: table {lw.lut.dtype} {tuple(lw.lut.shape)}, {spec} needs float16 "
                f"({spec.num_groups(rows)}, {spec.entries})"
            )
        if lw.indices.size and int(lw.indices.max()) >= spec.entries:
            raise BadArgumentError(f"{t.name}: an index is past the {spec.entries} entries of its table")


def _check_round_trip(model: DecoderModel, plain: dict[str, mx.array], stored: dict[str, mx.array]) -> None:
    """Loading applies ``sanitize``: it must give back the model's arrays bit for bit."""
    changed = {k for k in plain if stored[k] is not plain[k]}
    if not changed:
        return
    again = model.sanitize({k: stored[k] for k in changed})
    for k in sorted(changed):
        if not mx.array_equal(again[k].astype(plain[k].dtype), plain[k]).item():
            raise UnsupportedError(
                f"{k} cannot be stored in the checkpoint's convention exactly (its load-time fix-up would "
                "not give back the same values)"
            )

"""A whole ``anemll-mlx qat`` run: teacher cache, baselines, training, checkpoints, report.

The order matters for what a user can trust afterwards:

1. the KD cache (given, or built with the defaults beside the checkpoint as ``CKPT.kd-cache``, where
   a rerun or another recipe finds it again; the checkpoint folder itself stays a plain model
   folder that is swapped whole at every save);
2. the baselines on the held-out validation samples: plain post-training LUTs and calibrated ones
   (``probe.calibrate``), the latter being where training starts (or ``--init``'s tables);
3. training, with a checkpoint (plus ``train_state.safetensors`` for ``--resume``) every
   ``save_every`` steps: a killed run loses at most that many steps and resumes bit for bit;
4. validation after training, the final checkpoint (no training state: it is done), qat.json with
   the recipe, hashes, loss history and validation table, and a PNG of the loss curves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from ..distributed import SINGLE, World
from ..errors import BadArgumentError
from ..loading import LoadedModel, load
from ..loading.checkpoint import QAT_FILE, read_qat_info
from ..quant.lut import LUTConfig, LUTWeight, fit_lut
from .checkpoint import blank_luts, ptq_luts, quantized_targets, write_lut_checkpoint
from .kd_cache import KDCache, build_kd_cache, open_kd_cache
from .train import QATSettings, StepResult, Trainer, evaluate_model, luts_in_place

STATE_FILE = "train_state.safetensors"
PLOT_FILE = "qat-loss.png"
VALIDATION_SAMPLES = 32

Stage = Callable[[str], None]  # a line saying what starts now
StepReport = Callable[[int, StepResult, float], None]  # (steps done, result, tokens/s)


@dataclass
class Throughput:
    """Training speed over a run (qat.json's ``throughput``): tokens over all ranks per second of
    steps, and with several ranks the time and bytes of the gradient reduction per step.  The
    first step of a run (or of a resumed run) is left out: it compiles and allocates."""

    ranks: int = 1
    reduced_bytes: int = 0  # per rank and step
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    comm_seconds: float = 0.0
    _first: bool = True

    def add(self, result: StepResult, seconds: float) -> None:
        if self._first:
            self._first = False
            return
        self.steps += 1
        self.tokens += result.tokens
        self.seconds += seconds
        self.comm_seconds += result.comm

    def summary(self) -> dict[str, float]:
        steps = max(1, self.steps)
        return {
            "ranks": self.ranks,
            "steps": self.steps,
            "tokens_per_second": round(self.tokens / max(1e-9, self.seconds), 1),
            "seconds_per_step": round(self.seconds / steps, 4),
            "comm_seconds_per_step": round(self.comm_seconds / steps, 4),
            "reduced_bytes_per_step": self.reduced_bytes,
        }


@dataclass
class QATReport:
    """What a run measured (qat.json's ``validation`` and ``history``)."""

    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)  # [step, loss, kl, lr]
    steps: int = 0
    seconds: float = 0.0
    overflow_rate: float | None = None
    checkpoint: Path | None = None
    throughput: Throughput = field(default_factory=lambda: Throughput())

    @property
    def got_worse(self) -> bool:
        """Whether training ended worse than its starting point (the calibrated fit)."""
        start = self.validation.get("calibrated PTQ") or self.validation.get("init")
        end = self.validation.get("QAT")
        return bool(start and end and end["kl"] > start["kl"])


def default_cache_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.kd-cache"


def _settings_json(settings: QATSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["lut"] = {part: None if spec is None else str(spec) for part, spec in settings.lut.items()}
    data["train"] = list(settings.train)
    return data


def check_resume(out: Path, resume: bool, settings: QATSettings) -> dict[str, Any] | None:
    """The saved run to continue (its qat.json), None for a fresh start; a clear error when ``out``
    exists without ``--resume``, or holds another recipe, a finished run or no training state."""
    if not out.exists():
        if resume:
            raise BadArgumentError(f"--resume: {out} does not exist (nothing to resume)")
        return None
    if not resume:
        raise BadArgumentError(
            f"{out} already exists: pass --resume to continue its training, or choose another --out"
        )
    try:
        info = read_qat_info(out)
    except Exception as e:  # CorruptModelError and friends: say it as one line
        raise BadArgumentError(f"--resume: {out} is not a QAT checkpoint ({e})") from None
    if info.get("complete"):
        raise BadArgumentError(
            f"--resume: {out} is a finished run ({info.get('step')} steps): nothing to resume"
        )
    if not (out / STATE_FILE).is_file():
        raise BadArgumentError(f"--resume: {out} has no {STATE_FILE}")
    saved = info.get("recipe")
    wanted = _settings_json(settings)
    if saved != wanted:
        differ = sorted(k for k in set(saved or {}) | set(wanted) if (saved or {}).get(k) != wanted.get(k))
        raise BadArgumentError(
            f"--resume: {out} was trained with other settings ({', '.join(differ)} differ)"
        )
    return info


def check_init(init: str, lm: LoadedModel) -> None:
    """``--init`` must be a QAT checkpoint trained from this very model (its teacher's hash)."""
    try:
        teacher = read_qat_info(Path(init)).get("teacher") or {}
    except Exception as e:
        raise BadArgumentError(f"--init {init} is not a QAT checkpoint ({e})") from None
    if teacher.get("sha256") != lm.content_sha256:
        raise BadArgumentError(
            f"--init {init} is a checkpoint of another model (trained from {teacher.get('source')}, "
            f"not from {lm.source})"
        )


def starting_luts(
    lm: LoadedModel, lut: LUTConfig, init: str | None, stage: Stage
) -> tuple[dict[str, LUTWeight], str]:
    """(starting LUTs, what they are): calibrated PTQ, or ``--init``'s
    tables (refitted to ``lut`` where its spec differs: progressive 4-bit -> 2-bit)."""
    if init is None:
        from ..probe.calibrate import calibration_set, collect_input_moments

        stage("calibration statistics (built-in prompts)")
        # weighted, not error-compensated: training tables over compensated indices ended worse on
        # SmolLM2 LUT 4,4 (compare KL 0.183 against 0.156 from the weighted fit, same run otherwise)
        moments = collect_input_moments(lm, calibration_set(), full_width=0)
        stage("calibrated post-training fit")
        return ptq_luts(lm, lut, moments), "calibrated PTQ"
    start = load(init, "float32")  # run_qat has checked it was trained from this model
    if not start.model.lut_weights:
        raise BadArgumentError(f"--init {init} is not a LUT checkpoint")
    modules = dict(start.model.named_modules())
    luts = {}
    stage(f"starting from {init}'s tables (refitted where their spec differs)")
    for target in quantized_targets(lm.model, lut):
        spec = lut[target.part]
        assert spec is not None
        have = start.model.lut_weights.get(target.name)
        if have is not None and have.spec == spec:
            luts[target.name] = have
        else:  # refit the init's own (dequantized) weights: its tables' values carry what it learned
            luts[target.name] = fit_lut(modules[target.name].weight, spec)
    return luts, "init"


def run_qat(
    model: str,
    out: Path,
    settings: QATSettings,
    kd_dir: Path | None = None,
    init: str | None = None,
    resume: bool = False,
    stage: Stage = lambda line: None,
    on_step: StepReport | None = None,
    baselines: bool = True,
    kd_progress: Callable[[int, int], None] | None = None,
    world: World = SINGLE,
) -> QATReport:
    """Train ``model``'s LUT weights as ``settings`` say and write the checkpoint ``out``.

    With several ranks (``world``), every rank loads the model and reads the KD cache and trains on
    its share of each global batch; rank 0 alone checks and writes ``out``, computes the starting
    tables and the validation, and hands its state to the others (``Trainer.sync``), so a run
    resumes on any number of ranks.  ``stage`` and ``on_step`` are called on rank 0 only.
    """
    settings.check()
    world.check_batch(settings.batch_size)
    out = Path(out)
    main = world.main
    stage = stage if main else (lambda line: None)
    with world.together():
        saved = check_resume(out, resume, settings) if main else None
        lm = load(model, "float32")
        quantized_targets(lm.model, settings.lut)  # a tied head or embeddings under a LUT: refused now
        if lm.model.lut_weights:
            raise BadArgumentError(
                f"{model} is a LUT checkpoint: train from its source model, with --init {model}"
            )
        if init is not None and saved is None and main:
            check_init(init, lm)
    kd = _kd_cache(lm, out, kd_dir, stage, kd_progress, world)
    report = QATReport()
    started = time.perf_counter()

    with world.together():  # the other ranks wait here for rank 0's baselines and starting point
        validation = kd.validation(min(VALIDATION_SAMPLES, kd.held_out)) if main else None
        if not main or saved is not None:  # shapes only: rank 0's state replaces them (Trainer.sync)
            luts = blank_luts(lm.model, settings.lut)
        if main and saved is None:
            if baselines:
                stage("plain post-training fit")
                plain = ptq_luts(lm, settings.lut)
                report.validation["plain PTQ"] = _validate(lm, plain, validation)
            luts, label = starting_luts(lm, settings.lut, init, stage)
            report.validation[label] = _validate(lm, luts, validation)
        elif saved is not None:
            report.validation = saved["validation"]
            report.history = saved["history"]

    trainer = Trainer(lm.model, luts, settings, world)
    if saved is not None:
        trainer.load_state(
            cast(dict[str, mx.array], mx.load(str(out / STATE_FILE))),
            int(saved["step"]),
            saved.get("loss_scale"),
        )
    trainer.sync()
    if resume:
        stage(f"resuming at step {trainer.step} of {settings.steps}")
    batch_rows = world.part(settings.batch_size)
    batches = kd.batches(settings.batch_size, settings.seed, start=trainer.step, part=batch_rows)
    info = {
        "recipe": _settings_json(settings),
        "teacher": {"source": lm.source, "sha256": lm.content_sha256},
        "kd_cache": {"path": str(kd.path), "data": kd.manifest["data"], "samples": kd.samples},
        "init": init,
    }
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    stage(f"training {len(trainer.targets)} LUT weights for {settings.steps} steps{ranks}")
    report.throughput = Throughput(ranks=world.size, reduced_bytes=trainer.reduced_bytes() if world.size > 1 else 0)
    while trainer.step < settings.steps:
        t0 = time.perf_counter()
        result = trainer.train_step(next(batches))
        seconds = time.perf_counter() - t0
        report.throughput.add(result, seconds)
        report.history.append([trainer.step, result.loss, result.kl, result.lr])
        if on_step is not None and main:
            on_step(trainer.step, result, result.tokens / max(1e-9, seconds))
        if main and trainer.step % settings.save_every == 0 and trainer.step < settings.steps:
            _save(lm, trainer, out, info, report, complete=False)

    report.steps = trainer.step
    if not main:
        return report
    stage("validation after training")
    with trainer.source_weights():
        report.validation["QAT"] = _validate(lm, trainer.luts(), validation)
    report.seconds = time.perf_counter() - started
    report.overflow_rate = trainer.scaler.overflow_rate if trainer.scaler else None
    report.checkpoint = _save(lm, trainer, out, info, report, complete=True)
    return report


def _kd_cache(
    lm: LoadedModel,
    out: Path,
    kd_dir: Path | None,
    stage: Stage,
    progress: Callable[[int, int], None] | None,
    world: World,
) -> KDCache:
    """The given cache, or the default one built beside ``out`` (by all ranks, written by rank 0);
    every rank must be able to read it (one host, or a folder the hosts share)."""
    if kd_dir is None:
        kd_dir = default_cache_dir(out)
        stage(f"KD cache {kd_dir} (the teacher's top-k logits; reused by reruns)")
        build_kd_cache(lm, kd_dir, progress=progress, world=world)
    with world.together():
        kd = open_kd_cache(kd_dir)
        kd.check_teacher(lm)
        kd.read()  # a rank that cannot read the shards fails here, together with the others
    return kd


def _validate(lm: LoadedModel, luts: dict[str, LUTWeight], batch: Any) -> dict[str, float]:
    """KL and match of ``lm`` with ``luts`` in place, against the teacher on ``batch``."""
    with luts_in_place(lm.model, luts) as model:
        kl, match = evaluate_model(model, batch)
    return {"kl": kl, "match": match}


def _save(
    lm: LoadedModel, trainer: Trainer, out: Path, info: dict, report: QATReport, complete: bool
) -> Path:
    """The checkpoint as it stands, swapped in whole; with the training state unless complete."""
    luts = trainer.luts()
    details = dict(info)
    details.update(
        step=trainer.step,
        complete=complete,
        validation=report.validation,
        history=report.history,
        loss_scale=trainer.scaler.state() if trainer.scaler else None,
        overflow_rate=report.overflow_rate,
        seconds=round(report.seconds, 1),
        throughput=report.throughput.summary(),
    )

    def extra(folder: Path) -> None:
        if complete:
            _plot(report, folder / PLOT_FILE)
        else:
            mx.save_safetensors(str(folder / STATE_FILE), trainer.state())

    with trainer.source_weights():
        return write_lut_checkpoint(lm, luts, trainer.settings.lut, out, details, extra)


def _plot(report: QATReport, path: Path) -> None:
    """Loss and soft-KL per step, with the validation KL before and after as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row[0] for row in report.history if row[1] == row[1]]  # skipped steps are NaN
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    try:
        ax.plot(
            steps, [row[1] for row in report.history if row[1] == row[1]], label="training loss", linewidth=1
        )
        ax.plot(
            steps,
            [row[2] for row in report.history if row[2] == row[2]],
            label="soft KL (T^2-scaled)",
            linewidth=1,
        )
        for (name, row), style in zip(report.validation.items(), (":", "--", "-.", "-")):
            ax.axhline(
                row["kl"], linestyle=style, color="gray", label=f"validation KL, {name}: {row['kl']:.3f}"
            )
        ax.set_xlabel("step")
        ax.set_ylabel("loss / KL")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


__all__ = ["run_qat", "QATReport", "default_cache_dir", "check_resume", "QAT_FILE"]

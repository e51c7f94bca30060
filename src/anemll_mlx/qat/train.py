"""The QAT loop: distil the float model into its LUT version, one optimizer step at a time.

The student is the loaded model itself.  Its quantized holders get, for each forward, the weight
``TrainableLUT.weight`` computes from the trainable tables and latent weights (everything else
stays frozen at the teacher's values), so training runs the model's own forward on MLX with no
second definition.  The teacher exists only as its cached top-k logits (``kd_cache``).

Optimisation: AdamW per trained group (tables at ``lr``, latent weights at ``lr * weights_lr``:
moving a latent weight matters only when it crosses a midpoint, moving a table entry moves every
element assigned to it), linear warm-up then cosine decay to a tenth, global gradient-norm
clipping.  Latent weights are reassigned to their nearest entries every ``reassign_every`` steps
(a full reassignment costs about as much as a forward on the CPU; in between the straight-through
gradient keeps flowing to the latent weights).

``precision="fp16"``: the frozen weights and the student's quantized weights are cast to fp16 and
the forward and backward run in fp16 (fp32 master tables and latent weights), with dynamic loss
scaling (``LossScale``).  Either way the tables are rounded to fp16 in the forward, as exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import interrupts
from ..distributed import SINGLE, World
from ..errors import BadArgumentError, UnsupportedError
from ..models.base import DecoderModel, LUTTarget
from ..ops.mlx_ops import MLXOps
from ..ops.vocabulary import Embedding, Step
from ..quant.lut import LUTConfig, LUTWeight
from .fake_quant import TrainableLUT, nearest_indices
from .losses import LossWeights, drift, kd_loss

TRAINABLE = ("tables", "weights")
PRECISIONS = ("fp32", "fp16")
SCHEDULES = ("e2e", "lbl", "lbl+e2e")


@dataclass
class QATSettings:
    """Everything that decides a training run (recorded in qat.json)."""

    lut: LUTConfig
    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-4
    weights_lr: float = 0.1  # latent weights train at lr * weights_lr
    train: tuple[str, ...] = ("tables",)
    schedule: str = "e2e"
    layer_weight: float = 1.0  # the layer-by-layer term's weight (schedules lbl, lbl+e2e)
    loss: LossWeights = field(default_factory=LossWeights)
    precision: str = "fp32"
    seed: int = 0
    warmup: int | None = None  # default: a tenth of the steps, at most 100
    clip: float = 1.0
    reassign_every: int = 10
    save_every: int = 100

    def check(self) -> None:
        """Bad values -> one ``BadArgumentError`` line, before anything loads."""
        if self.steps < 1:
            raise BadArgumentError(f"--steps must be >= 1, got {self.steps}")
        if self.save_every < 1:
            raise BadArgumentError(f"--save-every must be >= 1, got {self.save_every}")
        if self.batch_size < 1:
            raise BadArgumentError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadArgumentError(f"--lr must be a finite number > 0, got {self.lr}")
        if not self.train or any(t not in TRAINABLE for t in self.train):
            raise BadArgumentError(
                f"--train takes tables, weights or tables,weights, got {','.join(self.train)}"
            )
        if self.schedule not in SCHEDULES:
            raise BadArgumentError(
                f"--schedule {self.schedule} is not supported (supported: {', '.join(SCHEDULES)})"
            )
        if self.precision not in PRECISIONS:
            raise BadArgumentError(f"--precision takes fp32 or fp16, got {self.precision}")
        if not self.loss.temperature > 0:
            raise BadArgumentError(f"--temperature must be > 0, got {self.loss.temperature}")
        if self.loss.hard_top1 < 0 or self.loss.hard_full < 0:
            raise BadArgumentError("--hard-top1-weight and --hard-full-weight must be >= 0")
        if not self.lut:
            raise BadArgumentError(
                "QAT needs a LUT for at least one part (--lut, --lut-lm-head, --lut-embed)"
            )

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)

    def schedule_for(self, peak: float) -> Callable[[mx.array], mx.array]:
        warm = self.warmup_steps
        decay = optim.cosine_decay(peak, max(1, self.steps - warm), peak * 0.1)
        if warm == 0:
            return decay
        return optim.join_schedules([optim.linear_schedule(peak / warm, peak, warm), decay], [warm])


class LossScale:
    """Dynamic loss scaling for fp16 backward passes.

    Start at 2^16; an inf/nan gradient halves the scale and skips the step; ``growth_interval``
    clean steps in a row double it; the scale stays within [1, 2^18].  (The usual interval is 2000
    steps; our runs are hundreds of steps long, so 200.)
    """

    MIN, MAX = 1.0, 2.0**18

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 200):
        self.scale = scale
        self.growth_interval = growth_interval
        self.clean = 0
        self.overflows = 0
        self.steps = 0

    def update(self, finite: bool) -> None:
        self.steps += 1
        if finite:
            self.clean += 1
            if self.clean >= self.growth_interval:
                self.scale = min(self.scale * 2, self.MAX)
                self.clean = 0
        else:
            self.overflows += 1
            self.scale = max(self.scale / 2, self.MIN)
            self.clean = 0

    @property
    def overflow_rate(self) -> float:
        return self.overflows / max(1, self.steps)

    def state(self) -> dict[str, float]:
        return {"scale": self.scale, "clean": self.clean, "overflows": self.overflows, "steps": self.steps}

    def load(self, state: dict[str, float]) -> None:
        self.scale, self.clean = float(state["scale"]), int(state["clean"])
        self.overflows, self.steps = int(state["overflows"]), int(state["steps"])


class _NoCache:
    """Training sees whole sequences: attention reads the keys and values of this call only."""

    context = 1 << 30

    def update(self, layer: int, k: mx.array, v: mx.array, step: Step) -> tuple[mx.array, mx.array]:
        return k, v


def forward(
    model: DecoderModel, tokens: mx.array, ops: MLXOps | None = None, layer_outputs: list[mx.array] | None = None
) -> mx.array:
    """Logits (B, T, vocab) of whole sequences ``tokens`` (B, T) from position 0, no cache.

    ``layer_outputs``: a list that receives every decoder layer's output (the layer-by-layer loss).
    """
    ops = ops or MLXOps()
    step = model.mlx_step(0, tokens.shape[1], _NoCache())  # type: ignore[arg-type]
    h = model.embed(ops, tokens)
    if layer_outputs is None:
        h = model.forward_layers(ops, h, step)
    else:
        for i in range(len(model.blocks)):
            h = model.forward_layers(ops, h, step, range(i, i + 1))
            layer_outputs.append(h)
    return model.logits(ops, model.final_norm(ops, h))[0]


def layer_loss(student: list[mx.array], teacher: list[mx.array], mask: mx.array) -> mx.array:
    """Mean over layers of each layer output's squared error relative to the teacher's energy
    (residual streams grow along the depth: relative errors weigh the layers alike)."""
    weights = mask[..., None]
    terms = [
        ((s.astype(mx.float32) - t.astype(mx.float32)) ** 2 * weights).sum()
        / mx.maximum((t.astype(mx.float32) ** 2 * weights).sum(), 1e-12)
        for s, t in zip(student, teacher)
    ]
    return mx.stack(terms).mean()


@dataclass
class StepResult:
    loss: float
    kl: float
    lr: float
    skipped: bool
    tokens: int  # over all ranks
    scale: float | None = None  # the loss scale this step ran with (fp16)
    comm: float = 0.0  # seconds this step spent in the gradient reduction (several ranks)


class Trainer:
    """Trains the LUT targets of ``model`` from the starting fits ``luts`` (keyed by target name).

    Data-parallel over ``world``: every rank runs the step on its share of the global batch; the
    gradients are averaged, weighted by each rank's target tokens, in one reduction, so every rank
    takes the same optimizer step as one process would on the whole batch (to float32 summation
    order).  The layer-by-layer term is a ratio of sums per rank, averaged the same way: close to,
    not equal to, the single-process value.  ``sync`` gives every rank rank 0's state first.
    """

    def __init__(
        self, model: DecoderModel, luts: dict[str, LUTWeight], settings: QATSettings, world: World = SINGLE
    ):
        self.model = model
        self.settings = settings
        self.world = world
        self.targets: list[tuple[LUTTarget, TrainableLUT]] = []
        for target in model.lut_targets():
            spec = settings.lut[target.part]
            if spec is None:
                continue
            if isinstance(target.holder, Embedding) and "lm_head" not in model:
                raise UnsupportedError(
                    "LUT training of the embeddings or the LM head needs untied weights (this model ties them)"
                )
            if target.holder.weight.ndim != 2:
                raise UnsupportedError(f"LUT training of stacked expert weights ({target.name}) is not supported yet")
            if target.name not in luts:
                raise BadArgumentError(f"no starting LUT for {target.name}")
            rows, columns = target.holder.weight.shape
            self.targets.append((target, TrainableLUT(target.name, spec, (rows, columns))))
        self.train_tables = "tables" in settings.train
        self.train_weights = "weights" in settings.train
        self.params: dict[str, dict[str, mx.array]] = {}
        self.indices: dict[str, mx.array] = {}
        for target, trainable in self.targets:
            lw = luts[target.name]
            self.params[target.name] = trainable.params(lw, target.holder.weight)
            self.indices[target.name] = mx.array(lw.indices.reshape(lw.lut.shape[0], -1))
        self.dtype = mx.float16 if settings.precision == "fp16" else mx.float32
        self._cast_frozen()
        self.opt_tables = optim.AdamW(settings.schedule_for(settings.lr), weight_decay=0.0)
        self.opt_weights = optim.AdamW(
            settings.schedule_for(settings.lr * settings.weights_lr), weight_decay=0.0
        )
        for key, opt in self._optimizers():
            # the state's arrays exist from the start (zeros, as the first update would make
            # them): a resumed or synchronised run fills in the same tree on every rank
            opt.init({_flat(name): p[key] for name, p in self.params.items()})
        self.scaler = LossScale() if settings.precision == "fp16" else None
        self.step = 0
        self._grad = mx.value_and_grad(self._loss)

    # --- the forward with trained weights in place

    def _cast_frozen(self) -> None:
        """fp16 training: every frozen weight in fp16 (the originals kept for ``source_weights``)."""
        self._originals: dict[int, dict[str, mx.array]] = {}
        quantized = {id(target.holder) for target, _ in self.targets}
        for _, module in self.model.named_modules():
            if id(module) in quantized:
                continue
            for name, value in module.parameters().items():
                if (
                    isinstance(value, mx.array)
                    and mx.issubdtype(value.dtype, mx.floating)
                    and value.dtype != self.dtype
                ):
                    self._originals.setdefault(id(module), {})[name] = value
                    setattr(module, name, value.astype(self.dtype))

    @contextmanager
    def _weights(self, params: dict[str, dict[str, mx.array]]) -> Iterator[None]:
        """The quantized holders hold ``params``' exported weights (at the current assignments) for
        one forward, then their own again."""
        saved = []
        for target, trainable in self.targets:
            weight = trainable.weight(params[target.name], self.indices[target.name]).astype(self.dtype)
            saved.append((target.holder, target.holder.weight))
            target.holder.weight = weight
        try:
            yield
        finally:
            for holder, weight in saved:
                holder.weight = weight

    def _merged(self, trainable: dict[str, dict[str, mx.array]]) -> dict[str, dict[str, mx.array]]:
        return {name: {**self.params[name], **trainable.get(name, {})} for name in self.params}

    def _trainable(self) -> dict[str, dict[str, mx.array]]:
        keys = [k for k, on in (("tables", self.train_tables), ("latent", self.train_weights)) if on]
        return {name: {k: p[k] for k in keys} for name, p in self.params.items()}

    def layer_by_layer(self) -> bool:
        """Whether this step adds the layer-by-layer term: always with ``lbl``, for the first
        half of the steps with ``lbl+e2e``."""
        schedule = self.settings.schedule
        return schedule == "lbl" or (schedule == "lbl+e2e" and self.step < self.settings.steps // 2)

    def _loss(self, trainable: dict, batch: Any, scale: float) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        params = self._merged(trainable)
        teacher: list[mx.array] | None = None
        student: list[mx.array] | None = None
        if self.layer_by_layer():  # the teacher's layer outputs: the model with its own weights
            teacher, student = [], []
            forward(self.model, batch.tokens, layer_outputs=teacher)
            teacher = [mx.stop_gradient(h) for h in teacher]
        with self._weights(params):
            logits = forward(self.model, batch.tokens, layer_outputs=student)
        loss, soft = kd_loss(logits, batch.topk_ids, batch.topk_logits, batch.mask, self.settings.loss)
        if teacher is not None and student is not None:
            loss = loss + self.settings.layer_weight * layer_loss(student, teacher, batch.mask)
        return loss * scale, (loss, soft)

    # --- one step

    def train_step(self, batch: Any) -> StepResult:
        """One optimizer step on ``batch`` (a ``kd_cache.KDBatch``); with fp16 a step whose
        gradients overflow is skipped (weights untouched) and the loss scale halved."""
        interrupts.check()
        if self.train_weights and self.step % self.settings.reassign_every == 0:
            self.reassign()
        scale = self.scaler.scale if self.scaler else 1.0
        (_, (loss, soft)), grads = self._grad(self._trainable(), batch, scale)
        if scale != 1.0:
            grads = tree_map(lambda g: g / scale, grads)
        lr = float(self.opt_tables.learning_rate if self.train_tables else self.opt_weights.learning_rate)
        comm = self.world.comm_seconds
        grads, loss, soft, tokens = self._average(grads, loss, soft, batch.mask.sum())
        comm = self.world.comm_seconds - comm
        if self.scaler is not None:
            finite = bool(mx.stack([mx.isfinite(g).all() for g in _leaves(grads)]).all())  # one sync
            finite = finite and math.isfinite(float(loss))
            self.scaler.update(finite)
            if not finite:
                self.step += 1
                return StepResult(float("nan"), float("nan"), lr, True, tokens, scale, comm)
        grads, _ = optim.clip_grad_norm(grads, self.settings.clip)
        for key, opt, on in (
            ("tables", self.opt_tables, self.train_tables),
            ("latent", self.opt_weights, self.train_weights),
        ):
            if not on:
                continue
            group_grads = {_flat(name): g[key] for name, g in grads.items()}
            group = {_flat(name): p[key] for name, p in self.params.items()}
            updated = opt.apply_gradients(group_grads, group)
            for name, p in self.params.items():
                p[key] = updated[_flat(name)]
        mx.eval(self.params, self.opt_tables.state, self.opt_weights.state)
        self.step += 1
        return StepResult(float(loss), float(soft), lr, False, tokens, scale if self.scaler else None, comm)

    def _average(self, grads: Any, loss: mx.array, soft: mx.array, tokens: mx.array) -> tuple[Any, mx.array, mx.array, int]:
        """(gradients, loss, soft KL, target tokens) over the global batch.  Each rank's loss is a
        mean over its own tokens, so the global mean weights rank r by its share n_r / N: one
        reduction sums n_r * g_r for every gradient together with n_r, n_r * loss, n_r * soft."""
        if self.world.size == 1:
            return grads, loss, soft, int(tokens)
        # by hand, not tree_flatten: target names hold dots, which MLX's tree paths split on
        leaves = [(name, key, g) for name, group in grads.items() for key, g in group.items()]
        n = tokens.astype(mx.float32)
        summed = self.world.all_sum_flat([g * n for _, _, g in leaves] + [mx.stack([n, loss * n, soft * n])])
        total = summed[-1]
        count = mx.maximum(total[0], 1.0)
        averaged: dict[str, dict[str, mx.array]] = {name: {} for name in grads}
        for (name, key, _), g in zip(leaves, summed[:-1]):
            averaged[name][key] = g / count
        return averaged, total[1] / count, total[2] / count, int(total[0])

    def reduced_bytes(self) -> int:
        """Bytes each rank sends into the gradient reduction per step (float32)."""
        trained = [k for k, on in (("tables", self.train_tables), ("latent", self.train_weights)) if on]
        return 4 * (3 + sum(int(p[k].size) for p in self.params.values() for k in trained))

    def _optimizers(self) -> list[tuple[str, optim.Optimizer]]:
        """(parameter key, optimizer) of each group that trains."""
        groups = (("tables", self.opt_tables, self.train_tables), ("latent", self.opt_weights, self.train_weights))
        return [(key, opt) for key, opt, on in groups if on]

    def sync(self) -> None:
        """Every rank takes rank 0's trained arrays, assignments, optimizer state, step and loss
        scale: the ranks start (or resume) from one state, whatever each computed or loaded.
        Latent weights that do not train are the loaded model's own on every rank: not sent."""
        if self.world.size == 1:
            return
        frozen_latent = not self.train_weights
        arrays = self.world.broadcast({
            k: v for k, v in self.state().items()
            if not (frozen_latent and (k.endswith(".latent") or k.startswith("opt.latent.")))
        })  # fmt: skip
        for name, p in self.params.items():
            for key in ("tables", "latent"):
                p[key] = arrays.get(f"{name}.{key}", p[key])
            self.indices[name] = arrays[f"{name}.indices"]
        for key, opt in self._optimizers():
            prefix = f"opt.{key}."
            opt.state = tree_unflatten([(k[len(prefix) :], v) for k, v in arrays.items() if k.startswith(prefix)])
        scaler = self.scaler.state() if self.scaler else {"scale": 0.0, "clean": 0, "overflows": 0, "steps": 0}
        numbers = self.world.broadcast_numbers([float(self.step)] + [float(v) for v in scaler.values()])
        self.step = int(numbers[0])
        if self.scaler is not None:
            self.scaler.load(dict(zip(scaler, numbers[1:])))

    def reassign(self) -> None:
        """Every latent weight to its nearest entry of the current fp16 tables."""
        for name, p in self.params.items():
            tables = p["tables"].astype(mx.float16).astype(mx.float32)
            self.indices[name] = nearest_indices(p["latent"], tables)
        mx.eval(self.indices)

    # --- results

    def luts(self) -> dict[str, LUTWeight]:
        """The trained weights as tables and indices, exactly what the checkpoint stores: latent
        weights that train are assigned afresh to their nearest entries (without touching the
        assignments training uses until its next reassignment, so a save changes nothing)."""
        return {
            t.name: trainable.export(
                self.params[t.name], None if self.train_weights else self.indices[t.name]
            )
            for t, trainable in self.targets
        }

    @contextmanager
    def source_weights(self) -> Iterator[None]:
        """The frozen weights as loaded (fp16 training casts them), for saving and validation."""
        current = {id(module): dict(module.parameters()) for _, module in self.model.named_modules()}
        modules = dict((id(m), m) for _, m in self.model.named_modules())
        for key, values in self._originals.items():
            for name, value in values.items():
                setattr(modules[key], name, value)
        try:
            yield
        finally:
            for key, values in self._originals.items():
                for name in values:
                    setattr(modules[key], name, current[key][name])

    # --- state for --resume

    def state(self) -> dict[str, mx.array]:
        """Every array a resumed run needs to continue bit for bit (safetensors-ready)."""
        arrays: dict[str, mx.array] = {}
        for name, p in self.params.items():
            arrays[f"{name}.tables"] = p["tables"]
            arrays[f"{name}.latent"] = p["latent"]
            arrays[f"{name}.indices"] = self.indices[name]
        for key, opt in (("tables", self.opt_tables), ("latent", self.opt_weights)):
            for path, value in cast(list[tuple[str, mx.array]], tree_flatten(opt.state)):
                arrays[f"opt.{key}.{path}"] = value
        return arrays

    def load_state(self, arrays: dict[str, mx.array], step: int, scaler: dict | None) -> None:
        for name, p in self.params.items():
            for key in ("tables", "latent"):
                if f"{name}.{key}" not in arrays:
                    raise BadArgumentError(
                        f"the training state lacks {name}.{key}: it belongs to another run"
                    )
                p[key] = arrays[f"{name}.{key}"]
            self.indices[name] = arrays[f"{name}.indices"]
        for key, opt in (("tables", self.opt_tables), ("latent", self.opt_weights)):
            prefix = f"opt.{key}."
            items = [(k[len(prefix) :], v) for k, v in arrays.items() if k.startswith(prefix)]
            if items:
                opt.state = tree_unflatten(items)
        self.step = step
        if self.scaler is not None and scaler:
            self.scaler.load(scaler)


def _leaves(tree: Any) -> list[mx.array]:
    return [cast(mx.array, item[1]) for item in tree_flatten(tree)]


def _flat(name: str) -> str:
    """A target name as an optimizer-tree key (MLX's tree paths split on dots)."""
    return name.replace(".", "/")


def evaluate_model(model: DecoderModel, batch: Any, chunk: int = 8) -> tuple[float, float]:
    """(KL, match) of ``model`` against the teacher's top-k on ``batch``, ``chunk`` sequences per forward."""
    total_kl = total_match = 0.0
    count = 0
    for start in range(0, batch.tokens.shape[0], chunk):
        interrupts.check()
        part = slice(start, start + chunk)
        logits = forward(model, batch.tokens[part])
        kl, match, n = drift(logits, batch.topk_ids[part], batch.topk_logits[part], batch.mask[part])
        total_kl += kl * n
        total_match += match * n
        count += n
    return total_kl / max(1, count), total_match / max(1, count)


@contextmanager
def luts_in_place(model: DecoderModel, luts: dict[str, LUTWeight]) -> Iterator[DecoderModel]:
    """``model`` computing with ``luts`` (by target name, dequantized: the export's weights) in
    place of its own weights, which are put back afterwards."""
    holders = {t.name: t.holder for t in model.lut_targets() if t.name in luts}
    saved = {name: holder.weight for name, holder in holders.items()}
    try:
        for name, holder in holders.items():
            holder.weight = mx.array(luts[name].dequantize()).astype(holder.weight.dtype)
        yield model
    finally:
        for name, holder in holders.items():
            holder.weight = saved[name]

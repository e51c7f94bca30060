"""QAT on tiny models: the gradients, the loss, training that helps, fp16 loss scaling, resume, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from anemll_mlx.loading import load
from anemll_mlx.qat.checkpoint import ptq_luts
from anemll_mlx.qat.fake_quant import TrainableLUT, nearest_indices
from anemll_mlx.qat.kd_cache import KDCache, build_kd_cache
from anemll_mlx.qat.losses import LossWeights, drift, kd_loss
from anemll_mlx.qat.run import STATE_FILE, VALIDATION_SAMPLES, run_qat
from anemll_mlx.qat.train import LossScale, QATSettings, Trainer
from anemll_mlx.quant.lut import LUTConfig, LUTSpec, fit_lut
from cli_runner import assert_one_error as _one_error
from cli_runner import run_cli as _cli

L, K = 24, 64
LUT44 = LUTConfig(ffn=LUTSpec(4, 4))


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def kd(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> KDCache:
    return build_kd_cache(
        # 4 built-in prompts x GROUP continuations; the held-out samples end the last prompt's run
        load(llama, "float32"), tmp_path_factory.mktemp("kd") / "cache", samples=128, max_length=L, top_k=K
    )


# --- the pieces


def _fitted(rng: np.random.Generator, shape: tuple[int, int], spec: LUTSpec):
    """A random weight, its LUT fit, and the trainable version starting from that fit."""
    w = (rng.normal(size=shape) * 0.05).astype(np.float32)
    lw = fit_lut(w, spec)
    trainable = TrainableLUT("w", spec, shape)
    return lw, trainable, trainable.params(lw, w)


def test_nearest_indices_are_the_fits_and_the_weight_is_what_core_ml_builds() -> None:
    lw, trainable, params = _fitted(np.random.default_rng(0), (32, 48), LUTSpec(4, 4))
    assert np.array_equal(
        np.array(nearest_indices(params["latent"], params["tables"])).reshape(32, 48), lw.indices
    )
    assert np.array_equal(np.array(trainable.weight(params)), lw.dequantize().astype(np.float32))
    exported = trainable.export(params)
    assert np.array_equal(exported.indices, lw.indices) and np.array_equal(exported.lut, lw.lut)


def test_table_gradient_is_the_scatter_sum_and_latent_gets_the_straight_through_gradient() -> None:
    rng = np.random.default_rng(1)
    lw, trainable, params = _fitted(rng, (8, 12), LUTSpec(2, 4))
    x = mx.array(rng.normal(size=(5, 12)).astype(np.float32))
    target = mx.array(rng.normal(size=(5, 8)).astype(np.float32))

    def loss(p):
        return (((x @ trainable.weight(p).T) - target) ** 2).sum()

    grads = mx.grad(loss)(params)
    dense = mx.array(lw.dequantize().astype(np.float32))
    d_weight = np.array(mx.grad(lambda wt: (((x @ wt.T) - target) ** 2).sum())(dense))
    # latent: straight through, the gradient of the quantized weight itself
    assert np.allclose(np.array(grads["latent"]), d_weight, rtol=1e-5, atol=1e-6)
    # tables: every entry collects the gradients of the elements assigned to it
    expected = np.zeros(lw.lut.shape, dtype=np.float64)
    rows_per_group = 4
    for r in range(8):
        for c in range(12):
            expected[r // rows_per_group, lw.indices[r, c]] += d_weight[r, c]
    assert np.allclose(np.array(grads["tables"]), expected, rtol=1e-4, atol=1e-6)


def test_kd_loss_matches_its_formula_and_is_zero_for_the_teacher_itself() -> None:
    rng = np.random.default_rng(2)
    vocab, k, t = 20, 5, 2.0
    student = rng.normal(size=(1, 3, vocab)).astype(np.float32)
    teacher = rng.normal(size=(1, 3, vocab)).astype(np.float32)
    ids = np.argsort(-teacher, axis=-1)[..., :k].astype(np.int32)
    top = np.take_along_axis(teacher, ids, -1)
    mask = np.array([[1, 1, 0]], dtype=np.float32)
    weights = LossWeights(t, 0.1, 5e-4)

    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    sk = np.take_along_axis(student, ids, -1)
    lp, lq = log_softmax(top / t), log_softmax(sk / t)
    soft = (np.exp(lp) * (lp - lq)).sum(-1) * t * t
    full_log = log_softmax(student)
    top1 = -np.take_along_axis(full_log, ids[..., :1], -1)[..., 0]
    full = -(np.exp(log_softmax(top)) * np.take_along_axis(full_log, ids, -1)).sum(-1)
    want = ((soft + 0.1 * top1 + 5e-4 * full) * mask).sum() / mask.sum()
    loss, kl = kd_loss(mx.array(student), mx.array(ids), mx.array(top), mx.array(mask), weights)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(kl) == pytest.approx((soft * mask).sum() / mask.sum(), rel=1e-5)
    kl_self, match_self, count = drift(mx.array(teacher), mx.array(ids), mx.array(top), mx.array(mask))
    # for the teacher itself the drift is only the mass outside its top-k: -log(top-k mass)
    mass = np.exp(np.take_along_axis(log_softmax(teacher), ids, -1)).sum(-1)[0, :2]
    assert (
        count == 2 and match_self == 1.0 and kl_self == pytest.approx(float(-np.log(mass).mean()), rel=1e-5)
    )


# --- training


def _settings(**overrides) -> QATSettings:
    base = dict(lut=LUT44, steps=40, batch_size=4, lr=1e-3, save_every=10)
    base.update(overrides)
    return QATSettings(**base)


def test_training_lowers_the_validation_drift(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    report = run_qat(str(llama), tmp_path / "ck", _settings(), kd.path)
    start, end = report.validation["calibrated PTQ"], report.validation["QAT"]
    # measured: calibrated (the weighted fit, QAT's start) 0.392 -> 0.343 (0.875x), match 61% -> 79%
    assert end["kl"] < 0.9 * start["kl"] and end["match"] > start["match"], report.validation
    assert not report.got_worse
    info = json.loads((tmp_path / "ck" / "qat.json").read_text())
    assert info["complete"] and info["step"] == 40 and len(info["history"]) == 40
    assert info["teacher"]["sha256"] == load(llama, "float32").content_sha256
    assert set(info["validation"]) == {"plain PTQ", "calibrated PTQ", "QAT"}
    assert not (tmp_path / "ck" / STATE_FILE).exists()  # finished: no state for --resume
    assert (tmp_path / "ck" / "qat-loss.png").read_bytes()[:4] == b"\x89PNG"
    # the checkpoint is the model that was validated: its LUT weights give the reported drift
    ckpt = load(tmp_path / "ck", "float32")
    from anemll_mlx.qat.train import evaluate_model

    kl, match = evaluate_model(ckpt.model, kd.validation(VALIDATION_SAMPLES))  # the run's own samples
    assert kl == pytest.approx(end["kl"], rel=1e-4) and match == pytest.approx(end["match"])


def test_resume_after_an_interrupted_run_gives_the_same_weights(
    llama: Path, kd: KDCache, tmp_path: Path
) -> None:
    settings = _settings(steps=12, save_every=4, reassign_every=3)
    whole = tmp_path / "whole"
    run_qat(str(llama), whole, settings, kd.path, baselines=False)

    cut = tmp_path / "cut"

    def kill_at_7(step, result, rate) -> None:
        if step == 7:  # saved at 4; steps 5-7 are lost as with a kill -9
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_qat(str(llama), cut, settings, kd.path, on_step=kill_at_7, baselines=False)
    assert json.loads((cut / "qat.json").read_text())["step"] == 4 and (cut / STATE_FILE).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    run_qat(str(llama), cut, settings, kd.path, resume=True, baselines=False)
    a, b = mx.load(str(whole / "model.safetensors")), mx.load(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert mx.array_equal(a[key], b[key]).item(), key  # bit for bit
    history_a = json.loads((whole / "qat.json").read_text())["history"]
    history_b = json.loads((cut / "qat.json").read_text())["history"]
    assert [row[0] for row in history_b] == list(range(1, 13)) and history_a[-1] == history_b[-1]


def test_layer_by_layer_adds_each_layers_error_for_its_part_of_the_schedule(llama: Path, kd: KDCache) -> None:
    from anemll_mlx.qat.train import forward, layer_loss

    lm = load(llama, "float32")
    luts = ptq_luts(lm, LUT44)
    batch = next(kd.batches(4, 0))
    outputs: list[mx.array] = []
    forward(lm.model, batch.tokens, layer_outputs=outputs)
    assert len(outputs) == len(lm.model.blocks) and float(layer_loss(outputs, outputs, batch.mask)) == 0.0
    e2e = Trainer(lm.model, luts, _settings(steps=4))
    plain = float(e2e._loss(e2e._trainable(), batch, 1.0)[1][0])
    both = Trainer(lm.model, luts, _settings(steps=4, schedule="lbl+e2e"))
    with_layers = float(both._loss(both._trainable(), batch, 1.0)[1][0])
    assert with_layers > plain  # the quantized layers' outputs differ from the teacher's
    phases = []
    for _ in range(4):
        phases.append(both.layer_by_layer())
        both.train_step(batch)
    assert phases == [True, True, False, False]


def test_loss_scaling_skips_an_overflowing_step_and_recovers(llama: Path, kd: KDCache) -> None:
    lm = load(llama, "float32")
    trainer = Trainer(lm.model, ptq_luts(lm, LUT44), _settings(precision="fp16"))
    batch = next(kd.batches(4, 0))
    before = {name: {k: np.array(v) for k, v in p.items()} for name, p in trainer.params.items()}
    trainer.scaler.scale = 2.0**40  # injected: scaled gradients past fp16's range
    result = trainer.train_step(batch)
    assert result.skipped and trainer.scaler.scale == 2.0**39 and trainer.scaler.overflows == 1
    for name, p in trainer.params.items():
        for k, v in p.items():
            assert np.array_equal(np.array(v), before[name][k])  # weights untouched
    trainer.scaler.scale = 2.0**10
    result = trainer.train_step(batch)
    assert not result.skipped and np.isfinite(result.loss)
    assert any(
        not np.array_equal(np.array(p["tables"]), before[n]["tables"]) for n, p in trainer.params.items()
    )


def test_loss_scale_grows_after_clean_steps_within_its_range() -> None:
    scale = LossScale(2.0**17, growth_interval=3)
    for _ in range(6):
        scale.update(True)
    assert scale.scale == LossScale.MAX
    for _ in range(40):
        scale.update(False)
    assert scale.scale == LossScale.MIN and scale.overflow_rate == pytest.approx(40 / 46)


def test_fp16_training_lands_close_to_fp32(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    fp32 = run_qat(str(llama), tmp_path / "a", _settings(steps=25), kd.path, baselines=False)
    fp16 = run_qat(
        str(llama), tmp_path / "b", _settings(steps=25, precision="fp16"), kd.path, baselines=False
    )
    start = fp32.validation["calibrated PTQ"]["kl"]
    a, b = fp32.validation["QAT"]["kl"], fp16.validation["QAT"]["kl"]
    assert b < start and abs(a - b) < 0.1 * (start - a) + 0.01, (start, a, b)
    assert fp16.overflow_rate is not None and fp16.overflow_rate < 0.2
    # the checkpoint holds the source's own plain weights, not their fp16 copies
    src = load(llama, "float32").model.model.norm.weight
    assert mx.array_equal(load(tmp_path / "b", "float32").model.model.norm.weight, src).item()


# --- the command




def test_cli_trains_and_reports(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    result = _cli("qat", llama, "--out", out, "--kd-cache", kd.path, "--steps", "6", "--lr", "1e-3")
    assert result.exit_code == 0, result.stdout + result.stderr
    for row in ("plain PTQ", "calibrated PTQ", "QAT"):
        assert row in result.stdout
    assert load(out, "float32").model.lut == LUT44
    _one_error(_cli("qat", llama, "--out", out, "--kd-cache", kd.path, "--steps", "6"), "pass --resume")
    _one_error(_cli("qat", llama, "--out", out, "--kd-cache", kd.path, "--resume"), "finished run")
    # progressive: 2-bit tables refitted from the 4-bit checkpoint's weights, then trained
    two = tmp_path / "ck2"
    result = _cli(
        "qat", llama, "--out", two, "--kd-cache", kd.path, "--init", out, "--lut", "2,4", "--steps", "4"
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    info = json.loads((two / "qat.json").read_text())
    assert info["init"] == str(out) and set(info["validation"]) == {"plain PTQ", "init", "QAT"}
    assert load(two, "float32").model.lut == LUTConfig(ffn=LUTSpec(2, 4))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kd-cache", "/nonexistent/kd"], "/nonexistent/kd"),
        (["--lut", "4,5"], "does not divide"),
        (["--lut", "5"], "bad LUT spec"),
        (["--steps", "0"], "--steps"),
        (["--train", "scales"], "--train"),
        (["--precision", "bf16"], "--precision"),
        (["--schedule", "layerwise"], "--schedule"),
        (["--lut", "none"], "at least one part"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_cli_refuses_bad_input_before_work(
    llama: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    out = tmp_path / "ck"
    _one_error(_cli("qat", llama, "--out", out, *flags), message)
    assert list(tmp_path.iterdir()) == []  # nothing half written, no cache started


def test_cli_refuses_a_kd_cache_or_init_of_another_model(
    llama: Path, kd: KDCache, tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    other = tiny_model_factory("llama", seed=5)
    _one_error(_cli("qat", other, "--out", tmp_path / "a", "--kd-cache", kd.path), "another model")
    qwen = tiny_model_factory("qwen3")
    ck = tmp_path / "qwen-ck"
    kd_qwen = build_kd_cache(load(qwen, "float32"), tmp_path / "kdq", samples=16, max_length=L, top_k=K)
    done = _cli("qat", qwen, "--out", ck, "--kd-cache", kd_qwen.path, "--steps", "2")
    assert done.exit_code == 0
    _one_error(
        _cli("qat", llama, "--out", tmp_path / "b", "--kd-cache", kd.path, "--init", ck), "another model"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_interrupted_keeps_the_last_checkpoint_and_says_how_to_resume(
    llama: Path, kd: KDCache, tmp_path: Path, monkeypatch
) -> None:
    import signal

    from anemll_mlx import interrupts
    from anemll_mlx.qat import train

    real_step = train.Trainer.train_step

    def step_then_sigint(self, batch):
        if self.step == 3:
            raise interrupts.Interrupted(signal.SIGINT)
        return real_step(self, batch)

    monkeypatch.setattr(train.Trainer, "train_step", step_then_sigint)
    out = tmp_path / "ck"
    flags = ["--kd-cache", kd.path, "--steps", "6", "--save-every", "2"]
    result = _cli("qat", llama, "--out", out, *flags)
    assert result.exit_code == 130, result.stdout + result.stderr
    assert "the checkpoint of step 2 is kept" in result.stderr and "--resume" in result.stderr
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    result = _cli("qat", llama, "--out", out, *flags, "--resume")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads((out / "qat.json").read_text())["step"] == 6


def test_cli_builds_its_kd_cache_beside_the_checkpoint(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    result = _cli("qat", llama, "--out", out, "--steps", "2")
    assert result.exit_code == 0, result.stdout + result.stderr
    cache = tmp_path / "ck.kd-cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == 1024 and manifest["top_k"] == 64
    assert json.loads((out / "qat.json").read_text())["kd_cache"]["path"] == str(cache)
    assert not (out / "kd-cache").exists()  # the checkpoint stays a plain model folder

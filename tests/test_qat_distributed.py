"""QAT and kd-cache over mx.distributed: two ranks of the ring backend on loopback.

Two ranks with global batch B must train what one process trains with batch B (the gradient is
the token-weighted mean over the ranks' halves of each batch), rank 0 alone writes, a killed run
resumes on another number of ranks, and bad input stops every rank with one line from rank 0.
On 2 cores this measures correctness and overhead, not speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from anemll_mlx.loading import load
from anemll_mlx.qat.kd_cache import KDCache, build_kd_cache
from anemll_mlx.qat.run import STATE_FILE, run_qat
from anemll_mlx.qat.train import QATSettings
from anemll_mlx.quant.lut import LUTConfig, LUTSpec
from cli_runner import assert_one_error, run_cli
from ranks import CLI, LAUNCH, free_ports, kill, run_ranks, start_ranks

L, K = 24, 64
LUT44 = LUTConfig(ffn=LUTSpec(4, 4))
# Two ranks sum each gradient in another order than one process does: float32 rounding apart.
# Measured on this model: under 1% of the fp16 table entries one rounding step apart (<= 2.4e-4);
# allow one fp16 step at |x| < 2.
TABLE_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def kd(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> KDCache:
    return build_kd_cache(
        load(llama, "float32"), tmp_path_factory.mktemp("kd") / "cache", samples=64, max_length=L, top_k=K
    )


def _qat_args(llama: Path, kd: Path | str, out: Path | str, steps: int, save_every: int, batch: int = 4) -> list[str]:
    return [
        "qat", str(llama), "--out", str(out), "--kd-cache", str(kd), "--steps", str(steps),
        "--batch-size", str(batch), "--lr", "1e-3", "--save-every", str(save_every),
    ]  # fmt: skip


def _settings(steps: int, save_every: int) -> QATSettings:
    return QATSettings(lut=LUT44, steps=steps, batch_size=4, lr=1e-3, save_every=save_every)


def _assert_same_tables(a: Path, b: Path) -> None:
    first, second = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        x, y = np.array(first[key].astype(mx.float32)), np.array(second[key].astype(mx.float32))
        assert np.abs(x - y).max() <= TABLE_TOLERANCE, (key, np.abs(x - y).max())


def _history(folder: Path) -> list[list[float]]:
    return json.loads((folder / "qat.json").read_text())["history"]


def test_two_ranks_train_what_one_process_trains_and_rank_0_alone_writes(
    llama: Path, kd: KDCache, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    run_qat(str(llama), one, _settings(8, 4), kd.path, baselines=False)

    work = tmp_path / "two-ranks"
    work.mkdir()
    ranks = run_ranks(_qat_args(llama, kd.path, work / "ckpt", 8, 4), work)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == "" and ranks[1].stderr == ""  # rank 1 neither prints nor writes
    assert ranks[0].stdout.count("checkpoint:") == 1 and "2 ranks:" in ranks[0].stdout
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith("hosts-")) == ["ckpt"]
    info = json.loads((work / "ckpt" / "qat.json").read_text())
    assert info["complete"] and info["throughput"]["ranks"] == 2
    assert info["throughput"]["reduced_bytes_per_step"] > 0
    _assert_same_tables(one, work / "ckpt")
    for a, b in zip(_history(one), _history(work / "ckpt")):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-4) and a[2] == pytest.approx(b[2], rel=1e-4)


def test_a_killed_two_rank_run_resumes_on_one_rank(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    steps, every = 40, 4
    whole = tmp_path / "whole"
    run_qat(str(llama), whole, _settings(steps, every), kd.path, baselines=False)

    work = tmp_path / "killed"
    work.mkdir()
    ckpt = work / "ckpt"
    procs = start_ranks(_qat_args(llama, kd.path, ckpt, steps, every), work)
    deadline = time.monotonic() + 120
    try:
        while not (ckpt / STATE_FILE).exists():  # the first checkpoint with its training state
            assert all(p.poll() is None for p in procs), "the ranks ended before their first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
    finally:
        kill(procs)  # kill -9, both ranks
    saved = json.loads((ckpt / "qat.json").read_text())
    assert not saved["complete"] and 0 < saved["step"] < steps

    run_qat(str(llama), ckpt, _settings(steps, every), kd.path, resume=True, baselines=False)
    _assert_same_tables(whole, ckpt)
    assert [row[0] for row in _history(ckpt)] == list(range(1, steps + 1))


def test_kd_cache_under_mlx_launch_is_the_one_process_cache(llama: Path, tmp_path: Path) -> None:
    args = ["kd-cache", str(llama), "--samples", "150", "--max-length", str(L)]  # 3 shards: 2 rounds
    single = run_cli(*args, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.stderr
    port = free_ports(1)[0]
    launched = subprocess.run(
        [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(port), "--", CLI, *args,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert "exited with code" not in launched.stderr, launched.stderr
    assert "on 2 ranks" in launched.stdout
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:  # byte for byte: manifest and every shard
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# --- bad input: one line from rank 0, exit 2 on every rank, nobody left waiting


def _assert_stopped_together(ranks, message: str) -> None:
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    lines = [line for line in ranks[0].stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert ranks[1].stderr.strip() == "" and ranks[1].stdout.strip() == ""


def test_a_global_batch_the_ranks_cannot_split_is_refused(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    ranks = run_ranks(_qat_args(llama, kd.path, tmp_path / "ckpt", 4, 2, batch=3), tmp_path)
    _assert_stopped_together(ranks, "--batch-size 3 does not split over 2 ranks")
    assert not (tmp_path / "ckpt").exists()


def test_a_kd_cache_missing_a_shard_stops_every_rank(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    broken = tmp_path / "kd"
    shutil.copytree(kd.path, broken)
    next(broken.glob("shard-*.safetensors")).unlink()
    ranks = run_ranks(_qat_args(llama, broken, tmp_path / "ckpt", 4, 2), tmp_path)
    _assert_stopped_together(ranks, "lacks its shard")
    assert not (tmp_path / "ckpt").exists()


def test_a_kd_cache_one_host_lacks_stops_every_rank(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    """Rank 1 runs where the relative path leads nowhere (another host without the cache): rank 0
    says so, naming the rank, and neither rank waits for the other."""
    here, there = tmp_path / "host0", tmp_path / "host1"
    here.mkdir(), there.mkdir()
    shutil.copytree(kd.path, here / "kd")
    ranks = run_ranks(_qat_args(llama, "kd", tmp_path / "ckpt", 4, 2), tmp_path, cwds=[here, there])
    _assert_stopped_together(ranks, "rank 1: KD cache kd not found")


def test_a_backend_that_is_not_available_is_one_line(llama: Path, kd: KDCache, tmp_path: Path) -> None:
    alone = run_cli(*_qat_args(llama, kd.path, tmp_path / "ckpt", 4, 2), "--backend", "mpi")
    assert_one_error(alone, "the mpi distributed backend is not available here")
    ranks = run_ranks([*_qat_args(llama, kd.path, tmp_path / "ckpt", 4, 2), "--backend", "jaccl"], tmp_path)
    _assert_stopped_together(ranks, "the jaccl distributed backend is not available here")
    assert_one_error(run_cli(*_qat_args(llama, kd.path, tmp_path / "c", 4, 2), "--backend", "tcp"), "--backend takes")
    assert not (tmp_path / "ckpt").exists()

"""The KD cache: the teacher's top-k logits over its own samples or given text, on disk in the
format the QAT trainer reads; resumable, deterministic, and refused when it is another's."""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from anemll_mlx.errors import BadArgumentError
from anemll_mlx.loading import LoadedModel, load
from anemll_mlx.probe.calibrate import CalibrationSample, read_samples
from anemll_mlx.qat import kd_cache
from anemll_mlx.qat.kd_cache import BUILT_IN, FORMAT, KDCache, build_kd_cache, open_kd_cache
from cli_runner import assert_one_error as _one_error
from cli_runner import run_cli as _cli

L, K = 24, 8  # tiny samples: every test builds in well under a second


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def teacher(llama: Path) -> LoadedModel:
    return load(llama, "float32")


@pytest.fixture(scope="module")
def built(teacher: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> KDCache:
    """A data-free cache of two shards (one full, one of 6), read only."""
    return build_kd_cache(teacher, tmp_path_factory.mktemp("kd") / "cache", samples=70, max_length=L, top_k=K)


def shard_arrays(cache: KDCache) -> list[dict[str, np.ndarray]]:
    return [{k: np.array(v) for k, v in mx.load(str(cache.path / s["file"])).items()} for s in cache.manifest["shards"]]


def reference_logits(lm: LoadedModel, tokens: np.ndarray) -> np.ndarray:
    """The teacher's logits for one sequence, from position 0, batch 1: nothing shared with the cache's code path."""
    cache = lm.model.make_cache(len(tokens))
    return np.array(lm.model(mx.array(tokens)[None], cache, 0)[0])


def check_against_teacher(lm: LoadedModel, cache: KDCache, rows: list[int]) -> None:
    data = cache._arrays()
    for r in rows:
        n = int(data["lengths"][r])
        ref = reference_logits(lm, data["tokens"][r, :n])
        for t in sorted({0, (n - 2) // 2, n - 2}):
            ids, values = data["topk_ids"][r, t], data["topk_logits"][r, t].astype(np.float32)
            assert np.all(np.diff(values) <= 0), "top-k must be sorted descending"
            np.testing.assert_allclose(values, ref[t, ids], rtol=2e-3, atol=2e-3)  # fp16 rounding
            np.testing.assert_allclose(values, np.sort(ref[t])[::-1][:K], rtol=2e-3, atol=2e-3)
        assert not data["topk_ids"][r, n - 1 :].any() and not data["topk_logits"][r, n - 1 :].any()


# --- the format


def test_manifest_and_shards(built: KDCache, teacher: LoadedModel) -> None:
    m = json.loads((built.path / "manifest.json").read_text())
    assert m == built.manifest
    assert m["format"] == FORMAT and m["version"] == 2 and m["complete"] is True
    assert m["teacher"] == {"source": teacher.source, "sha256": teacher.content_sha256, "vocab_size": teacher.model.args.vocab_size}
    assert m["data"]["source"] == BUILT_IN and len(m["data"]["sha256"]) == 64
    assert (m["samples"], m["max_length"], m["top_k"], m["seed"]) == (70, L, K, 0)
    assert m["shards"] == [{"file": "shard-00000.safetensors", "samples": 64}, {"file": "shard-00001.safetensors", "samples": 6}]
    shard = shard_arrays(built)[0]
    assert {k: (v.dtype, v.shape) for k, v in shard.items()} == {
        "tokens": (np.int32, (64, L)),
        "lengths": (np.int32, (64,)),
        "topk_ids": (np.int32, (64, L, K)),
        "topk_logits": (np.float16, (64, L, K)),
    }
    lengths = shard["lengths"]
    assert lengths.min() >= 2 and lengths.max() <= L
    for r in range(64):
        assert not shard["tokens"][r, lengths[r] :].any()  # padded with 0
    # GROUP continuations of one prompt (a batch) share it and differ after it; a shard holds
    # SHARD_SAMPLES / GROUP prompts, one after the other in the built-in training prompts' order
    prompts = [tuple(row[: L // 2]) for row in shard["tokens"]]
    groups = [set(prompts[i : i + kd_cache.GROUP]) for i in range(0, 64, kd_cache.GROUP)]
    assert all(len(g) == 1 for g in groups) and len(set().union(*groups)) == 64 // kd_cache.GROUP
    expected = [
        tuple(teacher.tokenizer.encode_prompt(p, chat=True)[-(L // 2) :])
        for p in kd_cache.training_prompts()[: 64 // kd_cache.GROUP]
    ]
    assert [next(iter(g)) for g in groups] == expected
    assert len({tuple(row) for row in shard["tokens"]}) > 60


def test_training_prompts_are_many_kinds_and_never_the_eval_prompts() -> None:
    from anemll_mlx.eval.prompts import default_prompts

    prompts = kd_cache.training_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & set(default_prompts())
    assert any("\u4e00" <= c <= "\u9fff" for p in prompts for c in p)  # Chinese among them


def test_top_k_logits_are_the_teachers_own(built: KDCache, teacher: LoadedModel) -> None:
    check_against_teacher(teacher, built, [0, 1, 63, 64, 69])


def test_sampled_sequences_stop_at_eos(teacher: LoadedModel, built: KDCache) -> None:
    data = built._arrays()
    eos = teacher.tokenizer.eos_token_ids
    for row, n in zip(data["tokens"], data["lengths"]):
        assert not set(row[L // 2 : n - 1].tolist()) & eos  # no EOS before the last token
        if n < L:
            assert int(row[n - 1]) in eos


# --- given data


def test_data_files_txt_and_jsonl(teacher: LoadedModel, tmp_path: Path) -> None:
    txt = tmp_path / "story.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    jsonl = tmp_path / "set.jsonl"
    records = [
        {"text": "Hello! How are you today? I am fine, thank you."},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]},
        {"prompt": "What is the capital of Japan?"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cache = build_kd_cache(teacher, tmp_path / "kd", data=[txt, jsonl], samples=1000, max_length=L, top_k=K, seed=3)
    tok = teacher.tokenizer

    def split(ids: list[int]) -> list[tuple[int, ...]]:
        return [p for i in range(0, len(ids), L) if len(p := tuple(ids[i : i + L])) >= 2]

    pieces = split(tok.encode("The quick brown fox jumps over the lazy dog. " * 12)) + split(tok.encode(records[0]["text"]))  # type: ignore[arg-type]
    chat = tok.encode_messages(records[1]["messages"])[:L]  # type: ignore[arg-type]
    prompt = tok.encode_prompt("What is the capital of Japan?", chat=True)[-(L // 2) :]  # a long prompt keeps its end
    m = cache.manifest
    assert m["samples"] == len(pieces) + 2  # fewer than asked: the data is short, the real count recorded
    assert m["data"]["source"] == f"{txt}, {jsonl}"
    rows = {tuple(r[:n].tolist()) for r, n in zip(cache._arrays()["tokens"], cache._arrays()["lengths"])}
    assert set(pieces) <= rows and tuple(chat) in rows
    continued = [r for r in rows if r[: len(prompt)] == tuple(prompt)]
    assert len(continued) == 1 and len(continued[0]) > len(prompt)  # the prompt was answered by sampling
    check_against_teacher(teacher, cache, list(range(cache.samples)))


def test_messages_records_are_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "chat.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    assert read_samples([good]) == [CalibrationSample("", chat=True, messages=(("user", "hi"),))]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n", encoding="utf-8")
    with pytest.raises(BadArgumentError, match='line 1: "messages" must be a non-empty list'):
        read_samples([bad], noun="data file")


# --- determinism and resume


def test_same_seed_same_bytes_other_seed_other_text(teacher: LoadedModel, built: KDCache, tmp_path: Path) -> None:
    again = build_kd_cache(teacher, tmp_path / "again", samples=70, max_length=L, top_k=K)
    for s in built.manifest["shards"]:
        assert (again.path / s["file"]).read_bytes() == (built.path / s["file"]).read_bytes()
    other = build_kd_cache(teacher, tmp_path / "other", samples=6, max_length=L, top_k=K, seed=1)
    assert not np.array_equal(other._arrays()["tokens"], built._arrays()["tokens"][:6])


def test_an_interrupted_build_resumes_to_the_same_bytes(teacher: LoadedModel, built: KDCache, tmp_path: Path) -> None:
    out = tmp_path / "resumed"

    class Stop(Exception):
        pass

    def stop_after_first_shard(done: int, total: int) -> None:
        if done == 64:
            raise Stop

    with pytest.raises(Stop):
        build_kd_cache(teacher, out, samples=70, max_length=L, top_k=K, progress=stop_after_first_shard)
    half = json.loads((out / "manifest.json").read_text())
    assert half["complete"] is False and [s["file"] for s in half["shards"]] == ["shard-00000.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == [".anemll-mlx.json", "manifest.json", "shard-00000.safetensors"]
    with pytest.raises(BadArgumentError, match="is incomplete \\(64 of 70 samples\\): rerun kd-cache"):
        open_kd_cache(out)
    seen: list[int] = []
    resumed = build_kd_cache(teacher, out, samples=70, max_length=L, top_k=K, progress=lambda d, n: seen.append(d))
    assert seen == [64, 70] and resumed.built == 6
    assert resumed.manifest == built.manifest | {"teacher": resumed.manifest["teacher"]}
    for s in built.manifest["shards"]:
        assert (out / s["file"]).read_bytes() == (built.path / s["file"]).read_bytes()
    again = build_kd_cache(teacher, out, samples=70, max_length=L, top_k=K)  # complete: found, not rebuilt
    assert again.built == 0 and again.manifest == resumed.manifest


# --- reading for training


def test_batches_are_deterministic_skip_and_hold_out_validation(built: KDCache) -> None:
    cache = open_kd_cache(built.path)
    assert cache.held_out == 70 // 8 and (cache.samples, cache.max_length, cache.top_k) == (70, L, K)
    first = list(islice(cache.batches(5, seed=7), 30))
    second = list(islice(cache.batches(5, seed=7), 30))
    for a, b in zip(first, second):
        assert all(np.array_equal(np.array(getattr(a, f)), np.array(getattr(b, f))) for f in ("tokens", "mask", "topk_ids", "topk_logits"))
    skipped = list(islice(cache.batches(5, seed=7, start=11), 3))
    for a, b in zip(skipped, first[11:14]):
        assert np.array_equal(np.array(a.tokens), np.array(b.tokens)) and np.array_equal(np.array(a.topk_logits), np.array(b.topk_logits))
    other = next(cache.batches(5, seed=8))
    assert not np.array_equal(np.array(other.tokens), np.array(first[0].tokens))

    data = cache._arrays()
    key = lambda tokens, logits: (tokens.tobytes(), logits.astype(np.float32).tobytes())  # noqa: E731
    rows = {key(data["tokens"][i], data["topk_logits"][i]): i for i in range(cache.samples)}
    assert len(rows) == cache.samples
    seen = [rows[key(t, g)] for b in first for t, g in zip(np.array(b.tokens), np.array(b.topk_logits))]
    train = cache.samples - cache.held_out
    assert set(seen) == set(range(train))  # 150 draws over 3+ epochs: every training sample, no held-out one
    assert sorted(seen[:train]) == list(range(train))  # one epoch is a permutation

    batch = first[0]
    assert batch.tokens.dtype == mx.int32 and batch.topk_ids.dtype == mx.int32
    assert batch.mask.dtype == mx.float32 and batch.topk_logits.dtype == mx.float32
    assert batch.tokens.shape == (5, L) and batch.topk_logits.shape == (5, L, K)
    lengths = data["lengths"][[rows[key(t, g)] for t, g in zip(np.array(batch.tokens), np.array(batch.topk_logits))]]
    assert np.array_equal(np.array(batch.mask), (np.arange(L)[None] < lengths[:, None] - 1).astype(np.float32))

    val = cache.validation(100)
    assert val.tokens.shape[0] == cache.held_out
    assert np.array_equal(np.array(val.tokens), data["tokens"][train:])
    assert np.array_equal(np.array(cache.validation(2).tokens), data["tokens"][-2:])


def test_check_teacher(built: KDCache, teacher: LoadedModel, tiny_model_factory: Callable[..., Path]) -> None:
    built.check_teacher(teacher)
    stranger = load(tiny_model_factory("llama", seed=1), "float32")
    with pytest.raises(BadArgumentError, match=f"KD cache {built.path} was made by another model \\(teacher sha256"):
        built.check_teacher(stranger)


def test_open_refuses_what_is_not_a_whole_cache(built: KDCache, tmp_path: Path) -> None:
    with pytest.raises(BadArgumentError, match="not found"):
        open_kd_cache(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(BadArgumentError, match="has no manifest.json"):
        open_kd_cache(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BadArgumentError, match="is not valid JSON"):
        open_kd_cache(broken)
    (broken / "manifest.json").write_text(json.dumps(built.manifest))
    with pytest.raises(BadArgumentError, match="lacks its shard shard-00000.safetensors"):
        open_kd_cache(broken)


# --- the command




def test_cli_builds_then_finds_it_complete(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "kd"
    flags = ["--samples", "6", "--max-length", str(L), "--top-k", str(K)]
    result = _cli("kd-cache", str(llama), "--out", str(out), *flags)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert f"{out}: 6 samples, " in result.stdout and "6 samples made in" in result.stdout
    assert open_kd_cache(out).samples == 6
    result = _cli("kd-cache", str(llama), "--out", str(out), *flags)
    assert result.exit_code == 0 and "already complete" in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "missing.txt"], "data file not found: missing.txt"),
        (["--data", "data.csv"], "data file data.csv must be .txt (plain text) or .jsonl"),
        (["--top-k", "0"], "--top-k must be between 1 and the vocabulary size"),
        (["--top-k", "100000"], "--top-k must be between 1 and the vocabulary size"),
        (["--max-length", "1"], "--max-length must be between 2 and the model's context 256"),
        (["--max-length", "257"], "--max-length must be between 2"),
        (["--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_cli_refuses_bad_flags_before_loading(llama: Path, tmp_path: Path, monkeypatch, flags, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b")
    monkeypatch.setattr("anemll_mlx.loading.load", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "never"
    _one_error(_cli("kd-cache", str(llama), "--out", str(out), *flags), message)
    assert not out.exists()


def test_cli_refuses_a_folder_holding_another_cache(
    llama: Path, built: KDCache, tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    base = ["--samples", "70", "--max-length", str(L)]
    _one_error(_cli("kd-cache", str(llama), "--out", str(built.path), *base, "--top-k", "4"), "was made with --top-k 8, not 4")
    _one_error(_cli("kd-cache", str(llama), "--out", str(built.path), *base, "--top-k", str(K), "--seed", "2"), "--seed 0, not 2")
    stranger = tiny_model_factory("llama", seed=2)
    _one_error(
        _cli("kd-cache", str(stranger), "--out", str(built.path), *base, "--top-k", str(K)),
        f"KD cache {built.path} was made by another model (teacher sha256",
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_error(_cli("kd-cache", str(llama), "--out", str(other)), "exists and is not a KD cache")


def test_module_constants_keep_batches_inside_shards() -> None:
    assert kd_cache.SHARD_SAMPLES % kd_cache.GROUP == 0


def test_cli_interrupted_keeps_whole_shards_and_resumes(llama: Path, built: KDCache, tmp_path: Path, monkeypatch) -> None:
    import signal

    from anemll_mlx.interrupts import Interrupted

    out = tmp_path / "stopped"
    flags = ["--out", str(out), "--samples", "70", "--max-length", str(L), "--top-k", str(K)]
    real = kd_cache._make_shard
    calls = []

    def second_shard_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(kd_cache, "_make_shard", second_shard_interrupted)
    result = _cli("kd-cache", str(llama), *flags)
    assert result.exit_code == 130
    assert result.stderr.strip() == f"error: interrupted (Ctrl-C); 64 samples kept in {out}: rerun the same command to resume"
    assert sorted(p.name for p in out.iterdir()) == [".anemll-mlx.json", "manifest.json", "shard-00000.safetensors"]
    monkeypatch.setattr(kd_cache, "_make_shard", real)
    result = _cli("kd-cache", str(llama), *flags)
    assert result.exit_code == 0 and "6 samples made in" in result.stdout
    for s in built.manifest["shards"]:
        assert (out / s["file"]).read_bytes() == (built.path / s["file"]).read_bytes()

"""The golden gate's file and flags on tiny models (the real-model round trip is in
test_smollm2_run.py): what it stores, that it replays as the reference would, that it refuses
another tokenizer, a damaged file and flags that do not go together."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anemll_mlx.errors import BadArgumentError, CorruptModelError
from anemll_mlx.eval import golden as goldens
from anemll_mlx.loading import load
from anemll_mlx.runtime.drivers import MLXDriver

CLI = Path(sys.executable).parent / "anemll-mlx"
PROMPTS = ["Hello there", "What is the capital of France?"]


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def saved(tiny_export, tmp_path_factory) -> Path:
    folder, _ = tiny_export
    path = tmp_path_factory.mktemp("golden") / "tiny.npz"
    done = cli("compare", "--reference", f"mlx:{folder}", "--save-golden", path, *sum((["--prompt", p] for p in PROMPTS), []), "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    return path


def test_the_file_holds_the_references_run(tiny_export, saved):
    folder, _ = tiny_export
    golden = goldens.load(saved)
    reference = MLXDriver(load(folder, "float32"), "r", context=128)
    assert golden.reference == f"mlx:{folder}" and golden.tokenizer == goldens.tokenizer_fingerprint(reference.tokenizer)
    for ids, logits, tokens in zip(golden.prompts, golden.logits, golden.tokens):
        assert logits.dtype == np.float32 and logits.shape == (len(tokens), reference.vocab_size)
        reference.reset()
        np.testing.assert_allclose(reference.prefill(ids), logits[0], rtol=1e-5, atol=1e-5)
        assert tokens == [int(np.argmax(row)) for row in logits]
    with np.load(saved, allow_pickle=False) as z:  # no pickles inside
        assert set(z.files) == {"meta"} | {f"{k}_{n}" for k in ("ids", "logits", "tokens") for n in range(len(PROMPTS))}


def test_the_export_passes_against_its_models_golden(tiny_export, saved):
    _, export = tiny_export
    done = cli("compare", "--golden", saved, "--candidate", f"mil:{export}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "golden: lowest cosine" in done.stdout and "greedy tokens identical" in done.stdout
    strict = cli("compare", "--golden", saved, "--candidate", f"mil:{export}", "--min-cosine", "1")
    assert strict.returncode == 1 and "gate: cosine" in strict.stdout  # fp16 is not exactly fp32


def test_another_tokenizer_is_refused(saved, tiny_model_factory):
    other = tiny_model_factory("gemma3")
    with pytest.raises(BadArgumentError, match="another tokenizer"):
        goldens.check(goldens.load(saved), MLXDriver(load(other), "mlx:other"))
    assert "another tokenizer" in one_error(cli("compare", "--golden", saved, "--candidate", f"mlx:{other}"))


def test_a_damaged_or_foreign_file_is_one_error(tmp_path, tiny_export):
    _, export = tiny_export
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CorruptModelError):
        goldens.load(junk)
    assert "not a readable golden file" in one_error(cli("compare", "--golden", junk, "--candidate", f"mil:{export}"))
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, meta=np.array('{"format": "something else"}'))
    assert "not a golden file" in one_error(cli("compare", "--golden", foreign, "--candidate", f"mil:{export}"))
    assert "no such golden file" in one_error(cli("compare", "--golden", tmp_path / "none.npz", "--candidate", f"mil:{export}"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--golden", "g.npz"], "needs a --candidate"),
        (["--golden", "g.npz", "--candidate", "mil:x", "--reference", "mlx:y"], "--golden replaces --reference"),
        (["--golden", "g.npz", "--candidate", "mil:x", "--prompt", "hi"], "brings its own prompts"),
        (["--reference", "mlx:y"], "give --candidate, --save-golden FILE, or both"),
        (["--candidate", "mil:x"], "give --reference"),
        (["--reference", "mlx:y", "--save-golden", "g.npz", "--free-run"], "drop --free-run"),
        (["--golden", "g.npz", "--candidate", "mil:x", "--min-cosine", "1.5"], "--min-cosine must be between 0 and 1"),
        (["--golden", "g.npz", "--candidate", "mil:x", "--max-token-mismatches", "-1"], "--max-token-mismatches must be >= 0"),
    ],
)
def test_flags_that_do_not_go_together(flags, message, tmp_path):
    assert message in one_error(cli("compare", *flags))


def test_save_golden_will_not_overwrite_without_force(tiny_export, saved):
    folder, _ = tiny_export
    line = one_error(cli("compare", "--reference", f"mlx:{folder}", "--save-golden", saved, "--prompt", "x"))
    assert "exists: pass --force" in line


def test_replay_refuses_what_it_did_not_record(saved):
    replay = goldens.Replay(goldens.load(saved))
    with pytest.raises(ValueError, match="did not record"):
        replay.prefill([1, 2, 3])
    replay.prefill(replay.golden.prompts[0])
    with pytest.raises(ValueError, match="was fed token"):
        replay.decode(replay.golden.tokens[0][0] + 1)

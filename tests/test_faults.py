"""Fault injection for every command that writes: nothing of the user's is ever lost, nothing
half-written is ever left, and every refusal is one ``error:`` line with exit code 2.

Each writing command (export, compare, probe) runs through the installed console script against:
``--out .`` with and without ``--force`` in a folder of user files, an existing file, a read-only
folder, an empty mount point, a path inside the source model, SIGINT and SIGTERM at several
stages (seen on a pseudo-terminal, where the progress bars name the stage), and bad flags, which
must be refused before any weight is read (the model given has corrupt weights: reading them
would give a different error).
"""

from __future__ import annotations

import hashlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import make_tiny_model, write_corrupt_copies

CLI = Path(sys.executable).parent / "anemll-mlx"
EXPORT_FLAGS = ("--context", "64", "--batch", "16")
UNSHARE = shutil.which("unshare")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "COLUMNS": "200", "TERM": "xterm"}


def run(*args: str | Path, cwd: Path | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300
    )


def one_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones included) by content, and every folder by name."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name or ".replaced-" in p.name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, its export, earlier outputs of each command, and a folder of user files."""
    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_model(root / "models", "llama", num_hidden_layers=2)
    corrupt = write_corrupt_copies(model, root / "models")["truncated_weights"]
    export = root / "export"
    done = run("export", model, "--out", export, *EXPORT_FLAGS, "--fp16-scale", "none")
    assert done.returncode == 0, done.stderr
    compared = root / "compared"
    done = run("compare", "--reference", f"mlx:{model}", "--candidate", f"mil:{export}",
               "--prompt", "Hello there", "--max-tokens", "2", "--out", compared)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = root / "report.json"
    done = run("probe", model, "--prompt", "Hello there", "--max-tokens", "1", "--out", report)
    assert done.returncode == 0, done.stderr
    return {"root": root, "model": model, "corrupt": corrupt, "export": export, "compared": compared, "report": report}


def user_folder(parent: Path) -> Path:
    """A working folder full of a user's files."""
    folder = parent / "user"
    (folder / "work").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "work" / "data.csv").write_text("1,2,3\n")
    (folder / ".hidden").write_bytes(b"\x00\x01")
    return folder


def commands(world, out: str | Path, model: Path | None = None) -> dict[str, list]:
    """Each writing command with ``--out out`` (and a model, the good one by default)."""
    model = model or world["model"]
    return {
        "export": ["export", model, "--out", out, *EXPORT_FLAGS, "--fp16-scale", "none"],
        "compare": ["compare", "--reference", f"mlx:{model}", "--candidate", f"mil:{world['export']}",
                    "--prompt", "Hello there", "--max-tokens", "2", "--out", out],  # fmt: skip
        "probe": ["probe", model, "--prompt", "Hello there", "--max-tokens", "1", "--out", out],
    }


COMMANDS = ("export", "compare", "probe")


# --- targets that must be refused, with everything left as it was


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("force", [False, True])
def test_out_dot_in_a_folder_of_user_files(world, tmp_path, command, force):
    folder = user_folder(tmp_path)
    before = digest(folder)
    args = commands(world, ".")[command] + (["--force"] if force else [])
    line = one_error(run(*args, cwd=folder))
    assert "." in line or str(folder) in line
    assert digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_an_existing_file(world, tmp_path, command):
    folder = user_folder(tmp_path)
    before = digest(folder)
    line = one_error(run(*commands(world, folder / "notes.txt")[command], cwd=folder))
    expected = "exists: pass --force" if command == "probe" else "is a file, not a folder"
    assert expected in line
    assert digest(folder) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_path_inside_the_source_model(world, command):
    model = world["model"]
    before = digest(model)
    inside = model / ("report.json" if command == "probe" else "out")
    line = one_error(run(*commands(world, inside)[command]))
    assert f"inside the source model folder {model}" in line
    assert digest(model) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "compare"])
def test_a_folder_that_holds_the_source_model(world, command):
    line = one_error(run(*commands(world, world["model"].parent)[command], "--force"))
    assert "would replace the source model" in line


def _in_namespace(script: str, *paths: Path) -> tuple[str, ...]:
    """A command prefix that runs the CLI in a private mount namespace after ``script``."""
    return (UNSHARE, "-rm", "sh", "-c", script + ' && exec "$@"', *map(str, paths))


needs_unshare = pytest.mark.skipif(
    UNSHARE is None or subprocess.run([UNSHARE or "false", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unshare -rm (user and mount namespaces) to make a read-only folder and a mount point",
)


@pytest.mark.slow
@needs_unshare
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_folder(world, tmp_path, command):
    folder = user_folder(tmp_path)
    before = digest(folder)
    read_only = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
    prefix = _in_namespace(read_only, folder)
    line = one_error(run(*commands(world, folder / "new")[command], prefix=prefix))
    assert "cannot write in" in line and "Read-only file system" in line
    assert digest(folder) == before


@pytest.mark.slow
@needs_unshare
@pytest.mark.parametrize("command", ["export", "compare"])
def test_an_empty_mount_point(world, tmp_path, command):
    mount = tmp_path / "mnt"
    mount.mkdir()
    prefix = _in_namespace('mount -t tmpfs none "$0"', mount)
    line = one_error(run(*commands(world, mount)[command], prefix=prefix))
    assert "is a mount point" in line


# --- signals: the partial output goes, the previous output stays


def interrupt_at(args: list, marker: str, signum: int, cwd: Path) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (so rich draws its progress), send ``signum`` once
    ``marker`` has been drawn, and return the exit code and everything it printed."""
    main, secondary = pty.openpty()
    env = {**_env(), "ANEMLL_MLX_CACHE": str(cwd.parent / f"{cwd.name}-cache")}  # no earlier probe answer reused
    proc = subprocess.Popen(
        [str(CLI), *map(str, args)], stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
        cwd=cwd, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(secondary)
    seen, sent = b"", False
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal closed: the process is gone
                    break
                if not chunk:
                    break
                seen += chunk
            if not sent and marker.encode() in seen:
                os.kill(proc.pid, signum)
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=60)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    text = seen.decode("utf-8", "replace")
    assert sent, f"the command ended before '{marker}' was shown (exit {code}):\n{text}"
    return code, text


STAGES = [
    # (command, progress text to wait for, what is happening then)
    ("export", "float32", "the probe of --fp16-scale auto, before any output exists"),
    ("export", "chunk 01of02", "building, with the partial folder beside the target"),
    ("compare", "comparing", "the comparison, before results are written"),
    ("probe", "float16", "the probe's float16 run, before the report is written"),
]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command, marker, when", STAGES, ids=[f"{c}-{m}" for c, m, _ in STAGES])
def test_a_signal_removes_partial_output_and_keeps_the_previous(world, tmp_path, command, marker, when, signum):
    previous = {"export": world["export"], "compare": world["compared"], "probe": world["report"]}[command]
    target = tmp_path / previous.name
    (shutil.copytree if previous.is_dir() else shutil.copy2)(previous, target)
    before = digest(tmp_path)
    args = commands(world, target)[command] + ["--force"]
    if command == "export":  # auto scale runs the probe on this model; 2 chunks: a longer build
        args = [a for a in args if a not in ("--fp16-scale", "none")] + ["--chunk", "2"]
    if command == "probe":  # the default prompts: still running when the signal lands
        args = [a for a in args if a not in ("--prompt", "Hello there", "--max-tokens", "1")]
    if command == "compare":  # prompts that fit the 64-token context, with steps to fill it
        args = [a for a in args if a not in ("--max-tokens", "2")] + ["--max-tokens", "64"] + ["--prompt", "Hi"] * 8
    code, text = interrupt_at(args, marker, signum, tmp_path)
    expected = {signal.SIGINT: (130, "interrupted (Ctrl-C)"), signal.SIGTERM: (143, "terminated (SIGTERM)")}
    assert code == expected[signum][0], text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected[signum][1] in errors[0], text
    assert "Traceback" not in text
    assert partials(tmp_path) == []
    assert digest(tmp_path) == before, f"{when}: the previous output changed"


# --- flags: refused before a single weight is read


BAD_FLAGS = [
    ("export", ["--attention-chunk", "0"], "--attention-chunk must be between 1 and --batch 16, got 0"),
    ("export", ["--context", "100", "--batch", "64"], "--context 100 must be a multiple of --batch 64"),
    ("export", ["--chunk", "0"], "--chunk must be auto or a whole number >= 1, got 0"),
    ("export", ["--chunk", "9"], "--chunk 9 must be between 1 and the number of layers (2)"),
    ("export", ["--split-lm-head", "0"], "--split-lm-head must be auto or a whole number >= 1, got 0"),
    ("export", ["--max-chunk-mb", "0.001"], "over --max-chunk-mb 0.001"),
    ("export", ["--max-chunk-mb", "0"], "--max-chunk-mb must be > 0, got 0.0"),
    ("export", ["--context", "4096"], "--context 4096 exceeds the model's max_position_embeddings"),
    ("export", ["--lut", "9"], "--lut: bad LUT spec '9'"),
    ("export", ["--fp16-scale", "2"], "--fp16-scale must be in (0, 1], got 2"),
    ("compare", ["--min-match", "50"], "--min-match must be between 0 and 1 (a fraction), got 50"),
    ("compare", ["--max-kl", "-1"], "--max-kl must be a number >= 0, got -1.0"),
    ("compare", ["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    ("probe", ["--max-tokens", "-1"], "--max-tokens must be >= 0, got -1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, flags, message", BAD_FLAGS, ids=[f"{c}{' '.join(f)}" for c, f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_the_weights_are_read(world, tmp_path, command, flags, message):
    args = commands(world, tmp_path / "out", model=world["corrupt"])[command] + flags
    line = one_error(run(*args))
    assert message in line, line  # the corrupt weights were never opened: that would be another error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bad_driver_specs_and_inputs(world, tmp_path):
    corrupt = world["corrupt"]
    line = one_error(run("compare", "--reference", f"mlx:{corrupt}@fp64", "--candidate", f"mil:{world['export']}"))
    assert line == f"error: unknown dtype 'fp64' in driver spec 'mlx:{corrupt}@fp64' (choose fp32, fp16 or bf16)"
    line = one_error(run("compare", "--reference", f"mlx:{corrupt}+scale=-1", "--candidate", f"mil:{world['export']}"))
    assert "bad scale '-1'" in line
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    line = one_error(run("inspect", gguf))
    assert line == f"error: {gguf} is a file, not an export folder (the folder export --out wrote)"
    line = one_error(run("generate", corrupt, "--prompt", ""))
    assert line == "error: --prompt must not be empty"


# --- what was refused stays refused; what is ours may be replaced


@pytest.mark.slow
def test_force_replaces_only_what_anemll_mlx_wrote(world, tmp_path):
    target = tmp_path / "compared"
    shutil.copytree(world["compared"], target)
    (target / "mine.txt").write_text("keep me")
    before = digest(target)
    line = one_error(run(*commands(world, target)["compare"], "--force"))
    assert "holds files anemll-mlx did not write (mine.txt)" in line
    assert digest(target) == before
    (target / "mine.txt").unlink()
    done = run(*commands(world, target)["compare"], "--force")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in target.iterdir()) == [".anemll-mlx.json", "results.jsonl", "summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
def test_inspect_reports_a_damaged_package_with_the_rest(world, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(world["export"], damaged)
    (damaged / "llama_lm_head.mlpackage" / "Data" / "com.apple.CoreML" / "model.mlmodel").unlink()
    shutil.rmtree(damaged / "llama_embeddings.mlpackage")
    done = run("inspect", damaged)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    problems = [line for line in done.stdout.splitlines() if line.startswith("problem: ")]
    assert any("llama_embeddings.mlpackage: missing" in p for p in problems), done.stdout
    assert any("llama_lm_head.mlpackage: cannot be read" in p for p in problems), done.stdout
    assert "llama_FFN_PF_chunk_01of01.mlpackage" in done.stdout and len(problems) == 2

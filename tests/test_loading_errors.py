"""Bad input through the real ``anemll-mlx`` console script: exactly one ``error: ...`` line on
stderr naming what is wrong, exit code 2, and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_writer import raw_tensor, write_gguf
from tiny_models import write_corrupt_copies

CLI = Path(sys.executable).parent / "anemll-mlx"


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script; the hub is always offline so nothing is downloaded."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run(
        [str(CLI), *map(str, args)], capture_output=True, env=full_env, timeout=120, check=False
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed run, after checking the exit code and the absent traceback."""
    stderr = result.stderr.decode("utf-8")
    assert result.returncode == 2, f"exit code {result.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: ")
    return lines[0]


def test_console_script_is_installed():
    """The tests below drive the real entry point, not a function call."""
    assert CLI.is_file() and os.access(CLI, os.X_OK), f"{CLI} missing: pip install -e ."


@pytest.mark.parametrize("command", ["info", "generate"])
def test_missing_path(tmp_path, command):
    """A path that does not exist is named back to the user."""
    missing = tmp_path / "no-such-model"
    assert error_line(run_cli(command, missing)) == f"error: no such file or folder: {missing}"


def test_folder_without_config(tiny_models, tmp_path):
    """A folder with weights but no config.json is not taken for a model."""
    folder = write_corrupt_copies(tiny_models["llama"], tmp_path)["no_config"]
    line = error_line(run_cli("info", folder))
    assert line == f"error: {folder} has no config.json: not a Hugging Face model folder"


def test_truncated_safetensors(tiny_models, tmp_path):
    """A safetensors file cut in half is reported as truncated, naming the file."""
    folder = write_corrupt_copies(tiny_models["qwen2"], tmp_path)["truncated_weights"]
    line = error_line(run_cli("info", folder))
    assert line.startswith(f"error: {folder / 'model.safetensors'} is truncated: its header needs ")
    size = (folder / "model.safetensors").stat().st_size
    assert line.endswith(f"bytes, the file has {size}")


def test_unsupported_model_type(tiny_models, tmp_path):
    """An unknown model_type is named along with the supported ones."""
    folder = write_corrupt_copies(tiny_models["gemma3"], tmp_path)["unknown_arch"]
    line = error_line(run_cli("generate", folder, "--max-tokens", "4"))
    supported = "llama, qwen2, qwen3, qwen3_moe, gemma3_text, gemma4_text, gemma3, gemma4"
    assert line == f"error: unsupported model_type 'mamba_xyz' (supported: {supported})"


def test_unsupported_gguf_tensor_type(tmp_path):
    """A GGUF holding a K-quant we do not dequantize names the file, the tensor and its type."""
    path = write_gguf(
        tmp_path / "kquant.gguf",
        {"general.architecture": "llama"},
        {"token_embd.weight": raw_tensor("Q5_K", (4, 256))},
    )
    line = error_line(run_cli("info", path))
    assert "kquant.gguf" in line
    assert "'token_embd.weight' has GGML type Q5_K, which is not supported" in line
    assert "Q4_1" in line  # the supported types are listed


def test_offline_hub_id(tmp_path):
    """A hub id that is not cached, with the hub offline, says so and how to pass a local folder."""
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub")}
    line = error_line(run_cli("info", "someorg/Some-Model-1B", env=env))
    assert "'someorg/Some-Model-1B'" in line
    assert "nothing is cached" in line
    assert "pass the local folder instead" in line
    assert "anemll-mlx info ./Some-Model-1B" in line


def test_bad_dtype(tiny_models):
    """An unknown --dtype is named with the choices."""
    line = error_line(run_cli("generate", tiny_models["llama"], "--dtype", "float8"))
    assert line == "error: unknown dtype 'float8' (choose one of float32, float16, bfloat16)"


def test_negative_temperature(tiny_models):
    """A negative --temp is refused before any model work."""
    line = error_line(run_cli("generate", tiny_models["llama"], "--temp", "-1"))
    assert line == "error: --temp must be >= 0, got -1.0"


def test_top_p_out_of_range(tiny_models):
    """--top-p outside (0, 1] is refused."""
    line = error_line(run_cli("generate", tiny_models["llama"], "--temp", "1", "--top-p", "1.5"))
    assert line == "error: --top-p must be in (0, 1], got 1.5"

"""Running the CLI in-process (typer's CliRunner) and checking its one-line errors."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result


def run_cli(*args: str | Path) -> Result:
    """``anemll-mlx ARGS`` in this process, wide enough that rich does not wrap lines."""
    from anemll_mlx.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_error(result: Result, message: str) -> None:
    """Exit 2 and exactly one ``error:`` line on stderr, naming ``message``."""
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines

"""The package as a user installs it: a wheel in a fresh virtual environment, away from the repo.

Only what the wheel carries counts there, so this is where missing package data shows (the
recipes once lived in the repo's top-level models/ and an installed ``--fp16-scale auto``
silently fell back to the probe).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import json, anemll_mlx
import anemll_mlx.export, anemll_mlx.runtime.drivers  # coremltools comes in here
from anemll_mlx.probe.recipes import load_recipes
from anemll_mlx.eval.prompts import default_prompts
from anemll_mlx.probe.run import calibration_prompts
print(json.dumps({"file": anemll_mlx.__file__, "recipes": sorted(r.name for r in load_recipes()),
                  "prompts": len(default_prompts()), "calibration": len(calibration_prompts())}))
"""


@pytest.mark.slow
def test_the_installed_wheel_finds_its_recipes_and_prompts(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("anemll_mlx-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    # the dependencies come from this environment's site-packages, appended after the new venv's own
    # (a plain path entry: the editable install's own .pth hooks there are not run)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # importing the library is quiet (no coremltools/transformers notices)
    found = json.loads(done.stdout)
    assert Path(found["file"]).is_relative_to(venv), found["file"]  # the wheel's copy, not the repo's
    assert "smollm2-135m-instruct" in found["recipes"] and "gemma-3-270m-it" in found["recipes"]
    assert len(found["recipes"]) == len(list((REPO / "src/anemll_mlx/data/recipes").glob("*.yaml")))
    assert found["prompts"] > 0 and found["calibration"] > 0

"""compare runs its reference on a worker thread: every kind of driver, opened on the caller's
thread, must run there (MLX keeps lazily built arrays on the stream of the thread that built them,
and a driver that left one lazy failed with "There is no Stream(cpu, 0) in current thread")."""

from __future__ import annotations

import pytest

from anemll_mlx.eval.compare import compare
from anemll_mlx.runtime.drivers import open_driver

PROMPTS = [[1, 5, 9, 14], [3, 2]]


@pytest.mark.parametrize(
    "reference, max_kl",
    [
        ("mlx:{model}", 1e-4),
        ("mlx:{model}@bf16", 0.05),
        ("mlx:{model}+scale=0.5", 1e-4),  # an exact rescaling: the same distributions
        ("mlx:{model}@fp16+lut=4", None),  # a LUT's drift is the model's; only that it runs
        ("mil:{export}", 1e-4),
    ],
)
def test_any_driver_runs_as_the_reference(tiny_export, reference: str, max_kl: float | None) -> None:
    model, export = tiny_export
    ref = open_driver(reference.format(model=model, export=export), 128)
    result = compare(ref, open_driver(f"mil:{export}"), PROMPTS, max_tokens=4)
    assert result.summary["steps"] == 8
    if max_kl is not None:
        assert result.summary["kl_max"] < max_kl

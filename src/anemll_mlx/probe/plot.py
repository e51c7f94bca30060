"""The probe's picture: per-layer peaks of each site on a log axis against fp16's 65504.

A log axis because sites differ by orders of magnitude (MLP hidden ~10, residual spikes ~1e5) and
the question is only how close each comes to the line.  Agg backend: no display is ever needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .recorder import SITES

_STYLE: dict[str, dict[str, Any]] = {
    "residual": {"color": "black", "linewidth": 2.2, "marker": "o"},
    "attn_out": {"color": "tab:blue", "marker": "^"},
    "mlp_hidden": {"color": "tab:green", "marker": "s"},
    "mlp_out": {"color": "tab:orange", "marker": "v"},
    "attn_scores": {"color": "tab:purple", "marker": "x"},
}


def plot_peaks(report: dict, path: str | Path) -> Path:
    """Write the PNG for a probe ``report`` to ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = [row["index"] for row in report["layers"]]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    try:
        for site in SITES:
            values = [row[site] if row[site] else float("nan") for row in report["layers"]]
            style: dict[str, Any] = {"markersize": 4, "linewidth": 1.2, **_STYLE.get(site, {})}
            ax.plot(layers, values, label=site, **style)
        if report.get("embedding"):
            ax.plot([-1], [report["embedding"]], "D", color="gray", label="embedding")
        fp16_max = report["fp16_max"]
        ax.axhline(fp16_max, color="red", linestyle="--", linewidth=1.2, label=f"fp16 max {fp16_max:g}")
        ax.axhline(0.75 * fp16_max, color="red", linestyle=":", linewidth=1, label="0.75 x fp16 max")
        if report.get("recommended_fp16_scale") and report.get("peak"):
            scaled = report["peak"] * report["recommended_fp16_scale"]
            ax.axhline(scaled, color="tab:red", alpha=0.4, linewidth=1, label=f"peak x {report['recommended_fp16_scale']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("peak |x| (float32)")
        ax.set_title(f"{Path(str(report['model'])).name}: {report['verdict']}  (peak {report['peak']:,.0f} at layer {report['peak_layer']})")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path

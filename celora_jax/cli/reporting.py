"""Summary tables and PNG plots from per-round metrics (headless matplotlib)."""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(mean, std, scale=100.0) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{scale * mean:.1f} ± {scale * (std or 0.0):.1f}"


def summary_table(summaries: Sequence[Mapping]) -> str:
    """Markdown table: per-method accuracy (mean ± std over clients) and communication."""
    lines = ["| method | own-test acc. (%) | global-test acc. (%) | MB up per client per round | MB per round (all, up+down) |",
             "|---|---|---|---|---|"]
    for s in summaries:
        method = f"{s['method']} ({s['note']})" if s.get("note") else s["method"]
        lines.append(
            f"| {method} | {_fmt(s.get('test_accuracy_mean'), s.get('test_accuracy_std'))} "
            f"| {_fmt(s.get('global_test_accuracy_mean'), s.get('global_test_accuracy_std'))} "
            f"| {s['mb_up_per_client_round']:.4f} | {s['mb_per_round']:.3f} |")
    return "\n".join(lines)


def plot_curves(histories: Mapping[str, Sequence[Mapping]], path: str | pathlib.Path) -> pathlib.Path:
    """Accuracy vs round and accuracy vs cumulative MB, one line per method."""
    plt = _pyplot()
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for method, history in histories.items():
        evaluated = [r for r in history if "test_accuracy_mean" in r]
        rounds = [r["round"] for r in evaluated]
        accuracy = np.array([r["test_accuracy_mean"] for r in evaluated])
        spread = np.array([r["test_accuracy_std"] for r in evaluated])
        megabytes = [max(r["bytes_cumulative"], 1) / 1e6 for r in evaluated]
        line, = by_round.plot(rounds, accuracy, marker="o", label=method)
        # Clipped to [0, 1]: near the ceiling a symmetric band would show accuracies above 100%.
        by_round.fill_between(rounds, np.clip(accuracy - spread, 0, 1), np.clip(accuracy + spread, 0, 1),
                              alpha=0.15, color=line.get_color())
        if history[-1]["bytes_cumulative"] > 0:
            by_bytes.plot(megabytes, accuracy, marker="o", label=method, color=line.get_color())
    by_round.set(xlabel="round", ylabel="own-test accuracy (mean ± std over clients)", title="accuracy vs round")
    by_bytes.set(xlabel="cumulative MB sent (up + down, all clients)", ylabel="own-test accuracy",
                 title="accuracy vs communication", xscale="log")
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmaps(matrices: Mapping[str, np.ndarray], path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Side-by-side heatmaps (e.g. personalized weights W and the two distance matrices)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8))
    axes = np.atleast_1d(axes)
    for axis, (name, matrix) in zip(axes, matrices.items()):
        image = axis.imshow(np.asarray(matrix), cmap="viridis")
        axis.set(title=name, xlabel="client j", ylabel="client i")
        fig.colorbar(image, ax=axis, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

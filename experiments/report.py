"""Tables and plots from grid results (``experiments/grid.py``).

    python -m experiments.report                                   # experiments/results/raw -> experiments/results
    python -m experiments.report --results experiments/results/raw_smoke --out /tmp/report

Accuracy is each client's own-test accuracy at the final round, pooled over clients and
seeds (mean ± std); "MB/round" is what one client sends up per round; "MB to target" is the
cumulative traffic (all clients, up and down) when the mean own-test accuracy first reaches
the target (default: 95% of the best final mean accuracy in that table), "-" if never.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np


def load_runs(root: pathlib.Path) -> dict[str, list[dict]]:
    """{run id without seed: [history of each seed]} for finished runs."""
    runs: dict[str, list[dict]] = collections.defaultdict(list)
    for summary in sorted(root.rglob("summary.json")):
        run_dir = summary.parent
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        run_id = str(run_dir.relative_to(root).parent)  # drop seedN
        runs[run_id].append(history)
    return dict(runs)


def _final_accuracies(histories: list[list[dict]]) -> np.ndarray:
    return np.concatenate([h[-1]["client_test_accuracy"] for h in histories])


def _mb_to_target(histories: list[list[dict]], target: float) -> float | None:
    rounds = min(len(h) for h in histories)
    for index in range(rounds):
        accuracy = np.mean([h[index].get("test_accuracy_mean", np.nan) for h in histories])
        if accuracy >= target:
            return float(np.mean([h[index]["bytes_cumulative"] for h in histories]) / 1e6)
    return None


def table(runs: dict[str, list[list[dict]]], prefix: str, target_fraction: float) -> str:
    """Markdown table of the runs whose id starts with ``prefix``."""
    selected = {k[len(prefix):].strip("/"): v for k, v in runs.items() if k.startswith(prefix)}
    if not selected:
        return ""
    best = max(float(np.mean(_final_accuracies(v))) for v in selected.values())
    target = target_fraction * best
    lines = [f"| run | own-test acc. (%) | global acc. (%) | seeds | MB/round (per client, up) | MB to {100 * target:.1f}% |",
             "|---|---|---|---|---|---|"]
    for name, histories in sorted(selected.items()):
        accuracy = _final_accuracies(histories)
        global_acc = [h[-1].get("global_test_accuracy_mean") for h in histories]
        global_acc = [g for g in global_acc if g is not None]
        to_target = _mb_to_target(histories, target)
        lines.append(
            f"| {name} | {100 * accuracy.mean():.1f} ± {100 * accuracy.std():.1f} "
            f"| {100 * np.mean(global_acc):.1f} | {len(histories)} "
            f"| {histories[0][-1]['bytes_up_per_client'] / 1e6:.4f} "
            f"| {'-' if to_target is None else f'{to_target:.2f}'} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[list[dict]]], prefix: str, path: pathlib.Path) -> None:
    from celora_jax.reporting import plot_curves

    selected = {k[len(prefix):].strip("/"): v for k, v in runs.items() if k.startswith(prefix)}
    if not selected:
        return
    # Mean over seeds, round by round, in the record format plot_curves reads.
    averaged = {}
    for name, histories in selected.items():
        rounds = min(len(h) for h in histories)
        averaged[name] = [{
            "round": histories[0][i]["round"],
            "test_accuracy_mean": float(np.mean([h[i]["test_accuracy_mean"] for h in histories])),
            "test_accuracy_std": float(np.mean([h[i]["test_accuracy_std"] for h in histories])),
            "bytes_cumulative": float(np.mean([h[i]["bytes_cumulative"] for h in histories])),
        } for i in range(rounds) if "test_accuracy_mean" in histories[0][i]]
    plot_curves(averaged, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="experiments/results/raw")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--target-fraction", type=float, default=0.95)
    args = parser.parse_args(argv)
    root, out = pathlib.Path(args.results), pathlib.Path(args.out)
    runs = load_runs(root)
    if not runs:
        print(f"report: error: no finished runs under {root}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    prefixes = sorted({run_id.split("/")[0] + "/" + run_id.split("/")[1] if run_id.startswith("main/")
                       else run_id.split("/")[0] for run_id in runs})
    for prefix in prefixes:
        text = table(runs, prefix, args.target_fraction)
        image = out / f"{prefix.replace('/', '_')}.png"
        plot(runs, prefix, image)
        sections.append(f"## {prefix}\n\n{text}\n\n![{prefix}]({image.name})\n")
    (out / "results.md").write_text("\n".join(sections))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

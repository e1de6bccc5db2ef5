"""Tables and plots from grid results (``experiments/grid.py``).

    python -m experiments.report                                   # experiments/results/raw -> experiments/results
    python -m experiments.report --results experiments/results/raw_smoke --out /tmp/report

Accuracy is each client's own-test accuracy at the final round, pooled over clients and
seeds (mean ± std); "vs local" is the paired difference to local-only training on the same
clients and seeds (mean ± standard error over clients; the ablations, all at α = 0.5, pair
with main/alpha0.5's local-only runs); "MB/round" is what one client sends
up per round; "MB to target" is the cumulative traffic (all clients, up and down) when the
mean own-test accuracy first reaches the target (default: 95% of the best final mean
accuracy in that table), "-" if never; "core share" is ‖A(C−I)B‖/‖ACB‖ at the last round
(how much of a client's update its shared core carries, tri-matrix methods only).

The report compares the folder with the grid it should hold (``--seeds``, default 0,1,2):
runs that are missing or unfinished are listed under each table and in the seeds column
("2/3"), never silently averaged away.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys

import numpy as np

Runs = dict[str, dict[str, list[dict]]]  # {run id without seed: {"seedN": history}}


def load_runs(root: pathlib.Path) -> Runs:
    """Every finished run under ``root`` (one with a summary.json), grouped over seeds."""
    runs: Runs = collections.defaultdict(dict)
    for summary in sorted(root.rglob("summary.json")):
        run_dir = summary.parent
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        runs[str(run_dir.relative_to(root).parent)][run_dir.name] = history
    return dict(runs)


def expected_runs(studies: list[str], seeds: list[int]) -> list[str]:
    """Every run id (with its seed) the grid of ``studies`` writes."""
    from experiments import grid

    return [run_id for study in studies for run_id, _ in grid.grid(study, seeds, smoke=True, overrides=[])]


def incomplete_runs(root: pathlib.Path, expected: list[str]) -> tuple[list[str], list[str]]:
    """(missing: never started, unfinished: metrics but no summary.json) among ``expected``."""
    missing, unfinished = [], []
    for run_id in expected:
        run_dir = root / run_id
        if (run_dir / "summary.json").exists():
            continue
        (unfinished if (run_dir / "metrics.jsonl").exists() else missing).append(run_id)
    return missing, unfinished


def _final_accuracies(histories: dict[str, list[dict]]) -> np.ndarray:
    return np.concatenate([h[-1]["client_test_accuracy"] for h in histories.values()])


def _mb_to_target(histories: dict[str, list[dict]], target: float) -> float | None:
    rounds = min(len(h) for h in histories.values())
    for index in range(rounds):
        accuracy = np.mean([h[index].get("test_accuracy_mean", np.nan) for h in histories.values()])
        if accuracy >= target:
            return float(np.mean([h[index]["bytes_cumulative"] for h in histories.values()]) / 1e6)
    return None


def _paired_gain(histories: dict[str, list[dict]], local: dict[str, list[dict]] | None) -> str:
    """Mean ± standard error over clients of (accuracy − local-only accuracy), same seeds."""
    if local is None:
        return "-"
    gains = [np.asarray(h[-1]["client_test_accuracy"]) - np.asarray(local[seed][-1]["client_test_accuracy"])
             for seed, h in histories.items() if seed in local]
    if not gains:
        return "-"
    gains = 100 * np.concatenate(gains)
    return f"{gains.mean():+.1f} ± {gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else 0:.1f}"


def _core_share(histories: dict[str, list[dict]]) -> str:
    shares = [h[-1]["core_share_mean"] for h in histories.values() if "core_share_mean" in h[-1]]
    return f"{np.mean(shares):.3f}" if shares else "-"


def natural_key(name: str) -> list:
    """Sort key reading numbers as numbers: lambda3.0 before lambda10.0, rank4 before rank16."""
    return [(0, float(part), "") if part[:1].isdigit() else (1, 0.0, part)
            for part in re.split(r"(\d+(?:\.\d+)?)", name) if part]


def table(runs: Runs, prefix: str, target_fraction: float,
          expected_seeds: int | None = None) -> str:
    """Markdown table of the runs whose id starts with ``prefix``."""
    selected = {k[len(prefix):].strip("/"): v for k, v in runs.items() if k.startswith(prefix)}
    if not selected:
        return ""
    best = max(float(np.mean(_final_accuracies(v))) for v in selected.values())
    target = target_fraction * best
    local = next((v for name, v in selected.items() if name.split("/")[-1] == "local"),
                 runs.get(_LOCAL_REFERENCE.get(prefix.split("/")[0], "")))
    lines = ["| run | own-test acc. (%) | vs local (pts) | global acc. (%) | seeds | MB/round (per client, up) "
             f"| MB to {100 * target:.1f}% | core share |",
             "|---|---|---|---|---|---|---|---|"]
    for name, histories in sorted(selected.items(), key=lambda item: natural_key(item[0])):
        accuracy = _final_accuracies(histories)
        global_acc = [h[-1].get("global_test_accuracy_mean") for h in histories.values()]
        global_acc = [g for g in global_acc if g is not None]
        to_target = _mb_to_target(histories, target)
        seeds = f"{len(histories)}" if expected_seeds is None else f"{len(histories)}/{expected_seeds}"
        paired = "-" if histories is local else _paired_gain(histories, local)
        first = next(iter(histories.values()))
        lines.append(
            f"| {name} | {100 * accuracy.mean():.1f} ± {100 * accuracy.std():.1f} | {paired} "
            f"| {100 * np.mean(global_acc):.1f} | {seeds} "
            f"| {first[-1]['bytes_up_per_client'] / 1e6:.4f} "
            f"| {'-' if to_target is None else f'{to_target:.2f}'} | {_core_share(histories)} |")
    return "\n".join(lines)


def plot(runs: Runs, prefix: str, path: pathlib.Path) -> bool:
    """Accuracy vs round and vs MB (mean over seeds); False when nothing finished."""
    from celora_jax.cli.reporting import plot_curves

    selected = {k[len(prefix):].strip("/"): list(v.values()) for k, v in runs.items() if k.startswith(prefix)}
    if not selected:
        return False
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
    return True


_MAIN_COLUMNS = ("local", "celora", "celora_avg", "fedavg_lora", "fedsa_lora", "ffa_lora")


def main_summary(runs: Runs) -> str:
    """The main study as one table: splits x methods, own-test accuracy (%) pooled over
    clients and seeds, the paired difference to local-only in brackets, seeds found."""
    splits = sorted({run_id.split("/")[1] for run_id in runs if run_id.startswith("main/")}, key=natural_key)
    if not splits:
        return ""
    lines = ["| split | " + " | ".join(_MAIN_COLUMNS) + " |", "|---|" + "---|" * len(_MAIN_COLUMNS)]
    for split in splits:
        local = runs.get(f"main/{split}/local")
        cells = []
        for method in _MAIN_COLUMNS:
            histories = runs.get(f"main/{split}/{method}")
            if histories is None:
                cells.append("-")
                continue
            accuracy = 100 * _final_accuracies(histories).mean()
            paired = "" if method == "local" else f" ({_paired_gain(histories, local)})"
            cells.append(f"{accuracy:.1f}{paired} [{len(histories)}]")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The ablations run on main/alpha0.5's clients (same partition and seeds): paired with its local.
_LOCAL_REFERENCE = {study: "main/alpha0.5/local" for study in ("ablation_beta", "ablation_lambda", "ablation_rank")}

# Studies whose tables are split one level further (by data split, by diagnosed setting).
_SECTION_DEPTH = {"main": 2, "diagnose": 2}


def section_of(run_id: str) -> str:
    parts = run_id.split("/")
    return "/".join(parts[:_SECTION_DEPTH.get(parts[0], 1)])


def _grouped(run_ids: list[str]) -> str:
    """'`a/celora` (seed1, seed2), ...' for run ids ending in /seedN."""
    seeds: dict[str, list[str]] = collections.defaultdict(list)
    for run_id in run_ids:
        run, _, seed = run_id.rpartition("/")
        seeds[run].append(seed)
    return ", ".join(f"`{run}` ({', '.join(found)})" for run, found in seeds.items())


def _runs(count: int) -> str:
    return f"{count} run" if count == 1 else f"{count} runs"


def _incomplete_note(missing: list[str], unfinished: list[str]) -> str:
    lines = []
    if missing:
        lines.append(f"**Missing ({_runs(len(missing))}, not in the table):** {_grouped(missing)}")
    if unfinished:
        lines.append(f"**Unfinished ({_runs(len(unfinished))}, started but no summary.json):** "
                     f"{_grouped(unfinished)}")
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from experiments import grid

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="experiments/results/raw")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--target-fraction", type=float, default=0.95)
    parser.add_argument("--seeds", default="0,1,2", help="the seeds the grid should hold (comma-separated)")
    parser.add_argument("--studies", default=None,
                        help=f"comma-separated studies to check for missing runs (default: those found; "
                             f"of {grid.STUDIES})")
    args = parser.parse_args(argv)
    root, out = pathlib.Path(args.results), pathlib.Path(args.out)
    runs = load_runs(root)
    found = sorted({run_id.split("/")[0] for run_id in runs} & set(grid.STUDIES))
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        studies = found if args.studies is None else [s.strip() for s in args.studies.split(",") if s.strip()]
        expected = expected_runs(studies, seeds)
    except ValueError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    if not runs and not expected:
        print(f"report: error: no finished runs under {root}", file=sys.stderr)
        return 2
    missing, unfinished = incomplete_runs(root, expected)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    summary = main_summary(runs)
    if summary:
        sections.append("## main (summary)\n\nOwn-test accuracy (%), pooled over clients and seeds; in brackets "
                        "the paired difference to local-only (± standard error over clients); [seeds found].\n\n"
                        + summary + "\n")
    for section in sorted({section_of(run_id) for run_id in list(runs) + expected}):
        text = table(runs, section + "/", args.target_fraction, len(seeds) if section.split("/")[0] in studies else None)
        image = out / f"{section.replace('/', '_')}.png"
        parts = [f"## {section}", text or "No finished runs."]
        if plot(runs, section + "/", image):
            parts.append(f"![{section}]({image.name})")
        note = _incomplete_note([r for r in missing if r.startswith(section + "/")],
                                [r for r in unfinished if r.startswith(section + "/")])
        if note:
            parts.append(note)
        sections.append("\n\n".join(parts) + "\n")
    (out / "results.md").write_text("\n".join(sections))
    print((out / "results.md").read_text())
    if missing or unfinished:
        print(f"report: {len(missing)} runs missing and {len(unfinished)} unfinished out of {len(expected)} "
              f"expected (listed under each table); means cover the finished seeds only", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

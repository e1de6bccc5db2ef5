"""Accuracy vs privacy budget: CE-LoRA with differentially private core uploads (METHOD.md §8).

Runs the ``default`` preset (MiniLM, movie reviews, 10 clients, Dirichlet 0.5, 8 rounds of
one local epoch) with ``dp.target_epsilon`` set to each ε in turn, plus a run without DP.
Each client clips its round's core change to ``--clip-norm`` and adds Gaussian noise
calibrated so that all rounds together spend ε at δ = 1e-5 (``celora_jax.privacy.dp``).
The aggregation uses the parameter-space distance only (``aggregation.beta=0``) so that
the ε covers every upload: the data statistic of the personalized aggregation is not
privatized. Runs whose ``summary.json`` exists are skipped (an interrupted study resumes).

    python experiments/dp.py                               # writes experiments/results/dp/
    python experiments/dp.py --epsilons 1,8,64,inf --clip-norm 0.1
    python experiments/dp.py --smoke                       # CI-sized

Output: one directory per ε with the run's files, ``results.jsonl`` (one line per ε),
``results.md`` (the table) and ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys

from celora_jax.federated.config import apply_overrides

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "dp"


def _parse_epsilons(text: str) -> list[float]:
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        value = math.inf if item in ("inf", "none") else float(item)
        if not value > 0:
            raise ValueError(f"every ε must be > 0 or 'inf', got {item!r}")
        values.append(value)
    if not values:
        raise ValueError("give at least one ε")
    return values


def run_id(epsilon: float) -> str:
    return "no_dp" if math.isinf(epsilon) else f"eps{epsilon:g}"


def study_config(preset: str, epsilon: float, clip_norm: float, overrides: list[str]):
    from celora_jax.federated.presets import get_preset

    settings = ["aggregation.beta=0.0"]
    if not math.isinf(epsilon):
        settings += [f"dp.clip_norm={clip_norm}", f"dp.target_epsilon={epsilon}"]
    return apply_overrides(get_preset(preset), settings + overrides)


def _row(epsilon: float, summary: dict, history: list[dict]) -> dict:
    final = history[-1]
    return {
        "epsilon": None if math.isinf(epsilon) else epsilon,
        "epsilon_spent": summary.get("dp_epsilon"),
        "noise_multiplier": summary.get("dp_noise_multiplier", 0.0),
        "clip_norm": summary.get("dp_clip_norm"),
        "test_accuracy_mean": summary["test_accuracy_mean"],
        "test_accuracy_std": summary["test_accuracy_std"],
        "global_test_accuracy_mean": summary["global_test_accuracy_mean"],
        "accuracy_by_round": [r.get("test_accuracy_mean") for r in history],
        "clipped_fraction_last_round": final.get("dp_clipped_fraction"),
        "update_norm_median_last_round": final.get("dp_update_norm_median"),
        "seconds": summary["seconds"],
    }


def write_table(rows: list[dict], path: pathlib.Path, command: str) -> None:
    lines = [f"Command: `{command}`", "",
             "| ε (δ = 1e-5) | noise multiplier | own-test accuracy | global-test accuracy | clipped (last round) |",
             "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -(r["epsilon"] or math.inf)):
        epsilon = "∞ (no DP)" if row["epsilon"] is None else f"{row['epsilon_spent']:.3g}"
        clipped = "–" if row["clipped_fraction_last_round"] is None else f"{100 * row['clipped_fraction_last_round']:.0f}%"
        lines.append(f"| {epsilon} | {row['noise_multiplier']:.3g} | "
                     f"{100 * row['test_accuracy_mean']:.1f} ± {100 * row['test_accuracy_std']:.1f}% | "
                     f"{100 * row['global_test_accuracy_mean']:.1f}% | {clipped} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
    baseline = [r for r in rows if r["epsilon"] is None]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for key, label, color in (("test_accuracy_mean", "own test", "C0"),
                              ("global_test_accuracy_mean", "global test", "C1")):
        if private:
            axis.plot([r["epsilon"] for r in private], [100 * r[key] for r in private], marker="o",
                      color=color, label=f"{label}, DP uploads")
        for row in baseline:
            axis.axhline(100 * row[key], color=color, linestyle="--", label=f"{label}, no DP")
    if private:
        axis.set_xscale("log")
    axis.set_xlabel("ε over all rounds (δ = 1e-5)")
    axis.set_ylabel("accuracy, mean over clients (%)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default=None,
                        help="comma-separated ε values; 'inf' = no DP (default 1,8,64,inf; smoke 8,inf)")
    parser.add_argument("--clip-norm", type=float, default=0.1,
                        help="L2 bound on a client's core change per round (the default preset's "
                             "median change is 0.1-0.2)")
    parser.add_argument("--smoke", action="store_true", help="the smoke preset and two ε values")
    parser.add_argument("--out", default=None, help=f"results directory (default {RESULTS})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        epsilons = _parse_epsilons(args.epsilons or ("8,inf" if args.smoke else "1,8,64,inf"))
        if not args.clip_norm > 0:
            raise ValueError(f"--clip-norm must be > 0, got {args.clip_norm}")
        preset = "smoke" if args.smoke else "default"
        configs = [(e, study_config(preset, e, args.clip_norm, args.overrides)) for e in epsilons]
    except ValueError as err:
        print(f"dp: error: {err}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    from celora_jax.federated import engine

    out = pathlib.Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for epsilon, config in tqdm(configs, desc="dp", unit="run"):
        directory = out / run_id(epsilon)
        if not (directory / "summary.json").exists():
            engine.run(config, output_dir=directory)
        summary = json.loads((directory / "summary.json").read_text())
        history = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
        rows.append(_row(epsilon, summary, history))
    with open(out / "results.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    command = "python experiments/dp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(rows, out / "results.md", command.strip())
    write_plot(rows, out / "accuracy_vs_epsilon.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

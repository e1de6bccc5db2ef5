"""Benchmarks that can tell methods apart (issue #21): gated settings, then the grid.

    python -m experiments.benchmarks --stage gates            # reference methods, 3 seeds
    python -m experiments.benchmarks --stage grid             # every method on the gated settings
    python -m experiments.benchmarks --stage report           # summary.json, table.md, plots
    python -m experiments.benchmarks --stage all --smoke      # CI-sized: all of it, in minutes

A setting (``celora_jax.federated.presets.BENCHMARKS``) measures something only if two reference
methods differ on it by more than 3 standard errors, paired over clients and seeds: its
gate. Gates: (a) few-shot IID: FedAvg-LoRA beats local training; (b) clustered labels: the
cluster oracle beats both FedAvg-LoRA and local; (c) clustered domains: the cluster oracle
or FedAvg-LoRA beats local, on reviews by source and on Fashion-MNIST with each cluster's
images rotated by its own quarter turns (the ViT with a classification head); (d) the natural Shakespeare split (next-token prediction with
SmolLM2, decoder-sized, so run only when named: ``--settings shakespeare_natural``):
FedAvg-LoRA beats local, our own choice of reference pair for a natural split. The grid
runs every method on every setting, with two references beside them: ``cluster_oracle``
(FedAvg-LoRA inside each true cluster) and ``centralized`` (FedAvg-LoRA whose clients all
draw their batches from the pooled training data, ``partition.pooled_training``: one model
on everyone's data, the usual upper bound when the clients share one distribution). The report
says which gates passed, so no table is read on a setting that failed its gate.

Every run writes ``<out>/<setting>/<method>/seed<k>/`` (config.json, metrics.jsonl,
summary.json); a run whose summary.json exists is skipped, so an interrupted stage resumes.
Seeds change the partition and the training alike (``seed`` = ``partition.seed``).
``--variant NAME`` runs CE-LoRA variants (β, the class-conditional data distance, the core
remedies) beside the methods, as rows named ``celora[NAME]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time

import numpy as np

from celora_jax.federated.config import RunConfig, apply_overrides
from celora_jax.federated.presets import BENCHMARKS, smoke_variant

logger = logging.getLogger(__name__)

RESULTS = pathlib.Path("experiments/results/benchmarks")


@dataclasses.dataclass(frozen=True)
class Gate:
    """``winner`` must beat every ``losers`` entry (``any_winner``: one of several winners
    suffices) by more than ``threshold`` standard errors."""

    rule: str
    pairs: tuple[tuple[str, str], ...]
    any_winner: bool = False
    threshold: float = 3.0
    min_seeds: int = 3  # fewer seeds make a pilot, not a gate

    def methods(self) -> list[str]:
        return sorted({m for pair in self.pairs for m in pair})


GATES = {
    "trec_fewshot_iid": Gate("fedavg_lora > local by > 3 SE", (("fedavg_lora", "local"),)),
    "wordnet_clustered_labels": Gate("cluster_oracle > fedavg_lora and cluster_oracle > local by > 3 SE",
                                     (("cluster_oracle", "fedavg_lora"), ("cluster_oracle", "local"))),
    "movie_reviews_clustered_domains": Gate("cluster_oracle > local or fedavg_lora > local by > 3 SE",
                                            (("cluster_oracle", "local"), ("fedavg_lora", "local")),
                                            any_winner=True),
    "fashion_mnist_clustered_rotations": Gate("cluster_oracle > local or fedavg_lora > local by > 3 SE",
                                              (("cluster_oracle", "local"), ("fedavg_lora", "local")),
                                              any_winner=True),
    "shakespeare_natural": Gate("fedavg_lora > local by > 3 SE", (("fedavg_lora", "local"),)),
}
# What runs when --settings is not given: the settings sized for a 2-core CPU.
DEFAULT_SETTINGS = ("trec_fewshot_iid", "wordnet_clustered_labels", "movie_reviews_clustered_domains",
                    "fashion_mnist_clustered_rotations")

GRID_METHODS = ("local", "fedavg_lora", "fedavg_lora_ft", "fedprox", "ffa_lora", "fedsa_lora", "fedex_lora",
                "celora_avg", "celora", "cluster_oracle", "centralized")

# References that are a method run on other data: name -> (method, overrides). The
# centralized reference: one model (FedAvg-LoRA, head and norms shared) whose clients all
# draw their batches from the pooled training data, tested on each client's own split.
REFERENCES = {"centralized": ("fedavg_lora", ["partition.pooled_training=True"])}

# CE-LoRA variants: which similarity sees which shift, and does the core carry enough?
VARIANTS = {
    "beta0": ["aggregation.beta=0.0"],
    "beta1": ["aggregation.beta=1.0"],
    "beta1_class_conditional": ["aggregation.beta=1.0", "aggregation.data_distance='class_conditional'"],
    "class_conditional": ["aggregation.data_distance='class_conditional'"],
    # Both measured fixes at once: the distance that sees concept shift, and cores that carry more.
    "class_conditional_core_lr10": ["aggregation.data_distance='class_conditional'",
                                    "optimizer.core_lr_multiplier=10.0"],
    "core_lr10": ["optimizer.core_lr_multiplier=10.0"],
    "freeze_ab_after1": ["optimizer.freeze_factors_after=1"],
}


def setting_config(setting: str, smoke: bool) -> RunConfig:
    try:
        config = BENCHMARKS[setting]
    except KeyError:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(BENCHMARKS)}") from None
    return smoke_variant(config) if smoke else config


def run_label(method: str, variant: str | None) -> str:
    return method if variant is None else f"celora[{variant}]"


def runs(settings, methods, variants, seeds, smoke: bool, overrides: list[str], root: pathlib.Path = RESULTS):
    """(run directory relative to the results root, config) of every requested run."""
    for setting in settings:
        # With --set tracking.backends=..., every run of a setting lands in one tracking group.
        base = apply_overrides(setting_config(setting, smoke), [f"tracking.directory={str(root / 'tracking')!r}",
                                                                f"tracking.experiment={setting!r}"])
        jobs = [(m, None) for m in methods] + [("celora", v) for v in variants]
        for method, variant in jobs:
            extra = [] if variant is None else VARIANTS[variant]
            trained_as, reference = REFERENCES.get(method, (method, []))
            for seed in seeds:
                config = apply_overrides(base, [f"federation.method='{trained_as}'", *reference, f"seed={seed}",
                                                f"partition.seed={seed}", "federation.eval_every=1",
                                                *extra, *overrides])
                yield f"{setting}/{run_label(method, variant)}/seed{seed}", config


def execute(todo, root: pathlib.Path) -> float:
    """Runs what has no summary.json yet; returns the seconds it took."""
    from tqdm.auto import tqdm

    from celora_jax.federated import engine

    started = time.perf_counter()
    pending = [(run_id, config) for run_id, config in todo if not (root / run_id / "summary.json").exists()]
    print(f"{len(todo)} runs, {len(todo) - len(pending)} already done, {len(pending)} to go", flush=True)
    for run_id, config in tqdm(pending, desc="benchmarks", unit="run"):
        engine.run(config, output_dir=root / run_id)
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- analysis


def read_run(run_dir: pathlib.Path) -> dict | None:
    """Final per-client accuracies, accuracy per round, bytes, W and clusters of one run."""
    if not (run_dir / "summary.json").exists():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = records[-1]
    return {
        "clients": np.asarray(final["client_test_accuracy"], np.float64),
        "curve": [r.get("test_accuracy_mean") for r in records],
        "bytes_per_round": float(final["bytes_round"]),
        "weights": final.get("weights"),
        "weights_by_round": [r.get("weights") for r in records],
        "weight_in_true_cluster": [r.get("weight_in_true_cluster_mean") for r in records],
        "core_share": final.get("core_share_mean"),
        "clusters": summary.get("true_clusters"),
        "seconds": float(summary.get("seconds", 0.0)),
        "first_round_seconds": float(records[0].get("seconds", 0.0)),
    }


def paired(a: dict[int, dict], b: dict[int, dict]) -> tuple[float, float, int]:
    """Mean and standard error of the per-(client, seed) accuracy differences a - b over
    the seeds both have; (nan, nan, 0) if none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, 0
    diffs = np.concatenate([a[s]["clients"] - b[s]["clients"] for s in seeds])
    se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return float(diffs.mean()), se, len(seeds)


def worst_fraction(clients: np.ndarray, fraction: float = 0.1) -> float:
    """Mean accuracy of the worst ``fraction`` of clients (at least one)."""
    count = max(1, int(round(fraction * len(clients))))
    return float(np.sort(clients)[:count].mean())


def adjusted_rand_of_weights(weights, clusters) -> float | None:
    """Adjusted Rand index between the true clusters and a spectral clustering (into as
    many clusters) of the symmetrized W: 1 = W recovers the clusters exactly."""
    if weights is None or clusters is None or len(set(clusters)) < 2:
        return None
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    w = np.asarray(weights, np.float64)
    affinity = 0.5 * (w + w.T) + 1e-9
    found = SpectralClustering(n_clusters=len(set(clusters)), affinity="precomputed", random_state=0
                               ).fit_predict(affinity)
    return float(adjusted_rand_score(clusters, found))


def mean_by_round(curves: list[list]) -> list:
    """Mean over seeds of per-round values; None for a round some seed lacks."""
    return [None if any(v is None for v in values) else float(np.mean(values)) for values in zip(*curves)]


def gate_result(gate: Gate, methods: dict[str, dict[int, dict]]) -> dict:
    checks = []
    for winner, loser in gate.pairs:
        diff, se, seeds = paired(methods.get(winner, {}), methods.get(loser, {}))
        checks.append({"winner": winner, "loser": loser, "diff": diff, "se": se, "seeds": seeds,
                       "passed": bool(seeds >= gate.min_seeds and se > 0 and diff > gate.threshold * se)})
    passed = any(c["passed"] for c in checks) if gate.any_winner else all(c["passed"] for c in checks)
    seeds = min((c["seeds"] for c in checks), default=0)
    return {"rule": gate.rule, "passed": bool(passed), "checks": checks, "seeds": seeds,
            "pilot": seeds < gate.min_seeds}


def summarize_setting(setting_dir: pathlib.Path, gate: Gate | None) -> dict:
    methods: dict[str, dict[int, dict]] = {}
    for run_dir in sorted(setting_dir.glob("*/seed*")):
        result = read_run(run_dir)
        if result is not None:
            methods.setdefault(run_dir.parent.name, {})[int(run_dir.name[4:])] = result
    table = {}
    for name, by_seed in sorted(methods.items()):
        seeds = sorted(by_seed)
        row = {"mean": float(np.mean([by_seed[s]["clients"].mean() for s in seeds])),
               "worst10": float(np.mean([worst_fraction(by_seed[s]["clients"]) for s in seeds])),
               "seeds": len(seeds),
               "bytes_per_round": by_seed[seeds[0]]["bytes_per_round"],
               "seconds_per_run": float(np.mean([by_seed[s]["seconds"] for s in seeds])),
               # Round 1 compiles the programs: cold for the first seed, from the cache after.
               "first_round_seconds_by_seed": [by_seed[s]["first_round_seconds"] for s in seeds],
               "accuracy_by_round": np.mean([by_seed[s]["curve"] for s in seeds], axis=0).tolist()}
        # CE-LoRA and its variants also against its plain average of cores (METHOD.md §7 claim 2).
        claim_two = ("celora_avg",) if name.startswith("celora") and name != "celora_avg" else ()
        for reference in ("local", "fedavg_lora", *claim_two):
            diff, se, _ = paired(by_seed, methods.get(reference, {}) if reference != name else {})
            row[f"diff_vs_{reference}"], row[f"se_vs_{reference}"] = diff, se
        in_cluster = [by_seed[s]["weight_in_true_cluster"][-1] for s in seeds
                      if by_seed[s]["weight_in_true_cluster"] and by_seed[s]["weight_in_true_cluster"][-1] is not None]
        if in_cluster:
            row["weight_in_true_cluster"] = float(np.mean(in_cluster))
            row["weight_in_true_cluster_by_round"] = mean_by_round([by_seed[s]["weight_in_true_cluster"]
                                                                    for s in seeds])
            by_round = mean_by_round([[adjusted_rand_of_weights(w, by_seed[s]["clusters"])
                                       for w in by_seed[s]["weights_by_round"]] for s in seeds])
            row["adjusted_rand_index"], row["adjusted_rand_index_by_round"] = by_round[-1], by_round
        shares = [by_seed[s]["core_share"] for s in seeds if by_seed[s]["core_share"] is not None]
        if shares:
            row["core_share"] = float(np.mean(shares))
        table[name] = row
    result = {"methods": table}
    if gate is not None:
        result["gate"] = gate_result(gate, methods)
    return result


def summarize(root: pathlib.Path) -> dict:
    settings = {}
    for setting_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = setting_dir.name.removesuffix("_smoke")
        if any(setting_dir.glob("*/seed*/summary.json")):
            settings[setting_dir.name] = summarize_setting(setting_dir, GATES.get(name))
    return {"settings": settings}


def _number(value, digits=1, scale=100.0) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{scale * value:.{digits}f}"


def overview(summary: dict) -> list[str]:
    """One table of every method (rows) on every setting (columns): accuracy and, in brackets,
    the paired difference to local training ± its standard error; [k] when fewer than 3 seeds."""
    settings = list(summary["settings"])
    names = [m for m in GRID_METHODS if any(m in summary["settings"][s]["methods"] for s in settings)]
    names += sorted({m for s in settings for m in summary["settings"][s]["methods"]} - set(names))
    lines = ["## All settings", "", "Accuracy (%) (difference to local ± SE); [k]: only k seeds; -: not run.", "",
             "| method | " + " | ".join(f"`{s}`" for s in settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for method in names:
        cells = []
        for setting in settings:
            row = summary["settings"][setting]["methods"].get(method)
            if row is None:
                cells.append("-")
                continue
            cell = _number(row["mean"])
            if method != "local" and not math.isnan(row["diff_vs_local"]):
                cell += f" ({row['diff_vs_local'] * 100:+.1f} ± {_number(row['se_vs_local'])})"
            cells.append(cell + (f" [{row['seeds']}]" if row["seeds"] < 3 else ""))
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(summary: dict) -> str:
    lines = ["# Benchmarks that tell methods apart", "",
             "Own-test accuracy (%) at the last round, mean over clients and seeds; worst10 = mean of the "
             "worst 10% of clients; differences in points, paired over (client, seed), ± one standard error "
             "(vs CE-LoRA avg: CE-LoRA and its variants against the plain average of cores). "
             "W in cluster = mass of CE-LoRA's aggregation weights on the client's true cluster; ARI = adjusted "
             "Rand index of a spectral clustering of W.", ""]
    lines += overview(summary)
    for name, setting in summary["settings"].items():
        gate = setting.get("gate")
        lines.append(f"## {name}")
        if gate:
            verdict = ("passed" if gate["passed"] else "FAILED (the setting cannot rank methods)") if not gate["pilot"] \
                else f"not decided: a pilot with {gate['seeds']} seed(s), the gate needs 3"
            checks = "; ".join(f"{c['winner']} - {c['loser']} = {_number(c['diff'], 2)} ± {_number(c['se'], 2)}"
                               for c in gate["checks"])
            lines += ["", f"Gate: {gate['rule']}: **{verdict}** ({checks})."]
        lines += ["", "| method | seeds | accuracy | worst10 | vs local | vs FedAvg-LoRA | vs CE-LoRA avg | MB/round "
                  "| W in cluster | ARI | core share |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, row in setting["methods"].items():
            lines.append(
                f"| {method} | {row['seeds']} | {_number(row['mean'])} | {_number(row['worst10'])} | "
                f"{_number(row['diff_vs_local'], 2)} ± {_number(row['se_vs_local'], 2)} | "
                f"{_number(row['diff_vs_fedavg_lora'], 2)} ± {_number(row['se_vs_fedavg_lora'], 2)} | "
                + (f"{_number(row['diff_vs_celora_avg'], 2)} ± {_number(row['se_vs_celora_avg'], 2)} | "
                   if "diff_vs_celora_avg" in row else "n/a | ") +
                f"{row['bytes_per_round'] / 1e6:.3f} | {_number(row.get('weight_in_true_cluster'), 2, 1.0)} | "
                f"{_number(row.get('adjusted_rand_index'), 2, 1.0)} | {_number(row.get('core_share'), 3, 1.0)} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, root: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Accuracy vs round per setting, and CE-LoRA's final W (seed 0) with the true cluster
    boundaries drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, setting in summary["settings"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, row in setting["methods"].items():
            curve = row["accuracy_by_round"]
            ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], label=method,
                    linestyle="--" if method in ("local", "centralized") or "oracle" in method else "-")
        ax.set(xlabel="round", ylabel="own-test accuracy (%)", title=name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}_accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        run = read_run(root / name / "celora" / "seed0")
        if run is not None and run["weights"] is not None and run["clusters"] is not None:
            fig, ax = plt.subplots(figsize=(4.5, 4))
            image = ax.imshow(np.asarray(run["weights"]), cmap="viridis")
            clusters = np.asarray(run["clusters"])
            for edge in np.flatnonzero(np.diff(clusters)) + 0.5:
                ax.axhline(edge, color="white", linewidth=1)
                ax.axvline(edge, color="white", linewidth=1)
            ax.set(title=f"CE-LoRA W, {name} (seed 0)", xlabel="client j", ylabel="client i")
            fig.colorbar(image)
            fig.tight_layout()
            path = out / f"{name}_weights.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _without_nan(value):
    """NaN (a difference nothing pairs with) as null, so that summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def report(root: pathlib.Path) -> dict:
    summary = summarize(root)
    (root / "summary.json").write_text(json.dumps(_without_nan(summary), indent=2, allow_nan=False))
    (root / "table.md").write_text(markdown(summary))
    plot(summary, root, root)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="gates", choices=("gates", "grid", "variants", "report", "all"))
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated settings of {sorted(BENCHMARKS)}")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the stage's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="CE-LoRA variants of the 'variants' stage")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--smoke", action="store_true", help="CI-sized runs (4 clients, 2 rounds)")
    parser.add_argument("--out", default=None, help=f"results root (default {RESULTS}[_smoke])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = pathlib.Path(args.out or (f"{RESULTS}_smoke" if args.smoke else RESULTS))
    try:
        settings = [s for s in args.settings.split(",") if s]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        for setting in settings:
            setting_config(setting, args.smoke)
        variants = [v for v in args.variants.split(",") if v]
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
        todo = []
        if args.stage in ("gates", "all"):
            for setting in settings:
                gate_methods = args.methods.split(",") if args.methods else GATES[setting].methods()
                todo += list(runs([setting], gate_methods, [], seeds, args.smoke, args.overrides, root))
        if args.stage in ("grid", "all"):
            methods = args.methods.split(",") if args.methods else GRID_METHODS
            todo += list(runs(settings, methods, [], seeds, args.smoke, args.overrides, root))
        if args.stage in ("variants", "all"):
            todo += list(runs(settings, [], variants, seeds, args.smoke, args.overrides, root))
    except ValueError as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        return 2
    unique = list(dict(todo).items())  # the grid repeats the gates' runs
    if unique:
        seconds = execute(unique, root)
        print(f"ran in {seconds:.0f} s", flush=True)
    if root.exists():
        summary = report(root)
        for name, setting in summary["settings"].items():
            gate = setting.get("gate")
            if gate:
                print(f"{name}: gate {'passed' if gate['passed'] else 'FAILED'} ({gate['rule']})")
        print(f"results: {root}/ (summary.json, table.md, plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

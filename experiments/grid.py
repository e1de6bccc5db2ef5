"""Study grids reproducing CE-LoRA's comparisons (METHOD.md §7), resumable run by run.

    python -m experiments.grid --study main                 # full CPU-sized grid
    python -m experiments.grid --study all --smoke          # CI-sized: 2 rounds, 3 clients
    python -m experiments.grid --study ablation_lambda --seeds 0,1,2 --set federation.rounds=20

Every run writes ``<out>/<study>/<run id>/`` (``metrics.jsonl``, ``summary.json``,
``config.json``); a run whose ``summary.json`` exists is skipped, so an interrupted grid
resumes where it stopped, and a run whose config equals a finished run's (the ablations'
defaults are main/alpha0.5's settings) is copied from it, its summary naming the source.
``python -m experiments.report`` turns the results into tables and plots. Studies:

- main: methods x {Dirichlet alpha 0.1, 0.5, 1.0 over labels, split by source (IMDB vs
  Rotten Tomatoes)}; rank 8.
- ablation_beta: CE-LoRA with beta 0 (parameters only), 0.5, 1 (data only), alpha 0.5.
- ablation_lambda: CE-LoRA with lambda 0.1, 0.3, 1, 3, 10, alpha 0.5.
- ablation_rank: CE-LoRA and FedAvg-LoRA with r 4, 8, 16, alpha 0.5.
- diagnose: why CE-LoRA, its plain average and local training tie: alpha 1.0 (the paper's),
  learning rate 1e-3 / 5e-3 and A's init scale 1e-3 / 3e-2, with local-only, CE-LoRA
  (personalized and plain average), CE-LoRA with lambda -> 0 (cores never mixed: tri-matrix
  local training) and FedAvg-LoRA; and the core-only ablation (A, B frozen, only the shared
  core trained). Every run logs ``core_share`` (how much of each client's update its shared
  core carries).

Size (``STUDY`` below), chosen for the 2-core CPU machines: MiniLM, 10 clients with 64
training and 64 test reviews each, 48 tokens, batch 16, 4 local steps (one local epoch) per
round, 12 rounds; about 2 CPU-minutes per run measured on 2 cores (compile included; 3.6
before the CPU speed-ups of 2026-11-26), so the main table (72 runs with 3 seeds) takes
about 2.5 CPU-hours and the ablations (42 runs, 12 of them copies of main/alpha0.5 runs)
about 1: run them across sessions, the grid resumes. On a GPU/TPU raise clients, examples,
tokens and rounds with ``--set``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import shutil
import sys
from typing import Iterator

from celora_jax.data.partition import PartitionConfig
from celora_jax.federated.config import FederationConfig, ModelConfig, RunConfig, apply_overrides, to_dict

logger = logging.getLogger(__name__)

STUDY = RunConfig(
    name="study",
    model=ModelConfig(max_length=48),
    partition=PartitionConfig(scheme="dirichlet", num_clients=10, alpha=0.5, train_examples=64,
                              test_examples=64, global_test_examples=256),
    federation=FederationConfig(method="celora", rounds=12, batch_size=16),
)

SMOKE = dataclasses.replace(
    STUDY,
    name="study_smoke",
    model=ModelConfig(max_length=24),
    partition=PartitionConfig(scheme="dirichlet", num_clients=3, alpha=0.5, train_examples=8,
                              test_examples=8, global_test_examples=16),
    federation=FederationConfig(method="celora", rounds=2, batch_size=8),
)

SPLITS = {
    "alpha0.1": ["partition.scheme='dirichlet'", "partition.alpha=0.1"],
    "alpha0.5": ["partition.scheme='dirichlet'", "partition.alpha=0.5"],
    "alpha1.0": ["partition.scheme='dirichlet'", "partition.alpha=1.0"],
    "source": ["partition.scheme='source'"],
}


# The six methods of the committed main grid (the benchmark suite of issue #21 adds the
# newer ones: fedprox, fedex_lora, fedavg_lora_ft).
MAIN_METHODS = ("celora", "celora_avg", "fedavg_lora", "fedsa_lora", "ffa_lora", "local")


def _study_runs(study: str) -> Iterator[tuple[str, list[str]]]:
    """(run id without seed, overrides) of one study."""
    if study == "main":
        for split, overrides in SPLITS.items():
            for method in MAIN_METHODS:
                yield f"{split}/{method}", overrides + [f"federation.method='{method}'"]
    elif study == "ablation_beta":
        for beta in (0.0, 0.5, 1.0):
            yield f"beta{beta}", ["federation.method='celora'", f"aggregation.beta={beta}"]
    elif study == "ablation_lambda":
        for lam in (0.1, 0.3, 1.0, 3.0, 10.0):
            yield f"lambda{lam}", ["federation.method='celora'", f"aggregation.lam={lam}"]
    elif study == "ablation_rank":
        for method in ("celora", "fedavg_lora"):
            for rank in (4, 8, 16):
                yield f"rank{rank}/{method}", [f"federation.method='{method}'", f"adapter.rank={rank}"]
    elif study == "diagnose":
        # Why do CE-LoRA, its plain average and local training tie? The paper's alpha (1.0),
        # the learning rate and A's init scale (1e-3 as the authors; 0.03 ~ PEFT's kaiming A).
        for setting, overrides in DIAGNOSE_SETTINGS.items():
            # Under core_only the cores are the whole update; LoRA baselines have no cores.
            baselines = () if "adapter.core_only=True" in overrides else ("local", "fedavg_lora")
            for method in ("celora_avg", "celora") + baselines:
                yield f"{setting}/{method}", SPLITS["alpha1.0"] + overrides + [f"federation.method='{method}'"]
            # lambda -> 0 puts all weight on the client itself: tri-matrix adapters, no mixing.
            yield f"{setting}/celora_self", SPLITS["alpha1.0"] + overrides + [
                "federation.method='celora'", "aggregation.lam=1e-6"]
    else:
        raise ValueError(f"unknown study {study!r}; choose one of {STUDIES} or 'all'")


DIAGNOSE_SETTINGS = {
    "lr1e-3_a1e-3": ["optimizer.learning_rate=1e-3", "adapter.a_init_std=1e-3"],
    "lr5e-3_a1e-3": ["optimizer.learning_rate=5e-3", "adapter.a_init_std=1e-3"],
    "lr1e-3_a3e-2": ["optimizer.learning_rate=1e-3", "adapter.a_init_std=3e-2"],
    # METHOD.md §1's ablation: A and B frozen (B random), C = 0 trained: the core carries all.
    "core_only": ["optimizer.learning_rate=5e-3", "adapter.a_init_std=3e-2", "adapter.core_only=True"],
}

STUDIES = ("main", "ablation_beta", "ablation_lambda", "ablation_rank", "diagnose")


def grid(study: str, seeds: list[int], smoke: bool, overrides: list[str]) -> list[tuple[str, RunConfig]]:
    """Every (run id, config) of ``study`` ('all' for every study)."""
    base = SMOKE if smoke else STUDY
    studies = STUDIES if study == "all" else (study,)
    runs = []
    for name in studies:
        for run_id, run_overrides in _study_runs(name):
            for seed in seeds:
                config = apply_overrides(base, run_overrides + [f"seed={seed}", f"partition.seed={seed}"]
                                         + overrides)
                runs.append((f"{name}/{run_id}/seed{seed}", config))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="main", help=f"one of {STUDIES} or 'all'")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--smoke", action="store_true", help="tiny CI-sized runs")
    parser.add_argument("--out", default=None, help="results root (default experiments/results/raw[_smoke])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from tqdm.auto import tqdm

    from celora_jax.federated import engine

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        runs = grid(args.study, seeds, args.smoke, args.overrides)
    except ValueError as err:
        print(f"grid: error: {err}", file=sys.stderr)
        return 2
    default_out = "experiments/results/raw_smoke" if args.smoke else "experiments/results/raw"
    root = pathlib.Path(args.out or default_out)
    todo = [(run_id, config) for run_id, config in runs if not (root / run_id / "summary.json").exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to go")
    if args.dry_run:
        for run_id, _ in todo:
            print(run_id)
        return 0
    for run_id, config in tqdm(todo, desc="grid", unit="run"):
        twin = finished_twin(root, config)
        if twin is not None:
            copy_twin(twin, root / run_id, root)
            continue
        engine.run(config, output_dir=root / run_id)  # writes summary.json last
    return 0


def finished_twin(root: pathlib.Path, config: RunConfig) -> pathlib.Path | None:
    """A finished run under ``root`` with this config (client blocks aside), if any.

    Studies overlap (the ablations' defaults are main/alpha0.5's runs) and a run is a
    function of its config up to floating-point reduction order (rerunning
    main/alpha0.5/celora at seed 0 gave the same per-client final accuracies and training
    losses within 8e-5), so such a run is copied rather than recomputed.
    """
    return twin_among(root.rglob("summary.json"), config, _result_settings)


def twin_among(summaries, config: RunConfig, settings) -> pathlib.Path | None:
    """The first finished run (a ``summary.json`` beside its ``config.json``) whose written
    config equals ``config`` once both pass through ``settings`` (which drops what does not
    change the result). The grid and the protocol each choose their candidates and settings."""
    wanted = settings(json.loads(json.dumps(to_dict(config))))  # as engine.run writes it
    for summary in sorted(summaries):
        config_path = summary.parent / "config.json"
        if config_path.exists() and settings(json.loads(config_path.read_text())) == wanted:
            return summary.parent
    return None


def _result_settings(config: dict) -> dict:
    """A written config without the fields that only schedule the work (client blocks, the
    compilation cache) and with the fields added since the grid's first runs at their
    defaults (method options, corpus, clusters, core remedies, ...), the adapter kind left
    to the method (it always was)."""
    config = with_defaults(config, to_dict(RunConfig()))
    config.pop("compilation_cache", None)
    federation = {k: v for k, v in config["federation"].items() if k != "client_block"}
    adapter = {**config["adapter"], "kind": None}
    return {**config, "federation": federation, "adapter": adapter}


def with_defaults(written: dict, defaults: dict) -> dict:
    """``written`` with every key it lacks taken from ``defaults``, section by section."""
    merged = dict(written)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and value and isinstance(merged[key], dict):
            merged[key] = with_defaults(merged[key], value)
    return merged


def copy_twin(twin: pathlib.Path, run_dir: pathlib.Path, root: pathlib.Path) -> None:
    """Copies a twin's results into ``run_dir``; its summary names where they came from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copyfile(twin / name, run_dir / name)
    summary = json.loads((twin / "summary.json").read_text())
    summary.setdefault("same_config_as", str(twin.relative_to(root)))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # written last, as engine.run


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: how long a user waits for a first result, cold and warm (issue #23, item 1).

Each measurement starts a fresh process, as a user does, with JAX's persistent compilation
cache pointed at one directory (``CELORA_JAX_COMPILATION_CACHE``): *cold* is that directory
empty, *warm* is the same command again, every program now on disk.

* ``cli``: ``celora-jax run --preset P --methods celora --set federation.rounds=1``, the
  wall seconds from starting the process to its exit (imports, model and data loading,
  compilation, round 1 and its evaluation), and round 1's own seconds from metrics.jsonl;
* ``grid_run``: one benchmark run, ``python -m experiments.benchmarks --stage grid
  --settings S --methods celora --seeds 0`` (a new results directory each time, so the run
  is not skipped), wall seconds to exit.

``saved_seconds`` = cold − warm, ``warm_over_cold`` = warm / cold.

    python benchmarks/startup.py                          # default preset + wordnet_clustered_labels
    python benchmarks/startup.py --smoke --out /tmp/startup.json   # smoke preset, CI-sized grid run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe as describe_machine  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "startup.json"


def timed(command: list[str], env: dict) -> float:
    """Wall seconds of one process running ``command`` to a successful exit."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def first_round_seconds(output_dir: Path) -> float:
    """Round 1's seconds as the run recorded them (the only round: rounds=1)."""
    (metrics,) = output_dir.glob("**/metrics.jsonl")
    return float(json.loads(metrics.read_text().splitlines()[0])["seconds"])


def cold_and_warm(make_command, cache: Path, scratch: Path, env: dict, read_round=None) -> dict:
    """Runs ``make_command(output_dir)`` twice on the same (initially empty) cache."""
    env = {**env, "CELORA_JAX_COMPILATION_CACHE": str(cache)}
    result = {}
    for phase in ("cold", "warm"):
        output_dir = scratch / phase
        result[f"{phase}_seconds"] = round(timed(make_command(output_dir), env), 2)
        if phase == "cold":  # what the cold process left for the warm one
            result["cache_files_after_cold"] = sum(1 for path in cache.rglob("*") if path.is_file())
        if read_round is not None:
            result[f"{phase}_round1_seconds"] = round(read_round(output_dir), 2)
    result["saved_seconds"] = round(result["cold_seconds"] - result["warm_seconds"], 2)
    result["warm_over_cold"] = round(result["warm_seconds"] / result["cold_seconds"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the smoke preset and a CI-sized grid run")
    parser.add_argument("--preset", default=None, help="preset of the CLI measurement (default: default, "
                                                         "or smoke with --smoke)")
    parser.add_argument("--setting", default="wordnet_clustered_labels", help="benchmark setting of the grid run")
    parser.add_argument("--skip-grid", action="store_true", help="measure the CLI only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the CLI measurement (repeatable)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    preset = args.preset or ("smoke" if args.smoke else "default")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run_args = ["run", "--preset", preset, "--methods", "celora", "--set", "federation.rounds=1",
                *[arg for item in args.overrides for arg in ("--set", item)]]
    results: dict = {"smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="celora_startup_") as scratch:
        scratch = Path(scratch)
        # `python -m celora_jax.cli.main` is the `celora-jax` entry point, without relying on PATH.
        results["cli"] = {"preset": preset, "command": " ".join(["celora-jax", *run_args]), **cold_and_warm(
            lambda out: [sys.executable, "-m", "celora_jax.cli.main", *run_args, "--no-progress",
                         "--output-dir", str(out)],
            scratch / "cache_cli", scratch / "cli", env, first_round_seconds)}
        print(f"cli: {results['cli']}", flush=True)
        if not args.skip_grid:
            grid = [sys.executable, "-m", "experiments.benchmarks", "--stage", "grid", "--settings", args.setting,
                    "--methods", "celora", "--seeds", "0", *(["--smoke"] if args.smoke else [])]
            results["grid_run"] = {"setting": args.setting, "command": " ".join(grid[1:]) + " --out DIR",
                                   **cold_and_warm(lambda out: [*grid, "--out", str(out)], scratch / "cache_grid",
                                                   scratch / "grid", env)}
            print(f"grid_run: {results['grid_run']}", flush=True)
    # Described after the timed processes: importing JAX here does not touch what they measure.
    results = {"machine": describe_machine(), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

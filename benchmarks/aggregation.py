"""Benchmark: the jitted CE-LoRA server step against a straightforward numpy implementation.

MiniLM shapes (METHOD.md §7 / issue 5): L = 36 adapted matrices (6 blocks × 6 linear
layers), r = 8, K = 2 classes, G = 3 components, D = 384 features.

Two costs are timed separately, because they run at different frequencies:

* per round (``server_step`` with the precomputed data distance): parameter distance,
  median normalization, N simplex projections, W @ C. This is the "full server step"
  whose target is < 1 s and ≥ 10× numpy at N = 1000.
* once (``similarity.data_distance``): the closed-form MMD over all client pairs, also
  timed inside one ``server_step`` call that recomputes it (``one_call_kernel_s``).

Run (full, a few minutes on 2 CPU cores):

    python benchmarks/aggregation.py
    python benchmarks/aggregation.py --smoke --out /tmp/aggregation.json   # N = 10 only

The numpy reference is float64 with explicit loops over client pairs/rows where that is the
natural way to write it; it also serves as an independent check of the kernel (the JSON
records the largest difference in W).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The float64 numpy reference lives with the tests that check the kernel against it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from numpy_reference import np_data_distance, np_server_step  # noqa: E402

from celora_jax.server import aggregation  # noqa: E402
from celora_jax.server import similarity
from celora_jax.server.gmm import ClassMixtures  # noqa: E402

logger = logging.getLogger("benchmarks.aggregation")

NUM_LAYERS = 36
RANK = 8
NUM_CLASSES = 2
NUM_COMPONENTS = 3
DIM = 384
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "aggregation.json"


# ----------------------------------------------------------------------------------------
# synthetic MiniLM-shaped inputs
# ----------------------------------------------------------------------------------------


def synthetic_inputs(n: int, seed: int = 0):
    """Cores near I, random mixture statistics, sizes and a mask with ~5% non-reporting."""
    rng = np.random.default_rng(seed)
    cores = (np.eye(RANK) + 0.05 * rng.standard_normal((n, NUM_LAYERS, RANK, RANK))).astype(np.float32)
    stats = ClassMixtures(
        weights=rng.dirichlet(np.ones(NUM_COMPONENTS), (n, NUM_CLASSES)).astype(np.float32),
        means=(0.1 * rng.standard_normal((n, NUM_CLASSES, NUM_COMPONENTS, DIM))).astype(np.float32),
        variances=rng.uniform(1e-3, 1e-2, (n, NUM_CLASSES, NUM_COMPONENTS, DIM)).astype(np.float32),
        class_counts=rng.integers(5, 200, (n, NUM_CLASSES)).astype(np.float32),
        component_mask=np.ones((n, NUM_CLASSES, NUM_COMPONENTS), bool),
    )
    sizes = stats.class_counts.sum(axis=1)
    mask = rng.random(n) >= 0.05
    mask[0] = True
    return cores, stats, sizes, mask


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call incl. compilation, median of `repeats` steady calls, last result)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)) if times else first, result


def bench_one(
    n: int, *, numpy_step: bool, numpy_data: bool, data_distance_kernel: bool, repeats: int, numpy_repeats: int = 1
) -> dict:
    config = aggregation.AggregationConfig()
    cores, stats, sizes, mask = synthetic_inputs(n)
    cores_j = jnp.asarray(cores)
    stats_j = ClassMixtures(*(jnp.asarray(x) for x in stats))
    row: dict = {"n_clients": n}

    if data_distance_kernel:
        first, steady, dist = _timed(lambda: similarity.data_distance(stats_j), max(1, repeats // 3))
        row["data_distance_kernel_compile_and_run_s"] = first
        row["data_distance_kernel_s"] = steady
        first, steady, _ = _timed(lambda: aggregation.server_step(cores_j, stats_j, sizes, mask, config), 1)
        row["one_call_kernel_s"] = steady
    else:  # timing of the per-round step does not depend on the distance values
        rng = np.random.default_rng(1)
        dist = rng.random((n, n)).astype(np.float32)
        dist = jnp.asarray(np.triu(dist, 1) + np.triu(dist, 1).T)
        row["data_distance_kernel_s"] = None
        row["one_call_kernel_s"] = None

    sorted_config = dataclasses.replace(config, projection="optax")
    first, steady, out = _timed(
        lambda: aggregation.server_step(cores_j, None, sizes, mask, sorted_config, data_distance=dist), repeats
    )
    row["kernel_compile_and_run_s"] = first
    row["kernel_s"] = steady
    fast = dataclasses.replace(config, projection="bisection")
    _, fast_steady, fast_out = _timed(
        lambda: aggregation.server_step(cores_j, None, sizes, mask, fast, data_distance=dist), repeats
    )
    row["kernel_bisection_s"] = fast_steady
    row["max_abs_weight_diff_bisection_vs_optax"] = float(np.max(np.abs(np.asarray(fast_out.weights - out.weights))))

    if numpy_step:
        numpy_times = []
        for _ in range(numpy_repeats):  # min over repeats: robust to a busy shared machine
            start = time.perf_counter()
            w_ref, _, _, _ = np_server_step(cores, np.asarray(dist), sizes, mask, config.beta, config.lam)
            numpy_times.append(time.perf_counter() - start)
        row["numpy_s"] = min(numpy_times)
        row["ratio_numpy_over_kernel"] = row["numpy_s"] / steady
        row["ratio_numpy_over_kernel_bisection"] = row["numpy_s"] / fast_steady
        row["max_abs_weight_diff"] = float(np.max(np.abs(np.asarray(out.weights) - w_ref)))
    else:
        row["numpy_s"] = row["ratio_numpy_over_kernel"] = row["max_abs_weight_diff"] = None
        row["ratio_numpy_over_kernel_bisection"] = None

    if numpy_data and data_distance_kernel:
        start = time.perf_counter()
        dist_ref = np_data_distance(stats)
        row["data_distance_numpy_s"] = time.perf_counter() - start
        row["data_distance_ratio_numpy_over_kernel"] = row["data_distance_numpy_s"] / row["data_distance_kernel_s"]
        scale = float(np.median(dist_ref[~np.eye(n, dtype=bool)]))
        row["data_distance_max_rel_diff"] = float(np.max(np.abs(np.asarray(dist) - dist_ref)) / scale)
    else:
        row["data_distance_numpy_s"] = row["data_distance_ratio_numpy_over_kernel"] = None
    logger.info("N=%d: %s", n, row)
    return row


def run(smoke: bool, out: Path, numpy_data_max_n: int = 100, repeats: int = 5, numpy_repeats: int = 2) -> dict:
    if smoke:
        plan = [(10, True, True)]
    else:
        # (N, numpy reference, kernel data distance); N = 4096 is the kernel alone.
        plan = [(10, True, True), (100, True, True), (1000, True, True), (4096, False, False)]
    results = []
    for n, with_numpy, with_data in plan:
        results.append(
            bench_one(
                n,
                numpy_step=with_numpy,
                numpy_data=with_numpy and n <= numpy_data_max_n,
                data_distance_kernel=with_data,
                repeats=repeats if n <= 1000 else 2,
                numpy_repeats=1 if smoke else numpy_repeats,
            )
        )
    at_1000 = next((r for r in results if r["n_clients"] == 1000), None)
    report = {
        "benchmark": "celora_jax server step (per round, precomputed data distance) vs numpy",
        "shapes": {"layers": NUM_LAYERS, "rank": RANK, "classes": NUM_CLASSES, "components": NUM_COMPONENTS, "dim": DIM},
        "config": {"beta": 0.5, "lam": 1.0},
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "smoke": smoke,
        "results": results,
        "targets": None
        if at_1000 is None
        else {
            "kernel_s_at_1000_under_1s": at_1000["kernel_s"] < 1.0,
            "ratio_at_1000_at_least_10x": at_1000["ratio_numpy_over_kernel"] >= 10.0,
            "kernel_bisection_s_at_1000_under_1s": at_1000["kernel_bisection_s"] < 1.0,
            "ratio_bisection_at_1000_at_least_10x": at_1000["ratio_numpy_over_kernel_bisection"] >= 10.0,
        },
        "notes": "numpy_s: min over --numpy-repeats runs of the float64 loop reference; "
        "kernel_s: median steady-state time of the jitted per-round server_step "
        "(parameter distance, normalization, weights, W @ C) with the data distance passed "
        f"in, with optax's sort-based simplex projection (projection='optax'); kernel_bisection_s: the "
        f"same with projection='bisection' (the default is {aggregation.AggregationConfig().projection!r}); data_distance_*: the one-time closed-form MMD; one_call_kernel_s: server_step "
        "recomputing the MMD from the statistics. None = not run (numpy data distance only "
        f"for N <= {numpy_data_max_n}; no data distance at N = 4096).",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="N = 10 only (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--numpy-data-max-n", type=int, default=100, help="largest N for the numpy MMD")
    parser.add_argument("--repeats", type=int, default=5, help="steady-state repetitions per kernel timing")
    parser.add_argument("--numpy-repeats", type=int, default=2, help="numpy step repetitions (min is kept)")
    args = parser.parse_args(argv)
    return run(args.smoke, args.out, args.numpy_data_max_n, args.repeats, args.numpy_repeats)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = main()
    for row in report["results"]:
        logger.info(
            "N=%5d  kernel %.4fs (bisection %.4fs)  numpy %s  ratio %s  data_distance %s",
            row["n_clients"],
            row["kernel_s"],
            row["kernel_bisection_s"],
            "-" if row["numpy_s"] is None else f"{row['numpy_s']:.3f}s",
            "-" if row["ratio_numpy_over_kernel"] is None else f"{row['ratio_numpy_over_kernel']:.1f}x",
            "-" if row["data_distance_kernel_s"] is None else f"{row['data_distance_kernel_s']:.3f}s",
        )

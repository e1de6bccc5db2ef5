"""Benchmark: the same federated round on our vmapped engine and on Flower's simulation engine.

A user who wants a federated simulation in the field's usual tool would run Flower's
simulation engine (Ray actors as SuperNodes, one message per client per round). Here both
run the same config (default preset: MiniLM, 10 clients, 8 local steps of 16 x 64 tokens,
CE-LoRA) on the same machine, in one run:

* ``engine``: ``celora_jax.federated.loop`` (all clients in one jitted, vmapped program);
* ``flower``: ``celora_jax.flower`` (``make_client_app`` + ``CeloraStrategy``) under
  ``flwr.simulation.run_simulation``, as many Ray actors as this machine has cores (each
  actor prepares the task once and trains the clients it is sent one after another).

Reported: seconds per round (median of the rounds between the first, which compiles, and
the last, which evaluates; Flower's round time is the server's, from sending the round's
messages to aggregating their replies), training examples/s, ``ratio`` = Flower's seconds per
round / the engine's, and whether the two runs ended with the same per-client accuracies.

    python benchmarks/flower_vs_engine.py            # writes benchmarks/results/flower_vs_engine.json
    python benchmarks/flower_vs_engine.py --smoke --out /tmp/flower_vs_engine.json
    PYTHONPATH=tests python benchmarks/flower_vs_engine.py --smoke --config-factory toy_flower:config \
        --setup-factory toy:toy_setup     # any model: a RunConfig and a Setup from your own functions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe as describe_machine  # noqa: E402
from benchmarks.round_speed import SMOKE  # noqa: E402  the same CI-sized default preset

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "flower_vs_engine.json"


def make_config(overrides: list[str], rounds: int, config_factory: str = ""):
    from celora_jax.federated.config import apply_overrides
    from celora_jax.federated.presets import get_preset

    if config_factory:
        from celora_jax.flower.app import load_callable

        base = load_callable(config_factory, "--config-factory")()
    else:
        base = apply_overrides(get_preset("default"), ["partition.global_test_examples=0"])
    # Evaluate only after the last round (Flower's strategy does the same).
    return apply_overrides(base, [f"federation.rounds={rounds}", f"federation.eval_every={rounds}", *overrides])


def default_prepare(config):
    from celora_jax.federated import engine

    return engine.prepare(config)


def run_engine(config, prepare) -> tuple[list[float], list[float]]:
    """(seconds of every round, final per-client own-test accuracy)."""
    from celora_jax.federated import loop

    records = [output.record for output in loop.iterate_rounds(prepare(config))]
    return [r["seconds"] for r in records], list(records[-1]["client_test_accuracy"])


def run_flower(config, actors: int, prepare) -> tuple[list[float], list[float]]:
    from flwr.simulation import run_simulation

    from celora_jax.federated.setup import resolve_method
    from celora_jax.flower.client_app import make_client_app
    from celora_jax.flower.server_app import make_server_app

    fed = config.federation
    done = {}
    server_app = make_server_app(resolve_method(config), config.aggregation, config.partition.num_clients,
                                 fed.rounds, fed.outlier_factor, timeout=3600,
                                 on_done=lambda strategy: done.update(strategy=strategy))
    repository = str(Path(__file__).resolve().parents[1])  # Ray's workers import celora_jax from here
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repository, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    run_simulation(server_app=server_app, client_app=make_client_app(config, prepare=prepare),
                   num_supernodes=config.partition.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": actors, "include_dashboard": False}})
    if "strategy" not in done:
        raise RuntimeError("the Flower simulation ended without finishing its rounds (see its log above)")
    strategy = done["strategy"]
    return ([h["seconds"] for h in strategy.history],
            [strategy.accuracies.get(i) for i in range(config.partition.num_clients)])


def timed(seconds: list[float]) -> list[float]:
    """The rounds between the compiling first and the evaluating last (at least one)."""
    return seconds[1:-1] or seconds[-1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (plus a first and a last)")
    parser.add_argument("--smoke", action="store_true", help="2 clients, 1 step of 4 x 16 tokens, 1 timed round")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="Ray actors (default: cores)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    parser.add_argument("--config-factory", default="", metavar="MODULE:FUNCTION",
                        help="a function returning the RunConfig to time instead of the default preset")
    parser.add_argument("--setup-factory", default="", metavar="MODULE:FUNCTION",
                        help="a function RunConfig -> Setup (your own model and data), importable by Ray's "
                             "workers (PYTHONPATH); default: celora_jax's prepare")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.actors < 1:
        parser.error("--rounds and --actors must be >= 1")
    rounds = 1 if args.smoke else args.rounds
    try:
        config = make_config(([] if args.config_factory or not args.smoke else SMOKE) + args.overrides, rounds + 2,
                             args.config_factory)
        if args.setup_factory:
            from celora_jax.flower.app import load_callable

            prepare = load_callable(args.setup_factory, "--setup-factory")
        else:
            prepare = default_prepare
    except ValueError as error:
        parser.error(str(error))
    import numpy as np

    fed = config.federation
    examples_per_round = config.partition.num_clients * config.local_steps * fed.batch_size
    engine_seconds, engine_accuracy = run_engine(config, prepare)
    flower_seconds, flower_accuracy = run_flower(config, args.actors, prepare)
    variants = {}
    for name, seconds in (("engine", engine_seconds), ("flower", flower_seconds)):
        median = statistics.median(timed(seconds))
        variants[name] = {"round_seconds": seconds, "median_round_s": median,
                          "examples_per_s": examples_per_round / median}
        print(f"{name}: {median:.2f} s per round, {examples_per_round / median:.1f} examples/s", flush=True)
    same = all(f is not None for f in flower_accuracy) and bool(
        np.allclose(engine_accuracy, flower_accuracy, atol=1e-6))
    report = {
        "machine": describe_machine(flwr=__import__("flwr").__version__),
        "settings": {"preset": args.config_factory or ("default" + (" (smoke)" if args.smoke else "")),
                     "setup_factory": args.setup_factory or None, "overrides": args.overrides,
                     "method": fed.method, "clients": config.partition.num_clients,
                     "local_steps": config.local_steps, "batch_size": fed.batch_size,
                     "max_length": config.model.max_length, "rounds": fed.rounds, "ray_actors": args.actors},
        "variants": variants,
        "ratio": variants["flower"]["median_round_s"] / variants["engine"]["median_round_s"],
        "client_test_accuracy": {"engine": engine_accuracy, "flower": flower_accuracy},
        "same_accuracies": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ratio": report["ratio"], "same_accuracies": same}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

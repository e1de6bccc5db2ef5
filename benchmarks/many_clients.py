"""Benchmark: time per round and peak memory vs the number of clients N (issue 9, item 3).

MiniLM with CE-LoRA (rank 8, every linear layer), real movie reviews, few examples per
client: 4 training and 4 test reviews of 32 tokens, one local step of batch 4 per round,
personalized aggregation. On an accelerator the peak bytes its allocator held are reported
too (``device_peak_mb``). Every N runs in a fresh subprocess, so its peak resident memory
(``ru_maxrss``) is its own. Each N runs with all clients at once (plain ``vmap``) where that
fits and with client blocks (``federation.client_block``), which bound the activations
alive at once to one block.

Reported per run: compile + first round seconds, steady round seconds (mean of the rounds
between the first and the last, which evaluates), peak RSS, and the bytes of the frozen
base weights and of one client's state. The base weights are passed to the vmapped client
step with ``in_axes=None``: if they were copied per client, memory would grow by the base
size (~90 MB) per client; the slope of peak RSS over N shows what one client really costs.

    python benchmarks/many_clients.py                        # N = 1, 8, 32, 128, 1000
    python benchmarks/many_clients.py --smoke --out /tmp/many_clients.json
    python benchmarks/many_clients.py --model-dir DIR      # another local HF BERT-family model
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe as describe_machine  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "many_clients.json"


def run_one(num_clients: int, block: int | None, rounds: int, max_length: int, model_dir: str | None) -> dict:
    """One measurement, in this process (the parent runs it in a fresh subprocess)."""
    import jax

    from celora_jax.data.partition import PartitionConfig
    from celora_jax.federated import engine, loop, sharding
    from celora_jax.federated.config import FederationConfig, ModelConfig, RunConfig

    config = RunConfig(
        name="many_clients",
        model=ModelConfig(path=model_dir, max_length=max_length),
        partition=PartitionConfig(scheme="dirichlet", num_clients=num_clients, alpha=0.5, train_examples=4,
                                  test_examples=4, global_test_examples=8),
        federation=FederationConfig(method="celora", rounds=rounds, batch_size=4, local_steps=1,
                                    eval_every=rounds, eval_batch_size=8, client_block=block),
    )
    started = time.perf_counter()
    setup = engine.prepare(config)
    prepare_s = time.perf_counter() - started
    round_seconds = []
    for record, _ in loop.iterate_rounds(setup):
        round_seconds.append(record["seconds"])
        accuracy = record.get("test_accuracy_mean")
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
    mesh = sharding.client_mesh(config.federation.num_devices, config.federation.data_parallel)
    return {
        "num_clients": num_clients,
        "client_block": block,
        # The client axis is padded to whole blocks (and devices): memory follows this count.
        "padded_clients": sharding.padded_client_count(num_clients, mesh, block),
        "prepare_s": prepare_s,
        "first_round_s": round_seconds[0],  # compile included
        # Between the first round (compiles training) and the last (evaluates, compiling the
        # evaluation: seconds on a GPU, which once made a 3-round "steady" mean 4x too high).
        "steady_round_s": sum(round_seconds[1:-1]) / len(round_seconds[1:-1]),
        "last_round_s": round_seconds[-1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_peak_mb": _device_peak_mb(jax.devices()[0]),
        "base_weights_mb": nbytes(setup.task.base_params) / 1e6,
        "client_params_mb": nbytes(setup.task.client_params) / 1e6,
        "final_test_accuracy": accuracy,
    }


def _device_peak_mb(device) -> float | None:
    """Peak bytes the accelerator's allocator held (None on CPU, where RSS is the measure)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 1e6 if stats and "peak_bytes_in_use" in stats else None


def _subprocess(num_clients: int, block: int | None, rounds: int, max_length: int, model_dir: str | None) -> dict:
    command = [sys.executable, __file__, "--one", str(num_clients), "--rounds", str(rounds),
               "--max-length", str(max_length), "--block", str(block or 0),
               *(["--model-dir", model_dir] if model_dir else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"num_clients": num_clients, "client_block": block, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(results: list[dict], rounds: int, max_length: int, block: int, model_dir: str | None) -> dict:
    """The sweep's JSON: machine, settings, every run so far and the blocked memory slopes."""
    ok = [r for r in results if "error" not in r]
    blocked = sorted((r for r in ok if r["client_block"]), key=lambda r: r["padded_clients"])
    slope = device_slope = None
    if len(blocked) >= 2 and blocked[-1]["padded_clients"] > blocked[0]["padded_clients"]:
        first, last = blocked[0], blocked[-1]
        added = last["padded_clients"] - first["padded_clients"]
        slope = (last["peak_rss_mb"] - first["peak_rss_mb"]) / added
        if first.get("device_peak_mb") is not None:
            device_slope = (last["device_peak_mb"] - first["device_peak_mb"]) / added
    return {
        "machine": describe_machine(),
        "settings": {"model": model_dir or "all-MiniLM-L6-v2", "method": "celora", "rank": 8, "train_examples": 4,
                     "test_examples": 4, "max_length": max_length, "batch_size": 4, "local_steps": 1,
                     "rounds": rounds, "block": block},
        "runs": results,
        # Per client slot of the padded client axis, between the smallest and largest blocked run.
        "peak_rss_mb_per_client_blocked": slope,
        "device_peak_mb_per_client_blocked": device_slope,
        "base_weights_mb": ok[0]["base_weights_mb"] if ok else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32,128,1000", help="comma-separated N")
    parser.add_argument("--block", type=int, default=32,
                        help="clients per block in the blocked runs (0: no blocks)")
    parser.add_argument("--unblocked-up-to", type=int, default=128,
                        help="also run all clients at once for N up to this")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 3: compile, steady, evaluate)")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="N = 2, at once and in blocks of 1; three rounds, 16 tokens")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--model-dir", default=None,
                        help="a local Hugging Face BERT-family directory (default: the shipped MiniLM)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        block = args.block if args.block else None
        print(json.dumps(run_one(args.one, block, args.rounds, args.max_length, args.model_dir)))
        return 0
    if args.smoke:
        counts, block, unblocked_up_to, rounds, max_length = [2], 1, 2, 3, 16
    else:
        counts = [int(n) for n in args.clients.split(",") if n.strip()]
        block, unblocked_up_to, rounds, max_length = args.block, args.unblocked_up_to, args.rounds, args.max_length
    if not counts or min(counts) < 1 or rounds < 3:
        parser.error("need N >= 1 and --rounds >= 3 (the first round compiles, the last evaluates)")
    if args.model_dir is not None:
        from celora_jax.models import loading

        try:  # a wrong directory is a usage error, not N subprocess tracebacks
            loading.read_encoder_config(args.model_dir)
        except loading.ModelLoadError as error:
            parser.error(f"--model-dir: {error}")
    from tqdm.auto import tqdm

    plan = [(n, None) for n in counts if n <= unblocked_up_to] + [(n, block) for n in counts if block and n > block]
    results = []
    out = Path(args.out)
    for n, b in tqdm(plan, desc="many clients", unit="run"):
        results.append(_subprocess(n, b, rounds, max_length, args.model_dir))
        tqdm.write(json.dumps(results[-1]))
        # Written after every run, so a sweep cut short (a time limit on a lent GPU) keeps
        # the runs it finished.
        report = _report(results, rounds, max_length, block, args.model_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("peak_rss_mb_per_client_blocked", "base_weights_mb")}))
    ok = [r for r in results if "error" not in r]
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

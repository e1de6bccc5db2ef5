"""Benchmark: where a Flower round's time goes on loopback, with and without node workers.

A real deployment (``flower-superlink`` and one ``flower-supernode`` per client on
127.0.0.1, insecure, started and stopped here by PID) runs the same app twice:

* ``per_message``: each SuperNode starts a fresh ClientApp process per message, which
  imports JAX and celora-jax, loads the model, encodes the node's data and loads its
  programs (from the persistent compilation cache) before it trains;
* ``worker``: a ``celora-jax flower-worker`` beside every SuperNode keeps that client
  prepared for the run; each message's process only forwards it.

Reported per variant: the server's seconds per round (from sending a round's messages to
aggregating its replies) and, per node and round, the seconds from the message process's
start to the app (interpreter and imports), building the task and programs, and training.

    python benchmarks/flower_overhead.py            # MiniLM, smoke preset: benchmarks/results/flower_overhead.json
    python benchmarks/flower_overhead.py --smoke --model-dir DIR --out /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe as describe_machine  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "flower_overhead.json"
BIN = Path(sys.executable).parent
VARIANTS = ("per_message", "worker")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise RuntimeError(f"no {what} within {timeout} s")


def run_variant(variant: str, root: Path, nodes: int, rounds: int, overrides: list[str], timeout: float) -> dict:
    """One loopback run; returns the server's summary (``flower_summary.json``)."""
    from celora_jax.flower.app_dir import write_app

    root.mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "JAX_PLATFORMS": "cpu"}
    (root / "flwr-home").mkdir()
    (root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    processes = []

    def start(name, argv):
        log = open(root / f"{name}.log", "ab")
        processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                            "--port", str(port)])
        _wait(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, "SuperLink", 60)
        for node in range(nodes):
            config = f"partition-id={node} num-partitions={nodes}"
            if variant == "worker":
                sock = root / f"worker{node}.sock"
                start(f"worker{node}", [str(BIN / "celora-jax"), "flower-worker", str(sock)])
                _wait(sock.exists, f"worker {node}", 120)
                config += f' worker="{sock}"'
            start(f"node{node}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                  "--node-config", config, "--port", str(_free_port())])
        app = write_app(root / "app", {"preset": "smoke", "output-dir": str(root / "out"), "round-timeout": timeout,
                                       "set": "; ".join([f"partition.num_clients={nodes}",
                                                         f"federation.rounds={rounds}", *overrides])})
        started = time.perf_counter()
        done = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--stream"], env=env,
                              capture_output=True, text=True, timeout=timeout * (rounds + 2))
        seconds = time.perf_counter() - started
        summary_path = root / "out" / "flower_summary.json"
        if done.returncode != 0 or not summary_path.exists():
            raise RuntimeError(f"the {variant} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        summary = json.loads(summary_path.read_text())
        summary["flwr_run_seconds"] = seconds
        return summary
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)


def breakdown(summary: dict) -> dict:
    """Seconds per round (server) and the nodes' mean seconds per part, per round."""
    history = summary["history"]
    rounds = []
    for record in history:
        parts = {}
        for name in ("before_app", "setup", "train"):
            values = [node[name] for node in record.get("node_seconds", {}).values() if name in node]
            parts[name] = statistics.fmean(values) if values else None
        rounds.append({"round": record["round"], "server_seconds": record["seconds"], "node_mean_seconds": parts})
    later = [r["server_seconds"] for r in rounds[1:]] or [rounds[0]["server_seconds"]]
    return {"rounds": rounds, "first_round_s": rounds[0]["server_seconds"],
            "later_rounds_median_s": statistics.median(later), "flwr_run_s": summary["flwr_run_seconds"],
            "client_test_accuracy": summary["client_test_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="2 rounds (CI)")
    parser.add_argument("--model-dir", default=None, help="a local HF model directory instead of the shipped MiniLM")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the server waits for a round")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1:
        parser.error("--nodes and --rounds must be at least 1")
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        parser.error(f"--model-dir {args.model_dir} is not a directory")
    rounds = 2 if args.smoke else args.rounds
    overrides = [] if args.model_dir is None else [f"model.path='{args.model_dir}'"]
    variants = {}
    with tempfile.TemporaryDirectory(prefix="celora-flower-overhead-") as scratch:
        for variant in VARIANTS:
            summary = run_variant(variant, Path(scratch) / variant, args.nodes, rounds, overrides, args.timeout)
            variants[variant] = breakdown(summary)
            print(f"{variant}: first round {variants[variant]['first_round_s']:.1f} s, later rounds "
                  f"{variants[variant]['later_rounds_median_s']:.1f} s (median)", flush=True)
    report = {"benchmark": "flower_overhead",
              "settings": {"preset": "smoke", "nodes": args.nodes, "rounds": rounds, "overrides": overrides,
                           "deployment": "loopback, insecure, one SuperNode per client"},
              "variants": variants,
              "later_rounds_speedup": variants["per_message"]["later_rounds_median_s"]
              / variants["worker"]["later_rounds_median_s"],
              "same_accuracies": variants["per_message"]["client_test_accuracy"]
              == variants["worker"]["client_test_accuracy"],
              "machine": describe_machine(flwr=__import__("flwr").__version__)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}: later rounds {report['later_rounds_speedup']:.1f}x faster with workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

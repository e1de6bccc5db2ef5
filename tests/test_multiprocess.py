"""Two processes x 4 CPU devices (jax.distributed, loopback coordinator, gloo collectives)
give the same run as one process x 8 devices, and their checkpoints resume on either."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import xla_flags
from test_engine import ROOT

METHODS = ("celora", "fedavg_lora")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(model_dir, out, *extra):
    return [sys.executable, "-m", "celora_jax.cli.main", "run", "--preset", "smoke", "--methods", ",".join(METHODS),
            "--no-progress", "--output-dir", str(out),
            "--set", f"model.path='{model_dir}'", "--set", "model.max_length=16",
            # 6 clients on 8 devices: process 0 holds clients 0-3, process 1 clients 4-5 and
            # two masked padding clients.
            "--set", "partition.num_clients=6", "--set", "partition.train_examples=8",
            "--set", "partition.test_examples=8", "--set", "partition.global_test_examples=16",
            "--set", "federation.rounds=3", *extra]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"),
                JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _history(root, method):
    lines = (root / "smoke" / method / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _two_processes(tmp_path, name, command):
    """Runs ``command(coordinator flags)`` in 2 processes x 4 devices; fails with their logs."""
    port = _free_port()
    logs = [tmp_path / f"{name}{i}.log" for i in range(2)]
    processes = [subprocess.Popen(command("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                          "--process-id", str(i)),
                                  env=_env(4), cwd=ROOT, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
                 for i in range(2)]
    try:
        codes = [p.wait(timeout=900) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]


def _assert_same_rounds(expected, got, keys=("train_loss", "train_accuracy", "test_accuracy_mean",
                                             "client_test_accuracy", "global_test_accuracy_mean", "weights",
                                             "param_distance", "data_distance"), label=""):
    assert [r["round"] for r in got] == [r["round"] for r in expected]
    for a, b in zip(expected, got):
        for key in keys:
            if key in a:
                np.testing.assert_allclose(b[key], a[key], atol=2e-5, err_msg=f"{label} {key}")
        assert b["bytes_cumulative"] == a["bytes_cumulative"]


# Both runs on a clients x data mesh (4 client groups x 2 devices; on 2 processes each
# client's batch is split over two devices of one process) with a checkpoint after every
# round: the one-process run is the reference, the two-process run's checkpoints are cut and
# resumed. (The clients-only mesh on 8 devices is covered in one process by test_engine and
# test_round_contract; one run of each kind here keeps the file's processes to six.)
_MESH_AND_CHECKPOINTS = ("--set", "federation.data_parallel=2", "--set", "checkpoint.every=1",
                         "--set", "checkpoint.keep=3", "--set", "tracking.backends=tensorboard")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """``(single, multi)``: output roots of the same run on 1 process x 8 devices and on
    2 processes x 4 devices, both methods."""
    root = tmp_path_factory.mktemp("multiprocess")
    single = root / "single"
    subprocess.run(_command(tiny_model_dir, single, *_MESH_AND_CHECKPOINTS), env=_env(8), cwd=ROOT, check=True,
                   timeout=900)
    multi = root / "multi"
    _two_processes(root, "process", lambda *flags: _command(tiny_model_dir, multi, *_MESH_AND_CHECKPOINTS, *flags))
    return single, multi


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
    single, multi = runs
    for method in METHODS:
        summaries = [json.loads((root / "smoke" / method / "summary.json").read_text()) for root in (single, multi)]
        assert [(s["processes"], s["devices"], s["local_clients"], s["data_parallel"]) for s in summaries] == [
            (1, 8, [0, 6], 2), (2, 8, [0, 4], 2)]
        expected, got = _history(single, method), _history(multi, method)
        assert len(got) == len(expected) == 3
        _assert_same_rounds(expected, got, label=method)
        # Process 0 alone logs to the trackers: one event file per run, as on one process.
        for root in (single, multi):
            events = list((root / "smoke" / "tracking" / "tensorboard" / "smoke" / method).glob("events.out.*"))
            assert len(events) == 1, (root, events)


@pytest.mark.slow
def test_two_process_checkpoints_resume_on_two_processes_and_on_one(runs, tmp_path):
    """The two-process run's sharded checkpoints, cut after round 2, resume with 2 processes
    (reading its shards back) and with 1 process x 8 devices (whole arrays), and both finish
    like the uninterrupted run."""
    _, full = runs
    method_dir = full / "smoke" / "celora"
    assert sorted(p.name for p in (method_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
    expected = _history(full, "celora")

    for name in ("cut_two", "cut_one"):  # the state of a run killed during round 3
        shutil.copytree(full, tmp_path / name)
        cut = tmp_path / name / "smoke" / "celora"
        shutil.rmtree(cut / "checkpoints" / "3")
        (cut / "summary.json").unlink()
        lines = (cut / "metrics.jsonl").read_text().splitlines()
        (cut / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")

    resume = [sys.executable, "-m", "celora_jax.cli.main", "run", "--no-progress", "--resume"]
    _two_processes(tmp_path, "resume", lambda *flags: resume + [str(tmp_path / "cut_two" / "smoke" / "celora"),
                                                                *flags])
    subprocess.run(resume + [str(tmp_path / "cut_one" / "smoke" / "celora")], env=_env(8), cwd=ROOT,
                   check=True, timeout=900)
    for name in ("cut_two", "cut_one"):
        got = _history(tmp_path / name, "celora")
        _assert_same_rounds(expected, got, label=name)
        summary = json.loads((tmp_path / name / "smoke" / "celora" / "summary.json").read_text())
        assert (summary["processes"], summary["data_parallel"]) == ((2 if name == "cut_two" else 1), 2)

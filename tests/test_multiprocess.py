"""Two processes x 4 CPU devices (jax.distributed, loopback coordinator, gloo collectives)
give the same run as one process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_engine import ROOT

METHODS = ("celora", "fedavg_lora")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(model_dir, out, *extra):
    return [sys.executable, "-m", "celora_jax.cli", "run", "--preset", "smoke", "--methods", ",".join(METHODS),
            "--no-progress", "--output-dir", str(out),
            "--set", f"model.path='{model_dir}'", "--set", "model.max_length=16",
            # 6 clients on 8 devices: process 0 holds clients 0-3, process 1 clients 4-5 and
            # two masked padding clients.
            "--set", "partition.num_clients=6", "--set", "partition.train_examples=8",
            "--set", "partition.test_examples=8", "--set", "partition.global_test_examples=16",
            "--set", "federation.rounds=3", *extra]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _history(root, method):
    lines = (root / "smoke" / method / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel", [1, 2])
def test_two_processes_equal_one_process(tiny_model_dir, tmp_path, data_parallel):
    """With data_parallel=2 the mesh is 4 client groups x 2 devices: each client's batch is
    split over two devices of one process."""
    mesh = ["--set", f"federation.data_parallel={data_parallel}"]
    single = tmp_path / "single"
    subprocess.run(_command(tiny_model_dir, single, *mesh), env=_env(8), cwd=ROOT, check=True, timeout=900)

    multi = tmp_path / "multi"
    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
    processes = [subprocess.Popen(_command(tiny_model_dir, multi, *mesh, "--coordinator", f"127.0.0.1:{port}",
                                           "--num-processes", "2", "--process-id", str(i)),
                                  env=_env(4), cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT)
                 for i in range(2)]
    try:
        codes = [p.wait(timeout=900) for p in processes]
    finally:
        for p in processes:
            p.kill()
    output = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], output
    for method in METHODS:
        summaries = [json.loads((root / "smoke" / method / "summary.json").read_text()) for root in (single, multi)]
        assert [(s["processes"], s["devices"], s["data_parallel"], s["local_clients"]) for s in summaries] == [
            (1, 8, data_parallel, [0, 6]), (2, 8, data_parallel, [0, 4])]
        expected, got = _history(single, method), _history(multi, method)
        assert len(got) == len(expected) == 3
        for a, b in zip(expected, got):
            for key in ("train_loss", "train_accuracy", "test_accuracy_mean", "client_test_accuracy",
                        "global_test_accuracy_mean", "weights", "param_distance", "data_distance"):
                if key in a:
                    np.testing.assert_allclose(b[key], a[key], atol=2e-5, err_msg=f"{method} {key}")
            assert b["bytes_cumulative"] == a["bytes_cumulative"]

"""tpu/pod.py: slice shapes, the gcloud commands and the dry-run validation on fake devices."""

import subprocess
import sys

import pytest

from test_engine import ROOT

sys.path.insert(0, str(ROOT / "tpu"))
import pod  # noqa: E402


@pytest.mark.parametrize("accelerator,shape", [("v4-8", (1, 4)), ("v4-32", (4, 4)), ("v5p-128", (16, 4)),
                                               ("v5litepod-8", (1, 8)), ("v5litepod-16", (4, 4)),
                                               ("v6e-256", (64, 4))])
def test_slice_shapes(accelerator, shape):
    assert pod.slice_shape(accelerator) == shape


def _dry_run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tpu" / "pod.py"), *args, "--name", "celora",
                           "--zone", "us-central2-b", "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_run_dry_run_validates_the_mesh_and_prints_the_launch(movie_reviews_csv):
    done = _dry_run("run", "--accelerator", "v4-32", "--set", "federation.rounds=3",
                    "--set", "partition.num_clients=1000")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # The pod preset splits each client's batch over 2 chips: 8 client groups x 2.
    assert "slice: 4 hosts x 4 chips = 16 devices; mesh clients=8 x data=2" in out
    # 1000 clients, blocks of 256 -> padded to 1024 = 128 per client group, 256 per host.
    assert "clients: 1000 real, padded to 1024 (128 per client group); block: 256" in out
    assert "host 3: clients 768..999 (232 real)" in out
    launch = [line for line in out.splitlines() if line.startswith("gcloud")]
    assert len(launch) == 1
    assert "tpu-vm ssh celora --zone=us-central2-b --worker=all" in launch[0]
    assert "celora-jax run --preset pod --distributed" in launch[0]
    assert "--set federation.rounds=3 --set partition.num_clients=1000" in launch[0]


def test_other_commands_print_gcloud():
    done = _dry_run("create", "--accelerator", "v5litepod-16")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("gcloud compute tpus tpu-vm create celora --zone=us-central2-b "
                                   "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite")
    done = _dry_run("setup", "--accelerator", "v4-8", "--repo", "https://example.org/celora.git")
    assert "--worker=all" in done.stdout and "bash setup.sh" in done.stdout and "jax[tpu]" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["run", "--accelerator", "v4-32", "--set", "partition.num_clients=100000"], "the data has 33530"),
    (["run", "--accelerator", "v4-32", "--set", "checkpoint.every=1"], "checkpoint.directory that every host"),
    (["run", "--accelerator", "v4-32", "--set", "federation.num_devices=6"], "multiple of the 4 chips"),
    (["run", "--accelerator", "v4-32", "--methods", "fedavg"], "unknown method"),
    (["run", "--accelerator", "v4-32", "--set", "federation.data_parallel=8"], "stays on one host"),
    (["run", "--accelerator", "v4-32", "--set", "federation.data_parallel=3"], "divide batch_size=8"),
    (["create", "--accelerator", "v9-3"], "unknown accelerator type"),
])
def test_dry_run_rejects_bad_plans(args, message, movie_reviews_csv):
    done = _dry_run(*args)
    assert done.returncode == 2
    assert message in done.stderr


def test_multi_host_checkpoints_go_to_the_shared_directory(movie_reviews_csv):
    done = _dry_run("run", "--accelerator", "v4-32", "--set", "checkpoint.every=5",
                    "--set", "checkpoint.directory='gs://bucket/celora'")
    assert done.returncode == 0, done.stderr
    assert "checkpoints: every 5 rounds to gs://bucket/celora/pod/<method>\n" in done.stdout


def test_dry_run_plans_auto_blocks_as_on_tpus(movie_reviews_csv):
    """'auto' is one client per device on CPUs but all at once on TPUs: the plan is the TPU's."""
    done = _dry_run("run", "--accelerator", "v4-32", "--set", "federation.client_block='auto'",
                    "--set", "partition.num_clients=100")
    assert done.returncode == 0, done.stderr
    assert "clients: 100 real, padded to 104 (13 per client group); block: all at once" in done.stdout

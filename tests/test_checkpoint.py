"""Checkpoint and resume: a run killed mid-round and resumed equals an uninterrupted run."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from helpers import tiny_config, xla_flags
from test_engine import ROOT

from celora_jax.federated import engine
from celora_jax.federated.config import CheckpointConfig, from_dict, to_dict

# Runs 4 rounds with a checkpoint after each; blocks at the start of round 3 (after the
# checkpoint of round 2) so that the parent can SIGKILL it mid-round.
_KILLED_RUN = textwrap.dedent("""
    import dataclasses, pathlib, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from celora_jax.federated.config import from_dict
    from celora_jax.data import packing
    from celora_jax.federated import engine
    import json
    config = from_dict(json.loads(pathlib.Path({config!r}).read_text()))
    original = packing.round_batches
    def stalling(examples, steps, batch_size, seed, round_index):
        if round_index == 2:
            pathlib.Path({flag!r}).write_text("in round 3")
            time.sleep(600)
        return original(examples, steps, batch_size, seed, round_index)
    packing.round_batches = stalling
    engine.run(config, output_dir={out!r})
""")

_RESUME_ON_EIGHT = textwrap.dedent("""
    import json, pathlib, sys, numpy as np, jax
    sys.path[:0] = [{root!r}]
    from celora_jax.federated.config import from_dict
    from celora_jax.federated import checkpoint
    from celora_jax.federated import engine
    assert len(jax.devices()) == 8
    assert checkpoint.manager(pathlib.Path({out!r}, "checkpoints")).latest_step() == 2
    config = from_dict(json.loads(pathlib.Path({out!r}, "config.json").read_text()))
    result = engine.run(config, output_dir={out!r}, resume=True)
    assert [r["round"] for r in result.history] == [1, 2, 3, 4]
    np.savez({npz!r}, *[np.asarray(x) for x in jax.tree.leaves(result.client_params)])
""")


def _config(model_dir, method):
    config = tiny_config(model_dir, method)
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, rounds=4),
                               checkpoint=CheckpointConfig(every=1, keep=2))


def _kill_mid_round(config, out, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(to_dict(config)))
    flag = tmp_path / "flag"
    script = _KILLED_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), config=str(config_path),
                                flag=str(flag), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 300
    while not flag.exists():
        assert process.poll() is None, "the run ended before reaching round 3"
        assert time.time() < deadline, "the run did not reach round 3 in time"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("method", ["celora", "fedsa_lora"])
def test_sigkill_mid_round_then_resume_is_bit_identical(tiny_model_dir, tmp_path, method):
    config = _config(tiny_model_dir, method)
    if method == "celora":  # a server state that is more than the setup: the mixtures each client received
        config = dataclasses.replace(config, aggregation=dataclasses.replace(config.aggregation,
                                                                             update_since="received"))
    reference = engine.run(config, output_dir=tmp_path / "reference")

    killed = tmp_path / "killed"
    _kill_mid_round(config, killed, tmp_path)
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["1", "2"]  # keep=2, and round 3 never finished
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 2
    eight = tmp_path / "eight"
    shutil.copytree(killed, eight)

    resumed = engine.run(config, output_dir=killed, resume=True)
    for got, want in zip(jax.tree.leaves(resumed.client_params), jax.tree.leaves(reference.client_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4]
    for got, want in zip(lines, reference.history):
        for key in ("train_loss", "test_accuracy_mean", "bytes_cumulative"):
            assert got[key] == want[key], key
    assert resumed.summary["test_accuracy_mean"] == reference.summary["test_accuracy_mean"]

    # The same checkpoint restores onto 8 devices (different mesh padding).
    npz = str(tmp_path / "eight.npz")
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _RESUME_ON_EIGHT.format(root=str(ROOT), out=str(eight), npz=npz)],
                   check=True, env=env)
    on_eight = np.load(npz)
    for index, want in enumerate(jax.tree.leaves(reference.client_params)):
        np.testing.assert_allclose(on_eight[f"arr_{index}"], np.asarray(want), atol=2e-5, rtol=1e-4)


def test_a_server_state_is_repadded_only_along_the_client_padding():
    from celora_jax.federated.checkpoint import _padding_apart, _repad

    # [N_pad, N_pad] distances and [N_pad, L, r, r] cores with r = N_pad = 8 by coincidence.
    saved, wanted = [[8, 8], [8, 1, 8, 8]], [[16, 16], [16, 1, 8, 8]]
    assert _padding_apart(saved, wanted, 8, 16)
    assert not _padding_apart(saved, [[16, 16], [16, 1, 9, 9]], 8, 16)  # the rank changed: no padding
    assert not _padding_apart(saved, wanted, 8, 12)  # not this run's padding
    assert not _padding_apart(saved, [[16, 16]], 8, 16)
    cores = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 1, 8, 8)
    repadded = _repad(cores, (16, 1, 8, 8), real=5)
    np.testing.assert_array_equal(repadded[:5], cores[:5])  # the real clients, every rank entry
    np.testing.assert_array_equal(repadded[5:], 0.0)
    distance = np.arange(64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(_repad(distance, (6, 6), real=5)[:5, :5], distance[:5, :5])


def test_config_round_trips_through_json(tiny_model_dir):
    config = _config(tiny_model_dir, "celora")
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(ValueError, match="unknown RunConfig keys"):
        from_dict({"rounds": 3})


# The CLI on the tiny model: 4 rounds, a checkpoint after each.
_TINY_CLI = ["--set", "model.max_length=16", "--set", "partition.num_clients=5", "--set", "partition.alpha=0.5",
             "--set", "partition.train_examples=16", "--set", "partition.test_examples=8",
             "--set", "partition.global_test_examples=16", "--set", "federation.rounds=4",
             "--set", "federation.batch_size=8", "--set", "checkpoint.every=1", "--no-progress"]

# The CLI in a child process that says (a flag file) when it is where the parent should
# signal it: inside the save of round 2's checkpoint (held for 3 s before orbax writes), or at the start of
# round 3. A child of a non-interactive shell inherits SIGINT ignored: default it first.
_SIGNALLED_CLI = textwrap.dedent("""
    import pathlib, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[:0] = [{root!r}]
    from celora_jax.federated import checkpoint
    from celora_jax.cli import main as cli
    from celora_jax.data import packing
    flag, where = pathlib.Path({flag!r}), {where!r}
    if where == "save":
        original_save = checkpoint.ocp.CheckpointManager.save
        def slow_save(self, step, *args, **kwargs):
            if step == 2:  # the signal comes before orbax has written anything of round 2
                flag.write_text("saving round 2")
                time.sleep(3)
            return original_save(self, step, *args, **kwargs)
        checkpoint.ocp.CheckpointManager.save = slow_save
    else:
        original_batches = packing.round_batches
        def stalling(examples, steps, batch_size, seed, round_index):
            if round_index == 2:
                flag.write_text("in round 3")
                time.sleep(600)
            return original_batches(examples, steps, batch_size, seed, round_index)
        packing.round_batches = stalling
    sys.exit(cli.main({argv!r}))
""")


def _records(root):
    return [json.loads(line) for line in (root / "default" / "celora" / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def uninterrupted_cli_records(tiny_model_dir, tmp_path_factory):
    from celora_jax.cli import main as cli

    out = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main(["run", "--set", f"model.path={tiny_model_dir}", *_TINY_CLI, "--output-dir", str(out)]) == 0
    return _records(out)


@pytest.mark.parametrize("signum, where", [(signal.SIGINT, "save"), (signal.SIGTERM, "round")])
def test_an_interrupted_cli_run_says_where_to_resume_and_resumes_bit_identical(tiny_model_dir, tmp_path, signum,
                                                                                where, uninterrupted_cli_records):
    """Ctrl-C during a checkpoint's save waits for it; SIGTERM mid-round stops at once. Either
    way: one line naming the --resume directory, no traceback, exit 128 + signal number, and
    the resumed run's records equal an uninterrupted run's."""
    from celora_jax.cli import main as cli

    argv = ["run", "--set", f"model.path={tiny_model_dir}", *_TINY_CLI]
    flag, out = tmp_path / "flag", tmp_path / "interrupted"
    script = _SIGNALLED_CLI.format(root=str(ROOT), flag=str(flag), where=where,
                                   argv=[*argv, "--output-dir", str(out)])
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not flag.exists():
        assert process.poll() is None, f"the run ended before the signal: {process.communicate()[1][-2000:]}"
        assert time.time() < deadline, "the run did not get there in time"
        time.sleep(0.1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    method_dir = out / "default" / "celora"
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "Error" not in err, err
    assert err.strip().splitlines()[-1] == (f"celora-jax: interrupted ({signum.name}); resume with: celora-jax run "
                                            f"--resume {method_dir} (its checkpoint after round 2 of 4)"), err
    checkpoints = sorted(p.name for p in (method_dir / "checkpoints").iterdir())
    assert checkpoints == ["1", "2"]  # round 2's complete, no temporary directory left behind

    assert cli.main(["run", "--resume", str(method_dir), "--no-progress"]) == 0
    resumed = _records(out)
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed, uninterrupted_cli_records):
        for key in ("train_loss", "test_accuracy_mean", "bytes_cumulative", "weights"):
            assert got.get(key) == want.get(key), (got["round"], key)


def test_an_interrupt_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    from celora_jax.cli import main as cli
    from celora_jax.federated.config import RunConfig

    hint = cli._resume_hint(RunConfig(), tmp_path / "celora", ["fedavg_lora", "local"])
    assert hint == ("celora saves no checkpoints, so nothing to resume (--set checkpoint.every=N saves one every "
                    "N rounds); not started: fedavg_lora, local")
    config = dataclasses.replace(RunConfig(), checkpoint=CheckpointConfig(every=3))
    assert cli._resume_hint(config, tmp_path / "celora", []) == (
        "celora wrote no checkpoint yet (the first comes after round 3), so nothing to resume")

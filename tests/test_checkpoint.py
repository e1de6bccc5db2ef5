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

from celora_jax.config import CheckpointConfig, from_dict, to_dict
from celora_jax.federated import engine
from helpers import tiny_config, xla_flags
from test_engine import ROOT

# Runs 4 rounds with a checkpoint after each; blocks at the start of round 3 (after the
# checkpoint of round 2) so that the parent can SIGKILL it mid-round.
_KILLED_RUN = textwrap.dedent("""
    import dataclasses, pathlib, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from celora_jax.config import from_dict
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
    from celora_jax.config import from_dict
    from celora_jax import checkpoint
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


def test_config_round_trips_through_json(tiny_model_dir):
    config = _config(tiny_model_dir, "celora")
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(ValueError, match="unknown RunConfig keys"):
        from_dict({"rounds": 3})

"""Every registered method through the same contract on a toy model (no assets, no torch):
bytes on the wire, sampled and dropped-out clients, NaN rejection, and 1 vs 8 devices."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
import pytest
from helpers import xla_flags
from toy import toy_config, toy_setup

from celora_jax.federated import loop
from celora_jax.federated.methods import METHODS, method_names
from celora_jax.lora import roles

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL = method_names()
CLIENTS, POISONED = 6, 2


def run_toy(config, *, poison: bool = False, silent_client: int | None = None):
    """(setup, records, per-round client parameters as numpy) of a toy run; ``poison``:
    client 2 starts with a NaN in its personal head; ``silent_client`` never reports."""
    original_state, original_reporting = loop.initial_client_state, loop.reporting_clients

    def poisoned_state(setup, count):
        stacked = original_state(setup, count)
        for part in ("params", "tuned"):  # tuned: the fine-tuned copy of fedavg_lora_ft
            if part in stacked:
                scale = stacked[part]["params"]["head"]["scale"]
                stacked[part] = {**stacked[part], "params": {"head": {"scale": scale.at[POISONED, 0].set(np.nan)}}}
        return stacked

    def reporting(n, *args):
        return original_reporting(n, *args) & (np.arange(n) != silent_client)

    try:
        loop.initial_client_state = poisoned_state if poison else original_state
        loop.reporting_clients = reporting
        setup = toy_setup(config)
        records, params = [], []
        for output in loop.iterate_rounds(setup):  # parameters are donated to the next round: copy now
            records.append(output.record)
            params.append(jax.tree.map(np.asarray, output.client_params))
    finally:
        loop.initial_client_state, loop.reporting_clients = original_state, original_reporting
    return setup, records, params


def _config(method, **federation):
    return toy_config(method, num_clients=CLIENTS, participation=0.7, client_dropout=0.2, **federation)


def _leaf_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def test_every_method_is_registered_once_under_its_own_name():
    assert len(ALL) == 11 and set(ALL) >= {"fedprox", "fedex_lora", "fedavg_lora_ft", "cluster_oracle", "fed_sb"}
    for name, method in METHODS.items():
        assert method.name == name and method.description


@pytest.fixture(scope="module")
def references():
    """Every method's run in which client 2 never reports, on one device (here) and on 8
    fake devices (a subprocess, clients padded to 8 and trained in blocks of 4)."""
    one = {method: run_toy(_config(method), silent_client=POISONED) for method in ALL}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "eight.json"
        script = _EIGHT_DEVICES.format(root=str(ROOT), tests=str(ROOT / "tests"), methods=ALL, out=str(out))
        env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp)
        eight = json.loads(out.read_text())
    return one, eight


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys, numpy as np, jax
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_round_contract import POISONED, _config, run_toy
    assert len(jax.devices()) == 8, jax.devices()
    out = {{}}
    for method in {methods!r}:
        _, records, params = run_toy(_config(method, client_block=4), silent_client=POISONED)
        out[method] = {{"loss": [r["train_loss"] for r in records],
                       "accuracy": records[-1]["client_test_accuracy"],
                       "leaves": [np.asarray(x)[:{clients}].tolist() for x in jax.tree.leaves(params[-1])]}}
    json.dump(out, open({out!r}, "w"))
""").replace("{clients}", str(CLIENTS))


@pytest.mark.parametrize("method", ALL)
def test_contract(method, references):
    """Clients sampled (participation 0.7) and dropping out (0.2), client 2 broken (NaN):
    bytes count reporting clients only; absent clients keep every parameter; client 2 is
    rejected whenever it reports and keeps its state; the others end exactly as in the run
    where client 2 never reports, and that run is the same on 1 and 8 devices."""
    setup, records, params = run_toy(_config(method), poison=True)
    spec, task = setup.method, setup.task
    shared = roles.select(task.client_params, setup.roles, roles.SHARED)
    up, down = records[0]["bytes_up_per_client"], records[0]["bytes_down_per_client"]
    assert up == _leaf_bytes(shared)  # the shared leaves, counted independently
    assert (up == 0) == (not spec.shared) and down >= up
    if method == "fedex_lora":  # plus the dense residual of the one adapted 8 x 3 kernel
        assert down == up + 4 * 8 * 3
    elif spec.shared:
        assert down == up
    initial = jax.tree.map(lambda x: np.array(np.broadcast_to(x, (CLIENTS, *x.shape))), task.client_params)
    initial["params"]["head"]["scale"][POISONED, 0] = np.nan
    previous = initial
    for record, current in zip(records, params):
        assert record["bytes_round"] == (up + down) * record["participants"]
        assert 1 <= record["participants"] == len(record["reporting_clients"]) < CLIENTS
        expected_broken = [POISONED] if POISONED in record["reporting_clients"] else []
        assert record["non_finite_clients"] == expected_broken == record["rejected_clients"]
        assert np.isfinite(record["train_loss"]) or record["reporting_clients"] == [POISONED]
        absent = sorted(set(range(CLIENTS)) - set(record["reporting_clients"]))
        for before, after in zip(jax.tree.leaves(previous), jax.tree.leaves(current)):
            np.testing.assert_array_equal(after[absent], before[absent])
        if "weights" in record:
            present = [i for i in record["reporting_clients"] if i != POISONED]
            np.testing.assert_array_equal(np.asarray(record["weights"])[np.ix_(present, absent + [POISONED])], 0.0)
        previous = current
    assert records[-1]["bytes_cumulative"] == sum(r["bytes_round"] for r in records)
    if spec.needs_data_statistics:  # the constant data distance is recorded once
        assert len(records[0]["data_distance"]) == CLIENTS and all("data_distance" not in r for r in records[1:])
    for got, start in zip(jax.tree.leaves(params[-1]), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(got[POISONED], start[POISONED])  # rolled back every round

    one, eight = references
    _, reference_records, reference = one[method]
    others = [i for i in range(CLIENTS) if i != POISONED]
    moved = max(float(np.abs(a[others] - b[others]).max())
                for a, b in zip(jax.tree.leaves(reference[-1]), jax.tree.leaves(initial)))
    assert moved > 1e-4  # the clients trained something
    for got, want in zip(jax.tree.leaves(params[-1]), jax.tree.leaves(reference[-1])):
        np.testing.assert_allclose(got[others], want[others], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(records[-1]["client_test_accuracy"])[others],
                               np.asarray(reference_records[-1]["client_test_accuracy"])[others])
    np.testing.assert_allclose(eight[method]["loss"], [r["train_loss"] for r in reference_records], atol=1e-5)
    np.testing.assert_allclose(eight[method]["accuracy"], reference_records[-1]["client_test_accuracy"])
    leaves = jax.tree.leaves(reference[-1])
    assert len(leaves) == len(eight[method]["leaves"])
    for got, want in zip(eight[method]["leaves"], leaves):
        np.testing.assert_allclose(np.asarray(got), want[:CLIENTS], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["celora", "fedex_lora", "fedavg_lora_ft"])
def test_contract_resume_is_exact_for_methods_with_extra_state(method, tmp_path):
    """CE-LoRA's data distance, FedEx-LoRA's summed residual (server state) and the
    fine-tuned copies of FedAvg-LoRA + FT (client state) survive a checkpoint: a run stopped
    after round 1 and resumed ends bit-identical to an uninterrupted one."""
    import dataclasses

    from celora_jax.federated.config import CheckpointConfig

    config = dataclasses.replace(toy_config(method, rounds=3), checkpoint=CheckpointConfig(every=1, keep=3))
    whole = [jax.tree.map(np.asarray, o.client_params) for o in loop.iterate_rounds(toy_setup(config))]
    rounds = loop.iterate_rounds(toy_setup(config), tmp_path / "ckpt")
    # A round's checkpoint is written once its record has been taken, when the next is asked
    # for: stopped after round 2's record, the run has round 1's checkpoint.
    assert [next(rounds).record["round"] for _ in range(2)] == [1, 2]
    rounds.close()
    resumed = [(o.record["round"], jax.tree.map(np.asarray, o.client_params))
               for o in loop.iterate_rounds(toy_setup(config), tmp_path / "ckpt", resume=True)]
    assert [r for r, _ in resumed] == [2, 3]
    for got, want in zip(jax.tree.leaves(resumed[-1][1]), jax.tree.leaves(whole[-1])):
        np.testing.assert_array_equal(got, want)

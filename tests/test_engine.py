"""The federated engine end to end on a tiny HF-format BERT and the real movie reviews."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import tiny_config, xla_flags

from celora_jax.data.text import DataError, TextDataConfig
from celora_jax.federated import engine, loop
from celora_jax.federated.config import ConfigError, FederationConfig, apply_overrides
from celora_jax.server import usable

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The methods run here on the tiny BERT (one of each kind of server and adapter); every
# registered method runs through the same contract on a toy model in
# tests/test_round_contract.py.
TINY_BERT_METHODS = ("celora", "fedavg_lora", "ffa_lora", "local")
TRI_METHODS = ("celora", "celora_avg")


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, tmp_path_factory):
    """``plain_run(method) -> (result, output_dir)``: ``engine.run`` of ``tiny_config(method)``,
    run once per method and shared by the tests that only read it."""
    @functools.cache
    def run(method):
        out = tmp_path_factory.mktemp(f"plain_{method}")
        return engine.run(tiny_config(tiny_model_dir, method), output_dir=out), out

    return run


@pytest.mark.parametrize("method", TINY_BERT_METHODS)
def test_every_method_runs_and_counts_bytes(plain_run, method):
    result, out = plain_run(method)
    assert len(result.history) == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    final = result.history[-1]
    assert np.isfinite(final["train_loss"])
    assert 0.0 <= final["test_accuracy_mean"] <= 1.0
    assert len(final["client_test_accuracy"]) == 5
    assert "global_test_accuracy_mean" in final
    if method == "local":
        assert final["bytes_cumulative"] == 0
    else:
        assert final["bytes_round"] == 2 * 5 * final["bytes_up_per_client"] > 0
        assert final["bytes_down_per_client"] == final["bytes_up_per_client"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    if method in TRI_METHODS:  # trained cores have left the identity
        assert len(final["core_share"]) == 5 and all(0 < s < 10 for s in final["core_share"])
        assert summary["core_share_mean"] == pytest.approx(np.mean(final["core_share"]))
    else:
        assert "core_share" not in final and "core_share_mean" not in summary


def test_fedavg_gives_every_client_the_same_shared_factors(plain_run):
    result, _ = plain_run("fedavg_lora")
    a = result.client_params["lora"]["backbone"]["encoder"]["layer_0"]["attention"]["self"]["query"]["A"]
    np.testing.assert_allclose(a[0], a[3], atol=1e-6)
    head = result.client_params["params"]["classifier"]["kernel"]
    assert float(np.abs(head[0] - head[1]).max()) > 1e-6  # the head stays personal


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys, numpy as np, jax
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from celora_jax.federated.config import apply_overrides
    from helpers import tiny_config
    from celora_jax.federated import engine
    assert len(jax.devices()) == 8, jax.devices()
    for index, (method, overrides) in enumerate({cases!r}):
        result = engine.run(apply_overrides(tiny_config({model!r}, method), overrides))
        out = {out!r} + str(index)
        np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(result.client_params)])
        json.dump([r["train_loss"] for r in result.history] + result.history[-1]["client_test_accuracy"],
                  open(out + ".json", "w"))
""")

# Plain 1-vs-8-device equality of every method is checked on the toy model
# (tests/test_round_contract.py); here the real encoder under blocks and data parallelism.
EIGHT_DEVICE_CASES = [
    # 10 clients padded to 16 and trained in two strided blocks of 8, each spanning all devices.
    ("celora", ["partition.num_clients=10", "federation.client_block=8"]),
    # clients x data mesh: 4 client groups of 2 devices, each client's batch of 8 split in two,
    # 10 clients padded to 12 and trained in three blocks of 4.
    ("celora", ["partition.num_clients=10", "federation.client_block=4", "federation.data_parallel=2"]),
    # all 8 devices on one client at a time: one example of each batch per device.
    ("fedavg_lora", ["federation.data_parallel=8"]),
]


@pytest.fixture(scope="module")
def eight_device_runs(tiny_model_dir, tmp_path_factory):
    """Every case of EIGHT_DEVICE_CASES on 8 fake CPU devices, in one subprocess: ``index ->
    (client parameter leaves, train losses + last client accuracies)``."""
    out = tmp_path_factory.mktemp("eight_devices")
    script = _EIGHT_DEVICES.format(root=str(ROOT), tests=str(ROOT / "tests"), model=str(tiny_model_dir),
                                   cases=EIGHT_DEVICE_CASES, out=str(out / "case"))
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=out)
    return {index: (np.load(out / f"case{index}.npz"), json.loads((out / f"case{index}.json").read_text()))
            for index in range(len(EIGHT_DEVICE_CASES))}


@pytest.fixture(scope="module")
def one_device_run(tiny_model_dir):
    """``one_device_run(method, overrides)``: the same clients on one device, all at once
    (cached: two cases share their one-device run)."""
    @functools.cache
    def run(method, overrides: tuple):
        return engine.run(apply_overrides(tiny_config(tiny_model_dir, method, num_devices=1), list(overrides)))

    return run


@pytest.mark.parametrize("case", range(len(EIGHT_DEVICE_CASES)),
                         ids=[f"{m}-{'-'.join(o)}" for m, o in EIGHT_DEVICE_CASES])
def test_one_device_and_eight_devices_give_the_same_run(eight_device_runs, one_device_run, case):
    """Clients padded to a multiple of 8 on an 8-device mesh equal the same clients on one
    device, all trained at once."""
    method, overrides = EIGHT_DEVICE_CASES[case]
    single = tuple(o for o in overrides if not o.startswith(("federation.client_block", "federation.data_parallel")))
    one = one_device_run(method, single)
    eight, eight_history = eight_device_runs[case]
    leaves = jax.tree.leaves(one.client_params)
    assert len(leaves) == len(eight.files)
    for index, leaf in enumerate(leaves):
        np.testing.assert_allclose(np.asarray(leaf), eight[f"arr_{index}"], atol=2e-5, rtol=1e-4)
    expected = [r["train_loss"] for r in one.history] + one.history[-1]["client_test_accuracy"]
    np.testing.assert_allclose(eight_history, expected, atol=1e-5)


def test_wasteful_padding_of_the_client_axis_is_reported(caplog):
    from celora_jax.federated import sharding

    mesh = sharding.client_mesh(1)
    with caplog.at_level("WARNING"):
        assert loop.warn_if_padding_wasteful(128, sharding.padded_client_count(128, mesh, 125))
    assert "128 clients run as 250 client slots" in caplog.text
    for num_clients, block in ((128, 32), (1000, 32), (10, None), (9, 5)):
        assert not loop.warn_if_padding_wasteful(num_clients, sharding.padded_client_count(num_clients, mesh, block))


def test_client_blocks_give_the_same_run(tiny_model_dir, plain_run):
    """5 clients in blocks of 2 (padded to 6, three blocks) equal all 5 at once."""
    whole, _ = plain_run("celora")  # tiny_config trains all clients at once
    blocked = engine.run(tiny_config(tiny_model_dir, "celora", client_block=2))
    for a, b in zip(jax.tree.leaves(whole.client_params), jax.tree.leaves(blocked.client_params)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    for before, after in zip(whole.history, blocked.history):
        for key, tolerance in (("train_loss", 1e-6), ("test_accuracy_mean", 1e-6), ("weights", 5e-5)):
            # The weights come out of simplex projections of distances over 5 vs 6 (padded)
            # clients: equal up to float32 reduction order.
            np.testing.assert_allclose(after[key], before[key], atol=tolerance)


def test_bad_input_fails_before_compiling(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        FederationConfig(method="fedavg")
    with pytest.raises(DataError, match="alpha must be > 0"):
        apply_overrides(tiny_config(tiny_model_dir), ["partition.alpha=0"])
    with pytest.raises(DataError, match="need .* examples, the data has"):
        engine.prepare(apply_overrides(tiny_config(tiny_model_dir), ["partition.num_clients=5000"]))
    bad_csv = tmp_path / "reviews.csv"
    bad_csv.write_text("review,stars\nfine,1\nbad,0\n")
    config = dataclasses.replace(tiny_config(tiny_model_dir), data=TextDataConfig(path=str(bad_csv)))
    with pytest.raises(DataError, match=r"no column\(s\) \['text', 'label'\]"):
        engine.prepare(config)
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(tiny_config(tiny_model_dir), ["federation.round=3"])
    with pytest.raises(ValueError, match="expects"):
        apply_overrides(tiny_config(tiny_model_dir), ["federation.rounds=many"])


def test_any_local_csv_with_text_and_label_columns_works(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    rows = ["sentence,sentiment"] + [f"{words[i % 6]} film {j},{'pos' if i % 6 < 3 else 'neg'}"
                                     for j, i in enumerate(rng.integers(0, 6, 400))]
    path = tmp_path / "mine.csv"
    path.write_text("\n".join(rows) + "\n")
    config = dataclasses.replace(
        tiny_config(tiny_model_dir, "celora_avg"),
        data=TextDataConfig(path=str(path), text_column="sentence", label_column="sentiment", group_column=None))
    result = engine.run(config)
    assert result.history[-1]["test_accuracy_mean"] >= 0.0


def test_reporting_clients_sampling():
    counts = [loop.reporting_clients(10, 0.3, 0.0, seed=0, round_index=r).sum() for r in range(20)]
    assert set(counts) == {3}
    assert loop.reporting_clients(10, 0.05, 0.0, seed=0, round_index=0).sum() == 1
    kept = np.mean([loop.reporting_clients(100, 1.0, 0.25, seed=1, round_index=r).mean() for r in range(50)])
    assert 0.7 < kept < 0.8
    np.testing.assert_array_equal(loop.reporting_clients(10, 0.5, 0.2, 3, 4),
                                  loop.reporting_clients(10, 0.5, 0.2, 3, 4))
    with pytest.raises(ValueError, match="participation"):
        FederationConfig(participation=0.0)
    with pytest.raises(ValueError, match="client_dropout"):
        FederationConfig(client_dropout=1.0)
    for block in (0, "fast", 2.5):
        with pytest.raises(ValueError, match="client_block must be an integer >= 1, None or 'auto'"):
            FederationConfig(client_block=block)


# Every method's absent clients are checked on the toy model (tests/test_round_contract.py);
# here on the real encoder with the personalized weights.
@pytest.mark.parametrize("method", ["celora"])
def test_absent_clients_keep_their_state_and_are_not_aggregated(tiny_model_dir, method):
    config = tiny_config(tiny_model_dir, method, participation=0.6, client_dropout=0.2)
    setup = engine.prepare(config)
    previous = jax.tree.map(lambda x: np.broadcast_to(x, (5, *x.shape)), setup.task.client_params)
    for record, client_params in loop.iterate_rounds(setup):
        current = jax.tree.map(lambda x: np.asarray(x)[:5], client_params)
        absent = sorted(set(range(5)) - set(record["reporting_clients"]))
        assert record["participants"] == len(record["reporting_clients"]) <= 3
        for before, after in zip(jax.tree.leaves(previous), jax.tree.leaves(current)):
            np.testing.assert_array_equal(after[absent], before[absent])
        if "weights" in record:
            weights = np.asarray(record["weights"])
            present = record["reporting_clients"]
            np.testing.assert_array_equal(weights[np.ix_(present, absent)], 0.0)
        previous = current


def test_rejected_updates_rule():
    before = {"c": np.zeros((5, 2))}
    after = {"c": np.array([[1.0, 0], [1.1, 0], [0.9, 0], [50.0, 0], [1.0, 0]])}
    trained = {"c": after["c"].copy(), "head": np.zeros((5, 3))}
    trained["head"][4, 1] = np.inf
    mask = np.array([True, True, True, True, True])
    non_finite = usable.non_finite_updates(trained, mask)
    np.testing.assert_array_equal(non_finite, [False, False, False, False, True])
    rejected = usable.rejected_updates(before, after, non_finite, mask, outlier_factor=10.0)
    np.testing.assert_array_equal(rejected, [False, False, False, True, True])
    lenient = usable.rejected_updates(before, after, non_finite, mask, outlier_factor=0.0)
    np.testing.assert_array_equal(lenient, [False, False, False, False, True])
    reporting = np.array([1, 1, 1, 0, 0], bool)
    absent = usable.rejected_updates(before, after, usable.non_finite_updates(trained, reporting), reporting, 10.0)
    assert not absent.any()


def test_recorded_float32_matrices_read_back_exactly_in_fewer_characters():
    values = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32) * np.float32(1e-3)
    values[0, :3] = [1e-30, np.nan, -np.inf]
    listed = loop._listed(values)
    back = np.asarray(json.loads(json.dumps(listed)), np.float32)
    np.testing.assert_array_equal(back, values)  # NaN and Inf included
    assert len(json.dumps(listed)) < 0.75 * len(json.dumps(values.tolist()))
    assert loop._listed(np.array([True, False])) == [True, False]  # other dtypes as they are
    assert loop._listed(np.array([3, 4], np.int32)) == [3, 4]


@pytest.mark.parametrize("method", ["celora", "fedavg_lora"])
def test_nan_client_is_rejected_and_others_are_unaffected(tiny_model_dir, method, monkeypatch, caplog):
    config = tiny_config(tiny_model_dir, method)
    original_state = loop.initial_client_state

    def poisoned(setup, count):  # client 2 starts with a NaN head
        stacked = original_state(setup, count)
        kernel = stacked["params"]["params"]["classifier"]["kernel"]
        stacked["params"]["params"]["classifier"]["kernel"] = kernel.at[2].set(np.nan)
        return stacked

    monkeypatch.setattr(loop, "initial_client_state", poisoned)
    with caplog.at_level("WARNING"):
        poisoned_run = engine.run(config)
    assert all(r["rejected_clients"] == [2] for r in poisoned_run.history)
    assert "clients [2] produced NaN/Inf" in caplog.text
    assert all(r["non_finite_clients"] == [2] for r in poisoned_run.history)
    monkeypatch.setattr(loop, "initial_client_state", original_state)

    # Reference: the same run in which client 2 simply never reports.
    original_reporting = loop.reporting_clients
    monkeypatch.setattr(loop, "reporting_clients",
                        lambda n, *args: original_reporting(n, *args) & (np.arange(n) != 2))
    reference = engine.run(config)
    others = [0, 1, 3, 4]
    for got, want in zip(jax.tree.leaves(poisoned_run.client_params), jax.tree.leaves(reference.client_params)):
        np.testing.assert_allclose(np.asarray(got)[others], np.asarray(want)[others], rtol=1e-6, atol=1e-7)
    accuracy = np.asarray(poisoned_run.history[-1]["client_test_accuracy"])
    np.testing.assert_allclose(accuracy[others], np.asarray(reference.history[-1]["client_test_accuracy"])[others])


def test_outlier_clients_keep_their_training_but_are_not_aggregated(tiny_model_dir, caplog):
    """An unusually large (finite) upload is set aside, not the client's own training."""
    one_round = ["federation.rounds=1"]
    strict = apply_overrides(tiny_config(tiny_model_dir, "celora"), one_round + ["federation.outlier_factor=1.0"])
    with caplog.at_level("WARNING"):
        run = engine.run(strict)
    record = run.history[-1]
    outliers = record["rejected_clients"]
    assert outliers and record["non_finite_clients"] == [] and "keep their own training" in caplog.text
    others = [i for i in range(5) if i not in outliers]
    np.testing.assert_array_equal(np.asarray(record["weights"])[np.ix_(others, outliers)], 0.0)
    # What a client trains for itself in round 1 does not depend on aggregation: the
    # outliers' A, B and head equal those of the same run without the rule.
    lenient = engine.run(apply_overrides(tiny_config(tiny_model_dir, "celora"),
                                         one_round + ["federation.outlier_factor=0.0"]))
    assert lenient.history[-1]["rejected_clients"] == []
    start = engine.prepare(strict).task.client_params
    for path, kept, reference in ((p, a, b) for (p, a), b in zip(
            jax.tree_util.tree_leaves_with_path(run.client_params), jax.tree.leaves(lenient.client_params))):
        name = jax.tree_util.keystr(path)
        if name.endswith("['C']"):
            continue  # the core: own for the outliers, the mixture for the others
        np.testing.assert_allclose(np.asarray(kept)[outliers], np.asarray(reference)[outliers], atol=1e-6)
    head = lambda params: np.asarray(params["params"]["classifier"]["kernel"])
    assert not np.allclose(head(run.client_params)[outliers], np.broadcast_to(head(start), head(run.client_params)[outliers].shape))


def test_bfloat16_compute_keeps_float32_adapters_and_tracks_float32(tiny_model_dir, plain_run):
    """Mixed precision: bf16 matmuls, float32 master adapters, optimizer state and norms."""
    full, _ = plain_run("celora")
    mixed = engine.run(apply_overrides(tiny_config(tiny_model_dir, "celora"), ["model.dtype='bfloat16'"]))
    for leaf in jax.tree.leaves(mixed.client_params):
        assert leaf.dtype == np.float32
    for a, b in zip(full.history, mixed.history):
        assert np.isfinite(b["train_loss"])
        assert abs(a["train_loss"] - b["train_loss"]) < 0.02  # bf16 has ~3 significant digits
    assert abs(full.history[-1]["test_accuracy_mean"] - mixed.history[-1]["test_accuracy_mean"]) <= 0.1
    # The adapters moved by the same updates: within bf16 rounding of the float32 run's.
    for a, b in zip(jax.tree.leaves(full.client_params), jax.tree.leaves(mixed.client_params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-2, rtol=2e-2)


def test_validation_split_is_scored_like_the_test_split_and_trained_on_by_no_one():
    """With the test split as validation, the validation record equals the test record
    exactly (the same clients, parameters and code); the clients train on the rest only."""
    from toy import toy_config, toy_setup

    config = apply_overrides(toy_config("celora", rounds=2), ["partition.validation_fraction=0.25"])
    setup = toy_setup(config)
    assert setup.task.train["labels"].shape[1] == 6 and setup.task.validation["labels"].shape[1] == 2
    np.testing.assert_array_equal(setup.sizes, 6.0)
    as_test = dataclasses.replace(setup, task=dataclasses.replace(setup.task, validation=setup.task.test))
    records = [output.record for output in loop.iterate_rounds(as_test)]
    for record in records:
        assert record["validation_accuracy_mean"] == record["test_accuracy_mean"]
        assert record["validation_accuracy_std"] == record["test_accuracy_std"]
        assert record["validation_loss"] == record["test_loss"]
    plain = [output.record for output in loop.iterate_rounds(setup)]
    assert all("validation_accuracy_mean" in r for r in plain)
    assert plain[-1]["validation_accuracy_mean"] != records[-1]["validation_accuracy_mean"]


def test_test_every_reads_the_test_split_only_on_its_schedule_and_changes_nothing_else():
    """``federation.test_every``: the validation split every ``eval_every`` rounds, the test
    split every ``test_every`` and at the last round; training and every number it does
    record are those of a run that evaluates everything every round."""
    from toy import toy_config, toy_setup

    every = apply_overrides(toy_config("celora", rounds=5), ["partition.validation_fraction=0.25"])
    sparse = apply_overrides(every, ["federation.test_every=2"])
    dense = [output.record for output in loop.iterate_rounds(toy_setup(every))]
    records = [output.record for output in loop.iterate_rounds(toy_setup(sparse))]
    assert [r["round"] for r in records if "test_accuracy_mean" in r] == [2, 4, 5]
    assert all("validation_accuracy_mean" in r for r in records)
    for full, record in zip(dense, records):
        for key in ("validation_accuracy_mean", "validation_loss", "train_loss", "test_accuracy_mean"):
            if key in record:
                assert record[key] == full[key], key
    with pytest.raises(ConfigError, match="test_every"):
        apply_overrides(every, ["federation.test_every=0"])


def test_runs_without_a_validation_split_record_none(plain_run):
    result, _ = plain_run("celora")
    assert not any("validation_accuracy_mean" in r for r in result.history)
    assert result.summary["validation_accuracy_mean"] is None


def test_a_run_with_a_validation_split_records_it_per_evaluated_round(tiny_model_dir, tmp_path):
    config = apply_overrides(tiny_config(tiny_model_dir, "fedavg_lora"), ["partition.validation_fraction=0.25"])
    result = engine.run(config, output_dir=tmp_path)
    for record in result.history:
        assert 0 <= record["validation_accuracy_mean"] <= 1 and record["validation_loss"] > 0
    assert result.summary["validation_accuracy_mean"] == result.history[-1]["validation_accuracy_mean"]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["validation_accuracy_mean"] for r in written] == [r["validation_accuracy_mean"] for r in result.history]

"""Clients of different ranks in a frozen shared basis (``adapter.client_ranks``, issue 41
item 3): a client of rank r_i computes with, trains and sends only the top-left r_i x r_i
block of its cores."""

import dataclasses

import jax
import numpy as np
import pytest
from toy import toy_config, toy_setup

from celora_jax.cli import main as cli
from celora_jax.federated import client_ranks, loop
from celora_jax.federated.config import RunConfig, apply_overrides
from celora_jax.lora.adapters import AdapterConfig, AdapterConfigError


def test_restricted_factors_give_each_client_its_top_left_block():
    rng = np.random.default_rng(0)
    ranks = np.array([1, 3, 2])
    for layers in ((), (2,)):  # unrolled, and stacked layers under nn.scan
        lora = {"layer": {"dense": {"A": rng.normal(size=(3, *layers, 5, 3)), "B": rng.normal(size=(3, *layers, 3, 4)),
                                    "C": rng.normal(size=(3, *layers, 3, 3))}}}
        cut = client_ranks.restrict_to_ranks(lora, ranks)["layer"]["dense"]
        np.testing.assert_array_equal(cut["C"], lora["layer"]["dense"]["C"])
        for i, r in enumerate(ranks):
            a, b, c = (lora["layer"]["dense"][k][i] for k in "ABC")
            np.testing.assert_allclose(cut["A"][i] @ c @ cut["B"][i], a[..., :r] @ c[..., :r, :r] @ b[..., :r, :],
                                       atol=1e-12)
            assert not cut["A"][i][..., r:].any() and not cut["B"][i][..., r:, :].any()


def _shared_basis(config, **adapter):
    return dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init="weight_svd", **adapter))


@pytest.mark.parametrize("method", ["fed_sb", "celora"])
def test_every_client_at_rank_one_in_a_rank_two_basis_is_the_rank_one_run(method):
    """The truncated SVD is nested (rank 1's A, B are rank 2's first column and row), so
    clients restricted to rank 1 must train, aggregate, score and pay exactly as a run at
    rank 1: this fails if a masked entry moved, leaked into the model or was counted."""
    config = toy_config(method, rounds=3)
    records = {}
    for name, adapter in (("restricted", {"rank": 2, "client_ranks": "1"}), ("rank1", {"rank": 1})):
        setup = toy_setup(_shared_basis(config, **adapter))
        outputs = list(loop.iterate_rounds(setup))
        records[name] = [o.record for o in outputs]
        cores = np.asarray(outputs[-1].client_params["lora"]["dense"]["C"])
        if name == "restricted":
            assert np.abs(cores[:, 0, 0]).min() > 0
            assert not cores[:, 1:, :].any() and not cores[:, :, 1:].any()  # nobody trains them
    for restricted, rank1 in zip(records["restricted"], records["rank1"]):
        for key in ("train_loss", "test_accuracy_mean", "test_loss"):
            # Float sums over a zero column differ in the last bits, which Adam carries on.
            assert restricted[key] == pytest.approx(rank1[key], rel=1e-4, abs=1e-5), key
        for key in ("bytes_up_per_client", "bytes_down_per_client", "bytes_round", "bytes_cumulative"):
            assert restricted[key] == rank1[key], key


def test_mixed_ranks_count_each_clients_block_and_keep_untrained_entries():
    config = _shared_basis(toy_config("fed_sb", rounds=2), rank=2, client_ranks="1,2")
    setup = toy_setup(config)
    full_up, full_down = loop.bytes_per_client(setup)
    outputs = list(loop.iterate_rounds(setup))
    record = outputs[0].record
    # Clients 0, 2, 4 at rank 1 save 2² - 1² = 3 float32 core entries each way.
    assert record["bytes_round"] == 6 * (full_up + full_down) - 3 * 2 * 3 * 4
    assert record["bytes_up_per_client"] == round(full_up - 3 * 3 * 4 / 6)
    # Every client receives the same average; a rank-1 client's factors cut the rest away.
    final = jax.tree.map(np.asarray, outputs[-1].client_params["lora"]["dense"])
    assert not final["A"][0][:, 1:].any() and final["A"][1][:, 1:].any()
    np.testing.assert_allclose(final["C"][0], final["C"][1], atol=1e-7)
    assert np.abs(final["C"][0][1, 1]) > 0  # trained by the rank-2 clients


@pytest.mark.parametrize("make, message", [
    (lambda: AdapterConfig(rank=4, client_ranks="2;4"), "comma-separated ranks"),
    (lambda: AdapterConfig(rank=4, client_ranks="2,8"), "must lie in 1..rank=4"),
    (lambda: AdapterConfig(rank=4, client_ranks="0"), "must lie in 1..rank=4"),
    (lambda: AdapterConfig(rank=4, client_ranks=""), "comma-separated ranks"),
])
def test_bad_client_ranks_are_refused(make, message):
    with pytest.raises(AdapterConfigError, match=message):
        make()


def test_client_ranks_need_a_frozen_basis_and_a_simulation(tmp_path, capsys):
    message = "adapter.client_ranks gives clients the top-left blocks of cores in one frozen shared basis"
    with pytest.raises(ValueError, match=message):
        apply_overrides(RunConfig(), ["federation.method=celora", "adapter.client_ranks='4,8'"])
    assert cli.main(["run", "--no-progress", "--set", "federation.method=fedavg_lora",
                     "--set", "adapter.client_ranks='4,8'"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="adapter.client_ranks with DP"):
        apply_overrides(RunConfig(), ["federation.method=fed_sb", "adapter.client_ranks='4,8'", "dp.clip_norm=0.1",
                                      "dp.noise_multiplier=1.0"])
    for value in ("'4,8'", "4,8", "(4, 8)"):  # quoted, or as --set parses an unquoted list
        adapter = apply_overrides(RunConfig(), ["federation.method=fed_sb", f"adapter.client_ranks={value}"]).adapter
        assert adapter.client_ranks == "4,8" and adapter.client_rank_cycle == (4, 8)

    from celora_jax.federated.nodes import ClientNode

    config = _shared_basis(toy_config("fed_sb", rounds=1), rank=2, client_ranks="1,2")
    with pytest.raises(ValueError, match="cores of different ranks"):
        ClientNode(toy_setup(config), 0)
    assert cli.main(["flower-app", str(tmp_path / "app"), "--set", "federation.method=fed_sb",
                     "--set", "adapter.client_ranks='4,8'"]) == 2

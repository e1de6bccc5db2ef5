"""A method run node by node (one client per node, the server on what arrives, records on the
wire in between) reproduces the simulator's run: the ground a deployment stands on."""

import dataclasses

import jax
import numpy as np
import pytest
from toy import toy_config, toy_setup, with_federation

from celora_jax.federated import loop
from celora_jax.federated.nodes import ClientNode, node_programs
from celora_jax.federated.server_node import ServerNode, stack_statistics
from celora_jax.privacy.dp import DPConfig
from celora_jax.server import wire

NODE_METHODS = ["celora", "celora_avg", "fedavg_lora", "ffa_lora", "fedsa_lora", "fedprox", "local", "fedex_lora",
                "fedavg_lora_ft", "fed_sb"]


def run_nodes(setup, rounds: int):
    """The run as separate nodes exchanging flat records: (records, final accuracies)."""
    config, fed, n = setup.config, setup.config.federation, setup.num_clients
    programs = node_programs(setup)  # shared, as a simulation's process shares them
    nodes = [ClientNode(setup, i, programs) for i in range(n)]
    states = [node.initial_state() for node in nodes]
    statistics = (stack_statistics({i: node.statistic() for i, node in enumerate(nodes)}, n)
                  if setup.method.needs_data_statistics else None)
    like = nodes[0].shared(states[0])
    server = ServerNode(setup.method, config.aggregation, like, setup.sizes, statistics, fed.outlier_factor)
    records = []
    for round_index in range(rounds):
        bytes_down = []
        reporting = np.flatnonzero(loop.reporting_clients(n, fed.participation, fed.client_dropout, config.seed,
                                                          round_index))
        uploads, losses, trained = {}, [], []
        for i in reporting:
            states[i], upload, metrics = nodes[i].train(states[i], round_index)
            if upload is not None:
                trained.append(int(i))
            arrays, dtypes = wire.flatten_tree(upload)  # what would cross the network
            uploads[int(i)] = wire.unflatten_tree(arrays, dtypes, like=like, require_finite=True)
            losses.append(metrics["train_loss"])
        downloads, logs = server.aggregate(uploads)
        for i, download in downloads.items():
            arrays, dtypes = wire.flatten_tree(download)
            states[i] = nodes[i].receive(states[i], wire.unflatten_tree(arrays, dtypes,
                                                                        like=nodes[i].download_like(states[i])))
            bytes_down.append(wire.record_bytes(arrays))
        for i in trained:  # personal steps once the round's answer is in (FedAvg-LoRA+FT)
            states[i] = nodes[i].finetune(states[i], round_index)
        records.append({"train_loss": float(np.mean(losses)), "reporting": reporting.tolist(),
                        "bytes_down": bytes_down, **logs})
    scores = [node.evaluate(state) for node, state in zip(nodes, states)]
    return records, [s["correct"] / max(s["count"], 1.0) for s in scores]


@pytest.mark.parametrize("method,init,update_since", [*((m, None, "start") for m in NODE_METHODS),
                                                      ("celora", "weight_svd", "start"),
                                                      ("celora", "weight_svd", "received")])
def test_nodes_reproduce_the_simulator(method, init, update_since):
    config = with_federation(toy_config(method), participation=0.67, rounds=3)
    if init is not None:  # the server node finds the cores' start (0 here) in what it first sent
        config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init=init))
    # Since received: the server keeps each client's last mixture; absent clients (a third
    # of them each round) must keep theirs, in the node's server as in the simulator's.
    config = dataclasses.replace(config, aggregation=dataclasses.replace(config.aggregation,
                                                                         update_since=update_since))
    setup = toy_setup(config)
    simulated = [out.record for out in loop.iterate_rounds(setup)]
    records, accuracies = run_nodes(setup, config.federation.rounds)
    for simulated_round, node_round in zip(simulated, records):
        assert simulated_round["reporting_clients"] == node_round["reporting"]
        np.testing.assert_allclose(node_round["train_loss"], simulated_round["train_loss"], rtol=1e-5, atol=1e-6)
        assert set(node_round["bytes_down"]) <= {simulated_round["bytes_down_per_client"]}
        if "weights" in simulated_round:  # CE-LoRA's personalized W
            # Learned from distances of statistics fitted one client at a time instead of six
            # at once: float32 reduction order moves W by ~3e-5.
            np.testing.assert_allclose(node_round["weights"], simulated_round["weights"], atol=1e-4)
    np.testing.assert_allclose(accuracies, simulated[-1]["client_test_accuracy"], atol=1e-6)


def test_nodes_reproduce_the_simulator_under_dp():
    config = dataclasses.replace(with_federation(toy_config("celora"), rounds=2),
                                 dp=DPConfig(clip_norm=0.05, noise_multiplier=0.5))
    setup = toy_setup(config)
    simulated = [out.record for out in loop.iterate_rounds(setup)]
    records, accuracies = run_nodes(setup, 2)
    for simulated_round, node_round in zip(simulated, records):
        np.testing.assert_allclose(node_round["train_loss"], simulated_round["train_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accuracies, simulated[-1]["client_test_accuracy"], atol=1e-6)


def test_server_refuses_nan_and_keeps_absent_clients_out():
    setup = toy_setup(toy_config("fedavg_lora", num_clients=4))
    nodes = [ClientNode(setup, i) for i in range(4)]
    states = [node.initial_state() for node in nodes]
    server = ServerNode(setup.method, setup.config.aggregation, nodes[0].shared(states[0]), setup.sizes)
    uploads = {}
    for i in (0, 1, 2):  # client 3 is absent
        states[i], uploads[i], _ = nodes[i].train(states[i], 0)
    uploads[2] = jax.tree.map(lambda x: np.full_like(x, np.nan), uploads[2])
    downloads, logs = server.aggregate(uploads)
    assert sorted(downloads) == [0, 1] and logs["non_finite"] == [2] and logs["rejected"] == [2]
    # The average is over clients 0 and 1 alone (equal sizes): the NaN did not leak into it.
    expected = jax.tree.map(lambda a, b: (a + b) / 2, uploads[0], uploads[1])
    for got, want in zip(jax.tree.leaves(downloads[0]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match=r"uploads from clients \[7\]"):
        server.aggregate({7: uploads[0]})


def _cores(tree) -> np.ndarray:
    """``[L * r * r]``: a client's cores, flattened (the toy has one adapted matrix)."""
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree["lora"])])


def test_a_client_that_started_over_is_measured_from_the_initial_parameters():
    """Client 0 lost its state after round 1 and had no download to apply (a Flower node
    restarted after an unaccepted upload): it trains round 2 from the initial parameters,
    and its update is measured from there, not from the mixture it was sent in round 1.
    Client 3 also started over and then sent NaN: the server holds it at the initial
    parameters (what it trains from next), not at its round-1 mixture."""
    config = toy_config("celora", num_clients=4)
    config = dataclasses.replace(config, aggregation=dataclasses.replace(config.aggregation,
                                                                         update_since="received"))
    setup = toy_setup(config)
    nodes = [ClientNode(setup, i) for i in range(4)]
    initial = [node.initial_state() for node in nodes]
    like = nodes[0].shared(initial[0])
    statistics = stack_statistics({i: node.statistic() for i, node in enumerate(nodes)}, 4)
    server = ServerNode(setup.method, config.aggregation, like, setup.sizes, statistics)
    states, uploads = list(initial), {}
    for i in range(4):
        states[i], uploads[i], _ = nodes[i].train(states[i], 0)
    first, _ = server.aggregate(uploads)
    states = [nodes[i].receive(states[i], first[i]) for i in range(4)]
    states[0] = states[3] = None  # lost: they start over from their initial states
    for i in range(4):
        states[i], uploads[i], _ = nodes[i].train(initial[i] if states[i] is None else states[i], 1)
    uploads[3] = jax.tree.map(lambda x: np.full_like(x, np.nan), uploads[3])
    _, logs = server.aggregate(uploads, started_over=[0, 3])
    origins = [_cores(like)] + [_cores(first[i]) for i in (1, 2)]
    deltas = np.stack([_cores(uploads[i]) - origin for i, origin in enumerate(origins)])
    unit = deltas / np.linalg.norm(deltas, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(logs["param_distance"])[:3, :3], 1.0 - unit @ unit.T, atol=1e-5)
    assert logs["non_finite"] == [3]
    for held, start in zip(jax.tree.leaves(jax.tree.map(lambda x: x[3], server.sent)), jax.tree.leaves(like)):
        np.testing.assert_array_equal(held, start)
    with pytest.raises(ValueError, match=r"clients started over: \[9\]"):
        server.aggregate({0: uploads[0]}, started_over=[9])


def test_the_norm_check_measures_a_client_that_started_over_from_the_start():
    """FedAvg-LoRA under the norm check (factor 3). Round 1: every client moves its leaves
    by about 10, so the average each is sent lies 10 from the start. Round 2: clients 1-3
    move 0.1 on from it; client 0, which lost its state, moves 0.1 from the start. Measured
    from what it was sent it is 10 away, an outlier (a server not told it started over
    rejects it); measured from the start it is like the others. Round 3: client 3 starts
    over but its upload never arrives; in round 4 its upload is measured from the start."""
    setup = toy_setup(toy_config("fedavg_lora", num_clients=4))
    node = ClientNode(setup, 0)
    like = node.shared(node.initial_state())

    def moved(tree, by):
        return jax.tree.map(lambda x: np.asarray(x) + by, tree)

    servers = [ServerNode(setup.method, setup.config.aggregation, like, setup.sizes, outlier_factor=3.0)
               for _ in range(2)]
    for server in servers:
        downloads, logs = server.aggregate({i: moved(like, 10.0 + 0.1 * i) for i in range(4)})
        assert logs["rejected"] == []
    second = {0: moved(like, 0.1), **{i: moved(downloads[i], 0.1) for i in (1, 2, 3)}}
    told, _ = servers[0].aggregate(second, started_over=[0])
    assert sorted(told) == [0, 1, 2, 3]
    assert servers[1].aggregate(second)[1]["rejected"] == [0]
    servers[0].aggregate({i: moved(told[i], 0.1) for i in (0, 1, 2)}, started_over=[3])
    _, logs = servers[0].aggregate({3: moved(like, 0.1), **{i: moved(told[i], 0.2) for i in (0, 1, 2)}})
    assert logs["rejected"] == []


def test_methods_a_node_cannot_run_are_refused():
    with pytest.raises(ValueError, match="cannot run on separate nodes: .*true clusters"):
        ClientNode(toy_setup(toy_config("cluster_oracle")), 0)
    setup = toy_setup(toy_config("celora"))
    with pytest.raises(ValueError, match="needs every client's data statistic"):
        ServerNode(setup.method, setup.config.aggregation, {}, setup.sizes)
    with pytest.raises(ValueError, match=r"data statistics of clients \[1, 2\] did not arrive"):
        stack_statistics({0: ClientNode(setup, 0).statistic()}, 3)
    with pytest.raises(ValueError, match="not one of the run's 6 clients"):
        ClientNode(setup, 6)

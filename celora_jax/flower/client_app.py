"""The Flower ClientApp: one SuperNode is one client (``partition-id`` in its node config) of
a celora-jax run, training with ``celora_jax.federated.nodes.ClientNode``.

Messages (all arrays as flat records by path, ``celora_jax.flower.records``):

  query     (once, before round 1)  reply: ``statistic`` (methods that need the data
            statistic), ``initial`` (the shared leaves every client starts from, from
            partition 0 only) and metrics ``num-examples``.
  train     round r: ``download`` = the server's answer to round r - 1 for this node (absent
            in round 1 or when its last upload was not accepted); the node applies it,
            trains one round and replies ``upload`` (its shared leaves) with metrics
            ``train_loss``, ``train_accuracy``, ``num-examples``.
  evaluate  ``download`` of the last round; the node applies it and replies its own-test
            ``correct``, ``count`` and ``loss``.

The node's parameters and optimizer state live in ``context.state`` between rounds
(``celora.params``, ``celora.opt_state``), which Flower keeps for the run on the node; a
node that lost it (restarted without persisted state) starts from the initial parameters
and says so in a warning.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from celora_jax.config import RunConfig
from celora_jax.federated import setup as setup_lib
from celora_jax.federated.nodes import ClientNode
from celora_jax.flower import records

logger = logging.getLogger(__name__)
PARAMS, OPT_STATE = "celora.params", "celora.opt_state"


def partition_id(context: Context, num_clients: int) -> int:
    """The client this node is (``partition-id`` of its node config), checked."""
    if "partition-id" not in context.node_config:
        raise ValueError("the SuperNode has no partition-id in its node config (flower-supernode "
                         "--node-config 'partition-id=0 num-partitions=N')")
    client = int(context.node_config["partition-id"])
    if not 0 <= client < num_clients:
        raise ValueError(f"partition-id {client} is not one of the run's {num_clients} clients")
    return client


def _load_state(node: ClientNode, context: Context, server_round: int) -> dict:
    initial = node.initial_state()
    if PARAMS not in context.state.array_records:
        if server_round > 1:
            logger.warning("client %d: no persisted state in round %d (the node restarted?); it starts fresh "
                           "from the initial parameters", node.client, server_round)
        return initial
    params = records.take_tree(context.state, PARAMS, initial["params"], what=f"client {node.client}'s state")
    leaves = records.take_tree(context.state, OPT_STATE, _numbered_leaves(initial["opt_state"]),
                               what=f"client {node.client}'s optimizer state")
    opt_state = jax.tree.unflatten(jax.tree.structure(initial["opt_state"]),
                                   [leaves[str(i)] for i in range(len(leaves))])
    return {"params": params, "opt_state": opt_state}


def _numbered_leaves(tree) -> dict:
    """An optimizer state (tuples of named tuples, some empty) as ``{"0": leaf, ...}``: its
    structure is the node's own, rebuilt from the initial state."""
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _save_state(context: Context, state: dict) -> None:
    records.put_tree(context.state, PARAMS, state["params"])
    records.put_tree(context.state, OPT_STATE, _numbered_leaves(state["opt_state"]))


def make_client_app(config: RunConfig, prepare: Callable = setup_lib.prepare) -> ClientApp:
    """A ClientApp running ``config``'s method on each node's own client (``prepare``
    builds the run's ``Setup``; tests pass a toy one)."""
    app = ClientApp()
    # Built once per process (a simulation serves several clients from one process; a
    # SuperNode starts a process per message, where the compilation cache saves the rest).
    prepared: dict = {"setup": None, "nodes": {}}

    def node_for(context: Context) -> ClientNode:
        if prepared["setup"] is None:
            prepared["setup"] = prepare(config)
        setup, nodes = prepared["setup"], prepared["nodes"]
        client = partition_id(context, setup.num_clients)
        if client not in nodes:
            nodes[client] = ClientNode(setup, client)
        return nodes[client]

    def arrive(msg: Message, context: Context) -> tuple[ClientNode, int, dict]:
        """(node, server round, state with the message's download applied if it has one)."""
        node = node_for(context)
        server_round = int(msg.content["config"]["server-round"])
        state = _load_state(node, context, server_round)
        if records.has_tree(msg.content, "download"):
            download = records.take_tree(msg.content, "download", node.shared(state),
                                         what=f"the download of client {node.client}")
            state = node.receive(state, download)
        return node, server_round, state

    def reply(msg: Message, node: ClientNode, **metrics) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": node.size, "client": node.client,
                                                            **metrics})}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        node = node_for(context)
        answer = reply(msg, node)
        if node.setup.method.needs_data_statistics:
            records.put_tree(answer.content, "statistic", node.statistic()._asdict())
        if node.client == 0:
            records.put_tree(answer.content, "initial", node.shared(node.initial_state()))
        return answer

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node, server_round, state = arrive(msg, context)
        state, upload, metrics = node.train(state, server_round - 1)
        _save_state(context, state)
        if upload is None:
            raise ValueError(f"client {node.client}: round {server_round} produced NaN/Inf; nothing uploaded")
        answer = reply(msg, node, train_loss=metrics["train_loss"], train_accuracy=metrics["train_accuracy"])
        records.put_tree(answer.content, "upload", upload)
        return answer

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node, _, state = arrive(msg, context)
        _save_state(context, state)
        return reply(msg, node, **node.evaluate(state))

    return app

"""The Flower ClientApp: one SuperNode is one client (``partition-id`` in its node config) of
a celora-jax run, training with ``celora_jax.federated.nodes.ClientNode``.

Messages (all arrays as flat records by path, ``celora_jax.flower.records``):

  query     (once, before round 1)  reply: ``statistic`` (methods that need the data
            statistic), ``initial`` (the shared leaves every client starts from; the
            server keeps the first present client's) and metrics ``num-examples``.
  train     round r: ``download`` = the server's answer to round r - 1 for this node (absent
            in round 1 or when its last upload was not accepted); the node applies it,
            trains one round and replies ``upload`` (its shared leaves) with metrics
            ``train_loss``, ``train_accuracy``, ``num-examples``, ``state_restored`` (1: its
            state came from its state-dir), ``state_fresh`` (1: it had lost its state) and
            ``started_over`` (1: lost, and no download to apply: it trained from the initial
            parameters, and the server measures its upload from there).
  evaluate  ``download`` of the last round; the node applies it and replies its own-test
            ``correct``, ``count`` and ``loss``.

The node's parameters and optimizer state live in ``context.state`` between rounds
(``celora.params``, ``celora.opt``; ``celora.fold``: the server state FedEx-LoRA folds into
the base), which the SuperNode keeps in memory for the run.
A SuperNode started with ``state-dir=DIR`` in its node config also writes them to
``DIR/client<k>.npz`` after every message, so that after a restart it continues where it
stopped; one without (or with nothing there yet) starts from the initial parameters and
says so in a warning. The server sends a restarted node the download it missed only if
that node had not been sent it yet.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Callable

import jax
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from celora_jax.federated import setup as setup_lib
from celora_jax.federated.config import RunConfig
from celora_jax.federated.nodes import ClientNode, node_programs
from celora_jax.flower import records
from celora_jax.server import wire

logger = logging.getLogger(__name__)
PREFIX = "celora."  # context.state records: celora.params, celora.opt, celora.fold
# A node that started over and whose upload has not yet gone out since (its training gave
# NaN): it says so again with its next upload. Kept in context.state and the state file.
OWED = "started_over"


def _process_started() -> float | None:
    """When this process started (seconds since the epoch), if psutil can tell."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().create_time()


# A SuperNode starts a process per message: what it spends before the app runs (interpreter,
# imports) is part of every round's cost.
PROCESS_STARTED = _process_started()


def partition_id(context: Context, num_clients: int) -> int:
    """The client this node is (``partition-id`` of its node config), checked."""
    if "partition-id" not in context.node_config:
        raise ValueError("the SuperNode has no partition-id in its node config (flower-supernode "
                         "--node-config 'partition-id=0 num-partitions=N')")
    client = int(context.node_config["partition-id"])
    if not 0 <= client < num_clients:
        raise ValueError(f"partition-id {client} is not one of the run's {num_clients} clients")
    return client


def _load_state(node: ClientNode, context: Context, server_round: int) -> tuple[dict, str, bool]:
    """``(state, origin, owed)``: Flower's ``context.state`` (kept by the SuperNode for the
    run; origin "memory"), else the node's ``state-dir`` (a SuperNode that restarted;
    "disk"), else the initial state ("initial"); ``owed``: it started over earlier and has
    not said so with an upload yet."""
    initial = node.initial_state()
    like = _parts_like(node, initial)
    if records.has_tree(context.state, PREFIX + "params"):
        parts = {name: records.take_tree(context.state, PREFIX + name, part_like,
                                         what=f"client {node.client}'s state ({name})")
                 for name, part_like in like.items() if records.has_tree(context.state, PREFIX + name)}
        owed = PREFIX + OWED in context.state.config_records
        return _from_parts(initial, parts), "memory", owed
    state_file = _state_file(context, node.client)
    if state_file is not None and state_file.is_file():
        parts, owed = _read_state_file(state_file, like)
        logger.warning("client %d: restored its state from %s (the node restarted)", node.client, state_file)
        return _from_parts(initial, parts), "disk", owed
    if server_round > 1:
        logger.warning("client %d: no persisted state in round %d (the node restarted without a state-dir in "
                       "its node config?); it starts fresh from the initial parameters", node.client, server_round)
    return initial, "initial", False


def _numbered_leaves(tree) -> dict:
    """An optimizer state (tuples of named tuples, some empty) as ``{"0": leaf, ...}``: its
    structure is the node's own, rebuilt from the initial state."""
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _parts(state: dict) -> dict:
    """What a node keeps between messages, as flat-keyed pytrees: parameters, optimizer
    leaves and (methods that fold it into the base) the server state it last received."""
    parts = {"params": state["params"], "opt": _numbered_leaves(state["opt_state"])}
    if "fold" in state:
        parts["fold"] = state["fold"]
    return parts


def _parts_like(node: ClientNode, initial: dict) -> dict:
    like = _parts(initial)
    if node.fold_like is not None:
        like["fold"] = node.fold_like
    return like


def _from_parts(initial: dict, parts: dict) -> dict:
    leaves = parts["opt"]
    opt_state = jax.tree.unflatten(jax.tree.structure(initial["opt_state"]),
                                   [leaves[str(i)] for i in range(len(leaves))])
    state = {"params": parts["params"], "opt_state": opt_state}
    if "fold" in parts:
        state["fold"] = parts["fold"]
    return state


def _state_file(context: Context, client: int) -> pathlib.Path | None:
    """``<state-dir>/client<k>.npz`` if the node config names a ``state-dir``."""
    directory = context.node_config.get("state-dir")
    if not directory:
        return None
    directory = pathlib.Path(str(directory)).expanduser()
    if not directory.is_absolute():  # the ClientApp runs in a process whose directory is Flower's
        raise ValueError(f"the node config's state-dir {str(directory)!r} must be an absolute path")
    return directory / f"client{client}.npz"


def _write_state_file(path: pathlib.Path, state: dict, owed: bool = False) -> None:
    """Every part by path, with the dtypes (and ``owed``), replaced atomically (a node
    killed mid-write leaves the previous file)."""
    arrays, dtypes = {"__" + OWED + "__": np.asarray(owed)}, {}
    for name, tree in _parts(state).items():
        flat, flat_dtypes = wire.flatten_tree(tree)
        arrays.update({f"{name}/{k}": v for k, v in flat.items()})
        dtypes.update({f"{name}/{k}": v for k, v in flat_dtypes.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(handle, __dtypes__=np.asarray(json.dumps(dtypes)), **arrays)
    os.replace(partial, path)


def _read_state_file(path: pathlib.Path, like: dict) -> tuple[dict, bool]:
    """The parts in ``path``, each checked against ``like`` (a part not saved yet, e.g. the
    server state before the first download, is left out), and ``owed``."""
    with np.load(path) as data:
        dtypes = json.loads(str(data["__dtypes__"]))
        arrays = {key: data[key] for key in data.files if not key.startswith("__")}
        owed = "__" + OWED + "__" in data.files and bool(data["__" + OWED + "__"])
    parts = {}
    for name, part_like in like.items():
        keys = [k for k in arrays if k.startswith(name + "/")]
        if keys or name in ("params", "opt"):
            parts[name] = wire.unflatten_tree({k[len(name) + 1:]: arrays[k] for k in keys},
                                              {k[len(name) + 1:]: dtypes[k] for k in keys}, part_like,
                                              what=f"the state file {path} ({name})")
    return parts, owed


def _save_state(context: Context, state: dict, client: int, owed: bool = False) -> None:
    for name, tree in _parts(state).items():
        records.put_tree(context.state, PREFIX + name, tree)
    if owed:
        context.state[PREFIX + OWED] = ConfigRecord({OWED: True})
    elif PREFIX + OWED in context.state.config_records:
        del context.state[PREFIX + OWED]
    state_file = _state_file(context, client)
    if state_file is not None:
        _write_state_file(state_file, state, owed)


def make_client_app(config: RunConfig, prepare: Callable = setup_lib.prepare) -> ClientApp:
    """A ClientApp running ``config``'s method on each node's own client (``prepare``
    builds the run's ``Setup``; tests pass a toy one)."""
    return client_app_for(lambda context: prepare(config))


def client_app_for(build_setup: Callable[[Context], "setup_lib.Setup"]) -> ClientApp:
    """A ClientApp whose ``Setup`` is built by ``build_setup(context)`` on the first message
    a process handles (``celora_jax.flower.app`` reads it from Flower's run config)."""
    app = ClientApp()
    # Built once per process, with one set of jitted programs for all its nodes (a
    # simulation serves several clients from one process, which then compiles once, not
    # once per client; a SuperNode starts a process per message, where the compilation
    # cache saves the rest).
    prepared: dict = {"setup": None, "programs": None, "nodes": {}, "setup_seconds": 0.0}

    def node_for(context: Context) -> ClientNode:
        if prepared["setup"] is None:
            started = time.perf_counter()
            try:
                prepared["setup"] = build_setup(context)
            except ValueError as err:  # DataError, ConfigError: one line in the node's log
                logger.error("this SuperNode cannot take part in the run: %s", err)
                raise
            prepared["programs"] = node_programs(prepared["setup"])
            prepared["setup_seconds"] = time.perf_counter() - started
        setup, nodes = prepared["setup"], prepared["nodes"]
        client = partition_id(context, setup.num_clients)
        if client not in nodes:
            nodes[client] = ClientNode(setup, client, prepared["programs"])
        return nodes[client]

    def arrive(msg: Message, context: Context) -> tuple[ClientNode, int, dict, dict]:
        """(node, server round, state with the message's download applied if it has one,
        metrics saying where the state came from)."""
        node = node_for(context)
        server_round = int(msg.content["config"]["server-round"])
        state, origin, owed = _load_state(node, context, server_round)
        fresh = origin == "initial" and server_round > 1
        has_download = records.has_tree(msg.content, "download")
        origin_metrics = {"state_restored": int(origin == "disk"), "state_fresh": int(fresh),
                          "started_over": int((fresh or owed) and not has_download)}
        if has_download:
            download = records.take_tree(msg.content, "download", node.download_like(state),
                                         what=f"the download of client {node.client}")
            state = node.receive(state, download)
        return node, server_round, state, origin_metrics

    def reply(msg: Message, node: ClientNode, **metrics) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": node.size, "client": node.client,
                                                            **metrics})}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        node = node_for(context)
        answer = reply(msg, node)
        if node.setup.method.needs_data_statistics:
            records.put_tree(answer.content, "statistic", node.statistic()._asdict())
        # Every node sends the shared leaves every client starts from: the server takes the
        # first present client's, whichever nodes fail their set-up.
        records.put_tree(answer.content, "initial", node.shared(node.initial_state()))
        return answer

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrived, setup_before = time.time(), prepared["setup_seconds"]
        node, server_round, state, origin = arrive(msg, context)
        state, upload, metrics = node.train(state, server_round - 1)
        _save_state(context, state, node.client, owed=bool(origin["started_over"]) and upload is None)
        if upload is None:
            raise ValueError(f"client {node.client}: round {server_round} produced NaN/Inf; nothing uploaded")
        # Where this message's time went on the node (the server records them per round).
        setup_seconds = prepared["setup_seconds"] - setup_before  # 0 unless this message built the task
        timings = {"seconds_before_app": max(0.0, arrived - PROCESS_STARTED) if PROCESS_STARTED else -1.0,
                   "seconds_setup": setup_seconds, "seconds_train": time.time() - arrived - setup_seconds}
        answer = reply(msg, node, train_loss=metrics["train_loss"], train_accuracy=metrics["train_accuracy"],
                       **origin, **timings)
        records.put_tree(answer.content, "upload", upload)
        return answer

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node, server_round, state, origin = arrive(msg, context)
        _save_state(context, state, node.client, owed=bool(origin["started_over"]))
        # Methods that fine-tune after the download (FedAvg-LoRA+FT) do it now that the
        # last round's answer is in, on that round's batches, and are evaluated with it.
        state = node.finetune(state, server_round - 1)
        return reply(msg, node, **node.evaluate(state), **origin)

    return app

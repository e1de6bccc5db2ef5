"""The Flower side of the server: a ``Strategy`` on the Message API that runs a celora-jax
method's server (``celora_jax.federated.server_node.ServerNode``: the method's jitted
strategy) on what the SuperNodes send, and sends **each node its own** download.

The round protocol (the ClientApp's side is ``celora_jax.flower.client_app``):

1. ``setup(grid)``: a query to every node; each answers with its number of training
   examples and, for methods that ask, its data statistic; partition 0 also sends the
   shared leaves every client starts from. The server is built from these.
2. Round r: ``configure_train`` sends every node its download of round r - 1 (one message
   per node, each with its own record; none in round 1 or for a node whose last upload was
   not accepted); ``aggregate_train`` checks every upload against the expected shapes and
   for NaN (a node that fails is excluded from the round and logged) and aggregates.
3. After the last round ``configure_evaluate`` sends the last downloads with the
   evaluation request; ``aggregate_evaluate`` gathers each client's own-test accuracy.

Bytes are counted from the records that cross the wire: the array payload of every
download and upload (``bytes_down``/``bytes_up`` per round), equal to the simulator's
counters for the same config, and Flower's own ``count_bytes`` of every message
(``message_bytes``, records' headers included).
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from celora_jax import wire
from celora_jax.aggregation import AggregationConfig
from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.federated.server_node import ServerNode, stack_statistics
from celora_jax.flower import records
from celora_jax.gmm import ClassMixtures

logger = logging.getLogger(__name__)


def content_bytes(content: RecordDict) -> int:
    """Flower's own count of a message's records (array buffers, keys, config values)."""
    return int(sum(record.count_bytes() for record in content.values()))


class CeloraStrategy(Strategy):
    """A celora-jax method's server as a Flower strategy (see the module docstring).

    Args:
      method: the run's federated method.
      aggregation: its aggregation options.
      num_clients: N; the nodes' partition ids are 0..N-1.
      outlier_factor: ``federation.outlier_factor``.
      evaluate_last: ask every node for its own-test accuracy after the last round.
    """

    def __init__(self, method: FederatedMethod, aggregation: AggregationConfig, num_clients: int,
                 outlier_factor: float = 0.0, num_rounds: int = 1, evaluate_last: bool = True):
        self.method, self.aggregation, self.num_clients = method, aggregation, int(num_clients)
        self.outlier_factor, self.num_rounds, self.evaluate_last = outlier_factor, int(num_rounds), evaluate_last
        self.server: ServerNode | None = None
        self.node_of: dict[int, int] = {}  # client (partition id) -> Flower node id
        self.pending: dict[int, dict] = {}  # client -> download not yet delivered
        self.history: list[dict] = []
        self.accuracies: dict[int, float] = {}
        self._like = None

    # ------------------------------------------------------------------ set-up (round 0)
    def setup(self, grid: Grid, timeout: float | None = None) -> None:
        """Asks every node who it is, its size and (if needed) its data statistic."""
        node_ids = _wait_for_nodes(grid, self.num_clients, timeout)
        replies = grid.send_and_receive([Message(RecordDict({"config": ConfigRecord({"server-round": 0})}),
                                                 dst_node_id=node, message_type=MessageType.QUERY)
                                         for node in node_ids], timeout=timeout)
        sizes, statistics, initial = {}, {}, None
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the set-up: {reply.error.reason}")
            metrics = reply.content["metrics"]
            client = int(metrics["client"])
            self.node_of[client] = reply.metadata.src_node_id
            sizes[client] = float(metrics["num-examples"])
            if records.has_tree(reply.content, "statistic"):
                statistics[client] = ClassMixtures(**records.read_tree(reply.content, "statistic",
                                                                       what=f"client {client}'s set-up"))
            if records.has_tree(reply.content, "initial"):
                initial = records.read_tree(reply.content, "initial", what="partition 0's set-up")
        missing = sorted(set(range(self.num_clients)) - set(sizes))
        if missing or initial is None:
            raise RuntimeError(f"clients {missing} did not answer the set-up" if missing else
                               "partition 0 did not send the initial shared parameters")
        self._like = initial
        stats = stack_statistics(statistics, self.num_clients) if self.method.needs_data_statistics else None
        self.server = ServerNode(self.method, self.aggregation, self._like,
                                 np.asarray([sizes[i] for i in range(self.num_clients)], np.float32), stats,
                                 self.outlier_factor)

    # ------------------------------------------------------------------ rounds
    def _messages(self, server_round: int, message_type: str) -> tuple[list[Message], int]:
        """One message per node, each a fresh record holding that node's pending download
        (its own mixture, if it has one): ``(messages, download payload bytes)``."""
        messages, down = [], 0
        for client, node in sorted(self.node_of.items()):
            content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
            if client in self.pending:
                download = self.pending.pop(client)
                records.put_tree(content, "download", download)
                down += records.tree_bytes(download)
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        return messages, down

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages, down = self._messages(server_round, MessageType.TRAIN)
        self.history.append({"round": server_round, "bytes_down": down,
                             "message_bytes_down": sum(content_bytes(m.content) for m in messages)})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        uploads, losses, up, message_up, excluded = {}, [], 0, 0, []
        for reply in replies:
            if reply.has_error():
                logger.error("round %d: node %s failed: %s", server_round, reply.metadata.src_node_id,
                             reply.error.reason)
                excluded.append(reply.metadata.src_node_id)
                continue
            metrics = reply.content["metrics"]
            client = int(metrics["client"])
            try:
                upload = records.take_tree(reply.content, "upload", self._like, what=f"the upload of client {client}",
                                           require_finite=True)
            except wire.WireError as err:
                logger.error("round %d: %s; client %d is left out of this round", server_round, err, client)
                excluded.append(client)
                continue
            uploads[client] = upload
            up += records.tree_bytes(upload)
            message_up += content_bytes(reply.content)
            losses.append(float(metrics["train_loss"]))
        downloads, logs = self.server.aggregate(uploads)
        self.pending.update(downloads)
        record = self.history[-1]
        record.update(bytes_up=up, message_bytes_up=message_up, reporting=sorted(uploads), excluded=excluded,
                      train_loss=float(np.mean(losses)) if losses else float("nan"),
                      accepted=logs["accepted"], rejected=logs["rejected"])
        if "weights" in logs:
            record["weights"] = np.asarray(logs["weights"]).tolist()
        return None, MetricRecord({"train_loss": record["train_loss"], "reporting": len(uploads)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not (self.evaluate_last and server_round == self.num_rounds):
            return []
        messages, down = self._messages(server_round, MessageType.EVALUATE)
        self.history[-1]["bytes_down_final"] = down
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        for reply in replies:
            if reply.has_error():
                logger.error("evaluation: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            self.accuracies[int(metrics["client"])] = float(metrics["correct"]) / max(float(metrics["count"]), 1.0)
        if not self.accuracies:
            return None
        return MetricRecord({"accuracy_mean": float(np.mean(list(self.accuracies.values())))})

    def summary(self) -> None:
        logger.info("celora-jax %s over %d clients", self.method.name, self.num_clients)


def _wait_for_nodes(grid: Grid, count: int, timeout: float | None) -> list[int]:
    """The ids of ``count`` connected nodes, waiting for them (a simulation connects its
    nodes after the ServerApp starts)."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} nodes connected within {timeout} s")
        time.sleep(0.2)


def make_server_app(method: FederatedMethod, aggregation: AggregationConfig, num_clients: int, num_rounds: int,
                    outlier_factor: float = 0.0, timeout: float = 3600.0, on_done=None):
    """A ServerApp that sets up a ``CeloraStrategy`` and runs ``num_rounds`` rounds;
    ``on_done(strategy)`` is called at the end (to read its history and accuracies)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        strategy = CeloraStrategy(method, aggregation, num_clients, outlier_factor, num_rounds)
        strategy.setup(grid, timeout)
        strategy.start(grid, ArrayRecord(), num_rounds=num_rounds, timeout=timeout)
        if on_done is not None:
            on_done(strategy)

    return app

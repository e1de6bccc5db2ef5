"""The Flower side of the server: a ``Strategy`` on the Message API that runs a celora-jax
method's server (``celora_jax.federated.server_node.ServerNode``: the method's jitted
strategy) on what the SuperNodes send, and sends **each node its own** download.

The round protocol (the ClientApp's side is ``celora_jax.flower.client_app``):

1. ``setup(grid)``: a query to every node; each answers with its number of training
   examples, for methods that ask its data statistic, and the shared leaves every client
   starts from. The server is built from these. A node whose set-up fails (its data file
   missing, a label outside the declared ones) is logged and left out of the run: its
   client has size 0 and never reports.
2. Round r: ``configure_train`` sends every node its download of round r - 1 (one message
   per node, each with its own record; none in round 1 or for a node whose last upload was
   not accepted); ``aggregate_train`` checks every upload against the expected shapes and
   for NaN (a node that fails is excluded from the round and logged) and aggregates.
3. After the last round ``configure_evaluate`` sends the last downloads with the
   evaluation request; ``aggregate_evaluate`` gathers each client's own-test accuracy.

Nodes come and go: a node that does not answer within the round's timeout is left out of
that round (``silent`` in the history) and keeps its download pending; at the start of every
round a node the SuperLink lists for the first time (a restarted SuperNode) is asked which
client it is and takes that client's place (``restored``/``fresh`` in the history say
whether it came back with its state; ``started_over``: fresh, no download, so measured
from the initial parameters); one that comes back during a round is asked then, and the
round stops waiting for its client's old node. Each record also has ``seconds``.
Replies are matched to clients by the message they answer (``reply_to_message_id``), not by
their sender: the SuperLink itself answers for a node whose heartbeat expired ("Node
Unavailable", sent from the SuperLink's own node id), and such a node counts as silent,
its download still pending.

The strategy waits for replies with its own pull loop (``prompt_grid.PromptGrid``): Flower's
``Grid.send_and_receive`` checks for replies every 3 s, which adds 1.5 s on average to every
exchange; this one checks after 0.1 s and backs off to once a second.

Bytes are counted from the records that cross the wire: the array payload of every
download and upload (``bytes_down``/``bytes_up`` per round), equal to the simulator's
counters for the same config, and Flower's own ``count_bytes`` of every message
(``message_bytes``, records' headers included).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.federated.server_node import ServerNode, stack_statistics
from celora_jax.flower import records
from celora_jax.flower.prompt_grid import prompt
from celora_jax.server import wire
from celora_jax.server.aggregation import AggregationConfig
from celora_jax.server.gmm import ClassMixtures

logger = logging.getLogger(__name__)


# Where a node's time went in a train message (``client_app.timed``): from its process's
# start to the message reaching the app, building the task and programs, and the rest.
NODE_TIMINGS = ("before_app", "setup", "train")

# Errors the SuperLink sends in a node's place: the node never took the message (or its
# reply was lost), so it did not apply its download.
UNDELIVERED = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                         ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


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
      on_round: called with the strategy after every round's aggregation and after the
        evaluation (the Flower app writes its summary file there).
    """

    def __init__(self, method: FederatedMethod, aggregation: AggregationConfig, num_clients: int,
                 outlier_factor: float = 0.0, num_rounds: int = 1, evaluate_last: bool = True, on_round=None):
        self.method, self.aggregation, self.num_clients = method, aggregation, int(num_clients)
        self.outlier_factor, self.num_rounds, self.evaluate_last = outlier_factor, int(num_rounds), evaluate_last
        self.on_round = on_round
        self.server: ServerNode | None = None
        self.node_of: dict[int, int] = {}  # client (partition id) -> Flower node id
        self.pending: dict[int, dict] = {}  # client -> download its node has not answered yet
        self._awaiting: dict[int, int] = {}  # node id -> client, of the messages in flight
        self._sent: list[Message] = []  # those messages (the grid stamps their ids when it pushes them)
        self._ignored: set[int] = set()  # nodes that are no client of this run
        self._rejoined: dict[int, int] = {}  # client -> node that took its place during a round
        self._asked: set[int] = set()  # nodes asked who they are during this exchange
        self._round = 0
        self.timeout: float | None = None
        self._round_started = time.perf_counter()
        self.history: list[dict] = []
        self.accuracies: dict[int, float] = {}
        self.excluded_at_setup: list[int] = []
        self.sizes: np.ndarray | None = None
        self._like = None

    # ------------------------------------------------------------------ set-up (round 0)
    def setup(self, grid: Grid, timeout: float | None = None) -> None:
        """Asks every node who it is, its size and (if needed) its data statistic."""
        self.timeout = timeout
        grid = prompt(grid)
        node_ids = _wait_for_nodes(grid, self.num_clients, timeout)
        queries = _queries(node_ids, 0)
        replies = list(grid.send_and_receive(queries, timeout=timeout))
        sizes, statistics, initial = {}, {}, {}
        for reply, node in zip(replies, _senders(replies, queries)):
            if reply.has_error():
                # E.g. its data file is missing or holds a label outside data.label_names: the
                # node logged why; the run goes on without it.
                logger.error("set-up: node %s failed and is excluded from the run: %s", node, reply.error.reason)
                self._ignored.add(node)
                continue
            metrics = reply.content["metrics"]
            client = int(metrics["client"])
            self.node_of[client] = node
            sizes[client] = float(metrics["num-examples"])
            if records.has_tree(reply.content, "statistic"):
                statistics[client] = ClassMixtures(**records.read_tree(reply.content, "statistic",
                                                                       what=f"client {client}'s set-up"))
            if records.has_tree(reply.content, "initial"):
                initial[client] = records.read_tree(reply.content, "initial", what=f"client {client}'s set-up")
        if not sizes:
            raise RuntimeError("no node passed the set-up; see the errors above and the nodes' logs")
        self.excluded_at_setup = sorted(set(range(self.num_clients)) - set(sizes))
        if self.excluded_at_setup:
            logger.error("set-up: clients %s are not in the run (their nodes failed or did not answer); the "
                         "others go on", self.excluded_at_setup)
        if not initial:
            raise RuntimeError("no node sent the initial shared parameters")
        self._like = initial[min(initial)]  # every client starts from the same ones
        # An excluded client never reports, so the server masks it out of every round; it
        # holds size 0 and (methods with a data statistic) a copy of a present client's.
        self.sizes = np.asarray([sizes.get(i, 0.0) for i in range(self.num_clients)], np.float32)
        stats = None
        if self.method.needs_data_statistics:
            present = statistics[min(statistics)]
            stats = stack_statistics({i: statistics.get(i, present) for i in range(self.num_clients)},
                                     self.num_clients)
        self.server = ServerNode(self.method, self.aggregation, self._like, self.sizes, stats, self.outlier_factor)

    # ------------------------------------------------------------------ membership
    def _refresh_nodes(self, grid: Grid, server_round: int) -> None:
        """Follows the SuperLink's node list: a client whose node left is dropped; a node not
        seen before (a SuperNode that restarted) is asked who it is and takes its client's
        place, with that client's undelivered download still pending. (Two live nodes with
        one partition id: the later one is the client, with a warning.)"""
        joined, self._rejoined = self._rejoined, {}
        live = set(grid.get_node_ids())
        for client, node in sorted(self.node_of.items()):
            if node not in live and client not in joined:
                logger.warning("round %d: client %d (node %s) has left the run", server_round, client, node)
                del self.node_of[client]
        new = sorted(live - set(self.node_of.values()) - set(joined.values()) - self._ignored)
        joined.update(self._who_are(grid, new, server_round))
        for client, node in sorted(joined.items()):
            # The newest node of a client takes its place: a restarted SuperNode registers
            # anew while the SuperLink may still list the dead one for a while.
            previous = self.node_of.get(client)
            if previous is not None:
                self._ignored.add(previous)
            logger.warning("round %d: client %d rejoined as node %s%s", server_round, client, node,
                           "" if previous is None else f" (replacing node {previous})")
            self.node_of[client] = node

    def _who_are(self, grid: Grid, nodes: list[int], server_round: int) -> dict[int, int]:
        """``{client: node}`` of the ``nodes`` that answer a query as a client of this run;
        the others are ignored from now on."""
        if not nodes:
            return {}
        queries = _queries(nodes, server_round)
        replies = list(grid.send_and_receive(queries, timeout=self.timeout))
        clients = {}
        for reply, node in zip(replies, _senders(replies, queries)):
            if reply.has_error():
                logger.error("round %d: node %s cannot join: %s", server_round, node, reply.error.reason)
                self._ignored.add(node)
                continue
            client = int(reply.content["metrics"]["client"])
            if not 0 <= client < self.num_clients:
                logger.error("round %d: node %s claims client %d of a %d-client run; ignored", server_round,
                             node, client, self.num_clients)
                self._ignored.add(node)
                continue
            if client in clients:  # two new nodes with one client: the one that answered last
                self._ignored.add(clients[client])
            clients[client] = node
        return clients

    def _replaced(self, grid: Grid, waiting: set[str]) -> set[str]:
        """The messages in ``waiting`` not to wait for: those to a node whose client has
        meanwhile joined from a new node (a SuperNode restarted mid-round; its old node
        would only be declared dead when its heartbeat expires, about a minute later). The
        client is silent this round; the new node takes its place from the next."""
        destination = _destinations(self._sent)
        awaited = {destination[i] for i in waiting if i in destination} & set(self._awaiting)
        if not awaited:
            return set()
        known = set(self.node_of.values()) | set(self._rejoined.values()) | self._ignored | self._asked
        new = sorted(set(grid.get_node_ids()) - known)
        self._asked.update(new)  # once per exchange: a node that does not answer is asked next round
        joined = self._who_are(grid, new, self._round)
        self._rejoined.update(joined)
        gone = {self.node_of.get(client) for client in joined} & awaited
        for node in sorted(gone):
            logger.warning("round %d: client %d came back on a new node; not waiting for its old node %s",
                           self._round, self._awaiting[node], node)
        return {i for i in waiting if destination.get(i) in gone}

    # ------------------------------------------------------------------ rounds
    def start(self, grid: Grid, *args, **kwargs):
        """Flower's ``Strategy.start``, waiting for replies through ``PromptGrid`` (which
        stops waiting for a node whose client came back on a new node, ``_replaced``)."""
        grid = prompt(grid)
        grid.give_up = lambda waiting: self._replaced(grid, waiting)
        try:
            return super().start(grid, *args, **kwargs)
        finally:
            grid.give_up = None

    def _messages(self, server_round: int, message_type: str) -> tuple[list[Message], int]:
        """One message per node, each a fresh record holding that node's pending download
        (its own mixture, if it has one): ``(messages, download payload bytes)``. A download
        stays pending until its node answers, so a node that missed a round gets it again."""
        messages, down = [], 0
        self._awaiting, self._sent, self._asked = {}, messages, set()
        for client, node in sorted(self.node_of.items()):
            content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
            if client in self.pending:
                download = self.pending[client]
                records.put_tree(content, "download", download)
                down += records.tree_bytes(download)
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
            self._awaiting[node] = client
        return messages, down

    def _answered(self, replies: list[Message], server_round: int) -> list[tuple[int, Message]]:
        """``(client, reply)`` for every reply its node sent (even an error): those nodes have
        applied their download. A reply is matched by the message it answers; those the
        SuperLink sent in a node's place (it never took the message) leave the client
        awaited, i.e. silent, with its download pending."""
        answered = []
        for reply, node in zip(replies, _senders(replies, self._sent)):
            if node not in self._awaiting:
                logger.warning("round %d: a reply from node %s that answers no message of this round; ignored",
                               server_round, node)
                continue
            if reply.has_error() and reply.error.code in UNDELIVERED:
                logger.error("round %d: client %d (node %s) was not reached: %s", server_round,
                             self._awaiting[node], node, reply.error.reason)
                continue
            client = self._awaiting.pop(node)
            self.pending.pop(client, None)
            answered.append((client, reply))
        return answered

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_started, self._round = time.perf_counter(), server_round
        self._refresh_nodes(grid, server_round)
        messages, down = self._messages(server_round, MessageType.TRAIN)
        self.history.append({"round": server_round, "bytes_down": down,
                             "message_bytes_down": sum(content_bytes(m.content) for m in messages)})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        answered = self._answered(list(replies), server_round)
        silent = sorted(self._awaiting.values())
        if silent:
            logger.error("round %d: clients %s did not answer (round timeout %s s); the round goes on without them",
                         server_round, silent, self.timeout)
        uploads, losses, up, message_up, excluded, node_seconds = {}, [], 0, 0, [], {}
        flagged = {"state_restored": [], "state_fresh": [], "started_over": []}  # clients whose node says so
        for client, reply in sorted(answered, key=lambda pair: pair[0]):  # client order, whatever the replies'
            if reply.has_error():
                logger.error("round %d: client %d failed: %s", server_round, client, reply.error.reason)
                excluded.append(client)
                continue
            metrics = reply.content["metrics"]
            if int(metrics["client"]) != client:
                logger.error("round %d: the node of client %d answered as client %s; left out of this round",
                             server_round, client, metrics["client"])
                excluded.append(client)
                continue
            # Before the upload's checks: one that started over is so even if left out.
            for flag, clients in flagged.items():
                if int(metrics.get(flag, 0)):
                    clients.append(client)
            try:
                upload = records.take_tree(reply.content, "upload", self._like, what=f"the upload of client {client}",
                                           require_finite=True)
            except wire.WireError as err:
                logger.error("round %d: %s; client %d is left out of this round", server_round, err, client)
                excluded.append(client)
                continue
            uploads[client] = upload
            node_seconds[str(client)] = {name: float(metrics[f"seconds_{name}"]) for name in NODE_TIMINGS
                                         if f"seconds_{name}" in metrics}
            up += records.tree_bytes(upload)
            message_up += content_bytes(reply.content)
            losses.append(float(metrics["train_loss"]))
        restored, fresh, started_over = flagged.values()
        for clients, how in ((sorted(set(fresh) - set(started_over)), "went on from the download they had pending"),
                             (started_over, "trained from the initial parameters")):
            if clients:
                logger.warning("round %d: clients %s lost their state and %s", server_round, clients, how)
        downloads, logs = self.server.aggregate(uploads, started_over)
        self.pending.update(downloads)
        record = self.history[-1]
        record.update(bytes_up=up, message_bytes_up=message_up, reporting=sorted(uploads), excluded=excluded,
                      silent=silent, restored=restored, fresh=fresh, started_over=started_over,
                      seconds=time.perf_counter() - self._round_started,
                      train_loss=float(np.mean(losses)) if losses else float("nan"),
                      accepted=logs["accepted"], rejected=logs["rejected"], node_seconds=node_seconds)
        if "weights" in logs:
            record["weights"] = np.asarray(logs["weights"]).tolist()
        if self.on_round is not None:
            self.on_round(self)
        return None, MetricRecord({"train_loss": record["train_loss"], "reporting": len(uploads)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not (self.evaluate_last and server_round == self.num_rounds):
            return []
        self._refresh_nodes(grid, server_round)
        messages, down = self._messages(server_round, MessageType.EVALUATE)
        self.history[-1]["bytes_down_final"] = down
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        for client, reply in self._answered(list(replies), server_round):
            if reply.has_error():
                logger.error("evaluation: client %d failed: %s", client, reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            self.accuracies[client] = float(metrics["correct"]) / max(float(metrics["count"]), 1.0)
        if self.on_round is not None:
            self.on_round(self)
        if not self.accuracies:
            return None
        return MetricRecord({"accuracy_mean": float(np.mean(list(self.accuracies.values())))})

    def summary(self) -> None:
        logger.info("celora-jax %s over %d clients", self.method.name, self.num_clients)


def _destinations(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the pushed messages (the grid stamps the ids)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def _senders(replies: list[Message], sent: list[Message]) -> list[int]:
    """The node each reply speaks for: the destination of the message it answers (an error
    the SuperLink sends in a node's place comes from the SuperLink's own node id)."""
    destination = _destinations(sent)
    return [destination.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]


def _queries(node_ids, server_round: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in node_ids]


def _wait_for_nodes(grid: Grid, count: int, timeout: float | None) -> list[int]:
    """The ids of ``count`` connected nodes, waiting for them (a simulation connects its
    nodes after the ServerApp starts)."""
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

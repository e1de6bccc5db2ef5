"""celora-jax methods as a Flower app: the Strategy on Flower's Message API with the
ClientApp behind a fake in-process Grid (every message really built, routed and answered
by the ClientApp), checked against the native simulator. Flower's own simulation engine
(Ray, 4 nodes, MiniLM) is tested through ``benchmarks/flower_vs_engine.py --smoke`` in
test_experiments.py; the Deployment Engine in test_flower_deployment.py."""

import uuid

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from toy import toy_config, toy_setup, with_federation  # noqa: E402

from celora_jax.federated import loop  # noqa: E402
from celora_jax.federated.nodes import ClientNode  # noqa: E402
from celora_jax.flower.client_app import make_client_app  # noqa: E402
from celora_jax.flower.server_app import CeloraStrategy  # noqa: E402


class FakeGrid:
    """Flower's Grid for one process: each message goes to the ClientApp with its node's
    own persistent Context, as a SuperNode would run it. Pushing stamps message ids, as
    Flower's grids do; the replies wait until pulled. Messages to ``unreachable`` nodes get
    what the SuperLink sends for a node whose heartbeat expired."""

    def __init__(self, client_app, num_nodes: int, first_id: int = 100):
        self.app = client_app
        self.contexts = {first_id + i: Context(run_id=1, node_id=first_id + i,
                                               node_config={"partition-id": i, "num-partitions": num_nodes},
                                               state=RecordDict(), run_config={})
                         for i in range(num_nodes)}
        self.sent: list[Message] = []
        self.unreachable: set[int] = set()
        self.silent: set[int] = set()  # their messages are never answered
        self.restart_when_sent: dict[int, tuple[int, int]] = {}  # node -> (new node, partition)
        self._replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # how Flower's grids stamp them
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            if message.metadata.dst_node_id in self.restart_when_sent:  # it dies with the message unanswered
                self.silent.add(message.metadata.dst_node_id)
                self.add_node(*self.restart_when_sent.pop(message.metadata.dst_node_id))
            if message.metadata.dst_node_id not in self.silent:
                self._replies[message.metadata.message_id] = self._answer(message)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def add_node(self, node: int, partition: int):
        """A SuperNode (re)started with ``partition``: a new node id and an empty state."""
        num_nodes = self.contexts[min(self.contexts)].node_config["num-partitions"]
        self.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                      node_config={"partition-id": partition, "num-partitions": num_nodes})

    def _answer(self, message):
        node = message.metadata.dst_node_id
        if node in self.unreachable:
            reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # the SuperLink answers, not the node
            return reply
        TaskIdentity.node_id = node
        try:
            return self.app(message, self.contexts[node])
        except Exception as err:  # what a SuperNode sends back when its ClientApp raised
            return Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        finally:
            TaskIdentity.node_id = 0


@pytest.fixture()
def task_identity(monkeypatch):
    """Messages are stamped with the running task's identity; here, a made-up one."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_flower(setup, grid_nodes=None, after_round=None, timeout=10.0):
    """``(strategy, grid)`` after the run; ``after_round(strategy, grid)`` is called after
    every round's aggregation (to change the grid between rounds)."""
    fed = setup.config.federation
    app = make_client_app(setup.config, prepare=lambda config: setup)
    grid = FakeGrid(app, grid_nodes or setup.num_clients)
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, setup.num_clients, fed.outlier_factor,
                              fed.rounds, on_round=None if after_round is None else lambda s: after_round(s, grid))
    strategy.setup(grid, timeout=timeout)
    from flwr.app import ArrayRecord

    strategy.start(grid, ArrayRecord(), num_rounds=fed.rounds, timeout=timeout)
    return strategy, grid


@pytest.mark.parametrize("method", ["celora", "fedavg_lora", "local", "fedex_lora", "fedavg_lora_ft"])
def test_flower_strategy_and_client_app_reproduce_the_simulator(method, task_identity):
    setup = toy_setup(with_federation(toy_config(method, num_clients=4), rounds=3))
    simulated = [out.record for out in loop.iterate_rounds(setup)]
    strategy, grid = run_flower(setup)
    np.testing.assert_allclose([strategy.accuracies[i] for i in range(4)], simulated[-1]["client_test_accuracy"],
                               atol=1e-6)
    for record, flower in zip(simulated, strategy.history):
        np.testing.assert_allclose(flower["train_loss"], record["train_loss"], rtol=1e-5)
        assert flower["bytes_up"] == record["bytes_up_per_client"] * record["participants"]
    # Downloads: the simulator counts one per client per round; Flower sends round r's in
    # round r + 1's train message and the last one with the evaluation.
    downs = [h["bytes_down"] for h in strategy.history[1:]] + [strategy.history[-1]["bytes_down_final"]]
    assert downs == [r["bytes_down_per_client"] * r["participants"] for r in simulated]


def test_each_node_gets_its_own_core_mixture_and_only_cores_travel(task_identity):
    setup = toy_setup(with_federation(toy_config("celora", num_clients=4), rounds=2))
    strategy, grid = run_flower(setup)
    round_two = [m for m in grid.sent if m.metadata.message_type == "train"
                 and int(m.content["config"]["server-round"]) == 2]
    assert len(round_two) == 4 and len({m.metadata.dst_node_id for m in round_two}) == 4
    cores = [m.content.array_records["download"]["lora/dense/C"].numpy() for m in round_two]
    assert all(c.shape == (2, 2) for c in cores)  # rank 2, one adapted matrix
    assert len({c.tobytes() for c in cores}) == 4  # personalized: every node its own mixture
    assert strategy.history[1]["bytes_down"] == 4 * (2 * 2 * 4)  # r^2 float32 per node
    assert strategy.history[0]["bytes_up"] == 4 * (2 * 2 * 4)
    # Each round's record of a node is a fresh one: no two messages share content.
    assert len({id(m.content) for m in grid.sent}) == len(grid.sent)


def test_a_node_the_superlink_answers_for_is_silent_and_keeps_its_download(task_identity, caplog):
    """Round 2's message to node 103 (client 3) comes back as the SuperLink's "Node
    Unavailable" error, sent from the SuperLink's own node id: client 3 is silent, not
    failed, and round 3 sends it the round-1 download it never got."""
    def unreachable_in_round_two(strategy, grid):
        grid.unreachable = {103} if len(strategy.history) == 1 else set()

    with caplog.at_level("ERROR"):
        strategy, grid = run_flower(toy_setup(with_federation(toy_config("celora", num_clients=4), rounds=3)),
                                    after_round=unreachable_in_round_two)
    second, third = strategy.history[1:]
    assert second["reporting"] == [0, 1, 2] and second["silent"] == [3] and second["excluded"] == []
    assert "client 3 (node 103) was not reached" in caplog.text
    core = 2 * 2 * 4  # one rank-2 float32 core
    assert second["bytes_down"] == third["bytes_down"] == 4 * core  # round 3 resends client 3's
    assert third["reporting"] == [0, 1, 2, 3] and third["silent"] == []
    sent_to_3 = [m for m in grid.sent if m.metadata.dst_node_id == 103 and m.metadata.message_type == "train"]
    assert [m.content.array_records["download"]["lora/dense/C"].numpy().tobytes() for m in sent_to_3[1:]] == [
        sent_to_3[1].content.array_records["download"]["lora/dense/C"].numpy().tobytes()] * 2
    assert len(strategy.accuracies) == 4


def test_a_round_does_not_wait_for_a_node_whose_client_came_back_on_a_new_node(task_identity, caplog):
    """Round 2's message to node 103 (client 3) is never answered: the node died, and client
    3 came back as node 203 with an empty state (a restarted SuperNode). Round 2 stops
    waiting for node 103 as soon as node 203 says it is client 3, long before the 30 s
    timeout; in round 3 node 203 is client 3, flagged fresh."""
    def restart_after_round_one(strategy, grid):
        if len(strategy.history) == 1:
            grid.restart_when_sent = {103: (203, 3)}

    with caplog.at_level("WARNING"):
        strategy, grid = run_flower(toy_setup(with_federation(toy_config("celora", num_clients=4), rounds=3)),
                                    after_round=restart_after_round_one, timeout=30)
    second, third = strategy.history[1:]
    assert second["reporting"] == [0, 1, 2] and second["silent"] == [3] and second["seconds"] < 10
    assert "client 3 came back on a new node; not waiting for its old node 103" in caplog.text
    assert third["reporting"] == [0, 1, 2, 3] and third["fresh"] == [3] and strategy.node_of[3] == 203
    assert third["started_over"] == []  # its round-1 download was still pending: it took that
    assert "clients [3] lost their state and went on from the download they had pending" in caplog.text
    assert "client 3 rejoined as node 203 (replacing node 103)" in caplog.text
    assert len(strategy.accuracies) == 4


def test_a_node_that_lost_its_state_and_has_no_download_started_over(task_identity, caplog, monkeypatch):
    """Client 2's round-1 upload is NaN (excluded: no download pending for it); its SuperNode
    then restarts without a state-dir as node 202 and starts over. Its round-2 training
    gives NaN (the node fails the round), so it says it started over with its next upload,
    in round 3; that upload is NaN again and left out, but the server is told all the same.
    In round 4 it trains on from there and is accepted."""
    setup = toy_setup(with_federation(toy_config("celora", num_clients=4), rounds=4))
    app = make_client_app(setup.config, prepare=lambda config: setup)
    train = ClientNode.train

    def nan_training_in_round_two(node, state, round_index):
        trained, upload, metrics = train(node, state, round_index)
        return (state, None, metrics) if (node.client, round_index) == (2, 1) else (trained, upload, metrics)

    monkeypatch.setattr(ClientNode, "train", nan_training_in_round_two)

    def nan_upload_in_rounds_one_and_three(message, context):
        reply = app(message, context)
        if (message.metadata.message_type == "train" and context.node_config["partition-id"] == 2
                and int(message.content["config"]["server-round"]) in (1, 3)):
            record = reply.content.array_records["upload"]
            from flwr.app import Array

            record["lora/dense/C"] = Array(np.full_like(record["lora/dense/C"].numpy(), np.nan))
        return reply

    grid = FakeGrid(nan_upload_in_rounds_one_and_three, 4)
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, 4, num_rounds=4,
                              on_round=lambda s: grid.add_node(202, 2) if len(s.history) == 1 else None)
    strategy.setup(grid, timeout=10)
    told = []
    aggregate = strategy.server.aggregate
    strategy.server.aggregate = lambda uploads, started_over=(): told.append(list(started_over)) or aggregate(
        uploads, started_over)
    from flwr.app import ArrayRecord

    with caplog.at_level("WARNING"):
        strategy.start(grid, ArrayRecord(), num_rounds=4, timeout=10)
    first, second, third, fourth = strategy.history
    assert first["excluded"] == [2] and first["started_over"] == []
    assert second["excluded"] == [2] and "produced NaN/Inf" in caplog.text and strategy.node_of[2] == 202
    assert third["excluded"] == [2] and third["started_over"] == [2] and third["fresh"] == []
    assert fourth["reporting"] == [0, 1, 2, 3] and fourth["started_over"] == [] and 2 in fourth["accepted"]
    assert told == [[], [], [2], []]
    assert "clients [2] lost their state and trained from the initial parameters" in caplog.text


def test_a_state_file_keeps_whether_the_node_still_owes_the_server_its_restart(tmp_path):
    from celora_jax.flower import client_app

    setup = toy_setup(toy_config("celora", num_clients=2))
    node = ClientNode(setup, 0)
    state = node.initial_state()
    for owed in (True, False):
        client_app._write_state_file(tmp_path / "client0.npz", state, owed)
        parts, read = client_app._read_state_file(tmp_path / "client0.npz", client_app._parts_like(node, state))
        assert read is owed and sorted(parts) == sorted(client_app._parts(state))


def test_a_bad_upload_is_excluded_and_the_round_goes_on(task_identity, caplog):
    setup = toy_setup(with_federation(toy_config("fedavg_lora", num_clients=4), rounds=2))
    app = make_client_app(setup.config, prepare=lambda config: setup)

    def broken(message, context):  # node 2 sends NaN, node 3 a core of the wrong shape
        reply = app(message, context)
        client = context.node_config["partition-id"]
        if message.metadata.message_type == "train" and client in (2, 3):
            record = reply.content.array_records["upload"]
            key = sorted(record)[0]
            value = record[key].numpy()
            from flwr.app import Array

            record[key] = Array(np.full_like(value, np.nan) if client == 2 else np.zeros((5, 5), value.dtype))
        return reply

    grid = FakeGrid(broken, 4)
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, 4, num_rounds=2)
    strategy.setup(grid, timeout=10)
    from flwr.app import ArrayRecord

    with caplog.at_level("ERROR"):
        strategy.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    assert strategy.history[0]["reporting"] == [0, 1] and strategy.history[0]["excluded"] == [2, 3]
    assert "client 2" in caplog.text and "NaN" in caplog.text and "has shape (5, 5)" in caplog.text
    assert len(strategy.accuracies) == 4  # everyone is still evaluated


def test_a_node_without_partition_id_is_a_clear_error(task_identity, caplog):
    setup = toy_setup(toy_config("fedavg_lora", num_clients=2))
    app = make_client_app(setup.config, prepare=lambda config: setup)
    grid = FakeGrid(app, 2)
    grid.contexts[100].node_config.pop("partition-id")
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, 2)
    with caplog.at_level("ERROR"):
        strategy.setup(grid, timeout=5)
    assert "node 100 failed and is excluded from the run: " in caplog.text
    assert "no partition-id in its node config" in caplog.text
    assert strategy.excluded_at_setup == [0] and strategy.node_of == {1: 101}
    grid.contexts[101].node_config.pop("partition-id")
    with pytest.raises(RuntimeError, match="no node passed the set-up"):
        CeloraStrategy(setup.method, setup.config.aggregation, 2).setup(grid, timeout=5)


@pytest.mark.parametrize("method", ["celora", "fedavg_lora"])
def test_a_node_whose_set_up_fails_is_left_out_and_the_run_goes_on(method, task_identity, caplog):
    """Node 0 fails its set-up (as a node whose data file holds an undeclared label does):
    the server logs it, never messages it again, gives its client size 0 (and CE-LoRA a
    stand-in statistic it masks out) and runs every round with the other three."""
    from celora_jax.data.errors import DataError

    setup = toy_setup(with_federation(toy_config(method, num_clients=4), rounds=2))
    app = make_client_app(setup.config, prepare=lambda config: setup)

    def failing(message, context):
        if context.node_config["partition-id"] == 0:
            raise DataError("row 3 of /data/site0.csv has label 'x', which is not one of the declared labels")
        return app(message, context)

    grid = FakeGrid(failing, 4)
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, 4, num_rounds=2)
    with caplog.at_level("ERROR"):
        strategy.setup(grid, timeout=10)
        from flwr.app import ArrayRecord

        strategy.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    assert "set-up: node 100 failed and is excluded from the run: DataError: row 3 of /data/site0.csv" in caplog.text
    assert strategy.excluded_at_setup == [0] and strategy.sizes.tolist() == [0.0, 8.0, 8.0, 8.0]
    assert [h["reporting"] for h in strategy.history] == [[1, 2, 3], [1, 2, 3]]
    assert sorted(strategy.accuracies) == [1, 2, 3]
    assert sum(m.metadata.dst_node_id == 100 for m in grid.sent) == 1  # the set-up query only


def test_flower_app_command_writes_a_valid_app_and_refuses_bad_input(tmp_path, capsys):
    """``celora-jax flower-app``: a pyproject.toml Flower accepts (components importable),
    whose run config is the preset and overrides; bad input is refused before writing."""
    from flwr.common.config import get_fused_config_from_dir, get_project_config, validate_config

    from celora_jax.cli.main import main
    from celora_jax.flower.app import config_from_run_config

    app = tmp_path / "app"
    assert main(["flower-app", str(app), "--preset", "smoke", "--set", "federation.rounds=3",
                 "--set", "federation.method='fedavg_lora'", "--round-timeout", "90"]) == 0
    valid, errors, _ = validate_config(get_project_config(app), check_module=True, project_dir=app)
    assert valid, errors
    run_config = get_fused_config_from_dir(app, {"output-dir": "/tmp/x"})
    config = config_from_run_config(run_config)
    assert (config.federation.rounds, config.federation.method, run_config["round-timeout"]) == (3, "fedavg_lora", 90.0)
    for argv, message in ((["--preset", "nope"], "unknown preset"), (["--set", "federation.roundz=1"], "roundz"),
                          (["--set", "federation.method='cluster_oracle'"], "cannot run on Flower nodes: it reads"),
                          (["--round-timeout", "0"], "must be positive"),
                          (["--node-data"], "--node-data needs the classes")):
        assert main(["flower-app", str(tmp_path / "bad"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["flower-app", str(tmp_path / "local"), "--node-data", "--set", "data.label_names=neg,pos"]) == 0
    local = get_fused_config_from_dir(tmp_path / "local", {})
    assert local["node-data"] is True and config_from_run_config(local).data.declared_labels == ("neg", "pos")
    with pytest.raises(ValueError, match="unknown run config keys \\['round-timout'\\]"):
        config_from_run_config({"round-timout": 3})
    with pytest.raises(ValueError, match="config-factory 'nomodule:f': cannot import"):
        config_from_run_config({"config-factory": "nomodule:f"})


def test_a_worker_serves_every_message_from_one_prepared_client(task_identity, tmp_path):
    """Messages forwarded to a long-running worker (``celora_jax.flower.worker``) give the
    same run as the ClientApp in-process, while the task is built once for the run instead
    of once per message process; a missing worker is a clear error."""
    import threading

    from flwr.app import Message

    from celora_jax.flower import worker

    setup = toy_setup(with_federation(toy_config("celora", num_clients=3), rounds=2))
    direct, _ = run_flower(setup)
    built = []

    def make_app():
        return make_client_app(setup.config, prepare=lambda config: built.append(1) or setup)

    socket_path = str(tmp_path / "worker.sock")
    messages = 3 * (1 + 2 + 1)  # query, 2 rounds, evaluation
    thread = threading.Thread(target=worker.serve, args=(socket_path, make_app, messages), daemon=True)
    thread.start()
    import time

    deadline = time.monotonic() + 10
    while not (tmp_path / "worker.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)

    def forwarding(message, context):  # what each per-message ClientApp process does
        return Message(worker.forward(socket_path, message, context), reply_to=message)

    grid = FakeGrid(forwarding, 3)
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, 3, num_rounds=2)
    strategy.setup(grid, timeout=10)
    from flwr.app import ArrayRecord

    strategy.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    thread.join(timeout=30)
    assert not thread.is_alive() and built == [1]
    assert [strategy.accuracies[i] for i in range(3)] == [direct.accuracies[i] for i in range(3)]
    assert [h["train_loss"] for h in strategy.history] == [h["train_loss"] for h in direct.history]
    assert not (tmp_path / "worker.sock").exists()  # removed when the worker stops
    with pytest.raises(RuntimeError, match="no celora-jax flower-worker listens there"):
        worker.forward(socket_path, None, None)


def test_the_server_app_logs_its_rounds_to_the_trackers(task_identity, tmp_path):
    """The ServerApp's per-round records (bytes, losses, W) and the nodes' final accuracies
    through the same writers as the simulator's runs, read back with their own readers."""
    from flwr.app import ArrayRecord
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from celora_jax.federated.config import apply_overrides
    from celora_jax.federated.tracking.mlflow_store import mlflow_uri
    from celora_jax.flower.app import ServerTracking

    setup = toy_setup(with_federation(toy_config("celora", num_clients=3), rounds=2))
    config = apply_overrides(setup.config, ["tracking.backends=tensorboard,mlflow"])
    log_round = ServerTracking(config, setup.method, tmp_path / "out")
    app = make_client_app(setup.config, prepare=lambda c: setup)
    grid = FakeGrid(app, 3)
    strategy = CeloraStrategy(setup.method, setup.config.aggregation, 3, num_rounds=2, on_round=log_round)
    strategy.setup(grid, timeout=10)
    strategy.start(grid, ArrayRecord(), num_rounds=2, timeout=10)
    log_round.close()
    events = EventAccumulator(str(tmp_path / "out" / "tracking" / "tensorboard" / "toy" / "celora"),
                              size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("bytes_up")} == {h["round"]: h["bytes_up"] for h in strategy.history}
    assert [i.step for i in events.Images("weights")] == [1, 2]
    assert [h.step for h in events.Histograms("client_test_accuracy")] == [2]
    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "out" / "tracking" / "mlflow"))
    run = client.search_runs([client.get_experiment_by_name("toy").experiment_id])[0]
    assert run.data.tags["engine"] == "flower" and run.info.status == "FINISHED"
    assert run.data.metrics["final/test_accuracy_mean"] == pytest.approx(np.mean(list(strategy.accuracies.values())))

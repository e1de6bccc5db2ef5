"""Flower's Deployment Engine for real, on loopback: a ``flower-superlink`` and
``flower-supernode`` processes (insecure, in-memory state) started by the test and stopped
by their PIDs, the app written by ``celora-jax flower-app``'s code and submitted with
``flwr run``; the toy task travels in the app directory (the FAB). Checked against the
native simulator, and with SuperNodes killed and restarted during the run."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest

pytest.importorskip("flwr")

from celora_jax.federated import loop  # noqa: E402
from celora_jax.flower.app_dir import write_app  # noqa: E402
from toy import toy_config, toy_setup, with_federation  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
TESTS = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Credentials(NamedTuple):
    """A test CA, the SuperLink's TLS certificate for 127.0.0.1 signed by it, and node key
    pairs (OpenSSH EC P-384, as ``ssh-keygen -t ecdsa -b 384`` writes them)."""

    ca: pathlib.Path
    certificate: pathlib.Path
    key: pathlib.Path
    nodes: dict  # name -> private key path (the public key beside it, ".pub")


def make_credentials(root: pathlib.Path, node_names) -> Credentials:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem, none = serialization.Encoding.PEM, serialization.NoEncryption()

    def certificate(subject, issuer, public_key, signing_key, extension):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)).add_extension(*extension)
                .sign(signing_key, hashes.SHA256()))

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "celora-jax test CA")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, (x509.BasicConstraints(ca=True, path_length=None),
                                                                      True))
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                         server_key.public_key(), ca_key,
                         (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    (root / "ca.crt").write_bytes(ca.public_bytes(pem))
    (root / "server.pem").write_bytes(server.public_bytes(pem))
    (root / "server.key").write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none))
    nodes = {}
    for name in node_names:
        key = ec.generate_private_key(ec.SECP384R1())
        nodes[name] = root / name
        nodes[name].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none))
        (root / f"{name}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH))
    return Credentials(root / "ca.crt", root / "server.pem", root / "server.key", nodes)


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each process in its own session so that
    stopping it by PID also stops the SuperExec and app processes it started. With
    ``credentials``: TLS and SuperNode authentication instead of ``--insecure``."""

    def __init__(self, root: pathlib.Path, credentials: Credentials | None = None):
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.port = free_port()
        self.credentials = credentials
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "JAX_PLATFORMS": "cpu"}
        self.processes: dict[str, subprocess.Popen] = {}
        transport = "insecure = true\n" if credentials is None else f'root-certificates = "{credentials.ca}"\n'
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            + transport)

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def start_superlink(self) -> None:
        security = ["--insecure"] if self.credentials is None else [
            "--ssl-ca-certfile", str(self.credentials.ca), "--ssl-certfile", str(self.credentials.certificate),
            "--ssl-keyfile", str(self.credentials.key), "--enable-supernode-auth"]
        self._start("superlink", [str(BIN / "flower-superlink"), *security, "--disable-runtime-dependency-installation",
                                  "--port", str(self.port)])
        _wait_for_port(self.port, self.processes["superlink"], self.root / "superlink.log")

    def start_node(self, partition: int, num_partitions: int, state_dir: pathlib.Path | None = None,
                   key: str | None = None, trust_ca: bool = True, name: str | None = None,
                   data_path: pathlib.Path | None = None, worker: bool = False) -> None:
        """A SuperNode; under TLS it authenticates with the private key ``key`` (a name in
        the credentials) and verifies the SuperLink with the CA unless ``trust_ca`` is off.
        ``data_path``: the node's own data file (node-local data); ``worker``: a
        ``celora-jax flower-worker`` beside it keeps its client prepared."""
        config = f"partition-id={partition} num-partitions={num_partitions}"
        if state_dir is not None:
            config += f' state-dir="{state_dir}"'
        if data_path is not None:
            config += f' data-path="{data_path}"'
        if worker:
            socket_path = self.root / f"worker{partition}.sock"
            self._start(f"worker{partition}", [str(BIN / "celora-jax"), "flower-worker", str(socket_path)])
            deadline = time.monotonic() + 120
            while not socket_path.exists():
                assert time.monotonic() < deadline, self.logs()
                time.sleep(0.2)
            config += f' worker="{socket_path}"'
        security = ["--insecure"]
        if self.credentials is not None:
            security = ["--auth-supernode-private-key", str(self.credentials.nodes[key])]
            security += ["--root-certificates", str(self.credentials.ca)] if trust_ca else []
        self._start(name or f"node{partition}", [str(BIN / "flower-supernode"), *security, "--superlink",
                                                 f"127.0.0.1:{self.port}", "--node-config", config,
                                                 "--port", str(free_port())])

    def register(self, key: str) -> None:
        """Adds a node's public key to the SuperLink (``flwr supernode register``)."""
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", f"{self.credentials.nodes[key]}.pub",
                               "loopback"], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def flwr_run(self, app: pathlib.Path) -> subprocess.Popen:
        log = open(self.root / "flwr-run.log", "ab")
        return subprocess.Popen([str(BIN / "flwr"), "run", str(app), "loopback", "--stream"], stdout=log,
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)


def _wait_for_port(port: int, process: subprocess.Popen, log: pathlib.Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not listen on {port} within {timeout} s")


def _require_flower_binaries() -> None:
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.fail("flower-superlink is not installed next to the interpreter (the test extra installs flwr)")


@pytest.fixture()
def deployment(tmp_path):
    _require_flower_binaries()
    deployment = Deployment(tmp_path)
    try:
        yield deployment
    finally:
        deployment.close()


def toy_app(root: pathlib.Path, method: str, num_clients: int, rounds: int, timeout: float) -> tuple:
    """An app directory holding the toy task (its modules ride in the FAB to every node)."""
    app = root / "app"
    app.mkdir()
    shutil.copy(TESTS / "toy.py", app / "toy.py")
    (app / "toy_flower.py").write_text(
        "from toy import toy_config, with_federation\n\n\n"
        f"def config():\n    return with_federation(toy_config({method!r}, num_clients={num_clients}), rounds={rounds})\n")
    out = root / "out"
    write_app(app, {"config-factory": "toy_flower:config", "setup-factory": "toy:toy_setup",
                    "output-dir": str(out), "round-timeout": timeout})
    return app, out / "flower_summary.json"


def read_summary(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(condition, deployment: Deployment, run: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run.poll() is not None and not condition():
            raise AssertionError(f"flwr run ended before {what}:\n{deployment.logs()}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s:\n{deployment.logs()}")


@pytest.mark.slow
@pytest.mark.usefixtures("two_node_run")  # started first: it waits alongside this one
def test_killed_supernodes_rejoin_with_or_without_their_state(deployment, tmp_path):
    """Three SuperNodes; after round 1 nodes 1 and 2 are killed and started again (node 1
    with a state-dir, node 2 without). Round 2 completes with node 0 as soon as the
    restarted nodes say who they are (the server then stops waiting for the dead ones,
    well before the timeout), and in round 3 node 1 continues from its saved state while
    node 2 starts fresh, both flagged."""
    app, summary_path = toy_app(tmp_path, "celora", num_clients=3, rounds=3, timeout=60.0)
    state_dir = tmp_path / "node-state"
    deployment.start_superlink()
    deployment.start_node(0, 3)
    deployment.start_node(1, 3, state_dir=state_dir)
    deployment.start_node(2, 3)
    run = deployment.flwr_run(app)
    wait_for(lambda: (s := read_summary(summary_path)) and len(s["history"]) >= 1 and "bytes_up" in s["history"][0],
             deployment, run, 300, "round 1")
    assert (state_dir / "client1.npz").is_file()
    for partition in (1, 2):
        deployment.stop(f"node{partition}")
    deployment.start_node(1, 3, state_dir=state_dir)
    deployment.start_node(2, 3)
    summary = wait_for(lambda: (s := read_summary(summary_path)) and s["finished"] and s, deployment, run, 600,
                       "finished run")
    assert run.wait(timeout=60) == 0, deployment.logs()
    first, second, third = summary["history"]
    assert first["reporting"] == [0, 1, 2]
    assert second["reporting"] == [0] and second["silent"] == [1, 2], deployment.logs()
    assert third["reporting"] == [0, 1, 2], deployment.logs()
    assert third["restored"] == [1] and third["fresh"] == [2] and third["started_over"] == []  # 2 had a download
    assert all(a is not None for a in summary["client_test_accuracy"])
    # Every node, the restarted ones included, was sent a core in round 3 (theirs still
    # pending from round 1, which they never answered).
    assert second["bytes_down"] == third["bytes_down"] == 3 * 2 * 2 * 4


class TwoNodeRun(NamedTuple):
    deployment: Deployment
    run: subprocess.Popen
    summary_path: pathlib.Path


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """SuperLink + 2 SuperNodes on loopback running CE-LoRA for 2 rounds, started when first
    asked for and left running. A deployment spends much of its time waiting, not on the CPU
    (SuperNodes poll every 3 s and start a ClientApp process per message): the killed-supernodes test asks
    for this run first, so that the two deployments wait side by side (about a minute less
    of the suite's wall time)."""
    _require_flower_binaries()
    root = tmp_path_factory.mktemp("two_node_run")
    deployment = Deployment(root)
    try:
        app, summary_path = toy_app(root, "celora", num_clients=2, rounds=2, timeout=240.0)
        deployment.start_superlink()
        for partition in range(2):
            deployment.start_node(partition, 2)
        yield TwoNodeRun(deployment, deployment.flwr_run(app), summary_path)
    finally:
        deployment.close()


@pytest.mark.slow
def test_deployment_engine_reproduces_the_simulator(two_node_run):
    """SuperLink + 2 SuperNodes on loopback, CE-LoRA, 2 rounds: the same per-client
    accuracies as the native simulator (same seed and config) and identical bytes."""
    deployment, run, summary_path = two_node_run
    summary = wait_for(lambda: (s := read_summary(summary_path)) and s["finished"] and s, deployment, run, 420,
                       "finished run")
    assert run.wait(timeout=60) == 0, deployment.logs()
    simulated = [out.record for out in loop.iterate_rounds(toy_setup(with_federation(toy_config("celora", 2),
                                                                                     rounds=2)))]
    np.testing.assert_allclose(summary["client_test_accuracy"], simulated[-1]["client_test_accuracy"], atol=1e-6)
    history = summary["history"]
    assert [h["reporting"] for h in history] == [[0, 1], [0, 1]]
    assert [h["bytes_up"] for h in history] == [r["bytes_up_per_client"] * r["participants"] for r in simulated]
    downs = [h["bytes_down"] for h in history[1:]] + [history[-1]["bytes_down_final"]]
    assert downs == [r["bytes_down_per_client"] * r["participants"] for r in simulated]
    assert history[0]["bytes_up"] == 2 * 2 * 2 * 4  # two nodes, one rank-2 core each, float32
    np.testing.assert_allclose([h["train_loss"] for h in history], [r["train_loss"] for r in simulated], rtol=1e-5)




def _reviews_csv(path: pathlib.Path, count: int, labels=("neg", "pos")) -> pathlib.Path:
    rows = [f"review {i} of {path.stem}: the film was {'great' if i % 2 else 'dull'},{labels[i % len(labels)]}"
            for i in range(count)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_tls_authenticated_nodes_train_on_their_own_files(tmp_path, tiny_model_dir):
    """The deployment a group of organisations runs: a SuperLink with TLS (a test CA's
    certificate for 127.0.0.1) and SuperNode authentication; each registered node reads
    only its own CSV (node-data, data-path), of its own size. Nodes 2-5 cannot take part
    (a label outside the declared ones, a missing file, a missing column, no data-path):
    each logs one line, is left out, and the run goes on. Node 0
    forwards its messages to a worker that keeps its client prepared. A node
    whose key the SuperLink does not know, and a registered node that does not trust the CA,
    are refused before any message reaches them. The run config's own data path does not
    exist: the ServerApp reads no client data."""
    _require_flower_binaries()
    bad_nodes = {  # partition -> (its data-path or None, the line its log must show)
        2: (_reviews_csv(tmp_path / "site2.csv", 8, labels=("neg", "pos", "mixed")), "label 'mixed'"),
        3: (tmp_path / "missing.csv", "missing.csv does not exist"),
        4: (tmp_path / "columns.csv", "has no column(s) ['label']"),
        5: (None, "has no data-path"),
    }
    (tmp_path / "columns.csv").write_text("text,diagnosis\na,neg\nb,pos\nc,neg\n")
    credentials = make_credentials(tmp_path / "credentials",
                                   [f"node{i}" for i in range(6)] + ["stranger", "uncertified"])
    deployment = Deployment(tmp_path, credentials)
    files = [_reviews_csv(tmp_path / "site0.csv", 12), _reviews_csv(tmp_path / "site1.csv", 20)] + \
        [bad_nodes[i][0] for i in range(2, 6)]
    try:
        app = write_app(tmp_path / "app", {
            "preset": "smoke", "node-data": True, "output-dir": str(tmp_path / "out"), "round-timeout": 240.0,
            "set": f"model.path='{tiny_model_dir}'; data.label_names='neg,pos'; partition.num_clients=6; "
                   "federation.method='celora'; data.path='/nonexistent/the-server-has-no-data.csv'"})
        summary_path = tmp_path / "out" / "flower_summary.json"
        deployment.start_superlink()
        for key in [f"node{i}" for i in range(6)] + ["uncertified"]:
            deployment.register(key)
        for partition in range(6):  # node 0 forwards its messages to a worker
            deployment.start_node(partition, 6, key=f"node{partition}", data_path=files[partition],
                                  worker=partition == 0)
        deployment.start_node(1, 6, key="stranger", name="stranger")
        deployment.start_node(1, 6, key="uncertified", trust_ca=False, name="uncertified")
        for name, reason in (("stranger", "Failed to activate SuperNode"),
                             ("uncertified", "CERTIFICATE_VERIFY_FAILED")):
            process = deployment.processes[name]
            assert process.wait(timeout=120) != 0, deployment.logs()
            assert reason in (tmp_path / f"{name}.log").read_text(errors="replace"), deployment.logs()
        run = deployment.flwr_run(app)
        summary = wait_for(lambda: (s := read_summary(summary_path)) and s["finished"] and s, deployment, run, 600,
                           "finished run")
        assert run.wait(timeout=60) == 0, deployment.logs()
        assert summary["excluded_at_setup"] == [2, 3, 4, 5]
        assert summary["client_sizes"] == [9.0, 15.0, 0.0, 0.0, 0.0, 0.0]  # each file less its test quarter
        assert [h["reporting"] for h in summary["history"]] == [[0, 1], [0, 1]]
        # The worker built node 0's client once (at the set-up query); node 1's per-message
        # processes build theirs in every round.
        for record in summary["history"]:
            assert record["node_seconds"]["0"]["setup"] == 0 and record["node_seconds"]["1"]["setup"] > 0
        accuracies = summary["client_test_accuracy"]
        assert all(0 <= a <= 1 for a in accuracies[:2]) and accuracies[2:] == [None] * 4
        for partition, (_, reason) in bad_nodes.items():
            lines = [line for line in (tmp_path / f"node{partition}.log").read_text(errors="replace").splitlines()
                     if "cannot take part in the run" in line]
            assert len(lines) == 1 and reason in lines[0], (partition, lines, deployment.logs())
        assert "Receiving: train message" in (tmp_path / "node0.log").read_text(errors="replace")
        for name in ("stranger", "uncertified"):  # received nothing
            assert "Receiving:" not in (tmp_path / f"{name}.log").read_text(errors="replace")
    finally:
        deployment.close()

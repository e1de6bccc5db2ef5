"""A long-running worker that keeps a SuperNode's client prepared between messages.

Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process for every message (in
both isolation modes), so without help each message imports JAX, loads the model, encodes
the node's data and loads its programs again. Started beside a SuperNode,

    celora-jax flower-worker /tmp/celora-node0.sock

holds the prepared client (``client_app.client_app_for``: task, jitted programs, node) in
memory for the run; a SuperNode whose node config names it (``worker="/tmp/celora-node0.sock"``)
then only forwards each message to it: its per-message process still starts Python and
imports celora-jax (~2 s), but builds nothing. A new run id makes the worker build afresh.

The socket is a Unix domain socket readable by its owner only (the protocol is pickle, so
it must never face anyone else); one message at a time, as a SuperNode sends them.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import socket
import struct
from typing import Any, Callable

logger = logging.getLogger(__name__)
_LENGTH = struct.Struct("!Q")


def _send(connection: socket.socket, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    connection.sendall(_LENGTH.pack(len(data)) + data)


def _receive(connection: socket.socket) -> Any:
    header = _exactly(connection, _LENGTH.size)
    return pickle.loads(_exactly(connection, _LENGTH.unpack(header)[0]))


def _exactly(connection: socket.socket, count: int) -> bytes:
    chunks, remaining = [], count
    while remaining:
        chunk = connection.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("the other end closed the connection mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def forward(socket_path: str, message, context):
    """Has the worker at ``socket_path`` handle ``message``: returns its reply's content
    and replaces ``context.state`` with the worker's (what Flower keeps for the node)."""
    path = pathlib.Path(socket_path)
    if not path.exists():
        raise RuntimeError(f"the node config names worker={socket_path!r}, but no celora-jax flower-worker listens "
                           f"there; start one: celora-jax flower-worker {socket_path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(str(path))
        _send(connection, (message, context))
        status, *answer = _receive(connection)
    if status != "ok":
        raise RuntimeError(f"the worker at {socket_path} failed: {answer[0]}")
    content, context.state = answer
    return content


def serve(socket_path: str, make_app: Callable[[], Callable], max_requests: int | None = None) -> int:
    """Answers forwarded messages until interrupted (or ``max_requests``); returns how many
    it answered. ``make_app()`` builds the ClientApp used for one run."""
    from flwr.supercore.task_identity import TaskIdentity

    path = pathlib.Path(socket_path)
    if path.exists():
        path.unlink()  # a stale socket of a worker that was killed
    apps: dict[int, Callable] = {}
    answered = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        previous = os.umask(0o177)  # the socket file: owner read/write only
        try:
            listener.bind(str(path))
        finally:
            os.umask(previous)
        listener.listen(1)
        logger.warning("celora-jax flower-worker listening on %s", path)
        try:
            while max_requests is None or answered < max_requests:
                connection, _ = listener.accept()
                with connection:
                    message, context = _receive(connection)
                    if context.run_id not in apps:  # a new run: build afresh, forget the old one
                        apps = {context.run_id: make_app()}
                    TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
                    try:
                        reply = apps[context.run_id](message, context)
                        response = ("ok", reply.content, context.state)
                    except Exception as err:  # noqa: BLE001 - sent back, raised by the node
                        logger.exception("the worker failed on a %s message", message.metadata.message_type)
                        response = ("error", f"{type(err).__name__}: {err}")
                    _send(connection, response)
                    answered += 1
        finally:
            path.unlink(missing_ok=True)
    return answered

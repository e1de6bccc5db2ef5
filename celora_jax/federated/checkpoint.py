"""Run checkpoints with orbax-checkpoint: save every k rounds, keep the last n, resume.

A checkpoint at step t holds the state *after* round t:

  clients:  every real client's parameters and optimizer state, ``[N, ...]`` (mesh padding
            removed, so a run can resume on a different number of devices). Runs over
            several processes save the padded, sharded arrays instead: each process writes
            its own clients' shards (no gather onto one host), and a resume with the same
            layout reads each process's shards straight back; any other layout (one process,
            another device count) reads the whole arrays and drops the padding;
  server:   the strategy's state (restored when its shapes still fit, see ``restore``);
  meta:     JSON with the round, cumulative bytes and the per-round metrics so far.

Everything else a round needs (PRNG keys, batch order, client sampling) is a pure function
of (seed, round), so restoring this state and replaying the remaining rounds reproduces an
uninterrupted run bit for bit. Orbax writes each step to a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint intact. With
several processes the directory must be one that every process sees (a ``gs://`` bucket,
NFS): every process takes part in each save and restore.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)


def _path(directory: str | pathlib.Path) -> epath.Path:
    """Local paths made absolute; ``gs://`` and other remote paths as they are."""
    directory = str(directory)
    return epath.Path(directory) if "://" in directory else epath.Path(pathlib.Path(directory).absolute())


def manager(directory: str | pathlib.Path, keep: int = 2) -> ocp.CheckpointManager:
    """A checkpoint manager for ``directory`` (local or ``gs://``) keeping the last ``keep`` steps."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    directory = _path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, truncated or was written by another config."""


def _shapes(tree: Any) -> list[list[int]]:
    return [list(np.shape(leaf)) for leaf in jax.tree.leaves(tree)]


def _named_shapes(tree: Any) -> dict[str, list[int]]:
    return {jax.tree_util.keystr(path): list(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def has_checkpoints(directory: str | pathlib.Path) -> bool:
    return latest_step(directory) is not None


def latest_step(directory: str | pathlib.Path) -> int | None:
    """The round of the newest complete checkpoint in ``directory`` (orbax writes a step to a
    temporary name and renames it to the bare number when complete), or None."""
    directory = _path(directory)
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def close(checkpoints: ocp.CheckpointManager) -> None:
    """Waits for any save in flight and stops the manager's threads (before the interpreter
    shuts down its executors)."""
    checkpoints.wait_until_finished()
    checkpoints.close()


def save(checkpoints: ocp.CheckpointManager, step: int, clients: Any, server: Any, meta: dict,
         num_clients: int | None = None, padded_clients: int | None = None) -> None:
    """Writes the state after round ``step`` (blocking, atomic).

    ``clients`` is ``[N, ...]`` host arrays, or (several processes) the padded, sharded
    ``[N_pad, ...]`` arrays of the run with ``num_clients`` = N real clients; every process
    calls this then. ``padded_clients``: N_pad, the client count the server state is padded
    to (lets a resume under another padding re-pad it).
    """
    leading = {np.shape(leaf)[0] for leaf in jax.tree.leaves(clients)}
    items = {"clients": ocp.args.StandardSave(clients),
             "meta": ocp.args.JsonSave({**meta, "server_shapes": _shapes(server),
                                        "client_shapes": _named_shapes(clients),
                                        "num_clients": num_clients or (leading.pop() if leading else 0),
                                        "padded_clients": padded_clients})}
    if jax.tree.leaves(server):  # orbax stores no empty trees; stateless strategies have {}
        items["server"] = ocp.args.StandardSave(server)
    with signals_deferred():
        checkpoints.save(step, args=ocp.args.Composite(**items))
        checkpoints.wait_until_finished()


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred():
    """Holds SIGINT and SIGTERM until the block ends, then delivers the first one received.

    A save interrupted half way leaves orbax's writer threads running into an interpreter
    that is shutting down (a traceback, and a temporary directory a resume must skip); a
    save takes seconds, so Ctrl-C or a scheduler's SIGTERM waits for it instead. Only the
    main thread can set handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in _DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            logger.info("signal %d held until checkpoint was written", received[0])
            signal.raise_signal(received[0])


def _abstract(tree: Any) -> Any:
    """Restore targets: each leaf's own sharding if it has one, else this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                       sharding=getattr(x, "sharding", None) or device), tree)


def restore(checkpoints: ocp.CheckpointManager, clients_like: Any, server_like: Any,
            step: int | None = None, padded_clients_like: Any = None,
            padded_clients: int | None = None) -> tuple[int, Any, Any | None, dict] | None:
    """The latest (or given) checkpoint as ``(step, clients, server, meta)``; None if none.

    ``clients_like`` gives the expected structure, shapes ``[N, ...]`` and dtypes of the real
    clients' state (arrays or ``jax.ShapeDtypeStruct``), ``server_like`` the server state's
    (a leaf's sharding, if any, is where it is restored to). ``padded_clients_like``
    (several processes) is this run's padded, sharded client state as ``ShapeDtypeStruct``
    with shardings: a checkpoint saved in exactly that layout is read into it shard by
    shard and returned padded (``meta["clients_layout"] == "sharded"``); otherwise the
    clients come back as ``[N, ...]`` on this process (``"whole"``). A server state
    saved under another device count (another mesh padding of the clients) comes back
    re-padded to ``server_like``'s shapes, when ``padded_clients`` (this run's N_pad) is
    given and the checkpoint recorded its own; it is returned as None when its shapes differ
    in any other way, and the strategy is then re-initialized.
    """
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        return None
    where = f"checkpoint {step} in {checkpoints.directory}"
    try:
        meta = checkpoints.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # orbax raises many types for damaged files
        raise CheckpointError(f"{where} is unreadable or truncated: {type(err).__name__}: {err}") from err
    if not isinstance(meta, dict) or "client_shapes" not in meta or "server_shapes" not in meta:
        raise CheckpointError(f"{where} has no celora-jax metadata")
    expected = _named_shapes(clients_like)
    saved = meta.pop("client_shapes")
    saved_leading = {shape[0] for shape in saved.values() if shape}
    real = meta.pop("num_clients", saved_leading.pop() if len(saved_leading) == 1 else 0)
    saved_real = {name: [real, *shape[1:]] for name, shape in saved.items()}  # padding aside
    if saved_real != expected:
        differing = (sorted(set(saved_real) ^ set(expected))
                     or sorted(k for k in saved_real if saved_real[k] != expected[k]))
        name = differing[0]
        raise CheckpointError(
            f"{where} was written by an incompatible config: client state {name} is "
            f"{saved_real.get(name, 'absent')} there, this config expects {expected.get(name, 'absent')}")
    as_saved = padded_clients_like is not None and _named_shapes(padded_clients_like) == saved
    if as_saved:
        clients_target = _abstract(padded_clients_like)
    else:  # the whole saved arrays on this process, padding (if any) dropped below
        leaves, treedef = jax.tree_util.tree_flatten_with_path(clients_like)
        clients_target = _abstract(jax.tree.unflatten(treedef, [
            jax.ShapeDtypeStruct(tuple(saved[jax.tree_util.keystr(path)]), leaf.dtype) for path, leaf in leaves]))
    args = {"clients": ocp.args.StandardRestore(clients_target)}
    saved_server, saved_padding = meta.pop("server_shapes"), meta.pop("padded_clients", None)
    server_fits = saved_server == _shapes(server_like)
    repadded = (not server_fits and saved_padding is not None and padded_clients is not None
                and _padding_apart(saved_server, _shapes(server_like), saved_padding, padded_clients))
    if (server_fits or repadded) and jax.tree.leaves(server_like):
        target = server_like if server_fits else jax.tree.unflatten(
            jax.tree.structure(server_like), [jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)
                                              for shape, leaf in zip(saved_server, jax.tree.leaves(server_like))])
        args["server"] = ocp.args.StandardRestore(_abstract(target))
    try:
        restored = checkpoints.restore(step, args=ocp.args.Composite(**args))
    except Exception as err:
        raise CheckpointError(f"{where} is unreadable or truncated: {type(err).__name__}: {err}") from err
    clients = restored["clients"]
    meta["clients_layout"] = "sharded" if as_saved else "whole"
    if not as_saved:
        clients = jax.tree.map(lambda x: x[:real], clients)
    if repadded:
        # Another device count pads the clients differently: the real clients' rows are kept;
        # the padding rows are zeros (padding clients never report, so no strategy reads them).
        server = jax.tree.map(lambda saved_leaf, like: _repad(np.asarray(saved_leaf), np.shape(like), real),
                              restored["server"], server_like)
        return step, clients, server, meta
    if not server_fits:
        logger.info("%s: server state shapes differ beyond the client padding; re-initializing it", where)
        return step, clients, None, meta
    return step, clients, restored.get("server", server_like), meta


def _padding_apart(saved: list[list[int]], wanted: list[list[int]], saved_padding: int,
                   wanted_padding: int) -> bool:
    """Whether the saved server leaves differ from the wanted ones only in client-padded
    dimensions (``saved_padding`` there, ``wanted_padding`` here), e.g. ``[N_pad, N_pad]``
    saved on one device count and restored on another."""
    if len(saved) != len(wanted):
        return False
    return all(len(a) == len(b) and all(x == y or (x == saved_padding and y == wanted_padding)
                                        for x, y in zip(a, b))
               for a, b in zip(saved, wanted))


def _repad(saved: np.ndarray, shape: tuple[int, ...], real: int) -> np.ndarray:
    """``saved`` with every dimension that differs from ``shape`` cut to the ``real``
    clients and padded with zeros to ``shape``."""
    cut = saved[tuple(slice(0, real) if have != want else slice(None) for have, want in zip(saved.shape, shape))]
    return np.pad(cut, [(0, want - have) for have, want in zip(cut.shape, shape)])

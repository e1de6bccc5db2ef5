"""Run checkpoints with orbax-checkpoint: save every k rounds, keep the last n, resume.

A checkpoint at step t holds the state *after* round t:

  clients:  every real client's parameters and optimizer state, ``[N, ...]`` (mesh padding
            removed, so a run can resume on a different number of devices);
  server:   the strategy's state (restored when its shapes still fit, see ``restore``);
  meta:     JSON with the round, cumulative bytes and the per-round metrics so far.

Everything else a round needs (PRNG keys, batch order, client sampling) is a pure function
of (seed, round), so restoring this state and replaying the remaining rounds reproduces an
uninterrupted run bit for bit. Orbax writes each step to a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


def manager(directory: str | pathlib.Path, keep: int = 2) -> ocp.CheckpointManager:
    """A checkpoint manager for ``directory`` keeping the last ``keep`` steps."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    directory = pathlib.Path(directory).absolute()
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
    directory = pathlib.Path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def save(checkpoints: ocp.CheckpointManager, step: int, clients: Any, server: Any, meta: dict) -> None:
    """Writes the state after round ``step`` (blocking, atomic)."""
    items = {"clients": ocp.args.StandardSave(clients),
             "meta": ocp.args.JsonSave({**meta, "server_shapes": _shapes(server),
                                        "client_shapes": _named_shapes(clients)})}
    if jax.tree.leaves(server):  # orbax stores no empty trees; stateless strategies have {}
        items["server"] = ocp.args.StandardSave(server)
    checkpoints.save(step, args=ocp.args.Composite(**items))
    checkpoints.wait_until_finished()


def _abstract(tree: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device), tree)


def restore(checkpoints: ocp.CheckpointManager, clients_like: Any, server_like: Any,
            step: int | None = None) -> tuple[int, Any, Any | None, dict] | None:
    """The latest (or given) checkpoint as ``(step, clients, server, meta)``; None if none.

    ``clients_like``/``server_like`` give the expected structure, shapes and dtypes. The
    server state is returned as None when its saved shapes differ from ``server_like``
    (e.g. resumed on another device count, which changes the mesh padding); strategies
    whose state is a function of the setup are then simply re-initialized.
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
    if saved != expected:
        differing = sorted(set(saved) ^ set(expected)) or sorted(k for k in saved if saved[k] != expected[k])
        name = differing[0]
        raise CheckpointError(
            f"{where} was written by an incompatible config: client state {name} is "
            f"{saved.get(name, 'absent')} there, this config expects {expected.get(name, 'absent')}")
    args = {"clients": ocp.args.StandardRestore(_abstract(clients_like))}
    server_fits = meta.pop("server_shapes") == _shapes(server_like)
    if server_fits and jax.tree.leaves(server_like):
        args["server"] = ocp.args.StandardRestore(_abstract(server_like))
    try:
        restored = checkpoints.restore(step, args=ocp.args.Composite(**args))
    except Exception as err:
        raise CheckpointError(f"{where} is unreadable or truncated: {type(err).__name__}: {err}") from err
    if not server_fits:
        logger.info("%s: server state shapes differ (other device count); re-initializing it", where)
        return step, restored["clients"], None, meta
    return step, restored["clients"], restored.get("server", server_like), meta

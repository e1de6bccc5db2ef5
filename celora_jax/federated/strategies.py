"""Server strategies behind one interface: ``init`` and ``aggregate``.

A strategy never sees a model, only pytrees of uploaded arrays stacked over clients:

  uploads:   the ``shared`` leaves of every client, ``[N, ...]`` per leaf.
  sizes:     ``[N]`` training examples per client (aggregation weights p ∝ sizes).
  mask:      ``[N]`` bool, True for clients that reported this round.
  downloads: what each client receives, same structure as ``uploads``, ``[N, ...]``
             (one row per client, so personalized strategies fit the same interface).

``aggregate(state, uploads, sizes, mask) -> (state, downloads, logs)`` is pure and jittable;
``logs`` is a dict of arrays recorded every round (e.g. the personalized weights);
``initial_logs(state)`` what is recorded once, with round 1 (e.g. a constant distance matrix).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from celora_jax.server import baselines

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A server aggregation rule.

    Attributes:
      name: identifier.
      init: ``init(uploads, sizes) -> state`` from the round-0 uploads (shapes only matter).
      aggregate: ``aggregate(state, uploads, sizes, mask) -> (state, downloads, logs)``.
      initial_logs: ``initial_logs(state) -> {name: array}``, recorded once with round 1.
      restart: ``restart(state, mask) -> state``: the clients in ``mask`` hold the initial
        parameters again (a Flower node that lost its state and had no download to apply);
        per-client state about what they hold goes back to its start. Most strategies keep
        none, hence the default.
    """

    name: str
    init: Callable[[PyTree, Array], PyTree]
    aggregate: Callable[[PyTree, PyTree, Array, Array], tuple[PyTree, PyTree, Mapping[str, Array]]]
    initial_logs: Callable[[PyTree], Mapping[str, Array]] = lambda state: {}
    restart: Callable[[PyTree, Array], PyTree] = lambda state, mask: state


def broadcast(tree: PyTree, count: int) -> PyTree:
    """Every one of ``count`` clients receives the same ``tree``: ``[count, ...]`` per leaf."""
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (count, *leaf.shape)), tree)


def _no_state(uploads, sizes):
    return {}


def weighted_average() -> Strategy:
    """FedAvg of the uploaded leaves with weights n_i / n over reporting clients
    (FedAvg-LoRA, FFA-LoRA, FedSA-LoRA and CE-LoRA without personalization)."""

    def aggregate(state, uploads, sizes, mask):
        return state, broadcast(baselines.fedavg(uploads, sizes, mask), sizes.shape[0]), {}

    return Strategy("weighted_average", _no_state, aggregate)


def local_only() -> Strategy:
    """Nothing is exchanged; every client keeps what it trained."""

    def aggregate(state, uploads, sizes, mask):
        return state, uploads, {}

    return Strategy("local_only", _no_state, aggregate)

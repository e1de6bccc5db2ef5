"""Cluster oracle: FedAvg-LoRA inside each true cluster of clients.

A reference, not a method a server could run: it reads the partition's hidden clusters
(``ServerInputs.clusters``). It is the upper bound a similarity-based aggregation can reach
when the clients' differences are the clusters, so a benchmark on which it does not beat
FedAvg-LoRA and local training cannot show what personalized aggregation is worth.

With ``shared_basis=True`` it is Fed-SB inside each true cluster instead: the cores of a
frozen shared basis (``adapter.init``, weight-SVD by default) averaged within the clusters.
That is the best CE-LoRA's server can do in that basis (its W equal to the oracle's), so
the gap between CE-LoRA in a shared basis and this oracle is what CE-LoRA's own weights and
settings cost there, and the gap between this oracle and the LoRA one is the cost of the
basis.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.federated import strategies
from celora_jax.federated.methods.base import FederatedMethod, ServerInputs
from celora_jax.lora import adapters

logger = logging.getLogger(__name__)

NAME = "cluster_oracle"
SINGLE_CLUSTER_NOTE = "the partition has a single cluster, so the oracle is FedAvg-LoRA"


def single_cluster(clusters) -> bool:
    """Whether every client is in one cluster (the Dirichlet and pathological schemes)."""
    return clusters is not None and len(np.unique(np.asarray(clusters))) <= 1


def cluster_weights(clusters: jax.Array, sizes: jax.Array, mask: jax.Array) -> jax.Array:
    """``[N, N]`` row-stochastic W: client i averages the reporting clients of its cluster
    with weights n_j; a client whose cluster has no reporter keeps its own upload."""
    same = clusters[:, None] == clusters[None, :]
    raw = jnp.where(same & mask[None, :], sizes[None, :], 0.0)
    total = raw.sum(1, keepdims=True)
    return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), jnp.eye(clusters.shape[0]))


def clustered_average(clusters: np.ndarray) -> strategies.Strategy:
    """Weighted averages within the clusters ``[N]``; clients beyond N (mesh padding) form
    clusters of their own."""

    def init(uploads, sizes):
        n_pad = sizes.shape[0]
        padded = -1 - np.arange(n_pad)  # padding: ids no real cluster has
        padded[: len(clusters)] = clusters
        return {"clusters": jnp.asarray(padded, jnp.int32)}

    def aggregate(state, uploads, sizes, mask):
        weights = cluster_weights(state["clusters"], sizes.astype(jnp.float32), mask)
        downloads = jax.tree.map(lambda leaf: jnp.tensordot(weights, leaf.astype(jnp.float32), axes=1)
                                 .astype(leaf.dtype), uploads)
        return state, downloads, {"weights": weights}

    return strategies.Strategy("clustered_average", init, aggregate)


def server(inputs: ServerInputs) -> strategies.Strategy:
    if inputs.clusters is None:
        raise ValueError("cluster_oracle needs the clients' true clusters (ServerInputs.clusters), which only "
                         "a simulation knows")
    if single_cluster(inputs.clusters):
        logger.warning("cluster_oracle: %s (a clustered_* partition scheme gives it clusters)", SINGLE_CLUSTER_NOTE)
    return clustered_average(np.asarray(inputs.clusters, np.int64))


def make(shared_basis: bool = False) -> FederatedMethod:
    if not isinstance(shared_basis, bool):
        raise ValueError(f"shared_basis must be True or False, got {shared_basis!r}")
    if shared_basis:
        return FederatedMethod(
            name=NAME, description="reference: Fed-SB inside each true cluster (reads the partition)",
            adapter_kind=adapters.TRI, trained=frozenset("C"), shared=frozenset("C"), server=server,
            default_init=adapters.WEIGHT_SVD, needs_frozen_basis=True, options={"shared_basis": True})
    return FederatedMethod(
        name=NAME, description="reference: FedAvg-LoRA inside each true cluster (reads the partition)",
        adapter_kind=adapters.LORA, trained=frozenset("AB"), shared=frozenset("AB"), server=server,
        options={"shared_basis": False})

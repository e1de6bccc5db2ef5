"""One rule for whether a client's contribution can be used this round, shared by the round
step (which rolls back clients with NaN/Inf), the server of a deployment
(``celora_jax.federated.server_node``), the baselines' averages and CE-LoRA's server
kernel: the client reported, its size is a finite count ≥ 0, and every array it trained or
sent is finite; and, with an outlier factor, its change is not far larger than the others'.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


def per_client_sum(tree: PyTree, reduce_leaf) -> Array | None:
    """Sums ``reduce_leaf(leaf [N, -1]) -> [N]`` over the leaves of a client-stacked tree
    (None for a tree without leaves)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return None
    per_leaf = jnp.stack([reduce_leaf(leaf.reshape(leaf.shape[0], -1)).astype(jnp.float32) for leaf in leaves])
    # Summed by a matrix product, which XLA computes once: a chain of adds or ands (or a
    # reduce of the stack, which XLA rewrites into one) is fused into every consumer of the
    # result (a client select per leaf), work quadratic in the leaves that made a 30-layer
    # decoder's FedAvg-LoRA round compile for minutes.
    return jnp.ones((len(leaves),), jnp.float32) @ per_leaf


def finite_clients(tree: PyTree) -> Array | bool:
    """``[N]`` bool: clients whose every entry of every leaf is finite (True without leaves)."""
    non_finite = per_client_sum(tree, lambda x: jnp.sum(~jnp.isfinite(x), axis=1))
    return True if non_finite is None else non_finite == 0


def valid_sizes(sizes: Array) -> Array:
    """``[N]`` bool: training-set sizes that can weight an average (finite, ≥ 0)."""
    return jnp.isfinite(sizes) & (sizes >= 0)


def usable_clients(tree: PyTree, sizes: Array, mask: Array) -> Array:
    """``[N]`` bool: reported (``mask``), a valid size and every leaf of ``tree`` finite."""
    return jnp.asarray(mask, bool) & valid_sizes(sizes) & finite_clients(tree)


def non_finite_updates(trained, mask) -> Array:
    """``[N]`` bool: reporting clients with a NaN/Inf anywhere in their trained parameters."""
    return mask & ~finite_clients(trained)


def rejected_updates(sent_before, uploads, non_finite, mask, outlier_factor: float) -> Array:
    """``[N]`` bool: reporting clients whose upload the server sets aside.

    A client is rejected when its trained parameters hold NaN/Inf (``non_finite``, from
    ``non_finite_updates``), or (``outlier_factor`` > 0) when the norm of its uploaded
    change exceeds ``outlier_factor`` times the median norm over the reporting clients
    with finite updates.
    """
    finite = ~non_finite
    rejected = mask & ~finite
    change = jax.tree.map(lambda new, old: new - old, uploads, sent_before)
    squared = per_client_sum(change, lambda x: jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) ** 2, axis=1))
    if outlier_factor > 0 and squared is not None:
        norms = jnp.sqrt(squared)
        median = jnp.nanmedian(jnp.where(mask & finite, norms, jnp.nan))
        rejected |= mask & finite & (median > 0) & (norms > outlier_factor * median)
    return rejected


def where_clients(mask, new, old):
    """Per client (leading axis), ``new`` where ``mask`` else ``old``."""
    def pick(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)

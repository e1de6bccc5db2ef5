"""The baselines' server aggregations on plain arrays: FedAvg-LoRA, FFA-LoRA, FedSA-LoRA.

Usable without the engine, like :func:`celora_jax.server_step` for CE-LoRA. Every function
takes what the clients uploaded, stacked over a leading client axis, and returns the size-
weighted average the server broadcasts, without the client axis:

================  ==============================  ==============================
method            clients upload                  server returns
================  ==============================  ==============================
FedAvg-LoRA       A ``[N, ..., d_in, r]`` and     (Ā, B̄)
                  B ``[N, ..., r, d_out]``
FFA-LoRA          B only (A frozen at its shared  B̄
                  init)
FedSA-LoRA        A only (B stays personal)       Ā
plain CE-LoRA     C ``[N, L, r, r]``              C̄ (:func:`fedavg` or
                                                  ``aggregation.weighted_average_cores``)
================  ==============================  ==============================

Each upload may be one array or any pytree of arrays (e.g. ``{"layer_0/query": A, ...}``),
all with the same leading client axis N. Weights are p_j = n_j / Σ n over the clients that
reported (``mask``) and whose uploads are all finite; a client with a NaN or Inf anywhere
in its upload is left out of every average (averaging A and B separately, a client whose B
is broken must not contribute its A either). If no client is usable the result is zeros.

Note that averaging A and B separately does not average the products: mean(A)·mean(B) ≠
mean(A·B), the aggregation error FFA-LoRA and FedSA-LoRA avoid by sharing only one factor,
and CE-LoRA avoids by sharing only the core between a common A and B basis (METHOD.md §1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax import _checks
from celora_jax.server import aggregation, usable

Array = jax.Array
PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def usable_clients(uploads: PyTree, sizes: Array, mask: Array) -> Array:
    """[N] bool: reported (mask), valid size (finite, ≥ 0) and every upload leaf finite
    (``celora_jax.server.usable``, the rule the round step and CE-LoRA's server apply too)."""
    return usable.usable_clients(uploads, sizes, mask)


@jax.jit
def _fedavg_impl(uploads: PyTree, sizes: Array, mask: Array) -> PyTree:
    usable = usable_clients(uploads, sizes, mask)
    # The same size prior as CE-LoRA's server kernel: p ∝ n over usable clients.
    weights = aggregation.client_prior(sizes, usable)

    def average(leaf):
        safe = jnp.where(usable.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, 0.0)
        return jnp.tensordot(weights.astype(leaf.dtype), safe, axes=1, precision=_HIGHEST)

    return jax.tree.map(average, uploads)


def _check_uploads(function: str, name: str, uploads: PyTree, sizes, mask) -> tuple[PyTree, Array, Array]:
    leaves, treedef = jax.tree.flatten(uploads)
    if not leaves:
        _checks.fail(function, f"{name} is empty (expected arrays [N, ...] stacked over clients)")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(uploads)[0]]
    arrays = []
    for path, leaf in zip(paths, leaves):
        where = f"{name}{path}"
        leaf = jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf
        _checks.check_floating(function, where, leaf)
        if leaf.ndim < 1:
            _checks.fail(function, f"{where} must have a leading client axis [N, ...], got a scalar")
        arrays.append(leaf)
    n = arrays[0].shape[0]
    for path, leaf in zip(paths, arrays):
        if leaf.shape[0] != n:
            _checks.fail(function, f"{name}{path} has {leaf.shape[0]} clients on its leading axis, "
                                   f"but {name}{paths[0]} has {n} (every leaf must be [N, ...])")
    if _checks.shape_of(sizes) != (n,):
        _checks.fail(function, f"sizes must have shape ({n},) (examples per client), got {_checks.shape_of(sizes)}")
    if mask is None:
        mask = np.ones((n,), bool)
    if _checks.shape_of(mask) != (n,):
        _checks.fail(function, f"mask must have shape ({n},) (True = reported), got {_checks.shape_of(mask)}")
    return jax.tree.unflatten(treedef, arrays), jnp.asarray(sizes, jnp.float32), jnp.asarray(mask, bool)


def fedavg(uploads: PyTree, sizes: Array, mask: Array | None = None) -> PyTree:
    """Σ_j p_j · upload_j over usable clients, p_j ∝ n_j: FedAvg of any stacked uploads.

    Args:
      uploads: an array ``[N, ...]`` or a pytree of them (one leading client axis).
      sizes: ``[N]`` examples per client.
      mask: ``[N]`` bool, True for clients that reported; None = all.

    Returns:
      The same structure without the client axis (zeros if no client is usable).

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import fedavg
      >>> cores = jnp.stack([jnp.eye(2), 3 * jnp.eye(2), jnp.full((2, 2), jnp.nan)])
      >>> fedavg(cores, sizes=jnp.array([1.0, 3.0, 5.0]))  # the NaN client is left out
      Array([[2.5, 0. ],
             [0. , 2.5]], dtype=float32)
      >>> fedavg(cores, sizes=jnp.array([1.0, 3.0]))
      Traceback (most recent call last):
      ...
      ValueError: fedavg: sizes must have shape (3,) (examples per client), got (2,)
    """
    uploads, sizes, mask = _check_uploads("fedavg", "uploads", uploads, sizes, mask)
    return _fedavg_impl(uploads, sizes, mask)


def fedavg_lora(a: PyTree, b: PyTree, sizes: Array, mask: Array | None = None) -> tuple[PyTree, PyTree]:
    """FedAvg-LoRA: the server averages both factors, (Σ p_j A_j, Σ p_j B_j).

    Args:
      a: A factors ``[N, ..., d_in, r]`` (an array or a pytree, e.g. one leaf per layer).
      b: B factors ``[N, ..., r, d_out]``, same structure as ``a``.
      sizes: ``[N]`` examples per client.
      mask: ``[N]`` bool, True for clients that reported; None = all.

    Returns:
      (Ā, B̄) without the client axis. A client with a non-finite A or B is left out of both.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import fedavg_lora
      >>> a = jax.random.normal(jax.random.key(0), (4, 16, 2))   # 4 clients, d_in 16, r 2
      >>> b = jax.random.normal(jax.random.key(1), (4, 2, 8))    # d_out 8
      >>> a_mean, b_mean = fedavg_lora(a, b, sizes=jnp.ones(4))
      >>> a_mean.shape, b_mean.shape
      ((16, 2), (2, 8))
    """
    uploads, sizes, mask = _check_uploads("fedavg_lora", "uploads", {"a": a, "b": b}, sizes, mask)
    average = _fedavg_impl(uploads, sizes, mask)
    return average["a"], average["b"]


def ffa_lora(b: PyTree, sizes: Array, mask: Array | None = None) -> PyTree:
    """FFA-LoRA: A is frozen at the shared init, clients upload B, the server averages B.

    Args:
      b: B factors ``[N, ..., r, d_out]`` (an array or a pytree).
      sizes: ``[N]`` examples per client.
      mask: ``[N]`` bool, True for clients that reported; None = all.

    Returns:
      B̄ without the client axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import ffa_lora
      >>> b = jnp.stack([jnp.zeros((2, 3)), jnp.ones((2, 3))])
      >>> ffa_lora(b, sizes=jnp.array([1.0, 1.0]), mask=jnp.array([True, False]))
      Array([[0., 0., 0.],
             [0., 0., 0.]], dtype=float32)
    """
    uploads, sizes, mask = _check_uploads("ffa_lora", "b", b, sizes, mask)
    return _fedavg_impl(uploads, sizes, mask)


def fedsa_lora(a: PyTree, sizes: Array, mask: Array | None = None) -> PyTree:
    """FedSA-LoRA: clients upload A (general knowledge) and keep B; the server averages A.

    Args:
      a: A factors ``[N, ..., d_in, r]`` (an array or a pytree).
      sizes: ``[N]`` examples per client.
      mask: ``[N]`` bool, True for clients that reported; None = all.

    Returns:
      Ā without the client axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import fedsa_lora
      >>> a = {"query": jnp.stack([jnp.ones((4, 2)), 3 * jnp.ones((4, 2))])}
      >>> fedsa_lora(a, sizes=jnp.array([1.0, 1.0]))["query"][0]
      Array([2., 2.], dtype=float32)
    """
    uploads, sizes, mask = _check_uploads("fedsa_lora", "a", a, sizes, mask)
    return _fedavg_impl(uploads, sizes, mask)

"""FedEx-LoRA (Singhal et al., 2025): exact aggregation of LoRA updates.

Averaging A and B separately is not averaging the updates: Σ p_i A_i B_i ≠ Ā B̄. FedEx-LoRA
sends every client Ā and B̄, as FedAvg-LoRA does, plus the residual
R = Σ p_i A_i B_i − Ā B̄ of every adapted matrix, which each client folds into its frozen
weight: W0 ← W0 + s·R. Every client then holds exactly W0 + s·Σ p_i A_i B_i. The residual
is a dense d_in × d_out matrix per adapted weight, so the download costs far more than the
upload; the bytes count it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from celora_jax.federated import strategies
from celora_jax.federated.methods.base import FederatedMethod, shared_bytes
from celora_jax.lora import adapters
from celora_jax.server import aggregation, baselines

_HIGHEST = jax.lax.Precision.HIGHEST


def residuals(lora_uploads, weights):
    """``{module path: Σ p_i A_i B_i − Ā B̄}`` from client-stacked A ``[N, ..., d_in, r]``
    and B ``[N, ..., r, d_out]``; ``weights`` ``[N]`` sum to 1 over usable clients."""
    out = {}
    for path, factors in adapters.adapter_modules(lora_uploads).items():
        a, b = factors["A"], factors["B"]
        weighted_a = a * weights.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
        # One contraction over clients and rank together: no [N, d_in, d_out] intermediate.
        mean_of_products = jnp.einsum("n...ir,n...ro->...io", weighted_a, b, precision=_HIGHEST)
        product_of_means = jnp.einsum("...ir,...ro->...io", weighted_a.sum(0),
                                      jnp.tensordot(weights.astype(b.dtype), b, axes=1, precision=_HIGHEST),
                                      precision=_HIGHEST)
        out[path] = mean_of_products - product_of_means
    return traverse_util.unflatten_dict(out)


def exact_aggregation() -> strategies.Strategy:
    def init(uploads, sizes):
        modules = adapters.adapter_modules(uploads["lora"])
        zeros = {path: jnp.zeros(f["A"].shape[1:-1] + f["B"].shape[-1:], f["A"].dtype)
                 for path, f in modules.items()}
        return {"residual": traverse_util.unflatten_dict(zeros)}

    def aggregate(state, uploads, sizes, mask):
        mean = baselines.fedavg(uploads, sizes, mask)  # Ā and B̄, as FedAvg-LoRA sends them
        usable = baselines.usable_clients(uploads, sizes, mask)
        weights = aggregation.client_prior(sizes, usable)  # the same p_i fedavg used
        lora = jax.tree.map(lambda x: jnp.where(usable.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0),
                            uploads["lora"])
        # The server keeps the sum of all rounds' residuals; the clients' frozen weights are
        # W0 + s·(that sum), so a resumed run rebuilds them from the server state alone.
        state = {"residual": jax.tree.map(jnp.add, state["residual"], residuals(lora, weights))}
        return state, strategies.broadcast(mean, sizes.shape[0]), {}

    return strategies.Strategy("exact_aggregation", init, aggregate)


def fold_residual(base_params, server_state, scale: float):
    """W0 + s·ΣR for every adapted kernel: the frozen weights every client holds after
    folding each round's residual (the same for all clients, so held once)."""
    flat = dict(traverse_util.flatten_dict(base_params))
    for path, residual in traverse_util.flatten_dict(server_state["residual"]).items():
        kernel = tuple(path) + ("kernel",)
        if kernel not in flat:
            raise ValueError(f"fedex_lora folds its residual into the frozen kernel {'/'.join(kernel)}, "
                             "but that kernel is trained by the client (model.trainable_base matches it)")
        flat[kernel] = flat[kernel] + (scale * residual).astype(flat[kernel].dtype)
    return traverse_util.unflatten_dict(flat)


def download_bytes(client_params, roles) -> int:
    """Ā and B̄ plus one dense residual per adapted matrix."""
    dense = 0
    for factors in adapters.adapter_modules(client_params.get("lora", {})).values():
        a, b = factors["A"], factors["B"]
        dense += np.dtype(a.dtype).itemsize * math.prod(a.shape[:-1]) * b.shape[-1]
    return shared_bytes(client_params, roles) + dense


def make() -> FederatedMethod:
    return FederatedMethod(
        name="fedex_lora",
        description="FedEx-LoRA: A and B averaged, the residual of the average folded into W0",
        adapter_kind=adapters.LORA, trained=frozenset("AB"), shared=frozenset("AB"),
        server=lambda inputs: exact_aggregation(), fold_into_base=fold_residual,
        download_bytes=download_bytes)

"""Clients of different ranks in one frozen shared basis (``adapter.client_ranks``).

In a shared basis every client's update is ``A · C_i · B`` with the same A, B, so a client
that can afford less uses a smaller rank r_i <= r by training only the top-left r_i x r_i
block of its core. We give client i the factors
``A P_i`` and ``P_i B`` with ``P_i = diag(1, ..., 1, 0, ..., 0)`` (r_i ones): its update is
then ``A[:, :r_i] · C[:r_i, :r_i] · B[:r_i, :]`` whatever C holds elsewhere, the gradient
of every core entry outside the block is exactly zero, and so is Adam's step for it. The
block is all such a client computes with and all it needs to send: r_i² numbers per core
instead of r².

What the server aggregates for the entries a client does not train: the value it sent that
client, which a real server knows and fills in itself (the simulation's client uploads it
unchanged, so no server code changes). Under Fed-SB's average an entry therefore moves by
its owners' updates damped by the share of clients that own it, the "replication padding"
of heterogeneous-rank LoRA (Byun & Lee, 2024, arXiv 2406.17477), not the zero padding
that would pull every high-rank entry towards 0.
"""

from __future__ import annotations

import math

import numpy as np

from celora_jax.lora import adapters as adapters_lib, roles as roles_lib


def ranks_by_client(adapter_config: adapters_lib.AdapterConfig, num_clients: int) -> np.ndarray | None:
    """``[num_clients]`` ranks (``adapter.client_ranks`` cycled over the clients), or None
    when every client uses the full rank."""
    cycle = adapter_config.client_rank_cycle
    if cycle is None:
        return None
    return np.asarray([cycle[i % len(cycle)] for i in range(num_clients)], np.int32)


def restrict_to_ranks(lora: dict, ranks: np.ndarray) -> dict:
    """Client-stacked tri-matrix adapters with client i's factors cut to rank ``ranks[i]``:
    the columns of A and the rows of B beyond it set to zero (cores untouched). ``lora``
    leaves carry the client axis first (then a layer axis under ``nn.scan``)."""
    ranks = np.asarray(ranks)

    def restrict(module: dict) -> dict:
        rank = module["C"].shape[-1]
        keep = (np.arange(rank)[None, :] < ranks[:, None]).astype(module["A"].dtype)  # [N, r]
        extra = module["A"].ndim - 2  # the axes between the client axis and the rank axis of A
        a_keep = keep.reshape(len(ranks), *([1] * extra), rank)
        b_keep = keep.reshape(len(ranks), *([1] * (module["B"].ndim - 3)), rank, 1)
        return {**module, "A": module["A"] * a_keep, "B": module["B"] * b_keep}

    return _map_modules(lora, restrict)


def unsent_core_bytes(client_params: dict, roles: dict, ranks: np.ndarray) -> np.ndarray:
    """``[N]`` bytes each client does not send (nor receive) because it holds only the
    top-left r_i x r_i block of every core that travels: sum over shared cores of
    ``(r² - r_i²) x (layers) x itemsize``."""
    shared = roles_lib.select(client_params, roles, roles_lib.SHARED)
    saved = np.zeros(len(ranks), np.int64)
    for module in adapters_lib.adapter_modules(shared.get("lora", {})).values():
        if "C" not in module:
            continue
        core = module["C"]
        rank, layers = core.shape[-1], math.prod(core.shape[:-2])
        saved += (rank * rank - np.asarray(ranks, np.int64) ** 2) * layers * core.dtype.itemsize
    return saved


def _map_modules(tree: dict, fn) -> dict:
    """``fn`` applied to every dict holding a tri-matrix adapter (A, B and C)."""
    if isinstance(tree, dict) and {"A", "B", "C"} <= set(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: _map_modules(value, fn) for key, value in tree.items()}
    return tree


__all__ = ["ranks_by_client", "restrict_to_ranks", "unsent_core_bytes"]

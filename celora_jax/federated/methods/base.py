"""What a federated method is: one frozen object, built by a factory in its own file.

A method answers, for the round step and the server, every question that differs between
federated fine-tuning methods:

- which adapter factors a client trains and which it sends (``trained``, ``shared``: the
  roles pytree of ``celora_jax.lora.roles`` is derived from them);
- the client's objective (``client_objective``: a wrapper of the task loss, e.g. FedProx's
  proximal term);
- what the server does with the uploads (``server``: builds a ``Strategy``, pure
  ``init``/``aggregate`` over arrays; it sees the data statistic and the uploads, never a
  model);
- how a client applies what it receives (``receive``; ``fold_into_base`` for a common
  update of the frozen weights, as FedEx-LoRA's residual; ``finetune_steps`` of personal
  training after the download, whose result the client is evaluated with);
- what a round costs on the wire (``upload_bytes``, ``download_bytes``).

Every hook has a default that is right for plain FedAvg over the ``shared`` leaves, so a
new method usually sets a few fields. The types, and what travels where::

  client_params   {"lora": adapters, "params": client-trained base subset}, one client
  trained         the shared and personal leaves of client_params (what the optimizer moves)
  anchor          trained as it was at the start of the round (after the last download)
  uploads         shared leaves of every client, [N, ...] per leaf
  downloads       what each client receives, same structure as uploads, [N, ...]
  server_state    the strategy's pytree, replicated, carried from round to round
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.federated import strategies
from celora_jax.lora import adapters as adapters_lib, cores, roles as roles_lib
from celora_jax.server.aggregation import AggregationConfig
from celora_jax.server.gmm import ClassMixtures

Array = jax.Array
PyTree = Any
# loss_fn(trained, anchor, fixed, base_params, batch, dropout_key) -> (loss, (correct, count))
LossFn = Callable[..., tuple[Array, tuple[Array, Array]]]


@dataclasses.dataclass(frozen=True)
class ServerInputs:
    """What the server knows when it builds its strategy: configuration and arrays only.

    Attributes:
      aggregation: the run's aggregation options (β, λ, ...).
      data_statistics: every client's once-uploaded data statistic (per-class Gaussian
        mixtures of frozen features, stacked over clients), or None when the method does
        not ask for it (``needs_data_statistics``).
      clusters: ``[N]`` the true cluster of every client, as the partition made them
        (``ClientSplit.clusters``). Only reference methods read it (the cluster oracle: an
        upper bound no real server could reach); None outside a simulation.
      core_origin: ``[L, r, r]`` the cores every client starts from (:func:`starting_cores`),
        from which CE-LoRA's parameter distance measures the updates; None = the identity
        (METHOD.md §4's random init; the shared-basis inits start at 0).
    """

    aggregation: AggregationConfig = AggregationConfig()
    data_statistics: ClassMixtures | None = None
    clusters: np.ndarray | None = None
    core_origin: np.ndarray | None = None


def starting_cores(shared_params: Mapping) -> np.ndarray | None:
    """The ``[L, r, r]`` cores of one client's initial shared parameters (every client starts
    from the same cores under every init), or None if no core travels."""
    lora = shared_params.get("lora", {})
    if not any("C" in module for module in adapters_lib.adapter_modules(lora).values()):
        return None
    return np.asarray(cores.stack_cores(lora))


def plain_objective(loss_fn: LossFn, roles: Mapping) -> LossFn:
    """The task loss unchanged (every method but FedProx)."""
    return loss_fn


def replace_shared(trained_params: Mapping, downloads: Mapping, roles: Mapping) -> dict:
    """The client keeps its personal and frozen leaves and takes the downloaded shared ones."""
    return roles_lib.combine(downloads, roles_lib.select(trained_params, roles, roles_lib.PERSONAL,
                                                         roles_lib.FROZEN))


def keep_base(base_params: Mapping, server_state: PyTree, scale: float) -> Mapping:
    """The frozen base weights stay as loaded (every method but FedEx-LoRA)."""
    return base_params


def no_client_logs(trained_params: Mapping, adapter_config: adapters_lib.AdapterConfig) -> dict:
    return {}


def shared_bytes(client_params: Mapping, roles: Mapping) -> int:
    """Bytes of the shared leaves of one client: what FedAvg-style methods send each way."""
    shared = roles_lib.select(client_params, roles, roles_lib.SHARED)
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(shared)))


def weighted_average_server(inputs: ServerInputs) -> strategies.Strategy:
    return strategies.weighted_average()


@dataclasses.dataclass(frozen=True)
class FederatedMethod:
    """A federated fine-tuning method (see the module docstring for what each hook means).

    Attributes:
      name: identifier used in configs (``federation.method``) and results.
      description: one line for tables and help texts.
      adapter_kind: "tri" (A·C·B) or "lora" (A·B).
      trained: adapter factors trained locally.
      shared: adapter factors uploaded and replaced by the server's answer each round.
      server: ``server(ServerInputs) -> Strategy``.
      needs_data_statistics: clients upload their data statistic once, before round 1.
      client_objective: ``client_objective(loss_fn, roles) -> loss_fn``.
      receive: ``receive(trained_params, downloads, roles) -> client_params``.
      fold_into_base: ``fold_into_base(base_params, server_state, scale) -> base_params``,
        a common update of the frozen weights after aggregation (every client's copy alike).
      finetune_steps: personal steps each client takes after its download; it is evaluated
        with the result, while the next round trains on from the download.
      upload_bytes, download_bytes: ``(client_params, roles) -> int``, one client, one round.
      client_logs: ``client_logs(trained_params, adapter_config) -> {name: [N] array}``
        over the client-stacked trained parameters: diagnostics recorded every round.
      options: the factory's keyword arguments, recorded with the run.

    Examples:
      A method that trains and sends only B, like FFA-LoRA, under another name:

      >>> from celora_jax import FederatedMethod
      >>> mine = FederatedMethod(name="b_only", description="B averaged, A frozen",
      ...                        adapter_kind="lora", trained=frozenset("B"), shared=frozenset("B"))
      >>> mine.communicates, mine.finetune_steps
      (True, 0)
      >>> FederatedMethod(name="bad", description="", adapter_kind="lora",
      ...                 trained=frozenset("AB"), shared=frozenset("C"))
      Traceback (most recent call last):
      ...
      ValueError: method 'bad': shared names factors ['C'] that a 'lora' adapter does not have
    """

    name: str
    description: str
    adapter_kind: str
    trained: frozenset
    shared: frozenset
    server: Callable[[ServerInputs], strategies.Strategy] = weighted_average_server
    needs_data_statistics: bool = False
    client_objective: Callable[[LossFn, Mapping], LossFn] = plain_objective
    receive: Callable[[Mapping, Mapping, Mapping], dict] = replace_shared
    fold_into_base: Callable[[Mapping, PyTree, float], Mapping] = keep_base
    finetune_steps: int = 0
    upload_bytes: Callable[[Mapping, Mapping], int] = shared_bytes
    download_bytes: Callable[[Mapping, Mapping], int] = shared_bytes
    client_logs: Callable[[Mapping, adapters_lib.AdapterConfig], dict] = no_client_logs
    options: Mapping = dataclasses.field(default_factory=dict)
    default_init: str = adapters_lib.RANDOM_INIT
    needs_frozen_basis: bool = False

    def __post_init__(self):
        if self.adapter_kind not in (adapters_lib.TRI, adapters_lib.LORA):
            raise ValueError(f"method {self.name!r}: adapter_kind must be 'tri' or 'lora', got {self.adapter_kind!r}")
        factors = set("ACB") if self.adapter_kind == adapters_lib.TRI else set("AB")
        for field in ("trained", "shared"):
            unknown = set(getattr(self, field)) - factors
            if unknown:
                raise ValueError(f"method {self.name!r}: {field} names factors {sorted(unknown)} that a "
                                 f"{self.adapter_kind!r} adapter does not have")
        if not set(self.shared) <= set(self.trained):
            raise ValueError(f"method {self.name!r}: shared factors must be trained")
        if self.default_init not in adapters_lib.INITS:
            raise ValueError(f"method {self.name!r}: default_init must be one of {adapters_lib.INITS}, "
                             f"got {self.default_init!r}")
        if self.finetune_steps < 0:
            raise ValueError(f"method {self.name!r}: finetune_steps must be >= 0, got {self.finetune_steps}")

    @property
    def communicates(self) -> bool:
        return bool(self.shared)


def core_share_logs(trained_params: Mapping, adapter_config: adapters_lib.AdapterConfig) -> dict:
    """What each client learned that its core (the only thing tri-LoRA methods share)
    carries; in a frozen basis (core_only, a shared-basis init: C starts at 0) the core is
    the whole update by construction."""
    if "lora" not in trained_params or adapter_config.frozen_basis:
        return {}
    return {"core_share": jnp.mean(cores.core_share(trained_params["lora"]), axis=-1)}

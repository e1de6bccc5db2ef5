"""A prepared run: the config, the method object, the task and the roles of every leaf."""

from __future__ import annotations

import dataclasses

import numpy as np

from celora_jax.federated.basis import with_gradient_basis
from celora_jax.federated.config import RunConfig
from celora_jax.federated.methods import FederatedMethod, get_method
from celora_jax.federated.tasks import Task, prepare_task
from celora_jax.lora import adapters as adapters_lib, roles as roles_lib


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the round loop needs, fixed before round 1.

    Attributes:
      config: the run's configuration.
      method: the federated method (``federation.method`` with its options).
      task: model, data and initial client parameters.
      roles: the role (shared, personal, frozen) of every leaf of ``task.client_params``.
      local_steps: local optimizer steps per round.
    """

    config: RunConfig
    method: FederatedMethod
    task: Task
    roles: dict
    local_steps: int

    @property
    def num_clients(self) -> int:
        return self.task.num_clients

    @property
    def sizes(self) -> np.ndarray:
        return self.task.sizes


def resolve_method(config: RunConfig) -> FederatedMethod:
    fed = config.federation
    return get_method(fed.method, **fed.method_options.get(fed.method, {}))


def adapter_config_for(config: RunConfig, method: FederatedMethod) -> adapters_lib.AdapterConfig:
    """``config.adapter`` with the method's adapter kind, and its init unless the config sets one."""
    return dataclasses.replace(config.adapter, kind=method.adapter_kind, init=config.adapter.init or method.default_init)


def prepare(config: RunConfig, *, progress: bool = False) -> Setup:
    """Resolves the method, loads the task and labels the client parameters with their
    roles (``progress``: bars for long preparation, the VLM's projector alignment)."""
    method = resolve_method(config)
    return setup_for(config, method, prepare_task(config, adapter_config_for(config, method), progress=progress))


def setup_for(config: RunConfig, method: FederatedMethod, task) -> Setup:
    """The run's setup from a loaded task: under ``adapter.init=gradient_svd`` the shared
    basis is built first (round 0, ``celora_jax.federated.basis``)."""
    if task.adapter_config.init == adapters_lib.GRADIENT_SVD:
        task = with_gradient_basis(task, config)
    return Setup(config, method, task, client_roles(task, method, config), config.local_steps)


def client_roles(task, method: FederatedMethod, config: RunConfig) -> dict:
    """The role of every client leaf; in a frozen basis (``adapter_config.frozen_basis``) only
    the cores of the adapters train."""
    return roles_lib.parameter_roles(task.client_params, method, core_only=task.adapter_config.frozen_basis,
                                     share_base=config.federation.share_base)

"""Where arrays live: a device mesh whose ``clients`` axis spans the devices.

Client-stacked pytrees (adapters, optimizer states, batches, masks) are split along their
leading client axis; the frozen base model and the server state are replicated. This is
decided here, once, at the jit boundary of the round step; models know nothing of it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLIENTS = "clients"


def client_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all devices if None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (CLIENTS,))


def padded_client_count(num_clients: int, mesh: Mesh) -> int:
    """Smallest multiple of the clients-axis size that holds ``num_clients``."""
    size = mesh.shape[CLIENTS]
    return -(-num_clients // size) * size


def clients_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the leading (client) axis."""
    return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_clients(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, clients_sharding(mesh))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))

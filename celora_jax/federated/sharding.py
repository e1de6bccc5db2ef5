"""Where arrays live: a 2-D device mesh ``clients x data``.

Client-stacked pytrees (adapters, optimizer states, batches, masks) are split along their
leading client axis over the ``clients`` mesh axis; the frozen base model and the server
state are replicated. With a ``data`` axis of size D > 1, each client's training batch is
split over D devices as well (data parallelism inside one client: XLA all-reduces its
gradients over that axis), for clients whose batches are too large for one chip; its
parameters are replicated over those D devices. D = 1 (the default) is the 1-D client mesh.
This is decided here, once, at the jit boundary of the round step; models know nothing of it.

Several processes (``jax.distributed.initialize``: TPU pod hosts, GPU hosts, or CPU
processes with gloo collectives) share one mesh over all their devices. Each process then
holds a contiguous range of client rows (:func:`local_client_rows`); host-side client
arrays keep their global shape, but a process only fills, and only sends to its devices,
its own rows (:func:`put_clients`); :func:`to_host` and :func:`gather_client_rows` bring
results back to every process.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLIENTS = "clients"
DATA = "data"


def client_mesh(num_devices: int | None = None, data_parallel: int = 1) -> Mesh:
    """A ``(num_devices / data_parallel) x data_parallel`` mesh with axes (clients, data)
    over the first ``num_devices`` devices (all devices if None).

    Consecutive devices share a client, so with several processes (devices listed process
    by process) a client's data-parallel group stays inside one host when ``data_parallel``
    divides the devices per process, which is required.
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible")
        devices = devices[:num_devices]
    if data_parallel < 1 or len(devices) % data_parallel:
        raise ValueError(f"data_parallel={data_parallel} must be >= 1 and divide the {len(devices)} devices")
    per_process = jax.local_device_count()
    if jax.process_count() > 1 and per_process % data_parallel:
        raise ValueError(f"data_parallel={data_parallel} must divide the {per_process} devices of each process "
                         f"(a client's data-parallel group stays on one host)")
    grid = np.asarray(devices).reshape(len(devices) // data_parallel, data_parallel)
    return Mesh(grid, (CLIENTS, DATA))


def client_block_size(block: int | str | None, mesh: Mesh) -> int | None:
    """``block`` rounded up to a multiple of the clients-axis size (so that every block
    spans every device); None stays None (all clients at once); "auto" is one client per
    device on CPUs (cache-sized working sets) and None on accelerators (``FederationConfig``)."""
    if block == "auto":
        block = mesh.shape[CLIENTS] if mesh.devices.flat[0].platform == "cpu" else None
    if block is None:
        return None
    if block < 1:
        raise ValueError(f"client block must be >= 1 or None, got {block}")
    size = mesh.shape[CLIENTS]
    return -(-block // size) * size


def padded_client_count(num_clients: int, mesh: Mesh, block: int | str | None = None) -> int:
    """Smallest multiple of the clients-axis size (and of ``client_block_size(block)``
    when fewer than ``num_clients``) that holds ``num_clients``."""
    multiple = mesh.shape[CLIENTS]
    block = client_block_size(block, mesh)
    if block is not None and block < num_clients:
        multiple = block
    return -(-num_clients // multiple) * multiple


def clients_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the leading (client) axis, replicated over the data axis."""
    return NamedSharding(mesh, P(CLIENTS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Training batches ``[clients, steps, batch, ...]``: clients over the clients axis,
    the examples of each batch over the data axis."""
    return NamedSharding(mesh, P(CLIENTS, None, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_client_rows(mesh: Mesh, total: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``[total, ...]`` client-sharded array that live on
    this process's devices (all rows with one process)."""
    if jax.process_count() == 1:
        return 0, total
    index_map = clients_sharding(mesh).addressable_devices_indices_map((total,))
    ranges = sorted({(index[0].start or 0, total if index[0].stop is None else index[0].stop)
                     for index in index_map.values()})
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        if start != stop:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous client rows {ranges}; "
                             "order the mesh devices by process")
    return ranges[0][0], ranges[-1][1]


def put_clients(tree: Any, mesh: Mesh, sharding: NamedSharding | None = None) -> Any:
    """Places a host tree with a leading client axis, split over the mesh
    (``clients_sharding`` unless ``sharding`` is given, e.g. :func:`batch_sharding`). With
    several processes each sends only its own rows (the other rows are never read)."""
    sharding = clients_sharding(mesh) if sharding is None else sharding
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(value):
        value = np.asarray(value)
        start, stop = local_client_rows(mesh, value.shape[0])
        return jax.make_array_from_process_local_data(sharding, value[start:stop], value.shape)

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly client-sharded, multi-process) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if isinstance(x, jax.Array) else x, tree)


def gather_client_rows(local: Any, start: int, total: int) -> Any:
    """Assembles host arrays whose leading axis holds this process's client rows
    ``start : start + len`` into ``[total, ...]`` arrays on every process."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(local)
    count = leaves[0].shape[0] if leaves else 0
    layout = np.asarray(multihost_utils.process_allgather(np.asarray([start, count], np.int64)))
    width = max(int(layout[:, 1].max()), 1)
    out = []
    for leaf in leaves:
        leaf = np.asarray(leaf)
        padded = np.zeros((width, *leaf.shape[1:]), leaf.dtype)
        padded[:count] = leaf
        every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, width, ...]
        full = np.zeros((total, *leaf.shape[1:]), leaf.dtype)
        for (first, rows), block in zip(layout, every):
            full[first:first + rows] = block[:rows]
        out.append(full)
    return jax.tree.unflatten(treedef, out)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))

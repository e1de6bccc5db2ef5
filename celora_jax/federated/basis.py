"""Round 0 of an ``adapter.init=gradient_svd`` run: the shared basis from a federated
sketch of the clients' first fine-tuning step.

LoRA-SB (Ponkshe et al., 2024; code RaghavSinghal10/lora-sb) builds A and B from the SVD of
an estimate of the first full fine-tuning update: the gradient of the task loss with respect
to each adapted kernel, summed over a few batches. Fed-SB computes that estimate once, on the
pooled training data. A federation cannot pool its data, but it can pool *sketches*: every
client sums its own gradient ``G_i`` over ``adapter.sketch_batches`` batches of its training
data, sketches it against test matrices drawn from the run seed (``celora_jax.lora.sketch``), and
uploads the sketches; the server sums them, which is the sketch of ``G = Σ G_i``, and returns
G's top-r singular vectors. Every client then holds the same ``A = U_r``, ``B = V_rᵀ``
(orthonormal, as LoRA-SB's) and ``C = 0``, frozen from round 1 on.

Where we differ from the authors: LoRA-SB takes ``-lr · sign(G)`` as the first update and
starts R at its singular values (the model starts one step in). The sign is not linear, so
the sum of the clients' sketches would not be the sketch of anything; we sketch the raw
summed gradient, whose singular vectors are what the basis needs, and start C at 0 (the
model starts at the pretrained weights, as under ``weight_svd``).

The exchange is counted: its bytes (sketches up, bases down, for every client) are added to
round 1's record as ``bytes_basis`` and to the summary as ``basis_bytes_*``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from celora_jax.data import packing
from celora_jax.federated import client as client_lib
from celora_jax.federated.config import RunConfig
from celora_jax.federated.tasks import Task
from celora_jax.lora import adapters as adapters_lib, sketch as sketch_lib
from celora_jax.lora.layer_layout import kernel_keys, layer_axes

BYTES_PER_NUMBER = 4  # float32 sketches and bases


def target_kernels(full_params: dict, target: str) -> dict:
    """``{kernel path: kernel}`` of the adapted kernels (regex ``target``) in the full parameters."""
    flat = traverse_util.flatten_dict(full_params)
    return {path: flat[path] for path in adapters_lib.target_kernel_paths(full_params, target)}


def draw_matrices(key: jax.Array, kernels: dict, rank: int, oversample: int) -> dict:
    """The shared test matrices of every kernel (per layer slice for stacked kernels), from
    one key every client knows, split as ``layer_layout.kernel_keys`` splits it: a model under
    ``nn.scan`` sketches its layers with exactly the matrices the unrolled model uses, and so
    gets the same basis."""
    keys = kernel_keys(key, {path: kernel.shape for path, kernel in kernels.items()})
    matrices = {}
    for path, kernel in kernels.items():
        d_in, d_out = kernel.shape[-2:]
        draw = lambda k: sketch_lib.draw_sketch_matrices(k, d_in, d_out, rank, oversample)
        matrices[path] = jax.vmap(draw)(keys[path]) if layer_axes(path) else draw(keys[path])
    return matrices


def _per_layer(function, path):
    """``function`` over a stacked kernel's layer slices, or as it is for a 2-D kernel."""
    return jax.vmap(function) if layer_axes(path) else function


def make_client_sketch(task: Task, paths: list):
    """``client_sketch(full_params, lora, matrices, batches [S, B, ...])``: one
    client's sketches of its task gradient summed over its batches, per kernel (jitted;
    the weights and test matrices are arguments, never constants of the program)."""

    def loss(kernels, full, lora, batch):
        flat = traverse_util.flatten_dict(full)
        flat.update(kernels)
        logits = task.logits_fn(traverse_util.unflatten_dict(flat), lora, batch, None)
        return client_lib.task_loss(logits, batch)[0]

    gradient = jax.grad(loss)

    @jax.jit
    def client_sketch(full, lora, matrices, batches):
        flat = traverse_util.flatten_dict(full)
        kernels = {path: flat[path] for path in paths}

        def step(total, batch):
            return jax.tree.map(jnp.add, total, gradient(kernels, full, lora, batch)), None

        summed, _ = jax.lax.scan(step, jax.tree.map(jnp.zeros_like, kernels), batches)
        return {path: _per_layer(sketch_lib.sketch, path)(summed[path], matrices[path]) for path in paths}

    return client_sketch


def bases_from_sketches(summed: dict, matrices: dict, rank: int) -> dict:
    """The server's side: ``{kernel path: {"A": U_r, "C": 0, "B": V_rᵀ}}`` from the summed
    sketches."""
    factors = {}
    for path, sketches in summed.items():
        def build(sketches, tests):
            u, _, vt = sketch_lib.top_singular(sketches, tests, rank)
            return {"A": u, "C": jnp.zeros((rank, rank), jnp.float32), "B": vt}
        factors[path] = _per_layer(build, path)(sketches, matrices[path])
    return factors


def exchange_bytes(kernels: dict, matrices: dict, rank: int) -> tuple[int, int]:
    """(bytes one client uploads: its sketches, bytes it downloads: the bases)."""
    up = down = 0
    for path, kernel in kernels.items():
        d_in, d_out = kernel.shape[-2:]
        layers = kernel.shape[0] if layer_axes(path) else 1
        tests = jax.tree.map(lambda x: x[0], matrices[path]) if layer_axes(path) else matrices[path]
        up += layers * sketch_lib.sketch_size(d_in, d_out, tests)
        down += layers * (d_in + d_out) * rank
    return BYTES_PER_NUMBER * up, BYTES_PER_NUMBER * down


def with_gradient_basis(task: Task, config: RunConfig) -> Task:
    """``task`` whose clients' A and B are the shared basis from the federated sketch of
    their summed task gradients (every client's sketch, summed; one process holds them all)."""
    adapter = task.adapter_config
    if jax.process_count() > 1:
        raise ValueError("adapter.init='gradient_svd' sums the clients' sketches within one process; "
                         "across processes it is not supported yet (use weight_svd)")
    full = client_lib.full_params(task.base_params, task.client_params)
    kernels = target_kernels(full, adapter.target)
    paths = sorted(kernels)
    matrices = draw_matrices(jax.random.fold_in(jax.random.key(config.seed), 3), kernels, adapter.rank,
                             adapter.sketch_oversample)
    client_sketch = make_client_sketch(task, paths)
    batches = packing.round_batches(task.train, adapter.sketch_batches, config.federation.batch_size,
                                    config.seed, 0)
    summed = None
    for client in range(*task.local_clients):
        mine = client_sketch(full, task.client_params["lora"], matrices,
                             jax.tree.map(lambda x: x[client], batches))
        summed = mine if summed is None else jax.tree.map(jnp.add, summed, mine)
    factors = bases_from_sketches(summed, matrices, adapter.rank)
    flat_lora = traverse_util.flatten_dict(task.client_params["lora"])
    for path, values in factors.items():
        for name, value in values.items():
            flat_lora[path[:-1] + (name,)] = value
    up, down = exchange_bytes(kernels, matrices, adapter.rank)
    client_params = {**task.client_params, "lora": traverse_util.unflatten_dict(flat_lora)}
    preparation = {**task.preparation, "basis_bytes_up_per_client": up, "basis_bytes_down_per_client": down,
                   "basis_sketch_batches": adapter.sketch_batches}
    return dataclasses.replace(task, client_params=client_params, preparation=preparation)


__all__ = ["target_kernels", "draw_matrices", "make_client_sketch", "bases_from_sketches", "exchange_bytes",
           "with_gradient_basis"]

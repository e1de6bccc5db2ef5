"""The federated round as one jitted program, and the jitted evaluation.

``build_round_step`` is the only jit/sharding boundary of a round: local training of every
client (vmapped, in client blocks, sharded over the ``clients`` mesh axis), the clients'
privatization of their uploads, the server's validation and aggregation, and each client's
application of what it receives. What varies between methods comes from the method object
(``celora_jax.federated.methods``); what varies between models from the task's logits_fn.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from celora_jax.federated import blocks, client as client_lib, sharding, strategies
from celora_jax.federated.methods import base as methods_base
from celora_jax.lora import roles as roles_lib
from celora_jax.privacy import dp as dp_lib
from celora_jax.server import usable

Array = jax.Array


def evaluated_params(client_state: dict) -> dict:
    """The parameters a client is evaluated with: its fine-tuned copy under methods with
    ``finetune_steps``, else its parameters."""
    return client_state["tuned"] if "tuned" in client_state else client_state["params"]


def base_folder(method, scale: float, mesh) -> Callable | None:
    """Jitted ``(base, server_state) -> base`` for methods that update the frozen weights
    (FedEx-LoRA), None for the others (their base is used as loaded)."""
    if method.fold_into_base is methods_base.keep_base:
        return None
    replicated = sharding.replicated(mesh)
    return jax.jit(lambda base, state: method.fold_into_base(base, state, scale),
                   in_shardings=(replicated, replicated), out_shardings=replicated)


def finetune_update(setup, total_steps: int) -> Callable:
    """Client update for a method's personal steps after the download: fresh Adam moments,
    at the learning rate of the round's last local step."""
    optimizer = dataclasses.replace(setup.config.optimizer, reset_each_round=True)
    steps_per_round = setup.local_steps

    def rate(round_index, local_step, num_steps):
        return client_lib.learning_rate_at((round_index + 1) * steps_per_round - 1, total_steps, optimizer)

    return client_lib.make_client_update(setup.task.logits_fn, setup.roles, optimizer, total_steps,
                                         learning_rate_fn=rate)


def build_round_step(setup, strategy: strategies.Strategy, mesh) -> Callable:
    """The jitted round: local training of all clients, aggregation, download.

    ``round_step(base, client_state, server_state, batches, mask, sizes, key, round_index)
    -> (client_state, server_state, metrics, logs)``; clients with ``mask`` False are
    trained (static shapes) but neither counted by the server nor updated. ``setup`` is a
    ``celora_jax.federated.setup.Setup`` (config, method, task, roles, local steps).
    """
    config, method, task, roles = setup.config, setup.method, setup.task, setup.roles
    total_steps = config.federation.rounds * setup.local_steps
    client_update = client_lib.make_client_update(task.logits_fn, roles, config.optimizer, total_steps,
                                                  objective=method.client_objective)
    noise_multiplier = dp_lib.resolve_noise_multiplier(config.dp, config.federation.rounds)
    privatize = jax.vmap(dp_lib.privatize_update, in_axes=(0, None, None, 0))
    block = sharding.client_block_size(config.federation.client_block, mesh)
    train_clients = blocks.blocked_vmap(client_update, (None, 0, 0, 0, None), block)
    finetune_clients = (blocks.blocked_vmap(finetune_update(setup, total_steps), (None, 0, 0, 0, None), block)
                        if method.finetune_steps else None)
    scale = task.adapter_config.scale

    def round_step(base, client_state, server_state, batches, mask, sizes, key, round_index):
        keys = jax.random.split(key, mask.shape[0])
        trained, metrics = train_clients(method.fold_into_base(base, server_state, scale), client_state,
                                         batches, keys, round_index)
        sent_before = roles_lib.select(client_state["params"], roles, roles_lib.SHARED)
        uploads = roles_lib.select(trained["params"], roles, roles_lib.SHARED)
        dp_logs = {}
        if config.dp.enabled and jax.tree.leaves(uploads):
            # The client clips and noises its change before it leaves: the server sees only this.
            change = jax.tree.map(jnp.subtract, uploads, sent_before)
            noise_keys = jax.random.split(jax.random.fold_in(key, 0xD1FF), mask.shape[0])
            noised, norms = privatize(change, config.dp.clip_norm, noise_multiplier, noise_keys)
            uploads = jax.tree.map(jnp.add, sent_before, noised)
            dp_logs = {"update_norm": norms}
        learned = roles_lib.select(trained["params"], roles, roles_lib.SHARED, roles_lib.PERSONAL)
        broken = usable.non_finite_updates(learned, mask)
        accepted = mask & ~usable.rejected_updates(sent_before, uploads, broken, mask, config.federation.outlier_factor)
        # Zero what rejected clients sent: a weight of 0 does not cancel NaN in a weighted sum.
        uploads = usable.where_clients(accepted, uploads, jax.tree.map(jnp.zeros_like, uploads))
        server_state, downloads, logs = strategy.aggregate(server_state, uploads, sizes, accepted)
        new_state = {"params": method.receive(trained["params"], downloads, roles), "opt_state": trained["opt_state"]}
        logs = {**logs, **dp_logs, **method.client_logs(trained["params"], task.adapter_config),
                "rejected": mask & ~accepted, "non_finite": broken}
        # Outliers (finite but unusually large uploads) keep their own round of training and
        # only miss the mixture: under strong label skew the clients still learning are the
        # "outliers" of clients that have converged, and rolling them back would freeze them.
        # Absent clients and clients with NaN/Inf keep the state they had before the round.
        own_round = usable.where_clients(mask & ~broken, trained, {k: client_state[k] for k in trained})
        state = usable.where_clients(accepted, new_state, own_round)
        if finetune_clients is not None:
            # Personal steps from what was just received; the next round trains on from `state`.
            first = jax.tree.map(lambda x: x[:, :method.finetune_steps], batches)
            tune_keys = jax.random.split(jax.random.fold_in(key, 0xF17E), mask.shape[0])
            tuned, _ = finetune_clients(method.fold_into_base(base, server_state, scale), state, first,
                                        tune_keys, round_index)
            state = {**state, "tuned": usable.where_clients(mask & ~broken, tuned["params"], client_state["tuned"])}
        return state, server_state, metrics, logs

    clients, replicated = sharding.clients_sharding(mesh), sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        round_step,
        in_shardings=(replicated, clients, replicated, batch, clients, clients, replicated, replicated),
        out_shardings=(clients, replicated, clients, replicated),
        donate_argnums=(1,))


def build_evaluate(setup, mesh) -> tuple[Callable, Callable]:
    """Jitted evaluation on each client's own test split and on the common test set:
    ``evaluate(base, client_params, examples) -> {"loss", "correct", "count"}`` per client."""
    evaluate = client_lib.make_evaluate(setup.task.logits_fn, setup.config.federation.eval_batch_size)
    block = sharding.client_block_size(setup.config.federation.client_block, mesh)
    clients, replicated = sharding.clients_sharding(mesh), sharding.replicated(mesh)
    own = jax.jit(blocks.blocked_vmap(evaluate, (None, 0, 0), block),
                  in_shardings=(replicated, clients, clients), out_shardings=clients)
    common = jax.jit(blocks.blocked_vmap(evaluate, (None, 0, None), block),
                     in_shardings=(replicated, clients, replicated), out_shardings=clients)
    return own, common

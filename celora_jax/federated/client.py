"""Local training and evaluation of one client, written to be ``jax.vmap``-ed over clients.

What travels where:
  base_params: frozen pre-trained parameters, one copy shared by all clients (vmap in_axes=None).
  client_state: {"params": {"lora": adapters, "params": client-trained base subset},
                 "opt_state": optimizer state of the trained leaves} — one per client.
  batches: one round of data, ``[S, B, ...]`` per client (see ``celora_jax.data.packing``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from celora_jax.federated.config import OptimizerConfig
from celora_jax.lora import roles as roles_lib

Array = jax.Array
PyTree = Any
# logits_fn(params, lora, batch, dropout_key or None) -> logits [B, classes]; params is the
# full base pytree (frozen part merged with the client's trained part).
LogitsFn = Callable[[Mapping, Mapping, Mapping, Array | None], Array]


def learning_rate_at(step: Array, total_steps: int, config: OptimizerConfig) -> Array:
    """Linear warmup to the peak, then linear decay to zero at ``total_steps``."""
    warmup = max(1, int(config.warmup_fraction * total_steps))
    step = jnp.asarray(step, jnp.float32)
    rise = (step + 1) / warmup
    fall = jnp.maximum(total_steps - step, 0) / max(1, total_steps - warmup)
    return config.learning_rate * jnp.minimum(rise, fall)


def local_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW with unit step size; the caller multiplies by the scheduled learning rate so
    the schedule can follow the global step while Adam's moments are reset per round."""
    parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm > 0 else []
    parts.append(optax.adamw(learning_rate=1.0, weight_decay=config.weight_decay))
    return optax.chain(*parts)


def factor_rates(trained: Mapping, round_index: Array, config: OptimizerConfig) -> PyTree:
    """Per-leaf multipliers of the learning rate: ``core_lr_multiplier`` on adapter cores
    C, 0 on A and B from round ``freeze_factors_after`` + 1 on (when set), 1 elsewhere."""
    frozen_factors = (jnp.asarray(round_index) >= config.freeze_factors_after
                      if config.freeze_factors_after > 0 else jnp.asarray(False))

    def rate(path, leaf):
        in_adapter = bool(path) and getattr(path[0], "key", None) == "lora"
        name = getattr(path[-1], "key", None) if path else None
        if in_adapter and name == "C":
            return jnp.float32(config.core_lr_multiplier)
        if in_adapter and name in ("A", "B"):
            return jnp.where(frozen_factors, 0.0, 1.0).astype(jnp.float32)
        return jnp.float32(1.0)

    return jax.tree_util.tree_map_with_path(rate, trained)


def classification_loss(logits: Array, labels: Array, example_mask: Array) -> tuple[Array, tuple[Array, Array]]:
    """Mean cross-entropy over real examples, plus (#correct, #examples)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = example_mask.sum()
    loss = (losses * example_mask).sum() / jnp.maximum(count, 1.0)
    correct = ((logits.argmax(-1) == labels) * example_mask).sum()
    return loss, (correct, count)


def answer_loss(logits: Array, targets: Array, target_mask: Array,
                example_mask: Array) -> tuple[Array, tuple[Array, Array]]:
    """Causal-LM loss on answer tokens only, plus (#exact matches, #examples).

    Args:
      logits: ``[B, K, vocab]`` next-token logits at the last K positions.
      targets: ``[B, K]`` the tokens those positions must predict.
      target_mask: ``[B, K]`` 1 where the target is an answer token.
      example_mask: ``[B]`` 1 for real examples.

    An example counts as an exact match when every answer token (its end-of-turn token
    included) is the argmax under teacher forcing, which is exactly when greedy decoding
    reproduces the answer and stops.
    """
    mask = target_mask * example_mask[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    right = (logits.argmax(-1) == targets) | (mask == 0)
    correct = (jnp.all(right, axis=-1) * example_mask).sum()
    return loss, (correct, example_mask.sum())


def next_token_loss(logits: Array, targets: Array, token_mask: Array,
                    example_mask: Array) -> tuple[Array, tuple[Array, Array]]:
    """Causal-LM loss over every real token, plus (#tokens predicted right, #tokens).

    Args:
      logits: ``[B, T, vocab]`` next-token logits at every position.
      targets: ``[B, T]`` the token each position must predict.
      token_mask: ``[B, T]`` 1 where the position holds a real token.
      example_mask: ``[B]`` 1 for real examples.

    Counting tokens, not examples, makes the round's accuracy the top-1 next-token accuracy
    and its loss the mean per-token cross-entropy (perplexity = exp(loss)).
    """
    mask = token_mask * example_mask[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    count = mask.sum()
    loss = (losses * mask).sum() / jnp.maximum(count, 1.0)
    correct = ((logits.argmax(-1) == targets) * mask).sum()
    return loss, (correct, count)


def task_loss(logits: Array, batch: Mapping[str, Array]) -> tuple[Array, tuple[Array, Array]]:
    """``next_token_loss`` for language-modelling batches (with ``token_mask``),
    ``answer_loss`` for instruction batches (with ``targets``), else ``classification_loss``."""
    if "token_mask" in batch:
        return next_token_loss(logits, batch["targets"], batch["token_mask"], batch["example_mask"])
    if "targets" in batch:
        return answer_loss(logits, batch["targets"], batch["target_mask"], batch["example_mask"])
    return classification_loss(logits, batch["labels"], batch["example_mask"])


def full_params(base_params: Mapping, client_params: Mapping) -> dict:
    """The model's parameter pytree: frozen base plus the client's trained base subset."""
    return roles_lib.combine(base_params, client_params.get("params", {}))


def init_client_state(client_params: Mapping, roles: Mapping, config: OptimizerConfig) -> dict:
    """Optimizer state over the trained leaves of one client."""
    trained = roles_lib.select(client_params, roles, roles_lib.SHARED, roles_lib.PERSONAL)
    return {"params": dict(client_params), "opt_state": local_optimizer(config).init(trained)}


def make_client_update(logits_fn: LogitsFn, roles: Mapping, config: OptimizerConfig,
                       total_steps: int, objective: Callable | None = None,
                       learning_rate_fn: Callable | None = None) -> Callable:
    """Builds ``client_update(base_params, client_state, batches, key, round_index)``.

    The returned function trains the client's trained leaves for the ``S`` steps in
    ``batches [S, B, ...]`` with ``lax.scan`` and returns ``(client_state, metrics)`` where
    metrics hold the round's mean task loss and accuracy over real examples.

    Args:
      objective: ``objective(loss_fn, roles) -> loss_fn`` wraps the task loss
        ``loss_fn(trained, anchor, fixed, base_params, batch, dropout_key)``, where
        ``anchor`` is ``trained`` as it was at the start of the round (FedProx's proximal
        term); None trains on the task loss.
      learning_rate_fn: ``(round_index, local_step, num_steps) -> rate``; None follows the
        warmup/decay schedule over the global step ``round_index * num_steps + local_step``.
    """
    optimizer = local_optimizer(config)

    def task_objective(trained, anchor, fixed, base_params, batch, dropout_key):
        client_params = roles_lib.combine(trained, fixed)
        logits = logits_fn(full_params(base_params, client_params), client_params.get("lora", {}),
                           batch, dropout_key)
        loss, (correct, count) = task_loss(logits, batch)
        return loss, (loss, correct, count)

    loss_fn = task_objective if objective is None else objective(task_objective, roles)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if learning_rate_fn is None:
        def learning_rate_fn(round_index, local_step, num_steps):
            return learning_rate_at(round_index * num_steps + local_step, total_steps, config)

    def client_update(base_params, client_state, batches, key, round_index):
        client_params = client_state["params"]
        trained = roles_lib.select(client_params, roles, roles_lib.SHARED, roles_lib.PERSONAL)
        fixed = roles_lib.select(client_params, roles, roles_lib.FROZEN)
        opt_state = optimizer.init(trained) if config.reset_each_round else client_state["opt_state"]
        num_steps = jax.tree.leaves(batches)[0].shape[0]
        anchor = trained
        multipliers = factor_rates(trained, round_index, config)

        def step(carry, inputs):
            trained, opt_state = carry
            batch, step_key, local_step = inputs
            dropout_key = step_key if config.dropout else None
            (_, (loss, correct, count)), grads = grad_fn(trained, anchor, fixed, base_params, batch, dropout_key)
            updates, opt_state = optimizer.update(grads, opt_state, trained)
            rate = learning_rate_fn(round_index, local_step, num_steps)
            trained = jax.tree.map(lambda p, u, m: p + (rate * m) * u, trained, updates, multipliers)
            return (trained, opt_state), (loss * count, correct, count)

        keys = jax.random.split(key, num_steps)
        (trained, opt_state), (loss_sums, correct, counts) = jax.lax.scan(
            step, (trained, opt_state), (batches, keys, jnp.arange(num_steps)))
        total = jnp.maximum(counts.sum(), 1.0)
        metrics = {"train_loss": loss_sums.sum() / total, "train_accuracy": correct.sum() / total}
        new_state = {"params": roles_lib.combine(trained, fixed), "opt_state": opt_state}
        return new_state, metrics

    return client_update


def make_evaluate(logits_fn: LogitsFn, chunk_size: int) -> Callable:
    """Builds ``evaluate(base_params, client_params, examples) -> {"loss", "correct", "count"}``
    for one client's examples ``[n, ...]``, processed in chunks of ``chunk_size``."""

    def evaluate(base_params, client_params, examples):
        n = examples["labels"].shape[0]
        size = min(chunk_size, n)
        chunks = -(-n // size)

        def pad(x):
            # Padded rows carry example_mask 0 and so do not count.
            return jnp.pad(x, [(0, chunks * size - n)] + [(0, 0)] * (x.ndim - 1))

        chunked = jax.tree.map(lambda x: pad(x).reshape(chunks, size, *x.shape[1:]), examples)
        params = full_params(base_params, client_params)

        def body(_, batch):
            logits = logits_fn(params, client_params.get("lora", {}), batch, None)
            loss, (correct, count) = task_loss(logits, batch)
            return None, (loss * count, correct, count)

        _, (loss_sums, correct, counts) = jax.lax.scan(body, None, chunked)
        return {"loss": loss_sums.sum(), "correct": correct.sum(), "count": counts.sum()}

    return evaluate

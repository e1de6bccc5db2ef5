"""Central projector pre-alignment for the VLM (LLaVA's stage 1), before federation.

A projector trained from scratch inside federated rounds sees a few dozen images per
client, mostly of one or two classes, so it learns each client's label prior rather than
the images. LLaVA first trains the projector alone, centrally, on public image-text pairs
(the ViT and the decoder frozen, no adapters), then fine-tunes. This module does that
stage on images that no client holds; every client then starts from the aligned projector.
It is deterministic in ``key`` and the examples, so every process of a multi-process run
computes the same projector without communicating.
"""

from __future__ import annotations

import logging
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from celora_jax.federated import client as client_lib

logger = logging.getLogger(__name__)


def public_rows(num_rows: int, used: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` dataset rows (sorted) drawn without replacement from those not in ``used``
    (the clients' train and test rows and the global test set)."""
    free = np.setdiff1d(np.arange(num_rows), used)
    if count > len(free):
        raise ValueError(f"projector alignment needs {count} images that no client holds; only {len(free)} "
                         "are left (lower model.align_examples or the clients' examples)")
    return np.sort(np.random.default_rng(seed).choice(free, count, replace=False))


def align_projector(logits_fn: client_lib.LogitsFn, params: Mapping, examples: Mapping[str, np.ndarray], *,
                    steps: int, batch_size: int, learning_rate: float, key: jax.Array,
                    progress: bool = False) -> tuple[dict, dict]:
    """Trains ``params["projector"]`` alone on the answer loss of ``examples``.

    Args:
      logits_fn: the VLM's ``logits_fn(params, lora, batch, dropout_key)``; called with no
        adapters.
      params: the VLM's parameters ``{"projector", "decoder"}``; only the projector changes.
      examples: packed instruction examples with ``image_tokens`` (``[n, ...]`` each).
      steps: AdamW steps, each on ``batch_size`` examples drawn without replacement per epoch.
      learning_rate: peak of a linear warmup (first 10%) and cosine decay.
      key: PRNG key of the batch order.

    Returns:
      ``(projector, record)``; the record holds the mean answer loss and teacher-forced exact
      match (= greedy exact match) over the first and the last 10% of steps.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"projector alignment needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    n = len(examples["input_ids"])
    if n < batch_size:
        raise ValueError(f"projector alignment has {n} examples, fewer than one batch of {batch_size}")
    # The frozen decoder is an argument, not a closure constant: captured, its weights were
    # baked into the program (SmolLM2: a 650 MB program, 25 s to compile against 1.6 s, 218 s
    # with the compilation cache writing it).
    frozen = jax.tree.map(jnp.asarray, {name: value for name, value in params.items() if name != "projector"})
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 10, 1), steps)
    optimizer = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(projector, frozen, batch):
        logits = logits_fn({**frozen, "projector": projector}, {}, batch, None)
        return client_lib.task_loss(logits, batch)

    @jax.jit
    def step(projector, opt_state, frozen, batch):
        (loss, (correct, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(projector, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, projector)
        return optax.apply_updates(projector, updates), opt_state, loss, correct / count

    projector = jax.tree.map(jnp.asarray, params["projector"])
    opt_state = optimizer.init(projector)
    order = np.asarray(jax.random.permutation(key, n))
    per_epoch = n // batch_size
    losses, matches = [], []
    indices = range(steps)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="projector alignment", unit="step")
    for index in indices:
        epoch, position = divmod(index, per_epoch)
        if position == 0 and epoch:
            order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        rows = order[position * batch_size:(position + 1) * batch_size]
        batch = {name: jnp.asarray(value[rows]) for name, value in examples.items()}
        batch["example_mask"] = jnp.ones(batch_size, jnp.float32)
        projector, opt_state, loss, match = step(projector, opt_state, frozen, batch)
        losses.append(float(loss))
        matches.append(float(match))
        if progress and (index + 1) % 10 == 0:
            indices.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", exact=f"{np.mean(matches[-10:]):.2f}")
    tenth = max(steps // 10, 1)
    record = {"steps": steps, "examples": n, "batch_size": batch_size, "learning_rate": learning_rate,
              "first_loss": float(np.mean(losses[:tenth])), "last_loss": float(np.mean(losses[-tenth:])),
              "first_exact_match": float(np.mean(matches[:tenth])),
              "last_exact_match": float(np.mean(matches[-tenth:]))}
    logger.info("projector alignment: %d steps on %d public images, answer loss %.3f -> %.3f, exact match "
                "%.1f%% -> %.1f%%", steps, n, record["first_loss"], record["last_loss"],
                100 * record["first_exact_match"], 100 * record["last_exact_match"])
    return jax.device_get(projector), record

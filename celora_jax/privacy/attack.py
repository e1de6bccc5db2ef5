"""Gradient inversion (DLG / inverting-gradients style) against federated text classifiers.

The attacker observes one client's gradient for one batch, restricted to the parameters
that client sends (LoRA's A and B, CE-LoRA's cores, or every weight), and optimizes dummy
input embeddings and soft labels so that *their* gradient matches the observed one
(METHOD.md §8). Recovered embeddings are mapped to the nearest token of the embedding
table. Restarts are batched with ``vmap`` and the whole optimization is one ``lax.scan``
under ``jit``.

The victim model is given as ``gradient_fn(inputs_embeds [B, T, d], soft_labels [B, C],
weights) -> gradient pytree``: the same function serves the victim (with its true weights,
on the embeddings of its real tokens and one-hot labels) and the attacker (with what it
believes the weights are). :func:`classifier_gradient_fn` builds it for our
``SequenceClassifier``; the threat settings differ only in which weights the attacker
passes and which gradient leaves it sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any
# gradient_fn(inputs_embeds [B, T, d], soft_labels [B, C], weights) -> gradient pytree.
GradientFn = Callable[[Array, Array, PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Optimization budget of the attacker (the same for every threat setting).

    Attributes:
      steps: Adam steps per restart.
      learning_rate: Adam step size (cosine-decayed to 0 over ``steps``).
      restarts: independent random initializations, run together with ``vmap``; the one
        with the lowest final matching loss is reported.
      cosine_weight: weight of 1 − cos(g_dummy, g_observed) (inverting gradients).
      l2_weight: weight of ‖g_dummy − g_observed‖² / ‖g_observed‖² (DLG).
      init_scale: dummy embeddings start as N(0, init_scale²) times the mean norm of the
        embedding table rows (the attacker knows the public model).
    """

    steps: int = 300
    learning_rate: float = 0.1
    restarts: int = 4
    cosine_weight: float = 1.0
    l2_weight: float = 0.0
    init_scale: float = 1.0

    def __post_init__(self):
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.cosine_weight < 0 or self.l2_weight < 0 or self.cosine_weight + self.l2_weight == 0:
            raise ValueError("cosine_weight and l2_weight must be >= 0 and not both 0")


class AttackResult(NamedTuple):
    """What the attacker recovers (best restart).

    Attributes:
      embeddings: [B, T, d] recovered input embeddings.
      label_logits: [B, C] recovered soft labels (logits).
      tokens: [B, T] nearest token of every recovered embedding (see :func:`nearest_tokens`).
      positions: [B, T] the position each recovered embedding most likely came from.
      matching_loss: final gradient-matching loss of the best restart.
      restart_losses: [restarts] final loss of every restart.
    """

    embeddings: Array
    label_logits: Array
    tokens: Array
    positions: Array
    matching_loss: Array
    restart_losses: Array


def _flat(tree: PyTree) -> Array:
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def matching_loss(candidate: PyTree, observed: PyTree, config: AttackConfig) -> Array:
    """cosine_weight · (1 − cos) + l2_weight · relative squared L2 between two gradients."""
    a, b = _flat(candidate), _flat(observed)
    norm_b = jnp.sqrt(jnp.sum(b * b))
    cosine = jnp.sum(a * b) / (jnp.sqrt(jnp.sum(a * a)) * norm_b + 1e-12)
    l2 = jnp.sum((a - b) ** 2) / (norm_b ** 2 + 1e-12)
    return config.cosine_weight * (1.0 - cosine) + config.l2_weight * l2


def _centered_unit(x: Array) -> Array:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_tokens(embeddings: Array, table: Array, offsets: Array | None = None) -> tuple[Array, Array]:
    """The (token, position) pair whose model input is closest to each recovered embedding.

    A BERT-style model normalizes ``word + position + type`` embeddings with a LayerNorm
    first, so its gradients only determine ``LayerNorm(e + offset_t)``: any e' with
    e' + offset_t = λ (e + offset_t) + c gives the same gradient. Beyond that, without a
    causal mask the network is permutation-equivariant in its normalized inputs, so a dummy
    embedding at slot t can stand for the token at any position s (e' = w + offset_s −
    offset_t): gradients reveal the *set* of (token, position) inputs, not which slot holds
    which. Each recovered embedding is therefore matched against every token at every
    position: the cosine between mean-centred ``e + offset_t`` and ``table + offset_s``,
    maximized over (token, s). ``offsets [T, d]`` are the position plus token-type
    embeddings; None compares with the bare table rows at the slot's own position.

    Returns:
      ``(tokens [B, T], positions [B, T])``: for each recovered slot its token and the
      position it most likely came from.
    """
    batch, length, _ = embeddings.shape
    if offsets is None:
        offsets = jnp.zeros(embeddings.shape[-2:], embeddings.dtype)
        candidates = jnp.zeros((1, embeddings.shape[-1]), embeddings.dtype)
    else:
        candidates = offsets
    recovered = _centered_unit(embeddings + offsets[None])  # [B, T, d]

    def per_position(offset):
        similarity = recovered @ _centered_unit(table + offset).T  # [B, T, V]
        return jnp.max(similarity, axis=-1), jnp.argmax(similarity, axis=-1).astype(jnp.int32)

    best, tokens = jax.lax.map(per_position, candidates)  # [P, B, T] each
    position = jnp.argmax(best, axis=0)  # [B, T]
    tokens = jnp.take_along_axis(tokens, position[None], axis=0)[0]
    if candidates.shape[0] == 1:
        position = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return tokens, position.astype(jnp.int32)


def invert_gradients(gradient_fn: GradientFn, observed: PyTree, weights: PyTree, shape: tuple[int, int, int],
                     num_classes: int, embedding_table: Array, key: Array,
                     config: AttackConfig = AttackConfig(), offsets: Array | None = None) -> AttackResult:
    """Recovers a batch's input embeddings and labels from its observed gradient.

    Args:
      gradient_fn: the victim's gradient as a function of inputs (see module docstring).
      observed: the gradient the attacker intercepted.
      weights: the weights the attacker believes the client used (true or guessed).
      shape: (B, T, d) of the inputs to recover (batch size and length are assumed known).
      num_classes: C.
      embedding_table: [vocab, d], public; sets the init scale and maps results to tokens.
      key: PRNG key of the random initializations.
      config: optimization budget.
      offsets: ``[T, d]`` embeddings added to the token embedding before the model's first
        LayerNorm (position + token type), for decoding; see :func:`nearest_tokens`.

    Returns:
      AttackResult of the restart with the lowest final matching loss.
    """
    batch, length, width = shape
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
    optimizer = optax.adam(schedule)

    # One program for all restarts and the decoding: run eagerly, the vmapped restarts
    # dispatch (and compile) every op outside the scan on its own, hundreds of programs
    # per call. The weights are arguments, not closure constants baked into the program.
    def restarts(observed, weights, embedding_table, offsets, key):
        row_norm = jnp.mean(jnp.linalg.norm(embedding_table, axis=-1))

        def objective(variables):
            embeds, label_logits = variables
            candidate = gradient_fn(embeds, jax.nn.softmax(label_logits, axis=-1), weights)
            return matching_loss(candidate, observed, config)

        value_and_grad = jax.value_and_grad(objective)

        def one_restart(restart_key):
            key_embed, key_label = jax.random.split(restart_key)
            # Each dummy row gets the typical norm of a real embedding row.
            embeds = (config.init_scale * row_norm / jnp.sqrt(width)
                      * jax.random.normal(key_embed, (batch, length, width)))
            variables = (embeds, jax.random.normal(key_label, (batch, num_classes)))
            state = optimizer.init(variables)

            def step(carry, _):
                variables, state = carry
                loss, grads = value_and_grad(variables)
                updates, state = optimizer.update(grads, state, variables)
                return (optax.apply_updates(variables, updates), state), loss

            (variables, _), _ = jax.lax.scan(step, (variables, state), None, length=config.steps)
            return variables, objective(variables)

        (embeds, label_logits), losses = jax.vmap(one_restart)(jax.random.split(key, config.restarts))
        best = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))
        embeds, label_logits = embeds[best], label_logits[best]
        tokens, positions = nearest_tokens(embeds, embedding_table, offsets)
        return embeds, label_logits, tokens, positions, losses[best], losses

    embeds, label_logits, tokens, positions, best_loss, losses = jax.jit(restarts)(
        observed, weights, embedding_table, offsets, key)
    return AttackResult(embeds, label_logits, tokens, positions, best_loss, losses)


def recovery_metrics(true_tokens: np.ndarray, recovered_tokens: np.ndarray, mask: np.ndarray,
                     true_labels: np.ndarray, label_logits: np.ndarray,
                     recovered_positions: np.ndarray | None = None,
                     true_embeddings: np.ndarray | None = None, recovered_embeddings: np.ndarray | None = None,
                     offsets: np.ndarray | None = None, ignore_tokens: tuple[int, ...] = ()) -> dict[str, float]:
    """How much of the batch the attacker got back.

    * ``token_recovery``: position-free: the fraction of the real tokens (multiset over the
      batch's unpadded positions) that appear among the recovered tokens.
    * ``token_accuracy``: in position: the fraction of real positions whose token the
      attacker placed there (a recovered slot claims the position in
      ``recovered_positions``, by default its own slot).
    * ``label_accuracy``: argmax of the recovered soft label == real label.
    * ``embedding_cosine`` (when embeddings are given): for every recovered slot, the best
      cosine between its model input and a real input of the same example, in the
      LayerNorm-invariant space of :func:`nearest_tokens` (mean-centred, plus ``offsets``).

    Real positions holding a token in ``ignore_tokens`` (e.g. [CLS] and [SEP], which every
    example has at known places) are left out of every metric.
    """
    mask = (np.asarray(mask) > 0) & ~np.isin(np.asarray(true_tokens), np.asarray(ignore_tokens, np.int64))
    true_tokens, recovered_tokens = np.asarray(true_tokens), np.asarray(recovered_tokens)
    real = true_tokens[mask].tolist()
    pool: dict[int, int] = {}
    for token in recovered_tokens[mask].tolist():
        pool[token] = pool.get(token, 0) + 1
    found = 0
    for token in real:
        if pool.get(token, 0) > 0:
            pool[token] -= 1
            found += 1
    batch, length = true_tokens.shape
    if recovered_positions is None:
        recovered_positions = np.broadcast_to(np.arange(length), (batch, length))
    placed = np.zeros_like(mask)
    for b in range(batch):
        for slot in range(length):
            position = int(recovered_positions[b, slot])
            if mask[b, slot] and mask[b, position] and recovered_tokens[b, slot] == true_tokens[b, position]:
                placed[b, position] = True
    metrics = {}
    if true_embeddings is not None and recovered_embeddings is not None:
        shift = 0.0 if offsets is None else np.asarray(offsets)[None]
        real_inputs = np.asarray(_centered_unit(jnp.asarray(np.asarray(true_embeddings) + shift)))
        found_inputs = np.asarray(_centered_unit(jnp.asarray(np.asarray(recovered_embeddings) + shift)))
        best = [np.max(found_inputs[b][mask[b]] @ real_inputs[b][mask[b]].T, axis=1)
                for b in range(batch) if mask[b].any()]
        metrics["embedding_cosine"] = float(np.mean(np.concatenate(best)))
    return {
        **metrics,
        "token_recovery": found / max(len(real), 1),
        "token_accuracy": float(placed[mask].mean()) if mask.any() else 0.0,
        "label_accuracy": float(np.mean(np.argmax(label_logits, -1) == np.asarray(true_labels))),
    }


def classifier_gradient_fn(model, input_ids_shape: tuple[int, int], attention_mask: Array,
                           observed: Callable[[Mapping], PyTree]) -> GradientFn:
    """``gradient_fn`` for a :class:`celora_jax.models.bert.SequenceClassifier`.

    Args:
      model: the classifier (dropout off).
      input_ids_shape: (B, T); the token ids are replaced by ``inputs_embeds``.
      attention_mask: [B, T], assumed known to the attacker (sequence lengths).
      observed: picks the observed leaves from ``weights`` = ``{"params": ..., "lora": ...}``
        (e.g. every "A" and "B" of the adapters, or every "C"); the gradient is taken
        with respect to exactly those.

    Returns:
      ``gradient_fn(inputs_embeds, soft_labels, weights)``: the gradient of the mean
      soft-label cross-entropy with respect to ``observed(weights)``.
    """
    dummy_ids = jnp.zeros(input_ids_shape, jnp.int32)

    def gradient_fn(inputs_embeds, soft_labels, weights):
        def loss(observed_leaves):
            variables = _replace(weights, observed(weights), observed_leaves)
            logits = model.apply(variables, dummy_ids, attention_mask, inputs_embeds=inputs_embeds)
            return jnp.mean(optax.softmax_cross_entropy(logits, soft_labels))

        return jax.grad(loss)(observed(weights))

    return gradient_fn


def _replace(weights: Mapping, selected: PyTree, values: PyTree) -> dict:
    """``weights`` with the leaves in ``selected`` (a sub-pytree picked from it) set to ``values``."""
    from flax import traverse_util

    flat = dict(traverse_util.flatten_dict(dict(weights)))
    for path, value in traverse_util.flatten_dict(values).items():
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def classifier_offsets(params: Mapping, length: int) -> Array:
    """``[T, d]`` position + token-type-0 embeddings of a BERT classifier's parameters."""
    embeddings = params["backbone"]["embeddings"]
    return (embeddings["position_embeddings"]["embedding"][:length]
            + embeddings["token_type_embeddings"]["embedding"][0])

"""Per-class diagonal Gaussian mixtures: the one-time client data statistic (METHOD.md §3).

Each client embeds its training examples with the frozen backbone and, for every class c
with n_c examples, fits a mixture of G = min(max_components, n_c) diagonal Gaussians
(k-means++ seeded k-means init, reg_covar 1e-5, max_iter 200, tol 1e-3, mirroring
scikit-learn's ``GaussianMixture(covariance_type="diag")``). Only the mixture parameters
and n_c leave the client.

Everything is one jitted program, ``vmap``ped over clients and classes. Ragged data is
handled with masks: features are padded to ``[clients, examples, dim]``, a point mask says
which rows are real, and a component mask says which of the ``max_components`` mixture
slots a class actually uses.

    stats = fit_class_mixtures(features, labels, mask, num_classes=2, key=key)
    stats.means        # [clients, classes, components, dim]

**[decided]** A class with a single example gets one component centred on it with variance
reg_covar (what scikit-learn returns for one sample); a class with no example has
``class_counts == 0`` and an all-False component mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


class ClassMixtures(NamedTuple):
    """The data statistic uploaded once by every client (a pytree of arrays).

    Slots of absent components hold weight 0, mean 0 and variance 1 so that downstream
    code never sees NaN; always combine with ``component_mask``.

    Attributes:
      weights: [clients, classes, components] mixture weights, summing to 1 over the
        present components of a present class.
      means: [clients, classes, components, dim] component means.
      variances: [clients, classes, components, dim] diagonal variances (reg_covar added).
      class_counts: [clients, classes] n_c, the number of examples of each class (float).
      component_mask: [clients, classes, components] bool, True for fitted components.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import fit_class_mixtures
      >>> features = jax.random.normal(jax.random.key(0), (3, 20, 4))   # 3 clients, 20 examples
      >>> labels = jnp.tile(jnp.arange(20) % 2, (3, 1))
      >>> stats = fit_class_mixtures(features, labels, None, 2, jax.random.key(1))
      >>> stats.means.shape, stats.class_counts[0].tolist()
      ((3, 2, 3, 4), [10.0, 10.0])
    """

    weights: Array
    means: Array
    variances: Array
    class_counts: Array
    component_mask: Array


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """How each per-class mixture is fitted (defaults follow METHOD.md §3 / scikit-learn).

    Attributes:
      max_components: G_max; a class with n_c examples gets min(G_max, n_c) components.
      reg_covar: added to every diagonal variance, as scikit-learn does (keeps the
        likelihood bounded when a component collapses onto few points).
      max_iter: EM iterations at most.
      tol: EM stops when the mean log-likelihood per example changes by less than this.
      kmeans_max_iter: Lloyd iterations at most for the k-means init (stops earlier once
        assignments no longer change).
      n_local_trials: candidates drawn per greedy k-means++ step; None means
        2 + floor(log G_max), scikit-learn's default.
      client_batch_size: None fits all clients in one vmap; an integer fits them in
        sequential batches of that many clients (``lax.map``) to bound memory, since each
        (client, class) pair works on the client's full padded example array.

    Examples:
      >>> from celora_jax import MixtureConfig
      >>> MixtureConfig(max_components=2).local_trials   # 2 + floor(log 2)
      2
      >>> MixtureConfig(max_components=0)
      Traceback (most recent call last):
      ...
      ValueError: max_components must be a positive integer, got 0
    """

    max_components: int = 3
    reg_covar: float = 1e-5
    max_iter: int = 200
    tol: float = 1e-3
    kmeans_max_iter: int = 100
    n_local_trials: int | None = None
    client_batch_size: int | None = None

    def __post_init__(self):
        for name in ("max_components", "max_iter", "kmeans_max_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.reg_covar >= 0.0 and math.isfinite(self.reg_covar)):
            raise ValueError(f"reg_covar must be finite and >= 0, got {self.reg_covar!r}")
        if not (self.tol > 0.0):
            raise ValueError(f"tol must be > 0, got {self.tol!r}")
        if self.n_local_trials is not None and self.n_local_trials < 1:
            raise ValueError(f"n_local_trials must be >= 1, got {self.n_local_trials!r}")
        if self.client_batch_size is not None and self.client_batch_size < 1:
            raise ValueError(f"client_batch_size must be >= 1, got {self.client_batch_size!r}")

    @property
    def local_trials(self) -> int:
        if self.n_local_trials is not None:
            return self.n_local_trials
        return 2 + int(math.log(self.max_components))


class _Params(NamedTuple):
    weights: Array  # [G]
    means: Array  # [G, D]
    variances: Array  # [G, D]


def _sq_dist(x: Array, x_sq: Array, centers: Array) -> Array:
    """Squared distances [M, C] via |x|² − 2x·c + |c|² (never materializes [M, C, D])."""
    cross = jnp.matmul(x, centers.T, precision=jax.lax.Precision.HIGHEST)
    c_sq = jnp.sum(centers * centers, axis=-1)
    return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _kmeans_plusplus(x, x_sq, point_mask, key, num_slots: int, trials: int) -> Array:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's variant).

    Draws centres among masked-in points only. Returns [num_slots, D]; slots beyond the
    class's component count are filled too but are never used.
    """
    valid_logits = jnp.where(point_mask, 0.0, -jnp.inf)
    key, sub = jax.random.split(key)
    first = jax.random.categorical(sub, valid_logits)
    centers = [x[first]]
    closest = jnp.where(point_mask, _sq_dist(x, x_sq, x[first][None])[:, 0], 0.0)
    for _ in range(1, num_slots):
        potential = jnp.sum(closest)
        # D² sampling; if every point coincides with a centre, fall back to uniform.
        logits = jnp.where(
            potential > 0.0,
            jnp.where(closest > 0.0, jnp.log(jnp.where(closest > 0.0, closest, 1.0)), -jnp.inf),
            valid_logits,
        )
        key, sub = jax.random.split(key)
        candidates = jax.random.categorical(sub, logits, shape=(trials,))
        dist = _sq_dist(x, x_sq, x[candidates])  # [M, trials]
        dist = jnp.where(point_mask[:, None], jnp.minimum(closest[:, None], dist), 0.0)
        best = jnp.argmin(jnp.sum(dist, axis=0))
        centers.append(x[candidates[best]])
        closest = dist[:, best]
    return jnp.stack(centers)


def _kmeans_labels(x, x_sq, point_mask, slot_mask, centers, max_iter: int) -> Array:
    """Lloyd iterations from the seeded centres; returns the final labels [M]."""

    def assign(c):
        d = jnp.where(slot_mask[None, :], _sq_dist(x, x_sq, c), jnp.inf)
        return jnp.argmin(d, axis=-1)

    def update(labels, c):
        onehot = jax.nn.one_hot(labels, c.shape[0], dtype=x.dtype) * point_mask[:, None]
        counts = jnp.sum(onehot, axis=0)
        sums = jnp.matmul(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
        # An emptied cluster keeps its previous centre.
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    def cond(carry):
        it, _, _, changed = carry
        return (it < max_iter) & changed

    def body(carry):
        it, c, labels, _ = carry
        c = update(labels, c)
        new_labels = assign(c)
        changed = jnp.any((new_labels != labels) & point_mask)
        return it + 1, c, new_labels, changed

    labels = assign(centers)
    _, _, labels, _ = jax.lax.while_loop(cond, body, (0, centers, labels, jnp.array(True)))
    return labels


def _m_step(x, resp, n, reg_covar: float) -> _Params:
    """Weighted means/variances from responsibilities [M, G] (scikit-learn's formulas)."""
    # scikit-learn adds 10·eps(float64) to avoid 0/0 for empty components. The float32 eps
    # would bias every variance by ~1e-6·x² (well above reg_covar for point-like
    # components), so keep the float64 constant: it vanishes next to any real count.
    nk = jnp.sum(resp, axis=0) + 10.0 * float(jnp.finfo(jnp.float64).eps)
    means = jnp.matmul(resp.T, x, precision=jax.lax.Precision.HIGHEST) / nk[:, None]
    avg_x2 = jnp.matmul(resp.T, x * x, precision=jax.lax.Precision.HIGHEST) / nk[:, None]
    # float32 cancellation can make E[x²] − μ² slightly negative; x is centred per class
    # beforehand to keep that error far below reg_covar.
    variances = jnp.maximum(avg_x2 - means * means, 0.0) + reg_covar
    return _Params(weights=nk / n, means=means, variances=variances)


def _log_gaussian(x, params: _Params) -> Array:
    """log N(x | μ_g, diag σ²_g) for all points and components, [M, G]."""
    precision = 1.0 / params.variances  # [G, D]
    quad = (
        jnp.matmul(x * x, precision.T, precision=jax.lax.Precision.HIGHEST)
        - 2.0 * jnp.matmul(x, (params.means * precision).T, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(params.means**2 * precision, axis=-1)[None, :]
    )
    log_det = jnp.sum(jnp.log(params.variances), axis=-1)
    dim = x.shape[-1]
    return -0.5 * (dim * _LOG_2PI + log_det[None, :] + jnp.maximum(quad, 0.0))


def _e_step(x, weight, slot_mask, n, params: _Params):
    log_w = jnp.where(slot_mask, jnp.log(jnp.where(slot_mask, params.weights, 1.0)), -jnp.inf)
    joint = _log_gaussian(x, params) + log_w[None, :]
    log_norm = jax.nn.logsumexp(joint, axis=-1)  # [M]
    log_resp = joint - log_norm[:, None]
    mean_log_likelihood = jnp.sum(weight * log_norm) / n
    return mean_log_likelihood, log_resp


def _fit_one(x: Array, point_mask: Array, key: Array, config: MixtureConfig):
    """Fits one class of one client: x [M, D] (all the client's rows), point_mask [M]."""
    num_slots = config.max_components
    weight = point_mask.astype(x.dtype)
    count = jnp.sum(weight)
    n = jnp.maximum(count, 1.0)
    # Centre on the class mean: the variance formula E[x²] − μ² then loses no precision
    # to a large common offset (features of pooled encoders are far from the origin).
    offset = jnp.matmul(weight, x, precision=jax.lax.Precision.HIGHEST) / n
    x = jnp.where(point_mask[:, None], x - offset, 0.0)
    x_sq = jnp.sum(x * x, axis=-1)

    num_components = jnp.minimum(num_slots, count).astype(jnp.int32)
    component_mask = jnp.arange(num_slots) < num_components
    # Empty classes still run (vmap), on one dummy slot, and are masked out at the end.
    slot_mask = jnp.arange(num_slots) < jnp.maximum(num_components, 1)

    centers = _kmeans_plusplus(x, x_sq, point_mask, key, num_slots, config.local_trials)
    labels = _kmeans_labels(x, x_sq, point_mask, slot_mask, centers, config.kmeans_max_iter)
    resp = jax.nn.one_hot(labels, num_slots, dtype=x.dtype) * weight[:, None]
    params = _m_step(x, resp, n, config.reg_covar)

    # EM exactly as scikit-learn's BaseMixture.fit: E-step, M-step, stop on |Δ lower bound| < tol.
    def cond(carry):
        it, _, converged, _ = carry
        return (it < config.max_iter) & ~converged

    def body(carry):
        it, lower_bound, _, params = carry
        new_bound, log_resp = _e_step(x, weight, slot_mask, n, params)
        params = _m_step(x, jnp.exp(log_resp) * weight[:, None], n, config.reg_covar)
        return it + 1, new_bound, jnp.abs(new_bound - lower_bound) < config.tol, params

    init = (0, jnp.array(-jnp.inf, x.dtype), jnp.array(False), params)
    _, _, _, params = jax.lax.while_loop(cond, body, init)

    weights = jnp.where(component_mask, params.weights, 0.0)
    weights = weights / jnp.maximum(jnp.sum(weights), jnp.finfo(x.dtype).tiny)
    means = jnp.where(component_mask[:, None], params.means + offset, 0.0)
    variances = jnp.where(component_mask[:, None], params.variances, 1.0)
    return weights, means, variances, count, component_mask


def _fit_client(features, class_masks, keys, config):
    # features [M, D]; class_masks [K, M]; keys [K]
    return jax.vmap(_fit_one, in_axes=(None, 0, 0, None))(features, class_masks, keys, config)


def _fit_impl(features, labels, mask, key, first_client, num_classes: int, config: MixtureConfig) -> ClassMixtures:
    num_clients = features.shape[0]
    features = jnp.where(mask[..., None], features, 0.0)  # padding may hold anything
    classes = jnp.arange(num_classes)
    class_masks = mask[:, None, :] & (labels[:, None, :] == classes[None, :, None])  # [N, K, M]
    # Keys follow the global client index, so fitting any subset of clients (one process's
    # share) reproduces exactly those clients' fits.
    client_ids = first_client + jnp.arange(num_clients)
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), num_classes))(client_ids)
    fit = lambda args: _fit_client(*args, config)  # noqa: E731
    if config.client_batch_size is None:
        out = jax.vmap(fit)((features, class_masks, keys))
    else:
        out = jax.lax.map(fit, (features, class_masks, keys), batch_size=config.client_batch_size)
    weights, means, variances, counts, component_mask = out
    return ClassMixtures(weights, means, variances, counts, component_mask)


_fit_jit = jax.jit(_fit_impl, static_argnames=("num_classes", "config"))


def fit_class_mixtures(
    features: Array,
    labels: Array,
    mask: Array | None,
    num_classes: int,
    key: Array,
    config: MixtureConfig = MixtureConfig(),
    first_client: int = 0,
) -> ClassMixtures:
    """Fits a diagonal Gaussian mixture per (client, class), all in one jitted call.

    Args:
      features: [clients, examples, dim] frozen-backbone embeddings, padded.
      labels: [clients, examples] integer class ids in [0, num_classes); ids outside that
        range are ignored.
      mask: [clients, examples] bool, True for real examples; None means all are real.
      num_classes: K (static).
      key: a ``jax.random`` key; each (client, class) gets its own subkey for k-means++.
      config: fitting options.
      first_client: global index of the first client in ``features``: each client's fit
        depends only on ``key`` and its global index, so fitting a subset of clients (one
        process's share) gives the same result as fitting them with everyone.

    Returns:
      ClassMixtures with weights [N, K, G], means/variances [N, K, G, D],
      class_counts [N, K], component_mask [N, K, G], where G = config.max_components.

    Raises:
      ValueError: on inconsistent shapes or a non-positive num_classes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import MixtureConfig, fit_class_mixtures
      >>> key_a, key_b = jax.random.split(jax.random.key(0))
      >>> features = jnp.concatenate([jax.random.normal(key_a, (1, 30, 2)) - 5,
      ...                             jax.random.normal(key_b, (1, 30, 2)) + 5], axis=1)
      >>> labels = jnp.zeros((1, 60), int)          # one client, one class, two clusters
      >>> stats = fit_class_mixtures(features, labels, None, 1, jax.random.key(2),
      ...                            MixtureConfig(max_components=2))
      >>> sorted(round(float(m)) for m in stats.means[0, 0, :, 0])
      [-5, 5]
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if features.ndim != 3:
        raise ValueError(f"features must be [clients, examples, dim], got shape {features.shape}")
    if labels.shape != features.shape[:2]:
        raise ValueError(f"labels must have shape {features.shape[:2]}, got {labels.shape}")
    if mask is None:
        mask = jnp.ones(features.shape[:2], dtype=bool)
    if mask.shape != features.shape[:2]:
        raise ValueError(f"mask must have shape {features.shape[:2]}, got {mask.shape}")
    features = jnp.asarray(features)
    if not jnp.issubdtype(features.dtype, jnp.floating):
        features = features.astype(jnp.float32)
    return _fit_jit(features, jnp.asarray(labels), jnp.asarray(mask, dtype=bool), key,
                    jnp.int32(first_client), num_classes, config)


def score_samples(weights: Array, means: Array, variances: Array, component_mask: Array, x: Array) -> Array:
    """Log-density of one mixture at points x, like scikit-learn's ``score_samples``.

    Args:
      weights: [G]; means, variances: [G, D]; component_mask: [G] bool.
      x: [M, D].

    Returns:
      [M] log p(x).
    """
    chex.assert_rank([weights, means, variances, component_mask, x], [1, 2, 2, 1, 2])
    # Direct (x − μ)² form: exact in float32, fine for evaluation-sized inputs.
    diff = x[:, None, :] - means[None, :, :]  # [M, G, D]
    log_gauss = -0.5 * (
        x.shape[-1] * _LOG_2PI
        + jnp.sum(jnp.log(variances), axis=-1)[None, :]
        + jnp.sum(diff * diff / variances[None], axis=-1)
    )
    log_w = jnp.where(component_mask, jnp.log(jnp.where(component_mask, weights, 1.0)), -jnp.inf)
    return jax.nn.logsumexp(log_gauss + log_w[None, :], axis=-1)

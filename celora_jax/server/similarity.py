"""Client-to-client distances for personalized aggregation (METHOD.md §3, §4).

Two [clients, clients] matrices, both symmetric with a zero diagonal:

* ``data_distance``: squared MMD between the clients' label-weighted diagonal Gaussian
  mixtures (the one-time statistic of :mod:`celora_jax.server.gmm`) under a Gaussian kernel,
  in closed form. It depends only on the statistics, so compute it once and pass it to
  every round's :func:`celora_jax.server.aggregation.server_step`.
* ``parameter_distance``: 1 − cos between the stacked core updates vec(C_i − C⁰), every
  round (C⁰: where the cores started, the identity by default).

``data_distance(..., class_conditional=True)`` is our extension beyond METHOD.md: the MMD of
the clients' joint distributions of (features, label) under the product kernel
k(x, x')·[y = y'], i.e. inner products Σ_c π_i(c) π_j(c) ⟨P_ic, P_jc⟩ between the per-class
mixtures. The marginal distance compares only Σ_c π_i(c) P_ic, so it cannot see clients
that give the same texts different labels (concept shift); the class-conditional one can.

Kernel expectation for two diagonal Gaussians, bandwidth ℓ (σ² = σ²_1d + σ²_2d):

    E k(x, y) = Π_d (ℓ² / (ℓ² + σ²))^{1/2} · exp(−(μ_1d − μ_2d)² / (2(ℓ² + σ²)))

evaluated as a sum of logs over d (the product underflows in float32 for D = 384).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.server.gmm import ClassMixtures

Array = jax.Array

logger = logging.getLogger(__name__)

_HIGHEST = jax.lax.Precision.HIGHEST


def statistic_is_valid(stats: ClassMixtures) -> Array:
    """[clients] bool: the client's statistic is usable (finite, positive variances, data).

    Only present components (component mask and n_c > 0) are checked, so padding slots may
    hold anything. A client with no examples at all is invalid too (its label-weighted
    mixture is undefined).
    """
    present = _present_components(stats)  # [N, K, G]
    finite = (
        jnp.isfinite(stats.weights)
        & (stats.weights >= 0)
        & jnp.all(jnp.isfinite(stats.means), axis=-1)
        & jnp.all(jnp.isfinite(stats.variances) & (stats.variances > 0), axis=-1)
    )
    component_ok = jnp.all(jnp.where(present, finite, True), axis=(1, 2))
    counts_ok = jnp.all(jnp.isfinite(stats.class_counts) & (stats.class_counts >= 0), axis=1)
    total = jnp.sum(jnp.where(jnp.isfinite(stats.class_counts), stats.class_counts, 0.0), axis=1)
    return component_ok & counts_ok & (total > 0)


def _present_components(stats: ClassMixtures) -> Array:
    return stats.component_mask & (stats.class_counts[..., None] > 0)


def _component_weights(stats: ClassMixtures, valid: Array) -> Array:
    """α_icg = π_i(c) · w_icg, zero for absent components and invalid clients, [N, K, G]."""
    present = _present_components(stats) & valid[:, None, None]
    counts = jnp.where(valid[:, None], stats.class_counts, 0.0)
    pi = counts / jnp.maximum(jnp.sum(counts, axis=1, keepdims=True), 1.0)  # [N, K]
    return jnp.where(present, pi[..., None] * stats.weights, 0.0)


def _order_key(values: Array) -> Array:
    """Maps float32 to uint32 so that unsigned integer order equals float order."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
    bits = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
    return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


def _from_order_key(key: Array) -> Array:
    bits = jax.lax.bitcast_convert_type(key ^ jnp.uint32(0x80000000), jnp.int32)
    bits = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kth_smallest(keys: Array, valid: Array, k: Array) -> Array:
    """Exact k-th smallest (0-based) of keys[valid] by bisection on the uint32 key.

    32 fused compare-and-count passes instead of a sort: sorting the 36M pairwise distances
    of N = 1000 clients takes seconds on CPU, this takes a fraction of that.
    """

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(valid & (keys <= mid), dtype=jnp.int32) > k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    return lo


def masked_median(values: Array, valid: Array) -> Array:
    """Exact median of values[valid] (any shape, flattened); 0 when nothing is valid.

    Computed in float32 (the median is one of the inputs, or the mean of two).
    """
    keys = _order_key(values)
    count = jnp.sum(valid, dtype=jnp.int32)
    lo = _kth_smallest(keys, valid, jnp.maximum((count - 1) // 2, 0))
    # The upper middle element equals lo unless fewer than count//2 + 1 keys are <= lo.
    need_next = jnp.sum(valid & (keys <= lo), dtype=jnp.int32) < count // 2 + 1
    next_key = jnp.min(jnp.where(valid & (keys > lo), keys, jnp.uint32(0xFFFFFFFF)))
    hi = jnp.where(need_next, next_key, lo)
    median = 0.5 * (_from_order_key(lo) + _from_order_key(hi))
    return jnp.where(count > 0, median, 0.0)


def median_bandwidth(means: Array, present: Array) -> Array:
    """ℓ² by the median heuristic: median squared distance between component means.

    Args:
      means: [..., D] component means (any leading shape, flattened together).
      present: [...] bool, which means take part (all clients, classes, components).

    Returns:
      Scalar ℓ²; 1.0 when fewer than two means are present or all coincide (the heuristic
      is undefined there and any positive bandwidth gives a valid kernel).
    """
    dim = means.shape[-1]
    flat = jnp.where(present[..., None], means, 0.0).reshape(-1, dim)
    keep = present.reshape(-1)
    # Centre first: |a|² + |b|² − 2a·b loses precision when the means share a large offset.
    centre = jnp.sum(flat, axis=0) / jnp.maximum(jnp.sum(keep), 1)
    flat = jnp.where(keep[:, None], flat - centre, 0.0)
    sq = jnp.sum(flat * flat, axis=-1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(flat, flat.T, precision=_HIGHEST), 0.0)
    pairs = keep[:, None] & keep[None, :] & ~jnp.eye(keep.shape[0], dtype=bool)
    med = masked_median(dist, pairs)
    return jnp.where(med > 0, med, 1.0)


def _log_kernel_expectation(mu_a, var_a, mu_b, var_b) -> Array:
    """log E k(x, y) for x ~ N(mu_a, var_a), y ~ N(mu_b, var_b), all pairs, [A, B].

    Inputs are pre-scaled by the bandwidth (μ/ℓ, σ²/ℓ²), which turns each factor into
    −½[log1p(u) + Δμ² / (1 + u)] with u = σ²_a + σ²_b: no cancellation between D·log ℓ²
    and Σ log(ℓ² + σ²) in float32.
    """
    u = var_a[:, None, :] + var_b[None, :, :]  # [A, B, D], fused into the reduction by XLA
    diff = mu_a[:, None, :] - mu_b[None, :, :]
    return -0.5 * jnp.sum(jnp.log1p(u) + diff * diff / (1.0 + u), axis=-1)


def _band_layout(num_blocks: int):
    """Static indices for computing a symmetric block matrix from a circulant half band.

    Row block b computes column blocks b, b+1, …, b+h (mod num_blocks), h = num_blocks // 2,
    which covers every unordered block pair (the antipodal pair twice when num_blocks is
    even). Returns, for every (row, col) block, where to read it: (source row block, band
    offset, whether to transpose).
    """
    half = num_blocks // 2
    rows, cols = np.meshgrid(np.arange(num_blocks), np.arange(num_blocks), indexing="ij")
    offset = (cols - rows) % num_blocks
    direct = offset <= half
    source = np.where(direct, rows, cols)
    band = np.where(direct, offset, (rows - cols) % num_blocks)
    return half, source, band, direct


def mixture_inner_products(stats: ClassMixtures, bandwidth_sq: Array, valid: Array, block_clients: int = 8,
                           class_conditional: bool = False) -> Array:
    """Gram matrix ⟨P_i, P_j⟩ = E_{x~P_i, y~P_j} k(x, y) of label-weighted mixtures, [N, N]
    (``class_conditional``: only component pairs of the same class count, the joint
    kernel k(x, x')·[c = c']).

    Clients are split into blocks of ``block_clients``; a ``lax.map`` over row blocks
    computes only a circulant half band of column blocks (the matrix is symmetric), so the
    work is ~N²/2 component pairs and memory O(block · N · (K · G)²) rather than O((N·K·G)²).
    """
    num_clients, num_classes, num_slots, dim = stats.means.shape
    slots = num_classes * num_slots
    alpha = _component_weights(stats, valid).reshape(num_clients, slots)
    usable = alpha > 0
    inv_ell = jax.lax.rsqrt(bandwidth_sq)
    mu = jnp.where(usable[..., None], stats.means.reshape(num_clients, slots, dim), 0.0) * inv_ell
    var = jnp.where(usable[..., None], stats.variances.reshape(num_clients, slots, dim), 1.0) * inv_ell**2

    block = max(1, min(block_clients, num_clients))
    num_blocks = -(-num_clients // block)
    padded = num_blocks * block
    half, source, band, direct = _band_layout(num_blocks)
    width = (half + 1) * block  # clients per row block's band of columns

    def blocked(x):  # [N, ...] -> [num_blocks, block · slots, ...] (padding has alpha 0)
        x = jnp.pad(x, [(0, padded - num_clients)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_blocks, block * slots) + x.shape[2:])

    # The barrier keeps the scaling/masking above out of the pairwise fusion (recomputing
    # it per pair would only cost time).
    mu, var, alpha = jax.lax.optimization_barrier((blocked(mu), blocked(var), blocked(alpha)))
    # Columns twice over, so that every band is one contiguous slice.
    mu_cols = jnp.concatenate([mu, mu]).reshape(-1, dim)
    var_cols = jnp.concatenate([var, var]).reshape(-1, dim)
    alpha_cols = jnp.concatenate([alpha, alpha]).reshape(-1)

    def row_block(args):
        index, mu_a, var_a, alpha_a = args
        start = index * block * slots
        mu_b = jax.lax.dynamic_slice_in_dim(mu_cols, start, width * slots)
        var_b = jax.lax.dynamic_slice_in_dim(var_cols, start, width * slots)
        alpha_b = jax.lax.dynamic_slice_in_dim(alpha_cols, start, width * slots)
        k = jnp.exp(_log_kernel_expectation(mu_a, var_a, mu_b, var_b))  # [B·S, W·S]
        k = alpha_a[:, None] * k * alpha_b[None, :]
        k = k.reshape(block, slots, half + 1, block, slots)
        if class_conditional:  # slot s holds a component of class s // num_slots
            slot_class = np.arange(slots) // num_slots
            k = k * (slot_class[:, None, None, None] == slot_class[None, None, None, :])
        k = k.sum(axis=(1, 4))  # [B, h+1, B]
        return k.transpose(1, 0, 2)  # [h+1, B, B]

    bands = jax.lax.map(row_block, (jnp.arange(num_blocks), mu, var, alpha))  # [nb, h+1, B, B]
    tiles = bands[source, band]  # [nb, nb, B, B]
    tiles = jnp.where(direct[:, :, None, None], tiles, tiles.swapaxes(-1, -2))
    gram = tiles.transpose(0, 2, 1, 3).reshape(padded, padded)
    return gram[:num_clients, :num_clients]


def data_distance_traced(stats: ClassMixtures, bandwidth_sq: float | None, block_clients: int,
                         class_conditional: bool = False) -> Array:
    """``data_distance`` without its input checks, for use inside a jitted program."""
    valid = statistic_is_valid(stats)
    # Sanitize so that one corrupt upload cannot poison the bandwidth or other clients' rows.
    present = _present_components(stats) & valid[:, None, None]
    stats = ClassMixtures(
        weights=jnp.where(present, stats.weights, 0.0),
        means=jnp.where(present[..., None], stats.means, 0.0),
        variances=jnp.where(present[..., None], stats.variances, 1.0),
        class_counts=jnp.where(valid[:, None] & jnp.isfinite(stats.class_counts), stats.class_counts, 0.0),
        component_mask=stats.component_mask,
    )
    if bandwidth_sq is None:
        ell_sq = median_bandwidth(stats.means, present)
    else:
        ell_sq = jnp.asarray(bandwidth_sq, stats.means.dtype)
    gram = mixture_inner_products(stats, ell_sq, valid, block_clients, class_conditional)
    self_term = jnp.diag(gram)
    dist = jnp.maximum(self_term[:, None] + self_term[None, :] - 2.0 * gram, 0.0)
    dist = 0.5 * (dist + dist.T)  # block sums are not bitwise symmetric
    dist = jnp.where(jnp.eye(dist.shape[0], dtype=bool), 0.0, dist)
    pair_valid = valid[:, None] & valid[None, :]
    return jnp.where(pair_valid, dist, jnp.nan)


_data_distance_jit = jax.jit(data_distance_traced, static_argnames=("bandwidth_sq", "block_clients",
                                                                  "class_conditional"))


def check_statistics(stats: ClassMixtures, num_clients: int | None = None, name: str = "stats") -> None:
    """Raises ValueError (naming ``name``) when the statistic's shapes are inconsistent."""
    if not isinstance(stats, ClassMixtures):
        raise ValueError(f"{name} must be a gmm.ClassMixtures, got {type(stats).__name__}")
    if stats.means.ndim != 4:
        raise ValueError(f"{name}.means must be [clients, classes, components, dim], got {stats.means.shape}")
    n, k, g, _ = stats.means.shape
    expected = {
        "weights": (n, k, g),
        "variances": stats.means.shape,
        "class_counts": (n, k),
        "component_mask": (n, k, g),
    }
    for field, shape in expected.items():
        got = getattr(stats, field).shape
        if tuple(got) != tuple(shape):
            raise ValueError(f"{name}.{field} must have shape {tuple(shape)}, got {tuple(got)}")
    if num_clients is not None and n != num_clients:
        raise ValueError(f"{name} has {n} clients, expected {num_clients}")


def data_distance(stats: ClassMixtures, bandwidth_sq: float | None = None, block_clients: int = 8,
                  class_conditional: bool = False) -> Array:
    """Squared MMD between the clients' label-weighted mixtures, all pairs, one jitted call.

    P_i = Σ_c π_i(c) Σ_g w_icg N(μ_icg, diag σ²_icg) with π_i(c) = n_ic / n_i, and
    D_ij = ⟨P_i, P_i⟩ + ⟨P_j, P_j⟩ − 2⟨P_i, P_j⟩ (METHOD.md §3).

    Args:
      stats: the uploaded statistics, leading axis = clients.
      bandwidth_sq: ℓ² of the Gaussian kernel; None uses the median heuristic (median
        squared distance between all present component means of all valid clients).
      block_clients: clients per row block of the pairwise computation. Memory is
        O(block · K · G · N · K · G); the default 8 (48 component rows for K·G = 6) avoids
        a ~10x slowdown of XLA:CPU's fused kernel seen with ≥ 96 rows against few columns.
      class_conditional: compare the joint distributions of (features, label) instead of
        the feature marginals (see the module docstring; our extension, not METHOD.md's).

    Returns:
      [N, N] float, symmetric, zero diagonal. Rows and columns of clients whose statistic
      is invalid (non-finite, non-positive variance, no data; see
      :func:`statistic_is_valid`) are NaN, so that ``server_step`` excludes them.

    Raises:
      ValueError: on inconsistent statistic shapes or a non-positive bandwidth.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from celora_jax import data_distance, fit_class_mixtures
      >>> features = jax.random.normal(jax.random.key(0), (3, 40, 4))
      >>> features = features.at[2].add(3.0)              # client 2's data is shifted
      >>> labels = jnp.zeros((3, 40), int)
      >>> stats = fit_class_mixtures(features, labels, None, 1, jax.random.key(1))
      >>> distance = data_distance(stats)
      >>> distance.shape, bool(distance[0, 2] > 10 * distance[0, 1])
      ((3, 3), True)
    """
    check_statistics(stats)
    if bandwidth_sq is not None and not bandwidth_sq > 0:
        raise ValueError(f"bandwidth_sq must be > 0 or None, got {bandwidth_sq!r}")
    if not isinstance(block_clients, int) or block_clients < 1:
        raise ValueError(f"block_clients must be a positive integer, got {block_clients!r}")
    dist = _data_distance_jit(stats, bandwidth_sq, block_clients, bool(class_conditional))
    if not isinstance(dist, jax.core.Tracer):
        bad = ~jnp.isfinite(jnp.diag(dist))
        if bool(jnp.any(bad)):
            logger.warning(
                "data_distance: statistics of clients %s are invalid (non-finite, non-positive "
                "variance or no data); their rows are NaN and server_step will exclude them",
                jnp.flatnonzero(bad).tolist(),
            )
    return dist


def parameter_distance(cores: Array | None, num_clients: int | None = None, origin: Array | None = None) -> Array:
    """1 − cos(Δ_i, Δ_j) with Δ_i = vec(C_i − C⁰) stacked over all adapted layers (METHOD §4).

    Args:
      cores: [N, L, r, r] uploaded cores, or None before any core exists (round 1).
      num_clients: N, needed only when cores is None.
      origin: C⁰, the [L, r, r] cores every client started from; None = the identity, the
        start METHOD §4 specifies (random init). The shared-basis inits start the cores at 0:
        measured from I, every Δ would be dominated by the same −I, and the distance would
        compare the updates' sizes along I instead of their directions. Or [N, L, r, r], one
        origin per client (e.g. the cores the server last sent each one, so that Δ_i is the
        client's own update and not the mixture it received).

    Returns:
      [N, N] in [0, 2], zero diagonal. Zeros everywhere in round 1 (cores None). A client
      whose Δ is exactly zero (core still at its start) has no direction: its distances are 0.

    Raises:
      ValueError: ``cores`` is not [N, L, r, r] or not floating point.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import parameter_distance
      >>> eye = jnp.eye(2)
      >>> cores = jnp.stack([eye + jnp.diag(jnp.array([1.0, 0.0])),
      ...                    eye + jnp.diag(jnp.array([2.0, 0.0])),
      ...                    eye - jnp.diag(jnp.array([1.0, 0.0]))])[:, None]   # [3, 1, 2, 2]
      >>> parameter_distance(cores)
      Array([[0., 0., 2.],
             [0., 0., 2.],
             [2., 2., 0.]], dtype=float32)
    """
    if cores is None:
        if num_clients is None:
            raise ValueError("num_clients is required when cores is None")
        return jnp.zeros((num_clients, num_clients), jnp.float32)
    shape = tuple(np.shape(cores))
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"parameter_distance: cores must have shape [N, L, r, r] (clients, layers, "
                         f"rank, rank), got {shape}")
    if not jnp.issubdtype(cores.dtype, jnp.floating):
        raise ValueError(f"parameter_distance: cores must be floating point, got {cores.dtype}")
    n, _, r, _ = cores.shape
    start = jnp.eye(r, dtype=cores.dtype) if origin is None else jnp.asarray(origin, cores.dtype)
    if start.shape not in ((r, r), tuple(shape[1:]), shape):
        raise ValueError(f"parameter_distance: origin must have shape {tuple(shape[1:])} (layers, rank, rank) "
                         f"or {shape} (one per client), got {tuple(start.shape)}")
    delta = (cores - start).reshape(n, -1)
    norm = jnp.sqrt(jnp.sum(delta * delta, axis=-1))
    has_direction = norm > 0
    unit = delta / jnp.where(has_direction, norm, 1.0)[:, None]
    cos = jnp.matmul(unit, unit.T, precision=_HIGHEST)
    both = has_direction[:, None] & has_direction[None, :]
    dist = jnp.where(both, jnp.clip(1.0 - cos, 0.0, 2.0), 0.0)
    return jnp.where(jnp.eye(n, dtype=bool), 0.0, dist)

"""CE-LoRA personalized aggregation of r×r cores: learned weights and mixtures (METHOD.md §5).

One jitted server step per round, static shapes for a fixed client population:

    D_data = similarity.data_distance(stats)              # once, after the statistic upload
    out = server_step(cores, None, sizes, mask, config, data_distance=D_data)   # every round
    out.mixed_cores[i]                                     # C̃_i, sent back to client i

Inside: D_param = 1 − cos(vec(C_i − C⁰), vec(C_j − C⁰)), C⁰ the cores' start (``core_origin``;
I by default, as METHOD.md §4); both distances divided by their median off-diagonal value
over reporting clients; D = β D̂_data + (1 − β) D̂_param; for every
client w_i = Proj_simplex(p − D_i / (2λ)) (the minimizer of Σ_j w_j D_ij + λ‖w − p‖² on the
simplex, p_j = n_j / Σ n); C̃ = W @ C per layer.

**[decided]** Clients that did not report this round (``mask`` False) or whose upload is
unusable (non-finite core, statistic or size: ``excluded``) get weight 0 in every row, and
p is renormalized over the remaining *active* clients. Rows of inactive clients:

* a client whose own core is finite gets the identity row (it keeps its own core);
* a client whose own core is non-finite gets p over the active clients (the plain average
  of the usable cores), or, if no client is active, the initial core I.

So every row of W is on the simplex and ``mixed_cores`` is always finite.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from optax import projections

from celora_jax import _checks
from celora_jax.server import similarity, usable
from celora_jax.server.gmm import ClassMixtures

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


DATA_DISTANCES = ("marginal", "class_conditional")
UPDATES_SINCE = ("start", "received")


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
    """Server-side aggregation options (hashable: passed to jit as a static argument).

    Attributes:
      beta: β, weight of the data distance in the blend D = β D̂_data + (1 − β) D̂_param;
        1 = data only, 0 = parameters only (METHOD.md §5 ablations). In [0, 1].
      lam: λ > 0, pull of each client's weights towards the size prior p. λ → ∞ gives
        FedAvg (W rows = p); λ → 0 gives local training (W = I).
      personalized: False is the "CE-LoRA without personalization" ablation: every
        active row of W is p, i.e. the size-weighted average of the reported cores.
      normalize: divide each distance matrix by its median off-diagonal value over the
        active clients before blending, so that β mixes comparable scales (METHOD.md §5).
        A median of 0 (e.g. all cores still the identity) leaves the matrix unscaled.
      bandwidth_sq: ℓ² of the MMD kernel when the data distance is computed inside
        ``server_step``; None = median heuristic over component means (METHOD.md §3).
      mmd_block_clients: clients per row block of the pairwise MMD computation (bounds
        memory; see ``similarity.data_distance``).
      data_distance: "marginal" (METHOD.md §3: MMD between the feature marginals) or
        "class_conditional" (our extension: MMD between the joint distributions of features
        and labels, which also sees clients that label the same inputs differently).
      projection: how each row is projected onto the simplex. "optax" is
        ``optax.projections.projection_simplex`` (sort-based); "bisection" (default) finds
        the support by bisection on the threshold, then applies the same closed form as
        the sort-based method. The two agree to ~1e-7 (tested against each other); on a
        2-core CPU at N = 1000 the sort alone takes ~0.11 s of optax's 0.15 s step, while
        the whole step with bisection takes ~0.04 s (benchmarks/aggregation.py).
      update_since: what the personalized strategy (``methods.celora``) measures each core
        from in the parameter distance: "start" (METHOD.md §4), C_i − C⁰, mixtures received
        included; "received" (our extension), C_i − C̃_i, the client's own training since
        its last mixture (why and what it measured: docs/shared_basis.md). ``server_step``
        takes the origin it is given (``core_origin``) and does not read this field.

    Examples:
      >>> from celora_jax import AggregationConfig
      >>> AggregationConfig(beta=1.0, lam=0.1).personalized
      True
      >>> AggregationConfig(beta=2.0)
      Traceback (most recent call last):
      ...
      ValueError: beta must be a number in [0, 1], got 2.0
    """

    beta: float = 0.5
    lam: float = 1.0
    personalized: bool = True
    normalize: bool = True
    bandwidth_sq: float | None = None
    mmd_block_clients: int = 8
    data_distance: str = "marginal"
    projection: str = "bisection"
    update_since: str = "start"

    def __post_init__(self):
        _checks.check_fields(self, "aggregation")
        if not (isinstance(self.beta, numbers.Real) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must be a number in [0, 1], got {self.beta!r}")
        if not (isinstance(self.lam, numbers.Real) and math.isfinite(self.lam) and self.lam > 0.0):
            raise ValueError(f"lam must be a finite number > 0, got {self.lam!r}")
        if self.bandwidth_sq is not None and not (
            isinstance(self.bandwidth_sq, numbers.Real) and math.isfinite(self.bandwidth_sq) and self.bandwidth_sq > 0
        ):
            raise ValueError(f"bandwidth_sq must be None or a finite number > 0, got {self.bandwidth_sq!r}")
        if not isinstance(self.mmd_block_clients, int) or self.mmd_block_clients < 1:
            raise ValueError(f"mmd_block_clients must be a positive integer, got {self.mmd_block_clients!r}")
        if self.data_distance not in DATA_DISTANCES:
            raise ValueError(f"data_distance must be one of {DATA_DISTANCES}, got {self.data_distance!r}")
        if self.projection not in ("optax", "bisection"):
            raise ValueError(f"projection must be 'optax' or 'bisection', got {self.projection!r}")
        if self.update_since not in UPDATES_SINCE:
            raise ValueError(f"update_since must be one of {UPDATES_SINCE}, got {self.update_since!r}")


class ServerOutputs(NamedTuple):
    """Everything one server step returns (all arrays; log W and the distances each round).

    Attributes:
      weights: [N, N] W, every row on the simplex; column j is 0 unless j is active.
      mixed_cores: [N, L, r, r] C̃_i = Σ_j W_ij C_j, the personalized core sent to client i.
      data_distance: [N, N] raw squared-MMD matrix used this round (non-finite entries,
        i.e. clients with invalid statistics, shown as 0; see ``excluded``); zeros when
        neither statistics nor a precomputed matrix were given (β = 0).
      param_distance: [N, N] raw 1 − cos matrix of this round's cores (0 for rows of
        clients with non-finite cores).
      excluded: [N] bool, clients dropped because their core, statistic or size is
        non-finite (or invalid); they are treated as not reporting.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import AggregationConfig, server_step
      >>> out = server_step(jnp.tile(jnp.eye(2), (3, 1, 1, 1)), None, jnp.ones(3), None,
      ...                   AggregationConfig(beta=0.0))
      >>> out._fields
      ('weights', 'mixed_cores', 'data_distance', 'param_distance', 'excluded')
    """

    weights: Array
    mixed_cores: Array
    data_distance: Array
    param_distance: Array
    excluded: Array


def client_prior(sizes: Array, active: Array) -> Array:
    """p_j = n_j / Σ_active n over active clients, 0 elsewhere, [N].

    If every active client has size 0 the prior is uniform over them; if none is active it
    is all zeros.
    """
    sizes = jnp.where(active, sizes, 0.0)
    total = jnp.sum(sizes)
    uniform = active / jnp.maximum(jnp.sum(active), 1)
    return jnp.where(total > 0, sizes / jnp.where(total > 0, total, 1.0), uniform)


def normalize_by_median(distance: Array, active: Array) -> Array:
    """distance / median of its off-diagonal entries among active pairs (unscaled if 0)."""
    n = distance.shape[0]
    pairs = active[:, None] & active[None, :] & ~jnp.eye(n, dtype=bool)
    median = similarity.masked_median(distance, pairs)
    return distance / jnp.where(median > 0, median, 1.0)


def _project_rows_optax(target: Array) -> Array:
    return jax.vmap(projections.projection_simplex)(target)


def _project_rows_bisection(target: Array, iterations: int = 32) -> Array:
    """Row-wise simplex projection without sorting; same result as the sort-based one.

    Finds the threshold θ with Σ_j max(v_j − θ, 0) = 1 by bisection on [max − 1, max],
    then recomputes θ exactly from the identified support, θ = (Σ_S v − 1) / |S| (the
    sort-based formula). Sorting N rows of N entries dominates the whole server step on
    CPU (~0.1 s at N = 1000); this is ~30x faster.
    """
    row_max = jnp.max(target, axis=-1, keepdims=True)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_low = jnp.sum(jnp.maximum(target - mid, 0.0), axis=-1, keepdims=True) > 1.0
        return jnp.where(too_low, mid, lo), jnp.where(too_low, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, body, (row_max - 1.0, row_max))
    support = target > lo
    size = jnp.sum(support, axis=-1, keepdims=True)
    theta = (jnp.sum(jnp.where(support, target, 0.0), axis=-1, keepdims=True) - 1.0) / size
    return jnp.maximum(target - theta, 0.0)


_PROJECTIONS = {"optax": _project_rows_optax, "bisection": _project_rows_bisection}


def personalized_weights(
    data_distance: Array,
    param_distance: Array,
    sizes: Array,
    active: Array,
    config: AggregationConfig,
) -> Array:
    """W [N, N] with w_i = Proj_simplex(p − D_i / (2λ)) for every active client i.

    Args:
      data_distance: [N, N] finite, symmetric, zero diagonal.
      param_distance: [N, N] finite, symmetric, zero diagonal.
      sizes: [N] n_i (example counts), the prior p ∝ n over active clients.
      active: [N] bool; inactive clients get 0 in every row and the identity as own row.
      config: β, λ, normalization, personalization switch.

    Returns:
      [N, N] row-stochastic W.
    """
    chex.assert_rank([data_distance, param_distance, sizes, active], [2, 2, 1, 1])
    n = sizes.shape[0]
    prior = client_prior(sizes, active)
    if config.personalized:
        if config.normalize:
            data_distance = normalize_by_median(data_distance, active)
            param_distance = normalize_by_median(param_distance, active)
        blended = config.beta * data_distance + (1.0 - config.beta) * param_distance
        target = prior[None, :] - blended / (2.0 * config.lam)  # [N, N]
        # Projection onto the simplex is invariant to adding a constant to a row, so shift
        # each row's active maximum to 0: the support then lies in [−1, 0], which keeps
        # float32 accurate even when λ is tiny and |target| huge. An entry below −1 always
        # projects to 0 (the threshold is ≥ max − 1), so −2 removes inactive columns
        # exactly without ±inf.
        row_max = jnp.max(jnp.where(active[None, :], target, -jnp.inf), axis=1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        target = jnp.where(active[None, :], target - row_max, -2.0)
        weights = _PROJECTIONS[config.projection](target)
        weights = jnp.where(active[None, :], weights, 0.0)
    else:
        weights = jnp.broadcast_to(prior, (n, n))
    return jnp.where(active[:, None], weights, jnp.eye(n, dtype=weights.dtype))


def mix_cores(weights: Array, cores: Array) -> Array:
    """C̃_i = Σ_j W_ij C_j for all clients and layers in one einsum, [N, L, r, r]."""
    chex.assert_rank([weights, cores], [2, 4])
    return jnp.einsum("ij,jlab->ilab", weights, cores, precision=_HIGHEST)


def weighted_average_cores(cores: Array, sizes: Array, mask: Array | None = None) -> Array:
    """Size-weighted average of the reported, finite cores, [L, r, r] (plain CE-LoRA).

    The non-personalized ablation: every client receives this same core (W rows = p).
    Returns the identity cores if no client is usable.

    Args:
      cores: ``[N, L, r, r]`` uploaded cores.
      sizes: ``[N]`` examples per client.
      mask: ``[N]`` bool, True for clients that reported; None = all.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import weighted_average_cores
      >>> cores = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])[:, None]   # [2 clients, 1 layer, 2, 2]
      >>> weighted_average_cores(cores, sizes=jnp.array([1.0, 3.0]))[0]
      Array([[1.75, 0.  ],
             [0.  , 1.75]], dtype=float32)
    """
    cores = _as_core_array(cores)
    n, num_layers, r, _ = cores.shape
    _check_vector(sizes, n, "sizes")
    if mask is None:
        mask = jnp.ones((n,), bool)
    _check_vector(mask, n, "mask")
    ok = jnp.asarray(mask, bool) & _core_is_finite(cores) & _size_is_valid(sizes)
    prior = client_prior(jnp.asarray(sizes, jnp.float32), ok)
    safe = jnp.where(ok[:, None, None, None], cores, 0.0)
    average = jnp.einsum("j,jlab->lab", prior, safe, precision=_HIGHEST)
    identity = jnp.broadcast_to(jnp.eye(r, dtype=cores.dtype), (num_layers, r, r))
    return jnp.where(jnp.any(ok), average, identity)


def _core_is_finite(cores: Array) -> Array:
    return usable.finite_clients(cores)


def _size_is_valid(sizes: Array) -> Array:
    return usable.valid_sizes(sizes)


def _data_distance_ok(distance: Array) -> Array:
    """[N] bool: client i's data-distance row is usable.

    ``similarity.data_distance`` marks invalid statistics with a NaN row and column; any
    other non-finite entry between two clients excludes both of them.
    """
    finite = jnp.isfinite(distance)
    diag_ok = jnp.diagonal(finite)
    bad_pair = ~finite & diag_ok[None, :] & diag_ok[:, None]
    return diag_ok & ~jnp.any(bad_pair, axis=1)


def _server_step_impl(cores, stats, sizes, mask, data_distance, origin, config: AggregationConfig) -> ServerOutputs:
    n, _, r, _ = cores.shape
    origin = jnp.broadcast_to(jnp.eye(r, dtype=cores.dtype) if origin is None else origin, cores.shape)

    core_ok = _core_is_finite(cores)
    # An unusable core counts as no update: back at the start, without a direction.
    cores = jnp.where(core_ok[:, None, None, None], cores, origin)
    size_ok = _size_is_valid(sizes)
    sizes = jnp.where(size_ok, sizes, 0.0)

    if data_distance is None and stats is not None:
        data_distance = similarity.data_distance_traced(stats, config.bandwidth_sq, config.mmd_block_clients,
                                                        config.data_distance == "class_conditional")
    if data_distance is None:
        data_distance = jnp.zeros((n, n), cores.dtype)
    stat_ok = _data_distance_ok(data_distance)
    data_distance = jnp.where(jnp.isfinite(data_distance), data_distance, 0.0)

    excluded = ~(core_ok & size_ok & stat_ok)
    active = mask & ~excluded

    # Computed even where the weights ignore it (β = 1, plain average): it is logged.
    param_distance = similarity.parameter_distance(cores, origin=origin)

    weights = personalized_weights(data_distance, param_distance, sizes, active, config)
    # Inactive clients with an unusable own core get the plain average of the active ones.
    fallback = client_prior(sizes, active)
    fallback = jnp.where(jnp.any(active), fallback, jnp.eye(n, dtype=weights.dtype))
    weights = jnp.where((~core_ok & ~active)[:, None], fallback, weights)
    mixed = mix_cores(weights.astype(cores.dtype), cores)
    return ServerOutputs(weights, mixed, data_distance, param_distance, excluded)


_server_step_jit = jax.jit(_server_step_impl, static_argnames=("config",))


def _as_core_array(cores) -> Array:
    """Stacks a per-client sequence of cores and checks the [N, L, r, r] layout."""
    if isinstance(cores, (list, tuple)):
        if not cores:
            raise ValueError("cores is empty")
        shapes = [tuple(np.shape(c)) for c in cores]
        for index, shape in enumerate(shapes):
            if shape != shapes[0]:
                raise ValueError(f"cores[{index}] has shape {shape}, but cores[0] has shape {shapes[0]}")
        cores = jnp.stack([jnp.asarray(c) for c in cores])
    cores = jnp.asarray(cores)
    if cores.ndim != 4 or cores.shape[-1] != cores.shape[-2]:
        raise ValueError(f"cores must be [clients, layers, r, r], got shape {tuple(cores.shape)}")
    if not jnp.issubdtype(cores.dtype, jnp.floating):
        cores = cores.astype(jnp.float32)
    return cores


def _check_vector(value, n: int, name: str) -> None:
    if tuple(np.shape(value)) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one entry per client), got {tuple(np.shape(value))}")


def server_step(
    cores: Array | Sequence[Array],
    stats: ClassMixtures | None,
    sizes: Array,
    mask: Array | None,
    config: AggregationConfig = AggregationConfig(),
    *,
    data_distance: Array | None = None,
    core_origin: Array | None = None,
) -> ServerOutputs:
    """One round of CE-LoRA personalized aggregation: distances, W and C̃ in one jitted call.

    Args:
      cores: [N, L, r, r] uploaded cores C_i (stale entries for non-reporting clients are
        fine), or a length-N sequence of [L, r, r] arrays.
      stats: the one-time statistics; used only when ``data_distance`` is None (then the
        MMD is recomputed inside this call, which is the expensive part: pass the
        precomputed matrix every round instead). May be None when β = 0.
      sizes: [N] n_i, the clients' example counts (prior p ∝ n).
      mask: [N] bool, True for clients that reported this round; None = all.
      config: static aggregation options (hashable; one compilation per config and N).
      data_distance: [N, N] output of :func:`similarity.data_distance` (NaN rows mark
        invalid statistics and exclude those clients).
      core_origin: [L, r, r] the cores every client started from, against which the
        parameter distance measures each update (C_i − C⁰); None = the identity (METHOD §4's
        random init). Pass zeros for cores that start at 0 (the shared-basis inits). Or
        [N, L, r, r], one origin per client (the distance then compares C_i − C⁰_i; the
        mixtures are of the cores C_i all the same).

    Returns:
      ServerOutputs(weights, mixed_cores, data_distance, param_distance, excluded).

    Raises:
      ValueError: on shape mismatches, an invalid config, or missing data inputs with β > 0.

    Examples:
      Four clients, one adapted layer, rank 2. Clients 0 and 1 moved their cores the same
      way, 2 and 3 the opposite way; with β = 0 (parameter distance only) and a small λ,
      each client mixes mostly with its look-alike:

      >>> import jax.numpy as jnp
      >>> from celora_jax import AggregationConfig, server_step
      >>> up, down = jnp.diag(jnp.array([0.5, 0.0])), jnp.diag(jnp.array([-0.5, 0.0]))
      >>> cores = (jnp.eye(2) + jnp.stack([up, 1.1 * up, down, 0.9 * down]))[:, None]
      >>> out = server_step(cores, None, sizes=jnp.full(4, 100.0), mask=None,
      ...                   config=AggregationConfig(beta=0.0, lam=0.5))
      >>> out.weights.round(2)
      Array([[0.5, 0.5, 0. , 0. ],
             [0.5, 0.5, 0. , 0. ],
             [0. , 0. , 0.5, 0.5],
             [0. , 0. , 0.5, 0.5]], dtype=float32)
      >>> out.mixed_cores.shape
      (4, 1, 2, 2)
    """
    if not isinstance(config, AggregationConfig):
        raise ValueError(f"config must be an AggregationConfig, got {type(config).__name__}")
    cores = _as_core_array(cores)
    n = cores.shape[0]
    _check_vector(sizes, n, "sizes")
    if mask is None:
        mask = jnp.ones((n,), bool)
    _check_vector(mask, n, "mask")
    if data_distance is not None:
        if tuple(np.shape(data_distance)) != (n, n):
            raise ValueError(f"data_distance must have shape ({n}, {n}), got {tuple(np.shape(data_distance))}")
        data_distance = jnp.asarray(data_distance, cores.dtype)
        stats = None  # precomputed: the statistics are not needed inside the kernel
    elif stats is not None:
        similarity.check_statistics(stats, n)
    elif config.beta > 0 and config.personalized:
        raise ValueError("stats or data_distance is required when config.beta > 0")
    if core_origin is not None:
        if tuple(np.shape(core_origin)) not in (tuple(cores.shape[1:]), tuple(cores.shape)):
            raise ValueError(f"core_origin must have shape {tuple(cores.shape[1:])} (layers, rank, rank) or "
                             f"{tuple(cores.shape)} (one per client), got {tuple(np.shape(core_origin))}")
        core_origin = jnp.asarray(core_origin, cores.dtype)
    return _server_step_jit(
        cores, stats, jnp.asarray(sizes, cores.dtype), jnp.asarray(mask, bool), data_distance, core_origin, config
    )

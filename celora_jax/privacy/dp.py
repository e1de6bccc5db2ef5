"""Differentially private uploads: clip each client's update, add Gaussian noise, account ε.

The defence of METHOD.md §8. In every round each reporting client computes the change of
what it uploads (CE-LoRA: its cores; LoRA baselines: A and B) since the round began,
clips that change to L2 norm ``clip_norm`` over all uploaded arrays together, and adds
``N(0, (noise_multiplier · clip_norm)²)`` to every coordinate *before* it leaves the client.
The server (similarities, learned weights, personalized mixtures) only ever sees noised
uploads, so everything it does is post-processing and costs no extra privacy.

Privacy unit and accounting: one client's whole local dataset, with add/remove adjacency
(as in DP-FedAvg): replacing the dataset by one that makes the client send no change moves
the clipped update by at most ``clip_norm``, so one round is a Gaussian mechanism of noise
multiplier σ = ``noise_multiplier``. (Replacing it by an arbitrary other dataset can move
the update by ``2 · clip_norm``: that guarantee is the one of multiplier σ/2.) ``rounds``
rounds compose to (ε, δ) computed by the maintained ``dp-accounting`` library. The privacy
losses of Gaussian mechanisms add up exactly: ``T`` rounds of multiplier σ are one Gaussian
mechanism of multiplier σ/√T, whose ε the library computes analytically (Balle & Wang 2018;
the default, exact). Its privacy-loss-distribution and Rényi accountants are options (they
give the same ε, resp. a looser one, and also cover sampled mechanisms). No amplification
by client sampling is claimed (a client is counted in every round), so the ε is an upper
bound when ``federation.participation`` < 1.

Not covered: the one-time data statistic of CE-LoRA's personalized aggregation (the
per-class Gaussian mixtures of METHOD.md §3) is sent without noise. Set
``aggregation.beta=0`` (parameter-space similarity only) for a run whose every upload is
covered by the ε.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from celora_jax import _checks

Array = jax.Array
PyTree = Any

ACCOUNTANTS = ("analytic", "pld", "rdp")


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Client-level differential privacy of the uploads (off unless ``clip_norm`` > 0).

    Attributes:
      clip_norm: L2 bound on one client's upload change per round, over all uploaded
        arrays together (0 disables the mechanism).
      noise_multiplier: Gaussian noise standard deviation in units of ``clip_norm``. Give
        this or ``target_epsilon``.
      target_epsilon: the ε to reach after all rounds; the noise multiplier is then
        calibrated with the accountant for ``federation.rounds`` rounds and ``delta``.
      delta: the δ of the (ε, δ) guarantee.
      accountant: "analytic" (exact for composed Gaussian mechanisms), "pld"
        (privacy-loss distributions, equal up to discretization) or "rdp" (Rényi DP, looser).
    """

    clip_norm: float = 0.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "analytic"

    def __post_init__(self):
        _checks.check_fields(self, "dp")
        if self.clip_norm < 0:
            raise ValueError(f"dp.clip_norm must be >= 0 (0 disables DP), got {self.clip_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"dp.target_epsilon must be > 0, got {self.target_epsilon}")
        if self.clip_norm > 0 and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("dp.clip_norm > 0 needs exactly one of dp.noise_multiplier and "
                             f"dp.target_epsilon, got noise_multiplier={self.noise_multiplier}, "
                             f"target_epsilon={self.target_epsilon}")

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0


def global_norm(tree: PyTree) -> Array:
    """L2 norm of all leaves of ``tree`` together (float32 scalar).

    Examples:
      >>> import jax.numpy as jnp
      >>> float(global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}))
      5.0
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def clip_update(update: PyTree, clip_norm: float) -> tuple[PyTree, Array]:
    """Scales ``update`` so that its global L2 norm is at most ``clip_norm``.

    Returns ``(clipped, norm_before)``; an update already inside the ball is unchanged.

    Examples:
      >>> import jax.numpy as jnp
      >>> clipped, norm = clip_update({"C": jnp.array([3.0, 4.0])}, 1.0)
      >>> clipped["C"].tolist(), float(norm)
      ([0.6000000238418579, 0.800000011920929], 5.0)
    """
    if not clip_norm > 0:
        _checks.fail("clip_update", f"clip_norm must be > 0, got {clip_norm}")
    for leaf in jax.tree.leaves(update):
        _checks.check_floating("clip_update", "update", leaf)
    norm = global_norm(update)
    # Never divide by zero and never scale up: factor = min(1, clip / norm).
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda leaf: (leaf * factor).astype(leaf.dtype), update), norm


def privatize_update(update: PyTree, clip_norm: float, noise_multiplier: float,
                     key: Array) -> tuple[PyTree, Array]:
    """The Gaussian mechanism on one client's update: clip, then add
    ``N(0, (noise_multiplier · clip_norm)²)`` independently to every coordinate.

    Returns ``(noised, norm_before_clipping)``. ``vmap`` it over a leading client axis with
    one key per client.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> noised, norm = privatize_update({"C": jnp.zeros((8, 8))}, 1.0, 0.5, jax.random.key(0))
      >>> noised["C"].shape, float(norm)
      ((8, 8), 0.0)
    """
    if noise_multiplier < 0:
        _checks.fail("privatize_update", f"noise_multiplier must be >= 0, got {noise_multiplier}")
    clipped, norm = clip_update(update, clip_norm)
    leaves, treedef = jax.tree.flatten(clipped)
    keys = jax.random.split(key, max(len(leaves), 1))
    std = noise_multiplier * clip_norm
    noised = [leaf + (std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
              for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noised), norm


def _gaussian_rounds_event(noise_multiplier: float, rounds: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)


def _fresh_accountant(accountant: str):
    import dp_accounting

    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    return dp_accounting.rdp.RdpAccountant()


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, rounds: int, delta: float, accountant: str = "analytic") -> float:
    """ε of ``rounds`` Gaussian-mechanism rounds of noise multiplier σ at the given δ.

    Computed by the ``dp-accounting`` library; ``inf`` for σ = 0, 0 for no rounds.

    Examples:
      >>> round(epsilon(1.0, 1, 1e-5), 3)
      4.377
      >>> round(epsilon(2.0, 4, 1e-5), 3)  # four rounds of σ = 2 are one round of σ = 1
      4.377
    """
    import dp_accounting

    if rounds < 0:
        raise ValueError(f"epsilon: rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta must be in (0, 1), got {delta}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant == "analytic":
        return float(dp_accounting.get_epsilon_gaussian(noise_multiplier / math.sqrt(rounds), delta))
    ledger = _fresh_accountant(accountant)
    ledger.compose(_gaussian_rounds_event(noise_multiplier, rounds))
    return float(ledger.get_epsilon(delta))


# Cached: the engine resolves the run's multiplier when it builds the round step and again
# for the round records; with the numerical accountants a calibration is a search.
@functools.lru_cache(maxsize=64)
def noise_multiplier_for(target_epsilon: float, rounds: int, delta: float,
                         accountant: str = "analytic") -> float:
    """The smallest noise multiplier whose ``rounds`` rounds stay within (target_epsilon, δ).

    Examples:
      >>> sigma = noise_multiplier_for(4.0, 8, 1e-5)
      >>> epsilon(sigma, 8, 1e-5) <= 4.0 + 1e-3
      True
    """
    import dp_accounting

    if not target_epsilon > 0 or rounds < 1:
        raise ValueError(f"noise_multiplier_for: need target_epsilon > 0 and rounds >= 1, "
                         f"got {target_epsilon}, {rounds}")
    exact = float(dp_accounting.get_sigma_gaussian(target_epsilon, delta)) * math.sqrt(rounds)
    if accountant == "analytic":
        return exact
    # The numerical accountants never report less than the exact ε, so the noise they need
    # is at least the exact one: search upwards from it.
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _fresh_accountant(accountant),
        lambda sigma: _gaussian_rounds_event(sigma, rounds),
        target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(exact * 0.999, exact * 1.5), tol=1e-6 * exact))


def resolve_noise_multiplier(config: DPConfig, rounds: int) -> float:
    """The noise multiplier a run uses: the configured one, or the one calibrated to
    ``config.target_epsilon`` over ``rounds`` rounds (0 when DP is off)."""
    if not config.enabled:
        return 0.0
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    return noise_multiplier_for(config.target_epsilon, rounds, config.delta, config.accountant)

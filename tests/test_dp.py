"""Differentially private uploads: clipping bound, noise scale, accountant, engine wiring."""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from hypothesis import given, settings, strategies as st
from scipy import optimize, stats

from celora_jax.federated import engine, loop
from celora_jax.federated.config import RunConfig, apply_overrides
from celora_jax.privacy import dp


def _tree(key, scale, shapes=((8, 8), (3, 8, 8), (5,))):
    keys = jax.random.split(key, len(shapes))
    return {f"leaf{i}": scale * jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-6, 1e3), clip=st.floats(1e-4, 1e2))
def test_clipped_update_never_exceeds_the_bound_and_keeps_its_direction(seed, scale, clip):
    update = _tree(jax.random.key(seed), scale)
    clipped, norm = dp.clip_update(update, clip)
    chex.assert_trees_all_equal_shapes_and_dtypes(clipped, update)
    assert float(dp.global_norm(clipped)) <= clip * (1 + 1e-5)
    np.testing.assert_allclose(float(norm), float(dp.global_norm(update)), rtol=1e-5)
    factor = min(1.0, clip / float(norm))
    for got, original in zip(jax.tree.leaves(clipped), jax.tree.leaves(update)):
        np.testing.assert_allclose(got, original * factor, rtol=1e-5, atol=1e-30)


def test_update_inside_the_ball_is_unchanged_and_zero_update_is_safe():
    update = {"C": jnp.full((4, 4), 0.01)}
    clipped, _ = dp.clip_update(update, 1.0)
    np.testing.assert_array_equal(clipped["C"], update["C"])
    clipped, norm = dp.clip_update({"C": jnp.zeros((4, 4))}, 1.0)
    assert float(norm) == 0.0 and np.all(np.isfinite(clipped["C"]))


@pytest.mark.parametrize("noise_multiplier,clip", [(0.5, 1.0), (2.0, 0.1), (1.1, 3.0)])
def test_noise_standard_deviation_matches_the_multiplier(noise_multiplier, clip):
    # A large update is clipped to norm `clip` first; what is left is the noise alone.
    update = _tree(jax.random.key(1), 100.0, shapes=((256, 256), (64, 256, 8)))
    clipped, _ = dp.clip_update(update, clip)
    noised, _ = dp.privatize_update(update, clip, noise_multiplier, jax.random.key(2))
    noise = np.concatenate([np.ravel(n - c) for n, c in zip(jax.tree.leaves(noised), jax.tree.leaves(clipped))])
    expected = noise_multiplier * clip
    # 196,608 draws: the sample std is within 1% of the truth with overwhelming probability.
    assert abs(noise.std() / expected - 1) < 0.01
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    assert stats.kstest(noise / expected, "norm").pvalue > 1e-4


def test_clients_draw_independent_noise_under_vmap():
    updates = {"C": jnp.zeros((4, 32, 32))}
    keys = jax.random.split(jax.random.key(0), 4)
    noised, _ = jax.vmap(dp.privatize_update, in_axes=(0, None, None, 0))(updates, 1.0, 1.0, keys)
    flat = np.asarray(noised["C"]).reshape(4, -1)
    correlation = np.corrcoef(flat)
    assert np.all(np.abs(correlation[~np.eye(4, dtype=bool)]) < 0.15)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="clip_update: clip_norm must be > 0"):
        dp.clip_update({"C": jnp.ones(3)}, 0.0)
    with pytest.raises(ValueError, match="clip_update: update must be a floating"):
        dp.clip_update({"C": jnp.ones(3, jnp.int32)}, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        dp.privatize_update({"C": jnp.ones(3)}, 1.0, -1.0, jax.random.key(0))


def _analytic_delta(epsilon, mu):
    """δ(ε) of a Gaussian mechanism with μ = sensitivity/σ (Balle & Wang 2018, Thm. 8)."""
    return stats.norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon + stats.norm.logcdf(-mu / 2 - epsilon / mu))


@pytest.mark.parametrize("noise_multiplier,rounds,delta", [(1.0, 1, 1e-5), (0.8, 8, 1e-5), (3.0, 50, 1e-6)])
def test_accountant_matches_the_library_and_the_closed_form(noise_multiplier, rounds, delta):
    ours = dp.epsilon(noise_multiplier, rounds, delta)
    # The library's own value for the same mechanism, two ways: composing the rounds one by
    # one in its privacy-loss-distribution accountant, and its analytic Gaussian ε.
    ledger = dp_accounting.pld.PLDAccountant()
    for _ in range(rounds):
        ledger.compose(dp_accounting.GaussianDpEvent(noise_multiplier))
    np.testing.assert_allclose(ours, ledger.get_epsilon(delta), rtol=1e-3)
    np.testing.assert_allclose(ours, dp_accounting.get_epsilon_gaussian(noise_multiplier / math.sqrt(rounds), delta),
                               rtol=1e-9)
    np.testing.assert_allclose(dp.epsilon(noise_multiplier, rounds, delta, "pld"), ours, rtol=1e-3)
    # Independent of the library: the ε whose closed-form δ(ε) equals δ.
    mu = math.sqrt(rounds) / noise_multiplier
    closed_form = optimize.brentq(lambda e: _analytic_delta(e, mu) - delta, 1e-6, 100.0, xtol=1e-12)
    np.testing.assert_allclose(ours, closed_form, rtol=1e-6)
    # Rényi accounting is valid but looser.
    assert dp.epsilon(noise_multiplier, rounds, delta, "rdp") >= ours * (1 - 1e-9)


def test_more_rounds_or_less_noise_cost_more_privacy():
    assert dp.epsilon(1.0, 4, 1e-5) < dp.epsilon(1.0, 8, 1e-5) < dp.epsilon(0.5, 8, 1e-5)
    assert dp.epsilon(0.0, 3, 1e-5) == math.inf and dp.epsilon(1.0, 0, 1e-5) == 0.0


@pytest.mark.parametrize("accountant", dp.ACCOUNTANTS)
def test_calibrated_noise_reaches_the_target_epsilon(accountant):
    for target in (1.0, 8.0):
        sigma = dp.noise_multiplier_for(target, 8, 1e-5, accountant)
        spent = dp.epsilon(sigma, 8, 1e-5, accountant)
        assert spent <= target * (1 + 1e-4)
        assert spent >= target * 0.99


def test_dp_config_validation_and_overrides_in_any_order():
    with pytest.raises(ValueError, match="exactly one of dp.noise_multiplier and dp.target_epsilon"):
        dp.DPConfig(clip_norm=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        dp.DPConfig(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ValueError, match="dp.clip_norm must be >= 0"):
        dp.DPConfig(clip_norm=-1.0)
    with pytest.raises(ValueError, match="dp.delta"):
        dp.DPConfig(delta=0.0)
    with pytest.raises(ValueError, match="dp.accountant"):
        dp.DPConfig(accountant="moments")
    assert not RunConfig().dp.enabled
    for order in (["dp.clip_norm=0.5", "dp.target_epsilon=4"], ["dp.target_epsilon=4", "dp.clip_norm=0.5"]):
        config = apply_overrides(RunConfig(), order)
        assert config.dp == dp.DPConfig(clip_norm=0.5, target_epsilon=4.0)
        assert dp.resolve_noise_multiplier(config.dp, 8) == pytest.approx(dp.noise_multiplier_for(4.0, 8, 1e-5))


def _shared_change(output, setup):
    """Round-1 change of the first client's shared arrays (FedAvg: the server's mean)."""
    from celora_jax.lora import roles

    before = roles.select(setup.task.client_params, setup.roles, roles.SHARED)
    after = roles.select(jax.tree.map(lambda x: np.asarray(x)[0], output.client_params),
                         setup.roles, roles.SHARED)
    return np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))])


def test_engine_sends_clipped_and_noised_updates(tiny_model_dir):
    import dataclasses

    base = tiny_config(tiny_model_dir, "fedavg_lora")
    base = dataclasses.replace(base, federation=dataclasses.replace(base.federation, rounds=1))
    # Clipping only: the server's mean of five clipped changes is within the clip ball.
    clip_only = engine.prepare(apply_overrides(base, ["dp.clip_norm=1e-4", "dp.noise_multiplier=0.0"]))
    output = next(loop.iterate_rounds(clip_only))
    record = output.record
    assert 0 < np.linalg.norm(_shared_change(output, clip_only)) <= 1e-4 * (1 + 1e-3)
    assert record["dp_clipped_fraction"] == 1.0 and record["dp_update_norm_median"] > 1e-4
    assert record["dp_epsilon"] == math.inf
    # Noise dominates a tiny clip bound: the mean of five noised uploads has std σ·S/√5.
    noisy = engine.prepare(apply_overrides(base, ["dp.clip_norm=1e-6", "dp.noise_multiplier=1e4"]))
    output = next(loop.iterate_rounds(noisy))
    record = output.record
    change = _shared_change(output, noisy)
    assert abs(change.std() / (1e4 * 1e-6 / math.sqrt(5)) - 1) < 0.05
    assert record["dp_epsilon"] == pytest.approx(dp.epsilon(1e4, 1, 1e-5))

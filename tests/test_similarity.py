"""Data distance (closed-form MMD between mixtures) and parameter distance."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as reference
import pytest
from hypothesis import given, settings, strategies as st

from celora_jax.server import similarity
from celora_jax.server.gmm import ClassMixtures

_median = jax.jit(similarity.masked_median)

# Two 2-D clients, two classes with two components each: small enough for Monte Carlo.
_W = np.array([[[0.5, 0.5], [0.3, 0.7]], [[0.6, 0.4], [0.5, 0.5]]])
_MU = np.array([[[[0, 0], [1, 1]], [[2, 0], [2, 1]]], [[[0.5, 0], [1, 2]], [[2.5, 0.5], [3, 1]]]], float)
_VAR = np.array([[[[0.2, 0.1], [0.3, 0.3]], [[0.1, 0.2], [0.2, 0.2]]], [[[0.3, 0.1], [0.1, 0.4]], [[0.2, 0.1], [0.3, 0.2]]]])
_COUNTS = np.array([[70.0, 30.0], [20.0, 80.0]])


def _stats(weights, means, variances, counts, mask=None) -> ClassMixtures:
    if mask is None:
        mask = np.ones(np.shape(weights), bool)
    return ClassMixtures(*(jnp.asarray(a, jnp.float32) for a in (weights, means, variances, counts)), jnp.asarray(mask))


def _random_stats(rng, n=5, k=2, g=3, d=16) -> ClassMixtures:
    mask = np.ones((n, k, g), bool)
    mask[0, 1, 2] = False  # ragged components
    return _stats(
        rng.dirichlet(np.ones(g), (n, k)) * mask,
        rng.normal(0.0, 1.0, (n, k, g, d)) + rng.normal(0.0, 1.0, (n, 1, 1, 1)),
        rng.uniform(0.05, 0.5, (n, k, g, d)),
        rng.integers(5, 50, (n, k)),
        mask,
    )


def _stratified_sample(rng, i, n):
    """n points from client i's label-weighted mixture, stratified over components."""
    pi = _COUNTS[i] / _COUNTS[i].sum()
    parts = []
    for c in range(2):
        for g in range(2):
            m = int(round(n * pi[c] * _W[i, c, g]))
            parts.append(_MU[i, c, g] + np.sqrt(_VAR[i, c, g]) * rng.standard_normal((m, 2)))
    return np.concatenate(parts)


def _mean_kernel(x, y, ell_sq, same):
    total = 0.0
    for s in range(0, len(x), 1000):
        k = np.exp(-((x[s : s + 1000, None, :] - y[None]) ** 2).sum(-1) / (2 * ell_sq))
        if same:  # U-statistic: drop the i == j terms
            k[np.arange(k.shape[0]), np.arange(s, s + k.shape[0])] = 0.0
        total += k.sum()
    return total / (len(x) * (len(x) - 1)) if same else total / (len(x) * len(y))


def test_mmd_matches_monte_carlo():
    ell_sq = 1.0
    closed = float(similarity.data_distance(_stats(_W, _MU, _VAR, _COUNTS), bandwidth_sq=ell_sq)[0, 1])
    rng = np.random.default_rng(0)
    x, y = _stratified_sample(rng, 0, 6000), _stratified_sample(rng, 1, 6000)
    mc = _mean_kernel(x, x, ell_sq, True) + _mean_kernel(y, y, ell_sq, True) - 2 * _mean_kernel(x, y, ell_sq, False)
    assert abs(closed - mc) <= 0.02 * closed, (closed, mc)


def test_mmd_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(1)
    stats = _random_stats(rng)
    # Client 3 uploads exactly client 1's statistic, with class counts scaled by 3
    # (same label proportions, hence the same mixture).
    stats = ClassMixtures(*(x.at[3].set(x[1]) for x in stats))
    stats = stats._replace(class_counts=stats.class_counts.at[3].multiply(3.0))
    dist = np.asarray(similarity.data_distance(stats))
    assert np.all(np.isfinite(dist))
    np.testing.assert_array_equal(dist, dist.T)
    np.testing.assert_array_equal(np.diag(dist), 0.0)
    assert np.all(dist >= 0)
    off = dist[~np.eye(5, dtype=bool)]
    assert dist[1, 3] <= 1e-5 * np.median(off)
    assert np.min(off[off > 0]) > 1e-3 * np.median(off)


@pytest.mark.parametrize("class_conditional", [False, True])
@pytest.mark.parametrize("block_clients", [1, 2, 3, 8])  # 5, 3 (odd), 2 (even, padded), 1 blocks
def test_mmd_matches_numpy_reference(block_clients, class_conditional):
    stats = _random_stats(np.random.default_rng(2))
    ours = np.asarray(similarity.data_distance(stats, block_clients=block_clients,
                                               class_conditional=class_conditional))
    ref = reference.np_data_distance(stats, class_conditional=class_conditional)
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6 * np.max(ref))


def test_only_the_class_conditional_distance_sees_relabelled_clients():
    """Clients 2 and 3 give every example the other class (concept shift): the feature
    marginals are the same for all four clients, the joint (feature, label) laws are not."""
    from celora_jax import fit_class_mixtures

    classes = jnp.tile(jnp.arange(80) % 2, (4, 1))
    features = jax.random.normal(jax.random.key(0), (4, 80, 5)) + 3.0 * classes[..., None]
    labels = classes.at[2:].set(1 - classes[2:])
    stats = fit_class_mixtures(features, labels, None, 2, jax.random.key(1))
    marginal = np.asarray(similarity.data_distance(stats))
    joint = np.asarray(similarity.data_distance(stats, class_conditional=True))
    across = np.ix_([0, 1], [2, 3])
    assert joint[across].min() > 20 * max(joint[0, 1], joint[2, 3])
    assert marginal[across].max() < 0.1 * joint[across].min()
    # One class everywhere: the two distances are the same thing.
    one = fit_class_mixtures(features, jnp.zeros_like(labels), None, 1, jax.random.key(1))
    np.testing.assert_allclose(similarity.data_distance(one, class_conditional=True), similarity.data_distance(one),
                               rtol=1e-6, atol=1e-9)


def test_median_bandwidth_matches_numpy():
    stats = _random_stats(np.random.default_rng(3))
    present = np.asarray(stats.component_mask)
    points = np.asarray(stats.means)[present]
    sq = [np.sum((points[a + 1 :] - points[a]) ** 2, axis=1) for a in range(len(points))]
    expected = np.median(np.concatenate(sq))
    got = float(jax.jit(similarity.median_bandwidth)(stats.means, stats.component_mask))
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_invalid_statistic_gives_nan_row_and_leaves_others(caplog):
    stats = _random_stats(np.random.default_rng(4))
    clean = np.asarray(similarity.data_distance(stats, bandwidth_sq=4.0))
    bad = stats._replace(means=stats.means.at[2, 0, 1, 3].set(jnp.nan))
    with caplog.at_level(logging.WARNING, logger="celora_jax.server.similarity"):
        dist = np.asarray(similarity.data_distance(bad, bandwidth_sq=4.0))
    assert "[2]" in caplog.text
    assert np.all(np.isnan(dist[2])) and np.all(np.isnan(dist[:, 2]))
    keep = np.array([0, 1, 3, 4])
    np.testing.assert_allclose(dist[np.ix_(keep, keep)], clean[np.ix_(keep, keep)], rtol=1e-6)
    # A NaN in an unused (masked) component slot is not an error.
    padded = stats._replace(means=stats.means.at[0, 1, 2].set(jnp.nan))
    assert np.all(np.isfinite(np.asarray(similarity.data_distance(padded, bandwidth_sq=4.0))))


def test_data_distance_bad_input():
    stats = _random_stats(np.random.default_rng(5))
    with pytest.raises(ValueError, match="variances"):
        similarity.data_distance(stats._replace(variances=stats.variances[:, :, :2]))
    with pytest.raises(ValueError, match="class_counts"):
        similarity.data_distance(stats._replace(class_counts=stats.class_counts[:3]))
    with pytest.raises(ValueError, match="bandwidth_sq"):
        similarity.data_distance(stats, bandwidth_sq=0.0)


def test_parameter_distance_matches_numpy():
    rng = np.random.default_rng(6)
    cores = np.eye(4) + 0.1 * rng.standard_normal((6, 3, 4, 4))
    cores[2] = np.eye(4) + 2.0 * (cores[0] - np.eye(4))  # same direction as client 0
    cores[3] = np.eye(4) - (cores[0] - np.eye(4))  # opposite direction
    cores[5] = np.eye(4)  # no update yet
    ours = np.asarray(similarity.parameter_distance(jnp.asarray(cores, jnp.float32)))
    np.testing.assert_allclose(ours, reference.np_parameter_distance(cores), atol=1e-5)
    assert abs(ours[0, 2]) < 1e-5 and abs(ours[0, 3] - 2.0) < 1e-5
    np.testing.assert_array_equal(ours[5], 0.0)
    np.testing.assert_array_equal(np.asarray(similarity.parameter_distance(None, num_clients=3)), np.zeros((3, 3)))


@settings(max_examples=25, deadline=None)
@given(
    # XLA:CPU flushes subnormals to zero, so they are not meaningful inputs here.
    values=st.lists(st.floats(-1e6, 1e6, width=32, allow_subnormal=False), min_size=1, max_size=12),
    keep=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_masked_median_matches_numpy(values, keep):
    x = np.zeros(12, np.float32)
    x[: len(values)] = values
    valid = np.asarray(keep) & (np.arange(12) < len(values))  # fixed shape: one compilation
    got = float(_median(jnp.asarray(x), jnp.asarray(valid)))
    want = float(np.median(x[valid].astype(np.float64))) if valid.any() else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_parameter_distance_measures_updates_from_where_the_cores_started():
    """Shared-basis cores start at 0. Measured from 0, two groups of updates in opposite
    directions are 0 apart inside a group and 2 across, whatever their sizes; measured from
    the identity (wrongly, for these cores) every Δ is dominated by the same −I, and a small
    update lies nearer to a small opposite one than to a large one of its own direction."""
    rng = np.random.default_rng(7)
    direction = rng.standard_normal((2, 4, 4))
    cores = np.stack([0.01 * direction, 0.05 * direction, -0.01 * direction, -0.05 * direction])
    from_zero = np.asarray(similarity.parameter_distance(jnp.asarray(cores, jnp.float32), origin=np.zeros((2, 4, 4))))
    np.testing.assert_allclose(from_zero, 2.0 * (np.arange(4)[:, None] // 2 != np.arange(4)[None, :] // 2), atol=1e-5)
    np.testing.assert_allclose(from_zero, reference.np_parameter_distance(cores, np.zeros((2, 4, 4))), atol=1e-5)
    from_identity = np.asarray(similarity.parameter_distance(jnp.asarray(cores, jnp.float32)))
    assert from_identity[0, 2] < from_identity[0, 1]
    # Shifting cores and origin together changes nothing: only the updates count.
    shift = rng.standard_normal((2, 4, 4))
    shifted = similarity.parameter_distance(jnp.asarray(cores + shift, jnp.float32), origin=shift)
    np.testing.assert_allclose(np.asarray(shifted), from_zero, atol=1e-4)
    with pytest.raises(ValueError, match=r"origin must have shape \(2, 4, 4\)"):
        similarity.parameter_distance(jnp.asarray(cores, jnp.float32), origin=np.zeros((3, 4, 4)))


def test_parameter_distance_takes_one_origin_per_client():
    """Per-client origins (what the server last sent each client): Δ_i = C_i − C⁰_i, so a
    mixture every client received alike shifts nothing, and the numpy reference agrees."""
    rng = np.random.default_rng(8)
    origins = rng.standard_normal((5, 2, 3, 3))
    cores = origins + 0.1 * rng.standard_normal((5, 2, 3, 3))
    got = np.asarray(similarity.parameter_distance(jnp.asarray(cores, jnp.float32), origin=origins))
    np.testing.assert_allclose(got, reference.np_parameter_distance(cores, origins), atol=1e-5)
    shared = rng.standard_normal((2, 3, 3))  # the same shift on core and origin, client by client
    shifted = similarity.parameter_distance(jnp.asarray(cores + shared, jnp.float32), origin=origins + shared)
    np.testing.assert_allclose(np.asarray(shifted), got, atol=1e-4)
    with pytest.raises(ValueError, match=r"or \(5, 2, 3, 3\) \(one per client\)"):
        similarity.parameter_distance(jnp.asarray(cores, jnp.float32), origin=origins[:4])


def test_parameter_distance_rejects_bad_core_shape_and_dtype():
    with pytest.raises(ValueError, match=r"parameter_distance: cores must have shape \[N, L, r, r\]"):
        similarity.parameter_distance(jnp.ones((3, 2, 2)))
    with pytest.raises(ValueError, match=r"parameter_distance: cores must be floating point"):
        similarity.parameter_distance(jnp.ones((3, 1, 2, 2), jnp.int32))

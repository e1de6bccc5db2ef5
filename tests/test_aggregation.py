"""Personalized weights, core mixtures and the jitted server step."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from helpers import load_benchmark_module
from hypothesis import given, settings, strategies as st
from optax import projections

from celora_jax.server import aggregation, gmm, similarity

N, L, R = 6, 3, 4


bench = load_benchmark_module("aggregation")


def _random_round(seed: int, n: int = N):
    """Cores near I, a random symmetric data distance with zero diagonal, sizes."""
    rng = np.random.default_rng(seed)
    cores = (np.eye(R) + 0.1 * rng.standard_normal((n, L, R, R))).astype(np.float32)
    dist = rng.uniform(0.1, 2.0, (n, n))
    dist = np.triu(dist, 1) + np.triu(dist, 1).T
    sizes = rng.integers(1, 100, n).astype(np.float32)
    return cores, dist.astype(np.float32), sizes


def _step(cores, dist, sizes, mask=None, **config):
    return aggregation.server_step(
        cores, None, sizes, mask, aggregation.AggregationConfig(**config), data_distance=dist
    )


# ---------------------------------------------------------------------------- properties


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    beta=st.sampled_from([0.0, 0.5, 1.0]),
    lam=st.sampled_from([1e-3, 1.0, 1e3]),
    projection=st.sampled_from(["optax", "bisection"]),
    masked=st.lists(st.booleans(), min_size=N, max_size=N),
)
def test_rows_on_simplex(seed, beta, lam, projection, masked):
    cores, dist, sizes = _random_round(seed)
    mask = ~np.asarray(masked)
    out = _step(cores, dist, sizes, mask, beta=beta, lam=lam, projection=projection)
    weights = np.asarray(out.weights)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    if mask.any():
        np.testing.assert_array_equal(weights[:, ~mask], np.eye(N)[:, ~mask] * ~mask[:, None])
    chex.assert_tree_all_finite(out)


def test_matches_numpy_reference():
    cores, dist, sizes = _random_round(7)
    mask = np.array([True, True, False, True, True, True])
    cores[4, 1, 0, 0] = np.inf
    out = _step(cores, dist, sizes, mask)
    w_ref, mixed_ref, param_ref, excluded_ref = numpy_reference.np_server_step(cores, dist, sizes, mask)
    np.testing.assert_allclose(np.asarray(out.weights), w_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.mixed_cores), mixed_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.param_distance)[:4, :4], param_ref[:4, :4], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.excluded), excluded_ref)


def test_bisection_projection_equals_optax():
    rng = np.random.default_rng(8)
    target = rng.normal(0.0, 0.3, (50, 40)).astype(np.float32)
    target[:5] *= 1e-3  # near-uniform rows
    target[5:10] *= 30.0  # one-hot rows
    expected = jax.vmap(projections.projection_simplex)(jnp.asarray(target))
    got = aggregation._project_rows_bisection(jnp.asarray(target - target.max(axis=1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


def test_large_lambda_gives_prior_and_small_gives_identity():
    cores, dist, sizes = _random_round(9)
    mask = np.array([True, True, True, False, True, True])
    prior = np.where(mask, sizes, 0.0) / sizes[mask].sum()
    far = np.asarray(_step(cores, dist, sizes, mask, lam=1e7).weights)
    for i in np.flatnonzero(mask):
        np.testing.assert_allclose(far[i], prior, atol=1e-5)
    near = np.asarray(_step(cores, dist, sizes, mask, lam=1e-7).weights)
    np.testing.assert_allclose(near, np.eye(N), atol=1e-6)


def test_plain_average_ablation():
    cores, dist, sizes = _random_round(10)
    out = _step(cores, dist, sizes, personalized=False)
    prior = sizes / sizes.sum()
    np.testing.assert_allclose(np.asarray(out.weights), np.tile(prior, (N, 1)), rtol=1e-6)
    average = np.asarray(aggregation.weighted_average_cores(cores, sizes))
    np.testing.assert_allclose(average, np.tensordot(prior, cores, axes=1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.mixed_cores), np.broadcast_to(average, cores.shape), atol=1e-6)


def test_mix_cores_matches_numpy():
    cores, _, _ = _random_round(11)
    weights = np.random.default_rng(11).dirichlet(np.ones(N), N).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(aggregation.mix_cores(jnp.asarray(weights), jnp.asarray(cores))),
        np.einsum("ij,jlab->ilab", weights, cores),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------- masking


def test_masking_removes_client_from_every_row():
    cores, dist, sizes = _random_round(12)
    mask = np.ones(N, bool)
    mask[2] = False
    out = _step(cores, dist, sizes, mask)
    weights = np.asarray(out.weights)
    np.testing.assert_array_equal(np.delete(weights[:, 2], 2), 0.0)
    np.testing.assert_array_equal(weights[2], np.eye(N)[2])  # keeps its own core
    np.testing.assert_allclose(np.asarray(out.mixed_cores[2]), cores[2], atol=1e-7)
    # The others get exactly what they would get if client 2 did not exist.
    keep = np.delete(np.arange(N), 2)
    alone = _step(cores[keep], dist[np.ix_(keep, keep)], sizes[keep])
    np.testing.assert_allclose(weights[np.ix_(keep, keep)], np.asarray(alone.weights), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.mixed_cores)[keep], np.asarray(alone.mixed_cores), atol=1e-6)


# ---------------------------------------------------------------------------- two groups


@pytest.fixture(scope="module")
def two_groups():
    """8 clients: group A mostly class 0 with cores along U, group B mostly class 1 along V."""
    rng = np.random.default_rng(13)
    n, m, d = 8, 120, 6
    group = np.repeat([0, 1], n // 2)
    class_centres = np.array([[[0.0] * d, [1.5] * d], [[4.0] * d, [5.5, 4.0] * (d // 2)]])  # [K, 2 blobs, D]
    labels = np.where(rng.random((n, m)) < np.where(group == 0, 0.9, 0.1)[:, None], 0, 1)
    blob = rng.integers(0, 2, (n, m))
    features = class_centres[labels, blob] + 0.5 * rng.standard_normal((n, m, d))
    stats = gmm.fit_class_mixtures(
        jnp.asarray(features, jnp.float32), jnp.asarray(labels), None, 2, jax.random.key(13)
    )
    directions = rng.standard_normal((2, L, R, R))
    cores = np.eye(R) + 0.2 * directions[group] + 0.03 * rng.standard_normal((n, L, R, R))
    sizes = np.full(n, float(m), np.float32)
    return stats, cores.astype(np.float32), sizes, group


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_two_groups_weight_mass_stays_in_group(two_groups, beta):
    stats, cores, sizes, group = two_groups
    dist = similarity.data_distance(stats)
    out = aggregation.server_step(cores, None, sizes, None, aggregation.AggregationConfig(beta=beta), data_distance=dist)
    weights = np.asarray(out.weights)
    in_group = (weights * (group[:, None] == group[None, :])).sum(axis=1)
    assert np.all(in_group > 0.8), in_group
    # Computing the MMD inside the step gives the same result.
    if beta == 0.5:
        one_call = aggregation.server_step(cores, stats, sizes, None, aggregation.AggregationConfig(beta=beta))
        np.testing.assert_allclose(np.asarray(one_call.weights), weights, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


def test_nan_core_is_excluded():
    cores, dist, sizes = _random_round(14)
    cores[3, 0, 1, 1] = np.nan
    out = aggregation.server_step(cores, None, sizes, None, data_distance=dist)
    np.testing.assert_array_equal(np.asarray(out.excluded), np.arange(N) == 3)
    weights = np.asarray(out.weights)
    np.testing.assert_array_equal(weights[:, 3], 0.0)
    active = np.arange(N) != 3
    np.testing.assert_allclose(weights[3], np.where(active, sizes, 0) / sizes[active].sum(), rtol=1e-6)
    chex.assert_tree_all_finite(out)


def test_nan_statistic_is_excluded():
    cores, _, sizes = _random_round(15)
    rng = np.random.default_rng(15)
    stats = gmm.ClassMixtures(
        jnp.asarray(rng.dirichlet(np.ones(3), (N, 2)), jnp.float32),
        jnp.asarray(rng.normal(size=(N, 2, 3, 5)), jnp.float32).at[1, 0, 0, 0].set(jnp.inf),
        jnp.asarray(rng.uniform(0.1, 1.0, (N, 2, 3, 5)), jnp.float32),
        jnp.full((N, 2), 10.0),
        jnp.ones((N, 2, 3), bool),
    )
    dist = similarity.data_distance(stats)
    out = aggregation.server_step(cores, None, sizes, None, data_distance=dist)
    np.testing.assert_array_equal(np.asarray(out.excluded), np.arange(N) == 1)
    np.testing.assert_array_equal(np.delete(np.asarray(out.weights[:, 1]), 1), 0.0)
    np.testing.assert_array_equal(np.asarray(out.weights[1]), np.eye(N)[1])  # finite core: kept
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"projection": "sort"}, "projection"),
        ({"bandwidth_sq": -1.0}, "bandwidth_sq"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        aggregation.AggregationConfig(**kwargs)


def test_the_core_origin_is_where_updates_are_measured_from():
    """Cores that started at C⁰ aggregate as the same updates started from I would: the
    same distances and weights, and mixtures shifted by C⁰ − I (W's rows sum to 1)."""
    cores, dist, sizes = _random_round(17)
    origin = np.random.default_rng(18).standard_normal((L, R, R)).astype(np.float32)
    moved = cores - np.eye(R, dtype=np.float32) + origin
    config = aggregation.AggregationConfig(beta=0.3, lam=0.5)
    reference = aggregation.server_step(cores, None, sizes, None, config, data_distance=dist)
    measured = aggregation.server_step(moved, None, sizes, None, config, data_distance=dist, core_origin=origin)
    np.testing.assert_allclose(measured.param_distance, reference.param_distance, atol=1e-4)
    np.testing.assert_allclose(measured.weights, reference.weights, atol=1e-4)
    np.testing.assert_allclose(measured.mixed_cores, reference.mixed_cores - np.eye(R) + origin, atol=1e-4)
    with pytest.raises(ValueError, match=r"core_origin must have shape"):
        aggregation.server_step(cores, None, sizes, None, config, data_distance=dist, core_origin=origin[0])


def test_one_core_origin_per_client_measures_each_clients_own_update():
    """The same origin given once per client changes nothing; different origins change the
    distances (each Δ_i = C_i − C⁰_i) but the mixtures stay mixtures of the cores C_i."""
    cores, dist, sizes = _random_round(19)
    origin = np.random.default_rng(20).standard_normal((L, R, R)).astype(np.float32)
    config = aggregation.AggregationConfig(beta=0.3, lam=0.5)
    shared = aggregation.server_step(cores, None, sizes, None, config, data_distance=dist, core_origin=origin)
    each = aggregation.server_step(cores, None, sizes, None, config, data_distance=dist,
                                   core_origin=np.broadcast_to(origin, cores.shape))
    np.testing.assert_allclose(each.weights, shared.weights, atol=1e-6)
    np.testing.assert_allclose(each.mixed_cores, shared.mixed_cores, atol=1e-6)
    origins = np.random.default_rng(21).standard_normal(cores.shape).astype(np.float32)
    own = aggregation.server_step(cores, None, sizes, None, config, data_distance=dist, core_origin=origins)
    np.testing.assert_allclose(own.param_distance, numpy_reference.np_parameter_distance(cores, origins), atol=1e-4)
    np.testing.assert_allclose(own.mixed_cores, np.einsum("ij,jlab->ilab", np.asarray(own.weights), cores),
                               atol=1e-4)


def test_bad_shapes_raise():
    cores, dist, sizes = _random_round(16)
    with pytest.raises(ValueError, match="cores"):
        _step(cores[:, :, :, :3], dist, sizes)  # not square
    with pytest.raises(ValueError, match="cores"):
        _step(cores[0], dist, sizes)  # missing client axis
    with pytest.raises(ValueError, match=r"cores\[2\]"):
        _step([cores[0], cores[1], cores[2][:, :3, :3]] + list(cores[3:]), dist, sizes)
    with pytest.raises(ValueError, match="sizes"):
        _step(cores, dist, sizes[:4])
    with pytest.raises(ValueError, match="mask"):
        _step(cores, dist, sizes, np.ones(N + 1, bool))
    with pytest.raises(ValueError, match="data_distance"):
        _step(cores, dist[:4, :4], sizes)
    with pytest.raises(ValueError, match="stats or data_distance"):
        aggregation.server_step(cores, None, sizes, None)
    with pytest.raises(ValueError, match="config"):
        aggregation.server_step(cores, None, sizes, None, {"beta": 0.5}, data_distance=dist)
    stats = gmm.ClassMixtures(
        jnp.ones((N - 1, 2, 3)) / 3, jnp.zeros((N - 1, 2, 3, 4)), jnp.ones((N - 1, 2, 3, 4)),
        jnp.ones((N - 1, 2)), jnp.ones((N - 1, 2, 3), bool),
    )  # fmt: skip
    with pytest.raises(ValueError, match="stats"):
        aggregation.server_step(cores, stats, sizes, None)
    # A list of equal-shape cores is accepted and stacked.
    stacked = _step(list(cores), dist, sizes)
    np.testing.assert_allclose(np.asarray(stacked.weights), np.asarray(_step(cores, dist, sizes).weights))


# ---------------------------------------------------------------------------- benchmark


def test_benchmark_smoke_writes_json(tmp_path):
    out = tmp_path / "aggregation.json"
    bench.main(["--smoke", "--out", str(out), "--repeats", "1"])
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["n_clients"] == 10
    for field in ("kernel_s", "kernel_bisection_s", "numpy_s", "ratio_numpy_over_kernel", "data_distance_kernel_s"):
        assert isinstance(row[field], float) and row[field] > 0, field
    assert row["max_abs_weight_diff"] < 1e-5
    assert row["data_distance_max_rel_diff"] < 1e-3

"""Plain-array FedAvg / FFA / FedSA aggregation against a numpy reference, with bad inputs."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from celora_jax import fedavg, fedavg_lora, fedsa_lora, ffa_lora
from celora_jax.server import baselines


def numpy_fedavg(leaf, sizes, usable):
    weights = np.where(usable, sizes, 0.0)
    weights = weights / weights.sum()
    return np.tensordot(weights, np.where(usable.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, 0.0), axes=1)


def test_fedavg_lora_matches_numpy_with_mask_and_non_finite_client():
    rng = np.random.default_rng(0)
    n = 6
    a = {"q": rng.normal(size=(n, 16, 4)).astype(np.float32), "v": rng.normal(size=(n, 2, 16, 4)).astype(np.float32)}
    b = {"q": rng.normal(size=(n, 4, 8)).astype(np.float32), "v": rng.normal(size=(n, 2, 4, 8)).astype(np.float32)}
    b["v"][3, 1, 0, 0] = np.nan  # client 3's B is broken: its A must not count either
    sizes = np.array([5, 1, 7, 3, 2, 9], np.float32)
    mask = np.array([True, True, False, True, True, True])
    a_mean, b_mean = fedavg_lora(a, b, sizes, mask)
    usable = mask & np.array([True, True, True, False, True, True])
    for name in ("q", "v"):
        chex.assert_shape(a_mean[name], a[name].shape[1:])
        np.testing.assert_allclose(a_mean[name], numpy_fedavg(a[name], sizes, usable), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b_mean[name], numpy_fedavg(b[name], sizes, usable), rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(b_mean[name]))


def test_ffa_and_fedsa_average_their_one_factor():
    rng = np.random.default_rng(1)
    factor = rng.normal(size=(4, 3, 5)).astype(np.float32)
    sizes = np.array([1, 2, 3, 4], np.float32)
    expected = numpy_fedavg(factor, sizes, np.ones(4, bool))
    np.testing.assert_allclose(ffa_lora(factor, sizes), expected, rtol=1e-6)
    np.testing.assert_allclose(fedsa_lora(factor, sizes), expected, rtol=1e-6)


def test_no_usable_client_gives_zeros_and_jit_works():
    uploads = jnp.ones((3, 2, 2))
    out = fedavg(uploads, jnp.ones(3), jnp.zeros(3, bool))
    np.testing.assert_array_equal(out, np.zeros((2, 2)))
    jitted = jax.jit(lambda u, s: fedavg(u, s))(uploads, jnp.ones(3))
    np.testing.assert_allclose(jitted, np.ones((2, 2)))


@settings(max_examples=25, deadline=None)
@given(sizes=hnp.arrays(np.float32, st.integers(1, 8), elements=st.floats(0, 100, width=32)),
       data=st.data())
def test_weights_on_simplex_over_usable_clients(sizes, data):
    n = sizes.shape[0]
    mask = data.draw(hnp.arrays(bool, n))
    uploads = jnp.asarray(np.eye(n, dtype=np.float32))  # row j = e_j: the average *is* the weights
    weights = np.asarray(fedavg(uploads, sizes, mask))
    assert np.all(weights >= 0)
    assert np.all(weights[~mask] == 0)
    if mask.any():
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
        if sizes[mask].sum() > 0:
            np.testing.assert_allclose(weights[mask], sizes[mask] / sizes[mask].sum(), rtol=1e-5, atol=1e-7)
    else:
        assert weights.sum() == 0


@pytest.mark.parametrize("call, message", [
    (lambda: fedavg(jnp.ones((3, 2)), jnp.ones(2)), r"fedavg: sizes must have shape \(3,\)"),
    (lambda: fedavg(jnp.ones((3, 2)), jnp.ones(3), jnp.ones(4, bool)), r"fedavg: mask must have shape \(3,\)"),
    (lambda: fedavg({}, jnp.ones(3)), r"fedavg: uploads is empty"),
    (lambda: fedavg(jnp.ones((3, 2), jnp.int32), jnp.ones(3)), r"uploads must be a floating-point array"),
    (lambda: fedavg_lora(jnp.ones((3, 4, 2)), jnp.ones((2, 2, 4)), jnp.ones(3)),
     r"fedavg_lora: uploads\['b'\] has 2 clients on its leading axis, but uploads\['a'\] has 3"),
    (lambda: ffa_lora(jnp.float32(1.0), jnp.ones(1)), r"ffa_lora: b must have a leading client axis"),
    (lambda: fedsa_lora({"q": jnp.ones((2, 3))}, jnp.ones(5)), r"fedsa_lora: sizes must have shape \(2,\)"),
])
def test_bad_inputs_name_argument_and_expected_shape(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_engine_strategy_uses_the_public_average():
    from celora_jax.federated import strategies

    strategy = strategies.weighted_average()
    uploads = {"lora": {"B": jnp.arange(12.0).reshape(3, 2, 2)}}
    sizes, mask = jnp.array([1.0, 2.0, 3.0]), jnp.array([True, False, True])
    _, downloads, _ = strategy.aggregate({}, uploads, sizes, mask)
    chex.assert_shape(downloads["lora"]["B"], (3, 2, 2))
    expected = baselines.fedavg(uploads, sizes, mask)["lora"]["B"]
    for client in range(3):
        np.testing.assert_allclose(downloads["lora"]["B"][client], expected)

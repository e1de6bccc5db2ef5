"""Per-class diagonal GMM statistic: parity with scikit-learn, masks, bad input."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from celora_jax.server import gmm

NUM_CLIENTS, NUM_EXAMPLES, DIM = 2, 360, 6
# Classes 0 and 1 are large (sklearn parity); for client 0, class 2 has 2 examples and
# class 3 has 1; client 1 has none of classes 2 and 3. One fit, one compilation.
NUM_CLASSES, BIG_CLASSES = 4, 2
SMALL_POINTS = np.array([[0.0, 0.0, 1, 1, 1, 1], [1.0, 2.0, 1, 1, 1, 1], [5.0, 5.0, 5, 5, 5, 5]], np.float32)

_score = jax.jit(gmm.score_samples)


def _blobs(rng, centres, scales, labels):
    """Samples one point per label from that class's 3-blob mixture."""
    comp = rng.integers(0, centres.shape[1], labels.shape)
    return centres[labels, comp] + scales[labels, comp] * rng.standard_normal(labels.shape + (centres.shape[-1],))


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 6.0, (NUM_CLIENTS, BIG_CLASSES, 3, DIM)) + 20.0  # far from 0 on purpose
    scales = rng.uniform(0.3, 1.5, (NUM_CLIENTS, BIG_CLASSES, 3, DIM))
    labels = rng.integers(0, BIG_CLASSES, (NUM_CLIENTS, NUM_EXAMPLES))
    test_labels = rng.integers(0, BIG_CLASSES, (NUM_CLIENTS, NUM_EXAMPLES))
    train = np.stack([_blobs(rng, centres[i], scales[i], labels[i]) for i in range(NUM_CLIENTS)])
    test = np.stack([_blobs(rng, centres[i], scales[i], test_labels[i]) for i in range(NUM_CLIENTS)])
    mask = np.ones((NUM_CLIENTS, NUM_EXAMPLES), bool)
    mask[1, 250:] = False  # ragged: client 1 has fewer examples
    train = train.astype(np.float32)
    train[1, 250:] = np.nan  # padding content must not matter
    train[0, :3] = SMALL_POINTS
    labels[0, :3] = [2, 2, 3]
    labels[1, 3] = 7  # out of range: ignored
    stats = gmm.fit_class_mixtures(
        jnp.asarray(train), jnp.asarray(labels), jnp.asarray(mask), NUM_CLASSES, jax.random.key(0)
    )
    return stats, train, labels, mask, test.astype(np.float32), test_labels


def test_shapes_and_normalization(fitted):
    stats, _, labels, mask, _, _ = fitted
    chex.assert_shape(stats.weights, (NUM_CLIENTS, NUM_CLASSES, 3))
    chex.assert_shape([stats.means, stats.variances], (NUM_CLIENTS, NUM_CLASSES, 3, DIM))
    chex.assert_shape(stats.class_counts, (NUM_CLIENTS, NUM_CLASSES))
    chex.assert_tree_all_finite(stats)
    expected_counts = np.stack(
        [np.bincount(labels[i][mask[i] & (labels[i] < NUM_CLASSES)], minlength=NUM_CLASSES) for i in range(NUM_CLIENTS)]
    )
    np.testing.assert_array_equal(np.asarray(stats.class_counts), expected_counts)
    np.testing.assert_allclose(np.asarray(stats.weights[:, :BIG_CLASSES]).sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(stats.component_mask[:, :BIG_CLASSES]))
    assert np.all(np.asarray(stats.variances) >= 1e-5)


def test_log_likelihood_parity_with_sklearn(fitted):
    """Held-out mean log-likelihood within 1% of GaussianMixture(covariance_type="diag")."""
    stats, train, labels, mask, test, test_labels = fitted
    for i in range(NUM_CLIENTS):
        for c in range(BIG_CLASSES):
            x_train = train[i][mask[i] & (labels[i] == c)].astype(np.float64)
            x_test = test[i][test_labels[i] == c]
            reference = GaussianMixture(
                n_components=min(3, len(x_train)),
                covariance_type="diag",
                reg_covar=1e-5,
                max_iter=200,
                tol=1e-3,
                random_state=0,
            ).fit(x_train)
            padded = jnp.asarray(np.pad(x_test, [(0, NUM_EXAMPLES - len(x_test)), (0, 0)]))  # one compile
            ours = _score(stats.weights[i, c], stats.means[i, c], stats.variances[i, c], stats.component_mask[i, c], padded)
            ours_mean, ref_mean = float(jnp.mean(ours[: len(x_test)])), float(reference.score(x_test))
            assert abs(ours_mean - ref_mean) <= 0.01 * abs(ref_mean), (i, c, ours_mean, ref_mean)
            # score_samples itself agrees with sklearn for sklearn's own parameters.
            theirs = _score(
                jnp.asarray(reference.weights_, jnp.float32),
                jnp.asarray(reference.means_, jnp.float32),
                jnp.asarray(reference.covariances_, jnp.float32),
                jnp.ones(reference.n_components, bool),
                padded,
            )
            np.testing.assert_allclose(
                np.asarray(theirs[: len(x_test)]), reference.score_samples(x_test), rtol=1e-4, atol=1e-3
            )


def test_small_and_empty_classes(fitted):
    """G = min(3, n_c): 2 examples -> 2 point components, 1 -> 1, 0 -> nothing."""
    stats = fitted[0]
    np.testing.assert_array_equal(np.asarray(stats.class_counts[:, 2:]), [[2, 1], [0, 0]])
    np.testing.assert_array_equal(
        np.asarray(stats.component_mask[:, 2:]),
        [[[True, True, False], [True, False, False]], [[False, False, False], [False, False, False]]],
    )
    means = np.asarray(stats.means[0, 2, :2])
    means = means[np.argsort(means[:, 0])]
    np.testing.assert_allclose(means, SMALL_POINTS[:2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.weights[0, 2]), [0.5, 0.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.variances[0, 2, :2]), 1e-5, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(stats.means[0, 3, 0]), SMALL_POINTS[2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.variances[0, 3, 0]), 1e-5, rtol=1e-2)
    np.testing.assert_array_equal(np.asarray(stats.weights[1, 2:]), 0.0)


def test_bad_input_raises():
    x = jnp.zeros((2, 5, 3))
    y = jnp.zeros((2, 5), jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="features"):
        gmm.fit_class_mixtures(jnp.zeros((5, 3)), y, None, 2, key)
    with pytest.raises(ValueError, match="labels"):
        gmm.fit_class_mixtures(x, jnp.zeros((2, 4), jnp.int32), None, 2, key)
    with pytest.raises(ValueError, match="mask"):
        gmm.fit_class_mixtures(x, y, jnp.ones((2, 4), bool), 2, key)
    with pytest.raises(ValueError, match="num_classes"):
        gmm.fit_class_mixtures(x, y, None, 0, key)
    with pytest.raises(ValueError, match="reg_covar"):
        gmm.MixtureConfig(reg_covar=-1.0)
    with pytest.raises(ValueError, match="max_components"):
        gmm.MixtureConfig(max_components=0)

"""Client partitions: sizes, disjointness and label statistics; packing shapes."""

import numpy as np
import pytest

from celora_jax.data import packing
from celora_jax.data.partition import PartitionConfig, partition
from celora_jax.data.text import DataError


def _labels(n=4000, classes=2, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int32)


def _check_disjoint_equal_sizes(split, config):
    assert split.train.shape == (config.num_clients, config.train_examples)
    assert split.test.shape == (config.num_clients, config.test_examples)
    everything = np.concatenate([split.train.ravel(), split.test.ravel(), split.global_test])
    assert len(np.unique(everything)) == len(everything)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_clients_are_equal_sized_and_disjoint(scheme):
    config = PartitionConfig(scheme=scheme, num_clients=7, train_examples=40, test_examples=10,
                             global_test_examples=50)
    labels = _labels()
    split = partition(labels, config)
    _check_disjoint_equal_sizes(split, config)
    assert len(split.global_test) == 50
    # The common test set keeps the global label proportions.
    assert abs(labels[split.global_test].mean() - labels.mean()) < 0.05


def test_dirichlet_label_skew_follows_alpha():
    """Small alpha gives nearly single-class clients; large alpha gives near-global mixes."""
    labels = _labels(20000)

    def mean_majority_share(alpha):
        config = PartitionConfig(scheme="dirichlet", num_clients=40, alpha=alpha,
                                 train_examples=60, test_examples=20, global_test_examples=0, seed=1)
        split = partition(labels, config)
        shares = [np.bincount(labels[np.concatenate([tr, te])], minlength=2).max() / 80
                  for tr, te in zip(split.train, split.test)]
        return float(np.mean(shares))

    skewed, mild, near_iid = mean_majority_share(0.05), mean_majority_share(1.0), mean_majority_share(1000.0)
    assert skewed > 0.9
    assert skewed > mild > near_iid
    assert near_iid < 0.6
    # Expected majority share under Dir(alpha * p) with p = (1/2, 1/2) and alpha = 1 is 0.82.
    assert 0.72 < mild < 0.9


def test_train_and_test_splits_share_each_clients_distribution():
    labels = _labels(20000)
    config = PartitionConfig(scheme="dirichlet", num_clients=20, alpha=0.3, train_examples=200,
                             test_examples=200, global_test_examples=0)
    split = partition(labels, config)
    train_share = labels[split.train].mean(1)
    test_share = labels[split.test].mean(1)
    assert np.corrcoef(train_share, test_share)[0, 1] > 0.9


def test_pathological_and_source_schemes():
    labels = np.tile(np.arange(4, dtype=np.int32), 1000)
    split = partition(labels, PartitionConfig(scheme="pathological", num_clients=4, labels_per_client=1,
                                              train_examples=20, test_examples=5, global_test_examples=0))
    for client, rows in enumerate(split.train):
        assert set(labels[rows]) == {client}
    groups = (np.arange(len(labels)) % 3 == 0).astype(np.int32)
    split = partition(labels, PartitionConfig(scheme="source", num_clients=4, train_examples=20,
                                              test_examples=5, global_test_examples=0), groups)
    for client, rows in enumerate(split.train):
        assert set(groups[rows]) == {client % 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(alpha=-1.0), "alpha must be > 0"),
    (dict(scheme="zipf"), "unknown partition scheme"),
    (dict(num_clients=0), "num_clients"),
    (dict(train_examples=0), "at least one train"),
])
def test_bad_partition_config(kwargs, message):
    with pytest.raises(DataError, match=message):
        PartitionConfig(**kwargs)


def test_too_many_clients_and_missing_groups_are_clear_errors():
    with pytest.raises(DataError, match="need .* examples, the data has"):
        partition(_labels(100), PartitionConfig(num_clients=10, train_examples=10, test_examples=5))
    with pytest.raises(DataError, match="only .* remain"):
        # Enough examples in total, but a pathological client needs more of its class than exist.
        labels = np.array([0] * 30 + [1] * 300, np.int32)
        partition(labels, PartitionConfig(scheme="pathological", num_clients=2, train_examples=40,
                                          test_examples=10, global_test_examples=0))
    with pytest.raises(DataError, match="needs a group column"):
        partition(_labels(), PartitionConfig(scheme="source", num_clients=2))


def test_round_batches_are_fixed_shape_epochs_and_reproducible():
    examples = {"input_ids": np.arange(3 * 10 * 4).reshape(3, 10, 4), "labels": np.arange(30).reshape(3, 10),
                "example_mask": np.ones((3, 10), np.float32)}
    batches = packing.round_batches(examples, steps=5, batch_size=2, seed=0, round_index=0)
    assert batches["input_ids"].shape == (3, 5, 2, 4)
    assert batches["labels"].shape == (3, 5, 2)
    for client in range(3):  # one full epoch: each example exactly once, from its own client
        seen = np.sort(batches["labels"][client].ravel())
        np.testing.assert_array_equal(seen, np.arange(10) + 10 * client)
    again = packing.round_batches(examples, steps=5, batch_size=2, seed=0, round_index=0)
    np.testing.assert_array_equal(again["labels"], batches["labels"])
    other = packing.round_batches(examples, steps=5, batch_size=2, seed=0, round_index=1)
    assert not np.array_equal(other["labels"], batches["labels"])
    padded = packing.pad_clients(batches, 4)
    assert padded["example_mask"].shape == (4, 5, 2) and padded["example_mask"][3].sum() == 0


def test_dirichlet_source_skews_by_label_and_source_at_once():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 20000).astype(np.int32)
    groups = (rng.random(20000) < 0.3).astype(np.int32)  # an unbalanced second source, like RT
    config = PartitionConfig(scheme="dirichlet_source", num_clients=30, alpha=0.3, train_examples=60,
                             test_examples=20, global_test_examples=100, seed=2)
    split = partition(labels, config, groups)
    _check_disjoint_equal_sizes(split, config)
    cells = [np.bincount(groups[rows] * 2 + labels[rows], minlength=4) / len(rows) for rows in split.train]
    # Strong skew: most clients are dominated by one (source, label) cell ...
    assert np.mean([c.max() for c in cells]) > 0.6
    # ... and both the source and the label mixes vary across clients.
    assert np.std([c[2] + c[3] for c in cells]) > 0.2 and np.std([c[1] + c[3] for c in cells]) > 0.2
    with pytest.raises(DataError, match="needs a group column"):
        partition(labels, config)

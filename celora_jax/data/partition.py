"""Split a labelled dataset into non-IID clients, each with its own train and test split.

All schemes give equal-size clients (as the authors' code does) and draw every client's
test split from the same distribution as its training split. Every split records each
client's true cluster (``ClientSplit.clusters``): the source for the source schemes, the
hidden cluster for the clustered ones, the client's own group for "natural", 0 otherwise; so
results can say how well learned aggregation weights recover it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from celora_jax._checks import check_fields
from celora_jax.data.errors import DataError

SCHEMES = ("iid", "dirichlet", "pathological", "source", "dirichlet_source", "clustered_labels",
           "clustered_domains", "clustered_rotations", "natural", "node_local")
# clustered_rotations turns cluster k's images by k quarter turns: 4 distinct domains at most.
MAX_ROTATION_CLUSTERS = 4
# Schemes whose clients are defined by data.group_column.
GROUP_SCHEMES = ("source", "dirichlet_source", "clustered_domains", "natural")


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """How examples are dealt to clients.

    Attributes:
      scheme: "iid"; "dirichlet" (label proportions of each client ~ Dir(alpha · global
        label proportions)); "pathological" (each client sees labels_per_client classes);
        "source" (client i draws only from source/group i mod #groups, e.g. IMDB vs
        Rotten Tomatoes, labels IID within its source); "dirichlet_source" (skewed by label
        and source at once: each client's proportions over the (source, label) cells ~
        Dir(alpha · global cell proportions)); "clustered_labels" (num_clusters hidden
        clusters of consecutive clients, labels IID, and every cluster but the first
        renames the classes by its own cyclic shift y -> (y + s_k) mod C: concept shift,
        the same text has different labels in different clusters; at most C clusters,
        whose relabelings then differ on every class); "clustered_domains" (num_clusters
        clusters of consecutive clients, cluster k drawing only from source/group k, labels
        IID within it); "clustered_rotations" (the image form of clustered_domains:
        num_clusters <= 4 clusters of consecutive clients, labels IID, cluster k's images
        rotated by k x 90 degrees, so each cluster sees its own domain of the same
        classes); "natural" (one client per group, e.g. a speaking role: the
        num_clients largest groups holding at least train_examples + test_examples
        examples); "node_local" (the whole data is one client's, ``node_client``, split
        into train and test by ``test_fraction``: the file a Flower SuperNode holds; the
        other clients' rows repeat it and are never read, and train_examples/test_examples
        are not used).
      num_clients: N.
      alpha: Dirichlet concentration (scheme "dirichlet"); smaller is more skewed.
      labels_per_client: classes per client (scheme "pathological").
      num_clusters: hidden clusters (the "clustered_*" schemes).
      train_examples: training examples per client.
      test_examples: test examples per client, from the client's own distribution.
      global_test_examples: examples of a common test set drawn from the remaining data
        with the global label distribution (0 disables it).
      seed: seed of the partition (independent of the training seed).
      pooled_training: every client trains on the union of all clients' training splits,
        each example as its owner sees it (its owner's class names and image rotation),
        while it is still tested on its own test split: the data of the ``centralized``
        reference (one shared model trained on the pooled data). One process holding
        every client only.
      validation_fraction: the share of each client's train_examples held out as its
        validation split (``validation_examples`` of them, at least one when > 0), on which
        hyperparameters are chosen so that the test split never is; the client trains on
        the rest. 0 (the default) holds out nothing. The examples drawn do not depend on
        it: the validation split is the tail of the client's shuffled training examples.
      node_client: the client whose data the whole file is (scheme "node_local": the
        partition-id of the Flower SuperNode reading it).
      test_fraction: the share of a node_local client's examples held out as its test
        split (at least one; at least one left to train).
    """

    scheme: str = "dirichlet"
    num_clients: int = 10
    alpha: float = 0.5
    labels_per_client: int = 1
    num_clusters: int = 2
    train_examples: int = 128
    test_examples: int = 64
    global_test_examples: int = 256
    seed: int = 0
    pooled_training: bool = False
    validation_fraction: float = 0.0
    node_client: int = 0
    test_fraction: float = 0.25

    @property
    def validation_examples(self) -> int:
        """Validation examples per client: ``validation_fraction`` of ``train_examples``,
        rounded, at least one when the fraction is > 0."""
        if self.validation_fraction == 0:
            return 0
        return max(1, int(round(self.validation_fraction * self.train_examples)))

    def __post_init__(self):
        check_fields(self, "partition")
        if self.seed < 0:
            raise DataError(f"partition.seed must be an integer >= 0, got {self.seed}")
        if self.scheme not in SCHEMES:
            raise DataError(f"unknown partition scheme {self.scheme!r}; choose one of {SCHEMES}")
        if self.num_clients < 1:
            raise DataError(f"num_clients must be at least 1, got {self.num_clients}")
        if self.scheme in ("dirichlet", "dirichlet_source") and not self.alpha > 0:
            raise DataError(f"Dirichlet alpha must be > 0, got {self.alpha}")
        if self.train_examples < 1 or self.test_examples < 1:
            raise DataError("every client needs at least one train and one test example "
                            f"(got train_examples={self.train_examples}, test_examples={self.test_examples})")
        if self.scheme == "node_local":
            if not 0 <= self.node_client < self.num_clients:
                raise DataError(f"partition.node_client={self.node_client} is not one of the {self.num_clients} "
                                "clients")
            if not 0 < self.test_fraction < 1:
                raise DataError(f"partition.test_fraction must be in (0, 1), got {self.test_fraction}")
            if self.validation_fraction:  # the simulation's hyperparameter search, not a node's
                raise DataError("partition.validation_fraction applies to simulated partitions; a node_local "
                                "client holds out only its test split (partition.test_fraction)")
        if not 0 <= self.validation_fraction < 1:
            raise DataError(f"partition.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.validation_examples >= self.train_examples:
            raise DataError(f"partition.validation_fraction={self.validation_fraction} holds out "
                            f"{self.validation_examples} of the {self.train_examples} training examples per client, "
                            "leaving none to train on; lower it or raise partition.train_examples")
        if self.labels_per_client < 1:
            raise DataError(f"labels_per_client must be at least 1, got {self.labels_per_client}")
        if self.global_test_examples < 0:
            raise DataError("global_test_examples must be >= 0")
        if self.scheme.startswith("clustered_"):
            if self.num_clusters < 1:
                raise DataError(f"partition.num_clusters must be at least 1, got {self.num_clusters}")
            if self.num_clusters > self.num_clients:
                raise DataError(f"partition.num_clusters={self.num_clusters} exceeds the {self.num_clients} "
                                "clients: every cluster needs a client")
            if self.scheme == "clustered_rotations" and self.num_clusters > MAX_ROTATION_CLUSTERS:
                raise DataError(f"partition.num_clusters={self.num_clusters} exceeds the {MAX_ROTATION_CLUSTERS} "
                                "distinct quarter turns clustered_rotations gives its clusters")


@dataclasses.dataclass(frozen=True)
class ClientSplit:
    """Example indices into the dataset: ``train [N, n_train]``, ``test [N, n_test]``,
    ``global_test [n_global]``; ``clusters [N]`` each client's true cluster;
    ``label_maps [N, C]`` (clustered_labels only, else None): client i's label of an example
    of dataset class y is ``label_maps[i, y]``; ``quarter_turns [N]`` (clustered_rotations
    only, else None): client i's images are rotated by ``quarter_turns[i] x 90`` degrees.
    The global test keeps the dataset's labels and images (those of cluster 0)."""

    train: np.ndarray
    test: np.ndarray
    global_test: np.ndarray
    clusters: np.ndarray | None = None
    label_maps: np.ndarray | None = None
    quarter_turns: np.ndarray | None = None


def cluster_of_clients(num_clients: int, num_clusters: int) -> np.ndarray:
    """Consecutive clients share a cluster (sizes differ by at most one): ``[N]`` ids."""
    return np.arange(num_clients) * num_clusters // num_clients


def cluster_label_maps(num_classes: int, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """``[K, C]`` relabelings: cluster 0 keeps the labels, cluster k shifts them by a distinct
    s_k in 1..C-1, so any two clusters disagree on every class."""
    if num_clusters > num_classes:
        raise DataError(f"partition.num_clusters={num_clusters} exceeds the {num_classes} classes: "
                        "clustered_labels gives every cluster a relabeling that differs from every other "
                        "cluster's on every class, and C classes allow at most C of them")
    shifts = np.concatenate([[0], rng.choice(np.arange(1, num_classes), size=num_clusters - 1, replace=False)])
    return (np.arange(num_classes)[None, :] + shifts[:, None]) % num_classes


def partition(labels: np.ndarray, config: PartitionConfig, groups: np.ndarray | None = None) -> ClientSplit:
    """Deals disjoint examples to clients following ``config.scheme``.

    Raises:
      DataError: the scheme cannot be satisfied with the data (too many clients or examples
        per client for some class or source, no groups for the "source" scheme).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(config.seed)
    if config.scheme == "node_local":
        return _node_local(len(labels), config, rng)
    num_classes = int(labels.max()) + 1
    per_client = config.train_examples + config.test_examples
    needed = config.num_clients * per_client + config.global_test_examples
    if needed > len(labels):
        raise DataError(f"{config.num_clients} clients x {per_client} examples + "
                        f"{config.global_test_examples} global test examples need {needed} "
                        f"examples, the data has {len(labels)}")
    pools = _Pools(labels, groups, rng)
    clusters, label_maps, quarter_turns = np.zeros(config.num_clients, np.int64), None, None
    if config.scheme in GROUP_SCHEMES and groups is None:
        raise DataError(f"the {config.scheme!r} partition needs a group column (data.group_column)")
    if config.scheme == "clustered_labels":  # IID labels, renamed per cluster afterwards
        clusters = cluster_of_clients(config.num_clients, config.num_clusters)
        label_maps = cluster_label_maps(num_classes, config.num_clusters, rng)[clusters]
    if config.scheme == "clustered_rotations":  # IID labels, images turned per cluster by the task
        clusters = cluster_of_clients(config.num_clients, config.num_clusters)
        quarter_turns = clusters.copy()
    if config.scheme in ("iid", "clustered_labels", "clustered_rotations"):
        counts = rng.multinomial(per_client, np.bincount(labels, minlength=num_classes) / len(labels),
                                 size=config.num_clients)
        cells = [{(None, c): n for c, n in enumerate(row)} for row in counts]
    elif config.scheme == "dirichlet":
        prior = np.bincount(labels, minlength=num_classes) / len(labels)
        proportions = rng.dirichlet(config.alpha * prior, size=config.num_clients)
        counts = np.stack([rng.multinomial(per_client, p) for p in proportions])
        cells = [{(None, c): n for c, n in enumerate(row)} for row in counts]
    elif config.scheme == "pathological":
        if config.labels_per_client > num_classes:
            raise DataError(f"labels_per_client={config.labels_per_client} exceeds the "
                            f"{num_classes} classes in the data")
        cells = []
        for client in range(config.num_clients):
            # Consecutive class windows so that every class is used when N·k >= #classes.
            chosen = [(client * config.labels_per_client + j) % num_classes
                      for j in range(config.labels_per_client)]
            counts = np.bincount(rng.choice(chosen, size=per_client), minlength=num_classes)
            cells.append({(None, c): n for c, n in enumerate(counts)})
    elif config.scheme == "dirichlet_source":
        num_groups = int(np.max(groups)) + 1
        cell_ids = np.asarray(groups) * num_classes + labels
        prior = np.bincount(cell_ids, minlength=num_groups * num_classes) / len(labels)
        proportions = rng.dirichlet(config.alpha * np.maximum(prior, 1e-12), size=config.num_clients)
        counts = np.stack([rng.multinomial(per_client, p) for p in proportions])
        cells = [{divmod(cell, num_classes): n for cell, n in enumerate(row)} for row in counts]
    elif config.scheme == "natural":
        clusters = natural_groups(groups, config.num_clients, per_client)
        cells = []
        for group in clusters:  # the group's labels as they come, without replacement
            in_group = np.bincount(labels[groups == group], minlength=num_classes)
            counts = rng.multivariate_hypergeometric(in_group, per_client)
            cells.append({(int(group), c): n for c, n in enumerate(counts)})
    else:  # source, clustered_domains
        num_groups = int(np.max(groups)) + 1
        if config.scheme == "clustered_domains":
            if config.num_clusters > num_groups:
                raise DataError(f"partition.num_clusters={config.num_clusters} exceeds the {num_groups} "
                                "sources/groups of the data: clustered_domains draws cluster k from group k")
            clusters = cluster_of_clients(config.num_clients, config.num_clusters)
        else:
            clusters = np.arange(config.num_clients) % num_groups
        cells = []
        for client, group in enumerate(clusters):
            in_group = labels[groups == group]
            prior = np.bincount(in_group, minlength=num_classes) / len(in_group)
            counts = rng.multinomial(per_client, prior)
            cells.append({(int(group), c): n for c, n in enumerate(counts)})
    train, test = [], []
    for client, cell in enumerate(cells):
        indices = np.concatenate([pools.take(g, c, n, client) for (g, c), n in cell.items() if n])
        rng.shuffle(indices)
        train.append(indices[: config.train_examples])
        test.append(indices[config.train_examples:])
    global_test = pools.take_global(config.global_test_examples, num_classes)
    return ClientSplit(np.stack(train), np.stack(test), global_test, np.asarray(clusters, np.int64), label_maps,
                       quarter_turns)


def _node_local(count: int, config: PartitionConfig, rng: np.random.Generator) -> ClientSplit:
    """Every example is client ``node_client``'s, shuffled and split into train and test
    (at least one of each); every row of the split repeats it (only that client reads it)."""
    test = max(1, int(round(config.test_fraction * count)))
    if count - test < 1:
        raise DataError(f"the node's data has {count} example(s): too few to hold out {test} for testing "
                        "(partition.test_fraction) and still train")
    order = rng.permutation(count)
    train, held = order[test:], order[:test]
    rows = config.num_clients
    return ClientSplit(np.tile(train, (rows, 1)), np.tile(held, (rows, 1)), np.zeros((0,), np.int64),
                       np.zeros(rows, np.int64))


def natural_groups(groups: np.ndarray, num_clients: int, per_client: int) -> np.ndarray:
    """The ``num_clients`` largest groups (ties by id) with at least ``per_client`` examples."""
    sizes = np.bincount(groups)
    large = [int(g) for g in np.lexsort((np.arange(len(sizes)), -sizes)) if sizes[g] >= per_client]
    if not large:
        raise DataError(f"the natural partition keeps groups with at least {per_client} examples "
                        f"(train_examples + test_examples) and none of the {len(sizes)} groups has that "
                        f"many (the largest has {int(sizes.max())}); ask for fewer examples per client")
    if len(large) < num_clients:
        raise DataError(f"the natural partition needs {num_clients} groups with at least {per_client} examples "
                        f"(train_examples + test_examples); the data has {len(large)}: lower "
                        "partition.num_clients or the examples per client")
    return np.asarray(large[:num_clients], np.int64)


class _Pools:
    """Shuffled per-(group, class) pools of unused example indices."""

    def __init__(self, labels, groups, rng):
        self._labels, self._groups, self._rng = labels, groups, rng
        self._used = np.zeros(len(labels), bool)
        self._order = rng.permutation(len(labels))

    def _available(self, group, label):
        keep = (self._labels[self._order] == label) & ~self._used[self._order]
        if group is not None:
            keep &= self._groups[self._order] == group
        return self._order[keep]

    def take(self, group, label, count, client):
        available = self._available(group, label)
        if len(available) < count:
            where = f"class {label}" + ("" if group is None else f" of source {group}")
            raise DataError(f"client {client} needs {count} examples of {where} but only "
                            f"{len(available)} remain; use fewer clients or examples per client")
        chosen = available[:count]
        self._used[chosen] = True
        return chosen

    def take_global(self, count, num_classes):
        """``count`` unused examples with the dataset's label proportions (stratified, so
        that what the clients took does not skew the common test set)."""
        if count == 0:
            return np.zeros((0,), np.int64)
        prior = np.bincount(self._labels, minlength=num_classes) / len(self._labels)
        per_class = np.floor(prior * count).astype(int)
        per_class[np.argsort(-(prior * count - per_class))[: count - per_class.sum()]] += 1
        chosen = []
        for label, wanted in enumerate(per_class):
            available = self._available(None, label)
            if len(available) < wanted:
                raise DataError(f"only {len(available)} unused examples of class {label} remain "
                                f"for a global test set of {count}")
            chosen.append(available[len(available) - wanted:])
        chosen = np.concatenate(chosen)
        self._used[chosen] = True
        return self._rng.permutation(chosen)

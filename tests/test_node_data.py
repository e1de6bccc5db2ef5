"""Node-local data for Flower deployments (issue 43 item 1): declared class names, the
node_local partition, a SuperNode's node config mapped to its run config, and a node built
from its own CSV on a tiny BERT."""

import numpy as np
import pytest

from celora_jax.data.errors import DataError
from celora_jax.data.partition import PartitionConfig, partition
from celora_jax.data.text import TextDataConfig, load_text_dataset
from celora_jax.federated.config import RunConfig, apply_overrides
from celora_jax.flower.node_data import node_local_config


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    return path


def test_declared_label_names_fix_the_ids_whatever_a_file_holds(tmp_path):
    names = "negative,neutral,positive"
    only_positive = _csv(tmp_path / "a.csv", [("good", "positive"), ("fine", "positive")])
    data = load_text_dataset(TextDataConfig(path=str(only_positive), label_names=names))
    assert data.labels.tolist() == [2, 2] and data.label_names == ("negative", "neutral", "positive")
    as_ids = load_text_dataset(TextDataConfig(path=str(_csv(tmp_path / "b.csv", [("x", 0), ("y", 1)])),
                                              label_names=names))
    assert as_ids.labels.tolist() == [0, 1] and as_ids.num_classes == 3
    undeclared = _csv(tmp_path / "c.csv", [("good", "positive"), ("odd", "mixed")])
    with pytest.raises(DataError, match=r"row 2 of .*c.csv has label 'mixed', which is not one of the declared"):
        load_text_dataset(TextDataConfig(path=str(undeclared), label_names=names))
    typed = apply_overrides(RunConfig(), ["data.label_names=0,1"]).data  # an unquoted list on the command line
    assert typed.label_names == "0,1" and typed.declared_labels == ("0", "1")
    for bad in ("positive", "a,,b", "a,a"):
        with pytest.raises(DataError, match="two or more distinct"):
            TextDataConfig(label_names=bad)


def test_node_local_partition_gives_one_client_the_whole_file():
    split = partition(np.arange(20) % 3, PartitionConfig(scheme="node_local", num_clients=4, node_client=2,
                                                         test_fraction=0.25))
    assert split.train.shape == (4, 15) and split.test.shape == (4, 5) and len(split.global_test) == 0
    assert sorted(np.concatenate([split.train[2], split.test[2]]).tolist()) == list(range(20))
    with pytest.raises(DataError, match="too few to hold out"):
        partition(np.array([0]), PartitionConfig(scheme="node_local", num_clients=2))
    with pytest.raises(DataError, match="node_client=5 is not one of the 2 clients"):
        PartitionConfig(scheme="node_local", num_clients=2, node_client=5)
    with pytest.raises(DataError, match="holds out only its test split"):
        PartitionConfig(scheme="node_local", validation_fraction=0.2)


def test_node_config_becomes_the_nodes_run_config(tmp_path):
    run = apply_overrides(RunConfig(), ["data.label_names='neg,pos'"])
    node = {"partition-id": 1, "num-partitions": 2, "data-path": str(tmp_path / "site.csv"), "test-fraction": 0.5,
            "data.text_column": "note"}
    config = node_local_config(run, node, required=True)
    assert config.data.path == str(tmp_path / "site.csv") and config.data.text_column == "note"
    assert (config.partition.scheme, config.partition.node_client, config.partition.test_fraction) == \
        ("node_local", 1, 0.5)
    assert node_local_config(run, {"partition-id": 0}, required=False) is run  # the preset's data
    for node_config, config_in, message in [
        ({"partition-id": 0}, run, "node-data=true.*has no data-path"),
        ({"partition-id": 0, "data-path": "site.csv"}, run, "must be an absolute path"),
        ({"partition-id": 0, "data-path": "/x.csv"}, RunConfig(), "set data.label_names"),
        ({"partition-id": 0, "data-path": "/x.csv", "data.label_names": "a,b"}, run, "classes are the run's"),
        ({"partition-id": 0, "data-path": "/x.csv", "data.no_such": 1}, run, "unknown config key"),
        ({"partition-id": 0, "data-path": "/x.csv"}, apply_overrides(run, ["model.architecture='vit'"]),
         "reads images"),
    ]:
        with pytest.raises(ValueError, match=message):
            node_local_config(config_in, node_config, required=True)


def test_a_node_trains_on_its_own_csv_only(tmp_path, tiny_model_dir):
    """A SuperNode's Setup from its own file (tiny BERT): its client holds every row of the
    file and nothing else, sized by its real count; the data statistic and a round of
    training run on it; a file with an undeclared label fails with a line naming it."""
    from flwr.app import Context, RecordDict

    from celora_jax.federated.nodes import ClientNode
    from celora_jax.flower import app

    rows = [(f"review number {i} was {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(13)]
    site = _csv(tmp_path / "site1.csv", rows)
    run_config = {"preset": "smoke", "node-data": True,
                  "set": f"model.path='{tiny_model_dir}'; data.label_names='neg,pos'; partition.num_clients=3"}
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 1, "num-partitions": 3, "data-path": str(site)})
    setup = app._setup_for(context)
    node = ClientNode(setup, 1)
    assert node.size == 10.0  # 13 rows, 3 held out for the node's test split
    assert node.test_examples["labels"].shape == (3,)
    assert node.statistic().class_counts.sum() == 10
    state, upload, metrics = node.train(node.initial_state(), 0)
    assert upload is not None and np.isfinite(metrics["train_loss"])
    bad = _csv(tmp_path / "site2.csv", rows[:4] + [("a text", "neutral")])
    context.node_config["data-path"] = str(bad)
    with pytest.raises(DataError, match=r"row 5 of .*site2.csv has label 'neutral'"):
        app._setup_for(context)

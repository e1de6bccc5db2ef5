"""Image classification with the ViT (model.architecture="vit"), the clustered_rotations
partition and its Fashion-MNIST benchmark smoke preset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.data.partition import PartitionConfig, partition
from celora_jax.data.text import DataError
from celora_jax.federated.config import ConfigError, ModelConfig, RunConfig, apply_overrides
from celora_jax.federated.tasks import base
from celora_jax.models import vit


def test_clustered_rotations_turn_each_cluster_by_its_quarter_turns():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    split = partition(labels, PartitionConfig(scheme="clustered_rotations", num_clients=8, num_clusters=4,
                                              train_examples=20, test_examples=10, global_test_examples=30))
    assert split.clusters.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(split.quarter_turns, split.clusters)
    assert split.label_maps is None  # the labels stay the dataset's
    everything = np.concatenate([split.train.ravel(), split.test.ravel(), split.global_test])
    assert len(np.unique(everything)) == len(everything)  # disjoint examples

    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    turned = base.rotate_clients(images, np.array([0, 3]))
    np.testing.assert_array_equal(turned[0], images[0])
    for k in range(3):  # three quarter turns counter-clockwise = one clockwise
        np.testing.assert_array_equal(turned[1, k], np.rot90(images[1, k], -1))


def test_clustered_rotations_bad_input_is_named():
    with pytest.raises(DataError, match="num_clusters=5 exceeds the 4 distinct quarter turns"):
        PartitionConfig(scheme="clustered_rotations", num_clients=10, num_clusters=5)
    config = apply_overrides(RunConfig(), ["partition.scheme=clustered_rotations"])
    with pytest.raises(DataError, match="needs the image classifier .*model.architecture='vit'.*'encoder'"):
        base.split_clients(None, config)
    with pytest.raises(ConfigError, match="model.architecture must be one of"):
        ModelConfig(architecture="resnet")
    with pytest.raises(ConfigError, match="computes in float32 only"):
        ModelConfig(architecture="vit", dtype="bfloat16")


def _write_idx(path, array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.tobytes())


def test_rotating_images_that_are_not_square_is_a_clear_error(tmp_path):
    from celora_jax.federated.tasks import vision

    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((n, 4, 6)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    config = apply_overrides(RunConfig(), ["model.architecture=vit", "partition.scheme=clustered_rotations",
                                           f"data.path={tmp_path}", "partition.num_clients=2"])
    with pytest.raises(DataError, match="needs square images; .* holds 4x6 images"):
        vision.prepare(config, config.adapter)


def test_image_classifier_is_the_vit_cls_token_through_a_linear_head():
    config = vit.VisionConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, patch_size=4,
                              position_grid=2)
    model = vit.ImageClassifier(config, num_labels=5, image_size=8)
    images = np.random.default_rng(1).integers(0, 256, (3, 6, 6), dtype=np.uint8)  # gray, resized to 8
    params = model.init(jax.random.key(0), images)["params"]
    logits = model.apply({"params": params}, images)
    assert logits.shape == (3, 5)
    tokens = vit.VisionTransformer(config).apply({"params": params["backbone"]},
                                                 vit.prepare_pixels(images, config, 8))
    head = params["classifier"]
    np.testing.assert_allclose(logits, tokens[:, 0] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)
    pixels = vit.prepare_pixels(images, config, 8)
    assert pixels.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2] * config.image_std[2] / config.image_std[0]
                               + (config.image_mean[2] - config.image_mean[0]) / config.image_std[0], rtol=1e-4,
                               atol=1e-4)  # gray repeated over RGB, each channel normalized by its own stats
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.assets
@pytest.mark.slow
def test_fashion_mnist_rotation_smoke_preset_runs_end_to_end(tmp_path, dinov2_onnx, fashion_mnist):
    from celora_jax.cli import main as cli
    from celora_jax.federated import setup as setup_lib
    from celora_jax.federated.presets import get_preset

    prepared = setup_lib.prepare(get_preset("fashion_mnist_clustered_rotations_smoke"))
    task = prepared.task
    assert task.train["images"].shape == (4, 4, 28, 28) and task.clusters.tolist() == [0, 0, 1, 1]
    assert task.num_classes == 10
    code = cli.main(["run", "--preset", "fashion_mnist_clustered_rotations_smoke", "--methods", "celora",
                     "--no-progress", "--output-dir", str(tmp_path)])
    assert code == 0
    run = tmp_path / "fashion_mnist_clustered_rotations_smoke" / "celora"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert 0.0 <= records[-1]["test_accuracy_mean"] <= 1.0
    # 12 blocks x 6 adapted linears x r^2 cores, plus the shared LayerNorms (25 x 2 x 384)
    # and the 384 x 10 head with its bias (federation.share_base).
    assert records[-1]["bytes_up_per_client"] == (12 * 6 * 64 + 25 * 2 * 384 + 384 * 10 + 10) * 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["true_clusters"] == [0, 0, 1, 1]

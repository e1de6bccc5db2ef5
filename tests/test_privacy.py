"""Gradient inversion: the attack must succeed where it provably can (full knowledge, batch 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from celora_jax import AdapterConfig, init_adapters
from celora_jax.models.bert import EncoderConfig, SequenceClassifier
from celora_jax.privacy import attack

TINY = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                     max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)


def _factors(*names):
    def pick(weights):
        flat = traverse_util.flatten_dict(weights["lora"])
        return traverse_util.unflatten_dict({("lora",) + p: v for p, v in flat.items() if p[-1] in names})
    return pick


def _victim(kind, key=0):
    model = SequenceClassifier(TINY, num_labels=2)
    params = model.init(jax.random.key(key), jnp.zeros((1, 6), jnp.int32))["params"]
    config = AdapterConfig(kind=kind, rank=4, target=r"encoder/.*/kernel$", a_init_std=0.3)
    lora = init_adapters(jax.random.key(key + 1), params, config)
    # A client some way into training: B is no longer zero.
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * jax.random.normal(jax.random.key(7), x.shape)
        if jax.tree_util.keystr(path).endswith("'B']") else x, lora)
    return model, {"params": params, "lora": lora}


@pytest.mark.slow
def test_full_knowledge_lora_attack_recovers_a_single_example():
    model, weights = _victim("lora")
    ids = jnp.array([[5, 17, 33, 9, 41, 60]])
    mask = jnp.ones_like(ids)
    table = weights["params"]["backbone"]["embeddings"]["word_embeddings"]["embedding"]
    gradient_fn = attack.classifier_gradient_fn(model, ids.shape, mask, _factors("A", "B"))
    observed = gradient_fn(table[ids], jax.nn.one_hot(jnp.array([1]), 2), weights)
    offsets = attack.classifier_offsets(weights["params"], 6)
    result = attack.invert_gradients(gradient_fn, observed, weights, (1, 6, TINY.hidden_size), 2, table,
                                     jax.random.key(3), attack.AttackConfig(steps=2000, restarts=8,
                                                                           learning_rate=0.01), offsets)
    metrics = attack.recovery_metrics(ids, result.tokens, mask, np.array([1]), result.label_logits,
                                      result.positions, table[ids], result.embeddings, offsets)
    assert metrics["token_recovery"] > 0.9, metrics
    assert metrics["token_accuracy"] > 0.9, metrics   # positions come back with the tokens
    assert metrics["embedding_cosine"] > 0.99, metrics
    assert metrics["label_accuracy"] == 1.0
    assert float(result.matching_loss) < 1e-3


def test_recovery_metrics_count_position_free_and_in_position():
    true = np.array([[1, 2, 2, 3]])
    recovered = np.array([[2, 1, 2, 9]])
    metrics = attack.recovery_metrics(true, recovered, np.array([[1, 1, 1, 0]]), np.array([0]),
                                      np.array([[2.0, 1.0]]))
    assert metrics["token_recovery"] == 1.0       # {1, 2, 2} all found, ignoring order
    assert metrics["token_accuracy"] == pytest.approx(1 / 3)
    assert metrics["label_accuracy"] == 1.0
    # Slots may claim other positions: slot 0 says "I am position 1", slot 1 "position 0".
    moved = attack.recovery_metrics(true, recovered, np.array([[1, 1, 1, 0]]), np.array([0]),
                                    np.array([[2.0, 1.0]]), np.array([[1, 0, 2, 3]]))
    assert moved["token_accuracy"] == 1.0


def test_decoding_finds_token_and_position_despite_layernorm_and_permutation():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    offsets = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    ids = np.array([[3, 7, 7, 40]])
    # Slot t holds the token of position perm[t], rescaled and shifted: what LayerNorm cannot see.
    perm = np.array([2, 0, 3, 1])
    inputs = (table[ids[0, perm]] + offsets[perm]) * 2.5 + 0.3 - offsets
    tokens, positions = attack.nearest_tokens(inputs[None], table, offsets)
    np.testing.assert_array_equal(tokens[0], ids[0, perm])
    np.testing.assert_array_equal(positions[0], perm)


def test_attack_config_rejects_bad_budgets():
    with pytest.raises(ValueError, match="steps and restarts"):
        attack.AttackConfig(steps=0)
    with pytest.raises(ValueError, match="not both 0"):
        attack.AttackConfig(cosine_weight=0.0, l2_weight=0.0)


def test_ignored_tokens_do_not_count():
    true = np.array([[101, 7, 8, 102]])
    recovered = np.array([[101, 9, 8, 102]])
    metrics = attack.recovery_metrics(true, recovered, np.ones((1, 4)), np.array([0]), np.array([[1.0, 0.0]]),
                                      ignore_tokens=(101, 102))
    assert metrics["token_recovery"] == 0.5 and metrics["token_accuracy"] == 0.5

"""Method roles, server strategy invariants and communication bytes (METHOD.md §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax import adapters, methods
from celora_jax.aggregation import AggregationConfig
from celora_jax.federated import engine, personalized, strategies

MINILM_SHAPES = {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384),
                 "up": (384, 1536), "down": (1536, 384)}


def _minilm_like_params():
    """Kernel shapes of MiniLM's 36 adapted matrices (6 layers)."""
    return {"encoder": {f"layer_{i}": {name: {"kernel": jnp.zeros(shape)} for name, shape in MINILM_SHAPES.items()}
                        for i in range(6)},
            "LayerNorm": {"scale": jnp.ones(384), "bias": jnp.zeros(384)}}


def _client_params(method, rank=8):
    params = _minilm_like_params()
    spec = methods.get_method(method)
    config = adapters.AdapterConfig(kind=spec.adapter_kind, rank=rank)
    lora = adapters.init_adapters(jax.random.key(0), params, config)
    return {"lora": lora, "params": {"LayerNorm": params["LayerNorm"]}}, spec


@pytest.mark.parametrize("method, expected_numbers", [
    # METHOD.md §6, per adapted matrix: CE-LoRA r², FedAvg-LoRA r(d_in + d_out),
    # FFA-LoRA r·d_out, FedSA-LoRA r·d_in, local 0.
    ("celora", 36 * 8 * 8),
    ("celora_avg", 36 * 8 * 8),
    ("fedavg_lora", 6 * sum(8 * (a + b) for a, b in MINILM_SHAPES.values())),
    ("ffa_lora", 6 * sum(8 * b for _, b in MINILM_SHAPES.values())),
    ("fedsa_lora", 6 * sum(8 * a for a, _ in MINILM_SHAPES.values())),
    ("local", 0),
])
def test_bytes_per_client_match_method_table_for_minilm_rank_8(method, expected_numbers):
    client_params, spec = _client_params(method)
    roles = methods.parameter_roles(client_params, spec)
    assert engine.bytes_per_client(client_params, roles) == 4 * expected_numbers


def test_celora_sends_over_100x_fewer_bytes_than_fedavg_lora():
    sizes = {}
    for method in ("celora", "fedavg_lora"):
        client_params, spec = _client_params(method)
        sizes[method] = engine.bytes_per_client(client_params, methods.parameter_roles(client_params, spec))
    assert sizes["fedavg_lora"] / sizes["celora"] == 144.0


def test_roles_per_method():
    params, spec = _client_params("celora")
    roles = methods.parameter_roles(params, spec)
    layer = roles["lora"]["encoder"]["layer_0"]["q"]
    assert layer == {"A": "personal", "B": "personal", "C": "shared"}
    assert roles["params"]["LayerNorm"]["scale"] == "personal"
    core_only = methods.parameter_roles(params, spec, core_only=True)["lora"]["encoder"]["layer_0"]["q"]
    assert core_only == {"A": "frozen", "B": "frozen", "C": "shared"}
    params, spec = _client_params("ffa_lora")
    assert methods.parameter_roles(params, spec)["lora"]["encoder"]["layer_0"]["q"] == {"A": "frozen", "B": "shared"}
    params, spec = _client_params("fedsa_lora")
    assert methods.parameter_roles(params, spec)["lora"]["encoder"]["layer_0"]["q"] == {"A": "shared", "B": "personal"}
    shared_base = methods.parameter_roles(params, spec, share_base=True)
    assert shared_base["params"]["LayerNorm"]["bias"] == "shared"
    with pytest.raises(ValueError, match="unknown method"):
        methods.get_method("fedprox")


def test_select_and_combine_round_trip():
    params, spec = _client_params("fedsa_lora", rank=2)
    roles = methods.parameter_roles(params, spec)
    parts = [methods.select(params, roles, role) for role in methods.ROLES]
    rebuilt = methods.combine(*parts)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="appears twice"):
        methods.combine(parts[0], parts[0])


def _uploads(num_clients, key, identical=False):
    # Cores live under "lora" (what the personalized strategy mixes); "b" is another shared leaf.
    base = {"lora": {"q": {"C": jax.random.normal(key, (3, 3))}, "v": {"C": jax.random.normal(key, (3, 3))}},
            "b": {"c": jax.random.normal(key, (4,))}}
    if identical:
        return jax.tree.map(lambda x: jnp.stack([x] * num_clients), base)
    keys = jax.random.split(key, num_clients)
    return jax.vmap(lambda k: jax.tree.map(lambda x: x + jax.random.normal(k, x.shape), base))(keys)


ALL_STRATEGIES = {
    "weighted_average": strategies.weighted_average,
    "local_only": strategies.local_only,
    "celora_personalized": lambda: personalized.personalized(
        np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0))), AggregationConfig()),
}


@pytest.mark.parametrize("name", sorted(ALL_STRATEGIES))
def test_strategy_contract(name):
    """Every strategy: shapes preserved, jittable, identical clients are a fixed point."""
    strategy = ALL_STRATEGIES[name]()
    uploads = _uploads(5, jax.random.key(0), identical=True)
    sizes = jnp.array([1.0, 2, 3, 4, 5])
    mask = jnp.array([True, True, False, True, True])
    state = strategy.init(uploads, sizes)
    state, downloads, logs = jax.jit(strategy.aggregate)(state, uploads, sizes, mask)
    assert jax.tree.structure(downloads) == jax.tree.structure(uploads)
    for got, sent in zip(jax.tree.leaves(downloads), jax.tree.leaves(uploads)):
        assert got.shape == sent.shape
        np.testing.assert_allclose(got, sent, rtol=1e-6, atol=1e-6)


def test_weighted_average_uses_sizes_and_ignores_masked_clients():
    uploads = _uploads(4, jax.random.key(1))
    sizes = jnp.array([1.0, 3.0, 100.0, 0.0])
    mask = jnp.array([True, True, False, True])
    _, downloads, _ = strategies.weighted_average().aggregate({}, uploads, sizes, mask)
    expected = (uploads["b"]["c"][0] * 1 + uploads["b"]["c"][1] * 3) / 4
    for row in range(4):
        np.testing.assert_allclose(downloads["b"]["c"][row], expected, rtol=1e-5, atol=1e-6)


def test_local_only_returns_each_clients_own_upload():
    uploads = _uploads(3, jax.random.key(2))
    _, downloads, _ = strategies.local_only().aggregate({}, uploads, jnp.ones(3), jnp.ones(3, bool))
    np.testing.assert_array_equal(downloads["b"]["c"], uploads["b"]["c"])


def test_personalized_strategy_mixes_every_shared_leaf_with_its_weights():
    uploads = _uploads(4, jax.random.key(3))
    data_distance = np.array([[0, 1, 5, 5], [1, 0, 5, 5], [5, 5, 0, 1], [5, 5, 1, 0]], np.float32)
    strategy = personalized.personalized(data_distance, AggregationConfig(beta=1.0, lam=1.0))
    sizes, mask = jnp.ones(4), jnp.array([True, True, True, False])
    state = strategy.init(uploads, sizes)
    _, downloads, logs = jax.jit(strategy.aggregate)(state, uploads, sizes, mask)
    weights = np.asarray(logs["weights"])
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(weights[:3, 3], 0.0)  # the absent client is in no mixture
    assert weights[0, 1] > weights[0, 2]  # the nearer client gets more weight
    for sent, got in ((uploads["lora"]["q"]["C"], downloads["lora"]["q"]["C"]),
                      (uploads["b"]["c"], downloads["b"]["c"])):
        expected = np.tensordot(weights, np.asarray(sent), axes=1)
        np.testing.assert_allclose(got[:3], expected[:3], rtol=1e-5, atol=1e-5)

"""Method roles, server strategy invariants and communication bytes (METHOD.md §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.federated import strategies
from celora_jax.federated.methods import celora as celora_method, fedex_lora, get_method
from celora_jax.federated.methods.base import shared_bytes
from celora_jax.lora import adapters, roles as methods
from celora_jax.server.aggregation import AggregationConfig

MINILM_SHAPES = {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384),
                 "up": (384, 1536), "down": (1536, 384)}


def _minilm_like_params():
    """Kernel shapes of MiniLM's 36 adapted matrices (6 layers)."""
    return {"encoder": {f"layer_{i}": {name: {"kernel": jnp.zeros(shape)} for name, shape in MINILM_SHAPES.items()}
                        for i in range(6)},
            "LayerNorm": {"scale": jnp.ones(384), "bias": jnp.zeros(384)}}


def _client_params(method, rank=8):
    params = _minilm_like_params()
    spec = get_method(method)
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
    assert shared_bytes(client_params, roles) == 4 * expected_numbers


def test_celora_sends_over_100x_fewer_bytes_than_fedavg_lora():
    sizes = {}
    for method in ("celora", "fedavg_lora"):
        client_params, spec = _client_params(method)
        sizes[method] = shared_bytes(client_params, methods.parameter_roles(client_params, spec))
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
        get_method("fedprox2")


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
    "celora_personalized": lambda: celora_method.personalized_strategy(
        np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0))), AggregationConfig()),
    "celora_personalized_since_received": lambda: celora_method.personalized_strategy(
        np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0))), AggregationConfig(update_since="received")),
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
    strategy = celora_method.personalized_strategy(data_distance, AggregationConfig(beta=1.0, lam=1.0))
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


def _one_core(values):
    """Uploads of one adapted layer, rank 2: client i's core is diag(values[i])."""
    return {"lora": {"q": {"C": jnp.stack([jnp.diag(jnp.asarray(v, jnp.float32)) for v in values])}}}


def _cosine_distance(deltas):
    flat = np.asarray(deltas, np.float64).reshape(len(deltas), -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    return 1.0 - unit @ unit.T


def test_distance_since_received_measures_each_clients_own_training():
    """Round 1 mixes clients 0 and 1 fully (their data are alike); in round 2 client 0
    moves on along +x and client 1 along −x from the same mixture. Measured from the start
    the two cores still look alike (the shared mixture dominates); measured from what each
    received, they are opposite. Client 2, absent in round 1, is measured from the start."""
    data = np.array([[0, 0, 9], [0, 0, 9], [9, 9, 0]], np.float32)
    origin = np.zeros((1, 2, 2), np.float32)
    sizes = jnp.ones(3)
    first = _one_core([[1.0, 1.0], [1.0, 0.8], [0.0, 0.0]])
    runs = {}
    for since in ("start", "received"):
        strategy = celora_method.personalized_strategy(
            data, AggregationConfig(beta=1.0, lam=10.0, update_since=since), core_origin=origin)
        state = strategy.init(first, sizes)
        state, downloads, _ = jax.jit(strategy.aggregate)(state, first, sizes, jnp.array([True, True, False]))
        mixed = np.asarray(downloads["lora"]["q"]["C"])
        second = _one_core([np.diag(mixed[0]) + [0.3, 0.0], np.diag(mixed[1]) - [0.3, 0.0], [0.0, 0.5]])
        _, _, logs = jax.jit(strategy.aggregate)(state, second, sizes, jnp.ones(3, bool))
        runs[since] = (state, mixed, np.asarray(second["lora"]["q"]["C"]), np.asarray(logs["param_distance"]))
    state, mixed, second, distance = runs["received"]
    assert "received" not in runs["start"][0]  # the default keeps the state it always had
    np.testing.assert_allclose(state["received"][:2, 0], mixed[:2], atol=1e-6)
    np.testing.assert_array_equal(state["received"][2], origin)  # absent: still its start
    np.testing.assert_allclose(distance, _cosine_distance(second - np.asarray(state["received"])[:, 0]), atol=1e-5)
    np.testing.assert_allclose(runs["start"][3], _cosine_distance(second), atol=1e-5)
    assert distance[0, 1] > 1.9 and runs["start"][3][0, 1] < 0.1


def test_a_restarted_client_is_measured_from_the_start_again():
    """``restart`` puts the restarted clients' ``received`` rows back to the start and
    leaves the others; without ``received`` (the default) there is nothing to restart."""
    data = np.zeros((3, 3), np.float32)
    origin = np.full((1, 2, 2), 0.5, np.float32)
    uploads, sizes = _one_core([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), jnp.ones(3)
    strategy = celora_method.personalized_strategy(data, AggregationConfig(update_since="received"),
                                                   core_origin=origin)
    state, _, _ = strategy.aggregate(strategy.init(uploads, sizes), uploads, sizes, jnp.ones(3, bool))
    restarted = jax.jit(strategy.restart)(state, jnp.array([False, True, False]))
    np.testing.assert_array_equal(restarted["received"][1], origin)
    np.testing.assert_array_equal(np.asarray(restarted["received"])[[0, 2]], np.asarray(state["received"])[[0, 2]])
    assert not np.allclose(state["received"][1], origin)
    plain = celora_method.personalized_strategy(data, AggregationConfig(), core_origin=origin)
    plain_state = plain.init(uploads, sizes)
    assert plain.restart(plain_state, jnp.ones(3, bool)) is plain_state


def test_update_since_is_checked():
    with pytest.raises(ValueError, match="update_since must be one of"):
        AggregationConfig(update_since="sent")


@pytest.mark.parametrize("method", ["fedprox", "fedavg_lora_ft"])
def test_new_fedavg_variants_send_what_fedavg_lora_sends(method):
    client_params, spec = _client_params(method)
    reference, fedavg = _client_params("fedavg_lora")
    roles = methods.parameter_roles(client_params, spec)
    assert spec.upload_bytes(client_params, roles) == spec.download_bytes(client_params, roles) == \
        shared_bytes(reference, methods.parameter_roles(reference, fedavg))


def test_fedex_lora_downloads_a_dense_residual_per_adapted_matrix():
    client_params, spec = _client_params("fedex_lora")
    roles = methods.parameter_roles(client_params, spec)
    dense = 6 * sum(a * b for a, b in MINILM_SHAPES.values())
    assert spec.upload_bytes(client_params, roles) == 4 * 6 * sum(8 * (a + b) for a, b in MINILM_SHAPES.values())
    assert spec.download_bytes(client_params, roles) == spec.upload_bytes(client_params, roles) + 4 * dense


def test_fedex_residual_makes_the_aggregate_exact():
    """W0 + s·ΣR + s·Ā·B̄ equals W0 + s·Σ p_i A_i B_i (numpy reference, float64)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 6, 3)).astype(np.float32)
    b = rng.normal(size=(4, 3, 5)).astype(np.float32)
    sizes = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    mask = np.array([True, True, False, True])
    uploads = {"lora": {"dense": {"A": jnp.asarray(a), "B": jnp.asarray(b)}}}
    strategy = fedex_lora.exact_aggregation()
    state = strategy.init(uploads, jnp.asarray(sizes))
    state, downloads, _ = jax.jit(strategy.aggregate)(state, uploads, jnp.asarray(sizes), jnp.asarray(mask))
    p = np.where(mask, sizes, 0) / sizes[mask].sum()
    exact = np.einsum("n,nir,nro->io", p, a.astype(np.float64), b.astype(np.float64))
    got_a, got_b = np.asarray(downloads["lora"]["dense"]["A"]), np.asarray(downloads["lora"]["dense"]["B"])
    np.testing.assert_allclose(got_a[0], got_a[3])  # every client receives the same average
    np.testing.assert_allclose(got_a[0], np.einsum("n,nir->ir", p, a), rtol=1e-5, atol=1e-6)
    residual = np.asarray(state["residual"]["dense"])
    np.testing.assert_allclose(residual + got_a[0] @ got_b[0], exact, rtol=1e-4, atol=1e-5)
    assert np.abs(residual).max() > 1e-2  # averaging the factors alone is not exact
    base = {"dense": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)}}
    folded = fedex_lora.fold_residual(base, state, scale=0.5)
    np.testing.assert_allclose(folded["dense"]["kernel"], 0.5 * residual, rtol=1e-6)
    np.testing.assert_array_equal(folded["dense"]["bias"], 0.0)
    # A second round adds its residual to the first one's: the base holds their sum.
    state2, _, _ = jax.jit(strategy.aggregate)(state, uploads, jnp.asarray(sizes), jnp.asarray(mask))
    np.testing.assert_allclose(state2["residual"]["dense"], 2 * residual, rtol=1e-5, atol=1e-6)


def test_method_options_are_checked_with_the_method_named():
    assert get_method("fedprox").options == {"mu": 0.01}
    assert get_method("fedavg_lora_ft", steps=3).finetune_steps == 3
    with pytest.raises(ValueError, match="method 'fedprox' has no option 'steps'"):
        get_method("fedprox", steps=2)
    with pytest.raises(ValueError, match="method 'fedprox': mu must be a finite number >= 0"):
        get_method("fedprox", mu=float("nan"))
    with pytest.raises(ValueError, match="method 'fedavg_lora_ft': steps must be an integer >= 1"):
        get_method("fedavg_lora_ft", steps=0)

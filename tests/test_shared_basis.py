"""Tri-LoRA in a frozen shared basis (issue 41): LoRA-XS's weight-SVD init, Fed-SB, and
CE-LoRA's methods in that basis. Parity against numpy's SVD; exact aggregation; the toy
rounds keep A and B frozen and identical on every client."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax import adapters, cli, roles
from celora_jax.adapters import AdapterConfig, AdapterConfigError, init_adapters, stack_layers
from celora_jax.config import ConfigError, RunConfig, apply_overrides
from celora_jax.federated import engine, loop
from celora_jax.federated.methods import get_method
from celora_jax.federated.methods.base import ServerInputs
from celora_jax.functional import adapt
from toy import toy_config, toy_setup


def _kernel(seed, shape=(12, 7)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_weight_svd_is_the_truncated_svd_of_the_kernel():
    kernel = _kernel(0)
    factors = adapters.weight_svd_factors(jnp.asarray(kernel), rank=3)
    u, s, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]  # Eckart-Young: the best rank-3 approximation
    np.testing.assert_allclose(np.asarray(factors["A"] @ factors["B"]), best, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(factors["C"]), np.zeros((3, 3)))
    np.testing.assert_allclose(np.asarray(factors["B"] @ factors["B"].T), np.eye(3), atol=1e-5)  # B = V_rᵀ
    np.testing.assert_allclose(np.linalg.norm(np.asarray(factors["A"]), axis=0), s[:3], rtol=1e-5)  # A = U_r S_r
    # Signs fixed: the largest entry of each column of A is positive, whatever the SVD chose.
    a = np.asarray(factors["A"])
    assert np.all(a[np.abs(a).argmax(0), np.arange(3)] > 0)
    # -W = U S (-Vᵀ) = (-U) S Vᵀ: the sign rule picks the first, whatever LAPACK returns.
    flipped = adapters.weight_svd_factors(jnp.asarray(-kernel), rank=3)
    np.testing.assert_allclose(np.asarray(flipped["A"]), a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(flipped["B"]), -np.asarray(factors["B"]), atol=1e-5)


def test_weight_svd_init_stacked_unrolled_and_functional_agree():
    layers = np.stack([_kernel(1), _kernel(2)])
    unrolled = {"encoder": {f"layer_{i}": {"dense": {"kernel": jnp.asarray(layers[i])}} for i in range(2)}}
    stacked = {"encoder": {"stacked": {"dense": {"kernel": jnp.asarray(layers)}}}}
    config = AdapterConfig(rank=4, target=r"dense/kernel$", init="weight_svd")
    key = jax.random.key(0)
    per_layer = init_adapters(key, unrolled, config)
    together = init_adapters(key, stacked, config)
    for got, want in zip(jax.tree.leaves(together), jax.tree.leaves(stack_layers(per_layer))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(per_layer["encoder"]["layer_1"]["dense"]["A"]
                                          @ per_layer["encoder"]["layer_1"]["dense"]["B"]),
                               np.asarray(adapters.weight_svd_factors(layers[1], 4)["A"]
                                          @ adapters.weight_svd_factors(layers[1], 4)["B"]), atol=1e-5)
    # adapt() on a linen model builds the same basis from the kernels' values.
    model = nn.Dense(7)
    variables = {"params": {"kernel": jnp.asarray(_kernel(3)), "bias": jnp.zeros(7)}}
    built, adapted_apply = adapt(model.apply, variables, AdapterConfig(rank=3, target="kernel$", init="weight_svd"), key)
    want = adapters.weight_svd_factors(variables["params"]["kernel"], 3)
    for name in "ACB":
        np.testing.assert_allclose(np.asarray(built["params"][name]), np.asarray(want[name]), atol=1e-6)
    x = jnp.ones((2, 12))
    np.testing.assert_allclose(adapted_apply(variables, built, x), model.apply(variables, x), atol=1e-6)  # C = 0


@pytest.mark.parametrize("make, message", [
    (lambda: AdapterConfig(init="pissa"), "adapter init must be one of random, weight_svd"),
    (lambda: AdapterConfig(kind="lora", init="weight_svd"), "needs tri-matrix adapters (kind 'tri')"),
    (lambda: AdapterConfig(core_only=True, init="weight_svd"), "core_only is the random-basis ablation"),
    (lambda: init_adapters(jax.random.key(0), {"d": {"kernel": jnp.zeros((4, 3))}},
                           AdapterConfig(rank=4, target="kernel", init="weight_svd")),
     "adapter rank 4 exceeds min(d_in, d_out) = 3"),
])
def test_bad_adapter_inits_are_refused(make, message):
    with pytest.raises(AdapterConfigError, match=None) as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["federation.method=fedavg_lora", "adapter.init=weight_svd"],
     "adapter.init='weight_svd' freezes a shared basis A, B around trained cores C, which needs tri-matrix "
     "adapters; federation.method='fedavg_lora' uses 'lora' adapters"),
    (["federation.method=fed_sb", "adapter.init=random"],
     "federation.method='fed_sb' trains only the cores in a frozen shared basis: adapter.init must be one of "
     "weight_svd (or leave it unset), got 'random'"),
    (["adapter.init=svd"], "adapter init must be one of random, weight_svd"),
])
def test_bad_init_configs_fail_before_anything_loads(overrides, message, capsys):
    with pytest.raises(ValueError) as info:
        apply_overrides(RunConfig(), overrides)
    assert message in str(info.value)
    argv = ["run", "--no-progress", *[item for pair in overrides for item in ("--set", pair)]]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_fed_sb_aggregate_equals_the_average_of_the_dense_updates():
    """Averaging cores in a shared basis is exact aggregation: A · mean(C_i) · B is the
    size-weighted mean of the clients' dense updates A · C_i · B over the reporting clients."""
    method = get_method("fed_sb")
    assert method.trained == method.shared == frozenset("C") and method.default_init == "weight_svd"
    strategy = method.server(ServerInputs())
    rng = np.random.default_rng(4)
    a, b = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32), jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    cores = jnp.asarray(rng.normal(size=(5, 4, 4)), jnp.float32)
    sizes = jnp.asarray([3.0, 1.0, 4.0, 2.0, 5.0])
    mask = jnp.asarray([True, True, False, True, True])
    uploads = {"lora": {"dense": {"C": cores}}}
    state = strategy.init(uploads, sizes)
    _, downloads, _ = strategy.aggregate(state, uploads, sizes, mask)
    weights = np.where(np.asarray(mask), np.asarray(sizes), 0.0)
    dense = np.einsum("i,ijk->jk", weights / weights.sum(), np.asarray(a @ cores @ b, np.float64))
    for client in range(5):
        np.testing.assert_allclose(np.asarray(a @ downloads["lora"]["dense"]["C"][client] @ b), dense, atol=1e-4)


@pytest.mark.parametrize("method", ["fed_sb", "celora", "celora_avg"])
def test_toy_rounds_in_a_shared_basis_train_only_the_cores(method):
    config = toy_config(method, rounds=2)
    config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init="weight_svd"))
    setup = toy_setup(config)
    lora_roles = setup.roles["lora"]["dense"]
    assert lora_roles == {"A": roles.FROZEN, "B": roles.FROZEN, "C": roles.SHARED}
    start = setup.task.client_params["lora"]["dense"]
    kernel = setup.task.base_params["dense"]["kernel"]
    want = adapters.weight_svd_factors(kernel, config.adapter.rank)
    for name in "ACB":
        np.testing.assert_allclose(np.asarray(start[name]), np.asarray(want[name]), atol=1e-6)
    outputs = list(loop.iterate_rounds(setup))
    final = jax.tree.map(np.asarray, outputs[-1].client_params["lora"]["dense"])
    for name in "AB":  # frozen, and the same on every client
        np.testing.assert_array_equal(final[name], np.broadcast_to(np.asarray(start[name]), final[name].shape))
    assert np.abs(final["C"]).max() > 0  # the cores carry the update
    summary = engine.summarize([o.record for o in outputs], setup)
    rank = config.adapter.rank
    personal = sum(x.size for x in jax.tree.leaves(setup.task.client_params["params"]))
    assert summary["sent_params_per_client"] == rank * rank
    assert summary["trainable_params_per_client"] == rank * rank + personal
    assert summary["adapter_init"] == "weight_svd"
    assert outputs[0].record["bytes_up_per_client"] == 4 * rank * rank

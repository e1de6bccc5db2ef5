"""Tri-LoRA in a frozen shared basis (issue 41): LoRA-XS's weight-SVD init, Fed-SB, and
CE-LoRA's methods in that basis. Parity against numpy's SVD; exact aggregation; the toy
rounds keep A and B frozen and identical on every client."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import toy_config, toy_setup

from celora_jax.cli import main as cli
from celora_jax.federated import engine, loop
from celora_jax.federated.config import RunConfig, apply_overrides
from celora_jax.federated.methods import get_method
from celora_jax.federated.methods.base import ServerInputs, starting_cores
from celora_jax.lora import adapters, roles
from celora_jax.lora.adapters import AdapterConfig, AdapterConfigError, init_adapters, stack_layers
from celora_jax.lora.functional import adapt


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
     "weight_svd, gradient_svd (or leave it unset), got 'random'"),
    (["adapter.init=svd"], "adapter init must be one of random, weight_svd"),
    (["adapter.init=gradient_svd", "dp.clip_norm=0.1", "dp.noise_multiplier=1.0"],
     "adapter.init='gradient_svd' uploads every client's gradient sketch in round 0 without DP noise"),
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


def test_the_shared_basis_cluster_oracle_is_fed_sb_inside_each_true_cluster():
    """Exact aggregation inside each cluster: client i's core makes A · C̃_i · B the
    size-weighted mean of its cluster's dense updates, and nothing crosses clusters."""
    method = get_method("cluster_oracle", shared_basis=True)
    assert method.trained == method.shared == frozenset("C") and method.needs_frozen_basis
    assert get_method("cluster_oracle").trained == frozenset("AB")  # the default: FedAvg-LoRA in clusters
    clusters = np.array([0, 1, 0, 1, 1])
    strategy = method.server(ServerInputs(clusters=clusters))
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 4)), rng.normal(size=(4, 6))
    cores = jnp.asarray(rng.normal(size=(5, 4, 4)), jnp.float32)
    sizes = jnp.asarray([3.0, 1.0, 4.0, 2.0, 5.0])
    uploads = {"lora": {"dense": {"C": cores}}}
    _, downloads, _ = strategy.aggregate(strategy.init(uploads, sizes), uploads, sizes, jnp.ones(5, bool))
    dense = a @ np.asarray(cores, np.float64) @ b
    for client in range(5):
        mates = clusters == clusters[client]
        want = np.einsum("i,ijk->jk", np.asarray(sizes)[mates] / np.asarray(sizes)[mates].sum(), dense[mates])
        np.testing.assert_allclose(a @ np.asarray(downloads["lora"]["dense"]["C"][client]) @ b, want, atol=1e-4)
    with pytest.raises(ValueError, match="shared_basis must be True or False"):
        get_method("cluster_oracle", shared_basis="yes")


@pytest.mark.parametrize("method", ["fed_sb", "celora", "celora_avg", "cluster_oracle"])
def test_toy_rounds_in_a_shared_basis_train_only_the_cores(method):
    config = toy_config(method, rounds=2)
    if method == "cluster_oracle":
        config = apply_overrides(config, ["federation.method_options.cluster_oracle.shared_basis=True"])
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
    assert summary["sent_params_per_client"] == summary["sent_adapter_params_per_client"] == rank * rank
    assert summary["trainable_params_per_client"] == rank * rank + personal
    # With the base subset travelling too, the adapters' share is still the cores alone.
    sharing = dataclasses.replace(config, federation=dataclasses.replace(config.federation, share_base=True))
    counts = engine.parameter_counts(toy_setup(sharing))
    assert counts["sent_params_per_client"] == rank * rank + personal
    assert counts["sent_adapter_params_per_client"] == rank * rank
    assert summary["adapter_init"] == "weight_svd"
    assert outputs[0].record["bytes_up_per_client"] == 4 * rank * rank


def test_celora_in_a_shared_basis_measures_core_updates_from_zero():
    """The server is told where the cores started (0 in a shared basis, I at random init),
    so its parameter distance compares the directions of the updates (METHOD.md §4's
    C − I is C − C⁰ with the specification's C⁰ = I)."""
    config = toy_config("celora", rounds=1)
    shared_basis = toy_setup(dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init="weight_svd")))
    random_basis = toy_setup(config)
    rank = config.adapter.rank
    for setup, start in ((shared_basis, np.zeros((1, rank, rank))), (random_basis, np.eye(rank)[None])):
        shared = roles.select(setup.task.client_params, setup.roles, roles.SHARED)
        np.testing.assert_array_equal(starting_cores(shared), start)
    fedavg = toy_setup(toy_config("fedavg_lora"))
    assert starting_cores(roles.select(fedavg.task.client_params, fedavg.roles, roles.SHARED)) is None

    strategy = loop.server_strategy(shared_basis)
    n = shared_basis.num_clients
    direction = np.random.default_rng(0).standard_normal((rank, rank))
    sizes = np.array([0.01, 0.05, 0.01, 0.05, 0.02, 0.03])  # two directions, sizes mixed
    cores = np.stack([(1 if i % 2 == 0 else -1) * sizes[i] * direction for i in range(n)]).astype(np.float32)
    uploads = {"lora": {"dense": {"C": jnp.asarray(cores)}}}
    weights = jnp.ones(n)
    state = strategy.init(uploads, weights)
    _, _, logs = strategy.aggregate(state, uploads, weights, jnp.ones(n, bool))
    same = (np.arange(n)[:, None] % 2) == (np.arange(n)[None, :] % 2)
    np.testing.assert_allclose(np.asarray(logs["param_distance"]), np.where(same, 0.0, 2.0), atol=1e-5)


def _principal_sines(u, v):
    """Sines of the principal angles between the column spaces of u and v (orthonormal)."""
    return np.sqrt(np.clip(1 - np.linalg.svd(u.T @ v, compute_uv=False) ** 2, 0, None))


def test_summed_client_sketches_give_the_svd_of_the_pooled_matrix():
    """Five clients sketch their own gradients against shared test matrices; the SVD from
    the summed sketches equals the SVD of the pooled sum: exactly for a sum of rank <= k,
    and within the sketch's error bound otherwise."""
    from celora_jax.lora import sketch

    rng = np.random.default_rng(5)
    d_in, d_out, rank = 40, 30, 4
    tests = sketch.draw_sketch_matrices(jax.random.key(7), d_in, d_out, rank, oversample=4)
    assert tests.omega.shape == (d_out, 8) and tests.psi.shape == (17, d_in)
    assert sketch.sketch_size(d_in, d_out, tests) == d_in * 8 + 17 * d_out

    def federated(clients):
        summed = jax.tree.map(lambda *parts: sum(parts), *[sketch.sketch(g, tests) for g in clients])
        return [np.asarray(x, np.float64) for x in sketch.top_singular(summed, tests, rank)]

    # A pooled matrix of rank 6 <= k = 8: recovered exactly.
    basis_left, basis_right = rng.normal(size=(d_in, 6)), rng.normal(size=(6, d_out))
    clients = [(basis_left * rng.normal(size=6)) @ basis_right for _ in range(5)]
    pooled = sum(clients)
    u, s, vt = np.linalg.svd(pooled, full_matrices=False)
    got_u, got_s, got_vt = federated([jnp.asarray(c, jnp.float32) for c in clients])
    np.testing.assert_allclose(got_s, s[:rank], rtol=1e-3)
    np.testing.assert_allclose(got_u @ np.diag(got_s) @ got_vt, (u[:, :rank] * s[:rank]) @ vt[:rank],
                               atol=1e-3 * s[0])
    # Full rank with a decaying spectrum: the subspaces are close, as the sketch's theory says.
    spectrum = 0.5 ** np.arange(min(d_in, d_out))
    q_left, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    q_right, _ = np.linalg.qr(rng.normal(size=(d_out, d_out)))
    clients = [(q_left[:, :d_out] * (spectrum * rng.uniform(0.5, 1.5))) @ q_right.T for _ in range(5)]
    pooled = sum(clients)
    u, s, vt = np.linalg.svd(pooled, full_matrices=False)
    got_u, got_s, got_vt = federated([jnp.asarray(c, jnp.float32) for c in clients])
    assert _principal_sines(got_u, u[:, :rank]).max() < 0.05
    assert _principal_sines(got_vt.T, vt[:rank].T).max() < 0.05
    tail = np.linalg.norm(s[rank:])  # the best rank-r error; the sketch's is within a small factor
    error = np.linalg.norm(pooled - got_u @ np.diag(got_s) @ got_vt)
    assert tail <= error < 2 * tail
    assert np.all(got_u[np.abs(got_u).argmax(0), np.arange(rank)] > 0)  # signs fixed


def _sign_fixed(u, vt):
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])
    return u * signs, vt * signs[:, None]


@pytest.mark.parametrize("method", ["fed_sb", "celora"])
def test_gradient_svd_basis_is_the_svd_of_the_pooled_gradient(method):
    """Round 0 of a gradient_svd run: every client's sketch of its summed task gradient,
    summed by the server, gives the top singular vectors of the pooled gradient (computed
    here in numpy from the same batches); its bytes are counted in round 1's record."""
    from celora_jax.data import packing

    config = toy_config(method, rounds=1)
    adapter = dataclasses.replace(config.adapter, init="gradient_svd", sketch_batches=3)
    config = dataclasses.replace(config, adapter=adapter)
    setup = toy_setup(config)
    task, rank = setup.task, adapter.rank
    kernel = np.asarray(task.base_params["dense"]["kernel"], np.float64)
    batches = packing.round_batches(task.train, 3, config.federation.batch_size, config.seed, 0)
    pooled = np.zeros_like(kernel)
    for client in range(task.num_clients):
        for step in range(3):
            x = np.asarray(batches["features"][client, step], np.float64)
            labels = np.asarray(batches["labels"][client, step])
            mask = np.asarray(batches["example_mask"][client, step], np.float64)
            logits = x @ kernel  # bias 0, head scale 1, adapters 0
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            probs[np.arange(len(labels)), labels] -= 1
            pooled += x.T @ (probs * mask[:, None]) / mask.sum()
    u, _, vt = np.linalg.svd(pooled, full_matrices=False)
    want_a, want_b = _sign_fixed(u[:, :rank], vt[:rank])
    lora = task.client_params["lora"]["dense"]
    np.testing.assert_allclose(np.asarray(lora["A"]), want_a, atol=2e-4)
    np.testing.assert_allclose(np.asarray(lora["B"]), want_b, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(lora["C"]), np.zeros((rank, rank)))
    assert setup.roles["lora"]["dense"] == {"A": roles.FROZEN, "B": roles.FROZEN, "C": roles.SHARED}

    record = next(loop.iterate_rounds(setup)).record
    k, l = 3, 7  # sketch sizes of an 8 x 3 kernel: k = min(r + 8, 8, 3), l = min(2k + 1, 8)
    up, down = 4 * (8 * k + l * 3), 4 * (8 + 3) * rank
    assert task.preparation["basis_bytes_up_per_client"] == up
    assert task.preparation["basis_bytes_down_per_client"] == down
    assert record["bytes_basis"] == (up + down) * task.num_clients
    per_round = (record["bytes_up_per_client"] + record["bytes_down_per_client"]) * record["participants"]
    assert record["bytes_round"] == per_round + record["bytes_basis"] == record["bytes_cumulative"]


def test_gradient_svd_bad_input():
    with pytest.raises(AdapterConfigError, match="sketch_batches must be >= 1"):
        AdapterConfig(init="gradient_svd", sketch_batches=0)
    with pytest.raises(ValueError, match="adapter.init='gradient_svd' freezes a shared basis"):
        apply_overrides(RunConfig(), ["federation.method=ffa_lora", "adapter.init=gradient_svd"])
    zeros = init_adapters(jax.random.key(0), {"d": {"kernel": jnp.ones((6, 4))}},
                          AdapterConfig(rank=2, target="kernel", init="gradient_svd"))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(zeros))  # filled in round 0


def test_gradient_svd_is_refused_on_separate_nodes(tmp_path):
    from celora_jax.federated.nodes import ClientNode

    config = toy_config("fed_sb", rounds=1)
    config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init="gradient_svd"))
    with pytest.raises(ValueError, match="round-0 exchange of every client's gradient sketch"):
        ClientNode(toy_setup(config), 0)
    assert cli.main(["flower-app", str(tmp_path / "app"), "--set", "adapter.init=gradient_svd",
                     "--set", "federation.method=fed_sb"]) == 2


def test_gradient_svd_on_a_tiny_bert_unrolled_and_under_scan_builds_one_basis(tiny_model_dir):
    """The real encoder task: the basis from the clients' sketches is the same whether the
    blocks run unrolled or stacked under nn.scan (the same test matrices per layer)."""
    from helpers import tiny_config

    from celora_jax.federated.setup import prepare

    def basis(scan):
        config = tiny_config(tiny_model_dir, "fed_sb")
        config = dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, init="gradient_svd", rank=4),
                                     model=dataclasses.replace(config.model, scan_layers=scan))
        setup = prepare(config)
        assert setup.task.preparation["basis_bytes_up_per_client"] > 0
        return setup.task.client_params["lora"]

    unrolled, scanned = basis(False), basis(True)
    pairs = list(zip(jax.tree.leaves(stack_layers(unrolled)), jax.tree.leaves(scanned)))
    assert len(pairs) == 18  # A, B, C of the 6 kernels of a block
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(want), np.asarray(got), atol=2e-3)
    from flax import traverse_util

    a = next(v for p, v in traverse_util.flatten_dict(unrolled).items() if p[-1] == "A")
    np.testing.assert_allclose(np.asarray(a.T @ a), np.eye(4), atol=1e-4)  # orthonormal, as LoRA-SB's


def test_weight_svd_on_the_decoder_and_the_vit_unrolled_and_under_scan():
    """The frozen basis on the Llama decoder's and the ViT's kernels: stacked under nn.scan
    it is the unrolled basis stacked; at C = 0 the adapted model is the pretrained one, and a
    core moves it identically in both layouts."""
    from test_llama import TINY, tiny_params

    from celora_jax.lora.adapters import DEFAULT_TARGET
    from celora_jax.models import llama, vit

    decoder, flat_params = tiny_params()
    config = AdapterConfig(rank=2, target=llama.DECODER_TARGET, init="weight_svd")
    flat = init_adapters(jax.random.key(0), flat_params, config)
    stacked = init_adapters(jax.random.key(0), stack_layers(flat_params), config)
    for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(stack_layers(flat))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    ids = jnp.asarray([[5, 17, 3, 42, 8, 11]])
    np.testing.assert_allclose(decoder.apply({"params": flat_params, "lora": flat}, ids)[0],
                               decoder.apply({"params": flat_params}, ids)[0], atol=1e-5)
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if jax.tree_util.keystr(path).endswith("['C']") else x, flat)
    scanned = llama.LlamaForCausalLM(TINY, scan_layers=True)
    np.testing.assert_allclose(scanned.apply({"params": stack_layers(flat_params), "lora": stack_layers(moved)}, ids)[0],
                               decoder.apply({"params": flat_params, "lora": moved}, ids)[0], atol=1e-4)

    vit_config = vit.VisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, patch_size=4,
                                  position_grid=7)
    pixels = jax.random.normal(jax.random.key(5), (2, 28, 28, 3))
    model = vit.VisionTransformer(vit_config)
    params = model.init(jax.random.key(6), pixels)["params"]
    adapters_vit = init_adapters(jax.random.key(1), params, AdapterConfig(rank=2, target=DEFAULT_TARGET,
                                                                          init="weight_svd"))
    np.testing.assert_allclose(model.apply({"params": params, "lora": adapters_vit}, pixels),
                               model.apply({"params": params}, pixels), atol=1e-5)
    for got, want in zip(jax.tree.leaves(init_adapters(jax.random.key(1), stack_layers(params),
                                                       AdapterConfig(rank=2, target=DEFAULT_TARGET, init="weight_svd"))),
                         jax.tree.leaves(stack_layers(adapters_vit))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

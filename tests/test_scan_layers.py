"""Layers under nn.scan (``model.scan_layers``): the stacked layout against the unrolled one.

Every check compares the same model in both layouts: weights loaded stacked are the unrolled
weights stacked, adapters start from the same values, logits, gradients and generations
agree up to float rounding, the server-side core functions see the same layers, PEFT export
writes the same files, and a federated run gives the same history.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_llama import TINY, numpy_logits, tiny_params

from celora_jax import AdapterConfig, init_adapters
from celora_jax.lora.adapters import DEFAULT_TARGET, STACKED, stack_layers, unstack_layers
from celora_jax.lora.cores import core_share, stack_cores, unstack_cores
from celora_jax.models import llama, loading, vit


def _moved(adapters, key=1, scale=0.05):
    """Adapters with random non-zero B and C away from I, so that they change the output."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def test_stack_and_unstack_layers_round_trip_and_refuse_unequal_layers():
    tree = {"encoder": {f"layer_{i}": {"dense": {"kernel": jnp.full((2, 3), float(i)), "bias": jnp.arange(3.0) + i}}
                        for i in range(12)},  # 12 layers: layer_10 sorts before layer_2 as a string
            "head": {"kernel": jnp.ones((3, 2))}}
    stacked = stack_layers(tree)
    assert set(stacked["encoder"]) == {STACKED}
    assert stacked["encoder"][STACKED]["dense"]["kernel"].shape == (12, 2, 3)
    np.testing.assert_array_equal(stacked["encoder"][STACKED]["dense"]["kernel"][:, 0, 0], np.arange(12.0))
    chex.assert_trees_all_equal(unstack_layers(stacked), tree)
    # A client axis in front: unstack along axis 1.
    clients = jax.tree.map(lambda x: jnp.stack([x, x + 1]), stacked)
    chex.assert_trees_all_equal(unstack_layers(clients, axis=1)["encoder"]["layer_11"],
                                jax.tree.map(lambda x: jnp.stack([x, x + 1]), tree["encoder"]["layer_11"]))
    # Not exactly layer_0 .. layer_{L-1}: left alone.
    gap = {"layer_0": {"k": jnp.ones(2)}, "layer_2": {"k": jnp.ones(2)}}
    assert stack_layers(gap).keys() == gap.keys()
    with pytest.raises(ValueError, match="layer_1 does not have layer_0's parameters"):
        stack_layers({"layer_0": {"k": jnp.ones(2)}, "layer_1": {"k": jnp.ones(3)}})


@pytest.fixture(scope="module")
def minilm_both(minilm_dir):
    """MiniLM classifiers in both layouts (same head key) and adapters with trained-like values."""
    key = jax.random.key(0)
    flat_model, flat_params = loading.load_classifier(minilm_dir, key, num_labels=3)
    scan_model, scan_params = loading.load_classifier(minilm_dir, key, num_labels=3, scan_layers=True)
    config = AdapterConfig(rank=4, target=DEFAULT_TARGET)
    flat_adapters = _moved(init_adapters(jax.random.key(2), flat_params, config))
    return flat_model, flat_params, scan_model, scan_params, flat_adapters, config


def test_minilm_weights_load_stacked_and_adapters_start_equal(minilm_both):
    _, flat_params, _, scan_params, _, config = minilm_both
    assert "layer_0" not in scan_params["backbone"]["encoder"]
    assert scan_params["backbone"]["encoder"][STACKED]["attention"]["self"]["query"]["kernel"].shape == (6, 384, 384)
    chex.assert_trees_all_equal(scan_params, stack_layers(flat_params))
    # Same key: the stacked adapters are exactly the unrolled ones stacked (same init, same A).
    scan_adapters = init_adapters(jax.random.key(2), scan_params, config)
    chex.assert_trees_all_equal(scan_adapters, stack_layers(init_adapters(jax.random.key(2), flat_params, config)))
    query = scan_adapters["backbone"]["encoder"][STACKED]["attention"]["self"]["query"]
    chex.assert_shape((query["A"], query["C"], query["B"]), [(6, 384, 4), (6, 4, 4), (6, 4, 384)])
    np.testing.assert_array_equal(query["C"], np.broadcast_to(np.eye(4), (6, 4, 4)))
    assert not np.allclose(query["A"][0], query["A"][1])  # each layer draws its own A


def test_minilm_logits_and_gradients_match_the_unrolled_model(minilm_both):
    flat_model, flat_params, scan_model, scan_params, flat_adapters, _ = minilm_both
    scan_adapters = stack_layers(flat_adapters)
    ids = jax.random.randint(jax.random.key(3), (2, 12), 1000, 5000)
    mask = jnp.ones_like(ids).at[1, 8:].set(0)

    def loss(model, params, adapters):
        logits = model.apply({"params": params, "lora": adapters}, ids, mask)
        return jnp.sum(jnp.sin(logits)), logits

    (flat_loss, flat_logits), flat_grads = jax.value_and_grad(
        lambda a: loss(flat_model, flat_params, a), has_aux=True)(flat_adapters)
    (scan_loss, scan_logits), scan_grads = jax.value_and_grad(
        lambda a: loss(scan_model, scan_params, a), has_aux=True)(scan_adapters)
    np.testing.assert_allclose(scan_logits, flat_logits, atol=2e-5)
    assert not np.allclose(flat_logits, flat_model.apply({"params": flat_params}, ids, mask), atol=1e-3)
    np.testing.assert_allclose(scan_loss, flat_loss, atol=1e-4)
    chex.assert_trees_all_close(unstack_layers(scan_grads), flat_grads, atol=1e-5)


def test_core_functions_see_the_same_layers_in_both_layouts(minilm_both):
    *_, flat_adapters, _ = minilm_both
    scan_adapters = stack_layers(flat_adapters)
    flat_cores, scan_cores = stack_cores(flat_adapters), stack_cores(scan_adapters)
    chex.assert_shape([flat_cores, scan_cores], (36, 4, 4))
    # Unrolled: layer-major (layer_0's six modules, then layer_1's); stacked: module-major.
    module_major = flat_cores.reshape(6, 6, 4, 4).transpose(1, 0, 2, 3).reshape(36, 4, 4)
    np.testing.assert_array_equal(scan_cores, module_major)
    np.testing.assert_allclose(core_share(scan_adapters),
                               core_share(flat_adapters).reshape(6, 6).T.reshape(36), rtol=1e-5)
    # unstack_cores puts a mixed array back where stack_cores took it from, in either layout.
    mixed = 2.0 * scan_cores + 1.0
    back = unstack_cores(scan_adapters, mixed)
    np.testing.assert_array_equal(stack_cores(back), mixed)
    chex.assert_trees_all_equal(unstack_layers(back), unstack_cores(flat_adapters, 2.0 * flat_cores + 1.0))
    # With a client axis in front.
    clients = jax.tree.map(lambda x: jnp.stack([x, -x]), scan_adapters)
    chex.assert_shape(stack_cores(clients), (2, 36, 4, 4))
    chex.assert_shape(core_share(clients), (2, 36))


def test_peft_export_of_stacked_adapters_is_per_layer(minilm_both, tmp_path):
    from safetensors.numpy import load_file

    from celora_jax.models.export import export_peft

    *_, flat_adapters, _ = minilm_both
    export_peft(flat_adapters, tmp_path / "flat", rank=4, alpha=8.0, base_model="minilm")
    export_peft(stack_layers(flat_adapters), tmp_path / "scan", rank=4, alpha=8.0, base_model="minilm")
    flat, scan = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("flat", "scan"))
    assert sorted(scan) == sorted(flat) and any(".layer.5." in name for name in scan)
    for name in flat:
        np.testing.assert_allclose(scan[name], flat[name], rtol=1e-6, atol=1e-7)
    assert (tmp_path / "scan" / "adapter_config.json").read_text() == (tmp_path / "flat" / "adapter_config.json").read_text()


def test_decoder_under_scan_matches_numpy_and_generates_the_same_tokens():
    flat_model, flat_params = tiny_params()
    scan_model = llama.LlamaForCausalLM(TINY, scan_layers=True)
    scan_params = stack_layers(flat_params)
    # The scanned model initialises into the same stacked structure.
    initialised = scan_model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    chex.assert_trees_all_equal_shapes(initialised, scan_params)
    ids = [5, 17, 3, 42, 8, 11]
    ours = scan_model.apply({"params": scan_params}, jnp.asarray([ids]))[0][0]
    np.testing.assert_allclose(ours, numpy_logits(flat_params, TINY, ids), atol=1e-4, rtol=0)

    config = AdapterConfig(rank=2, target=llama.DECODER_TARGET)
    flat_adapters = _moved(init_adapters(jax.random.key(4), flat_params, config), scale=0.2)
    scan_adapters = init_adapters(jax.random.key(4), scan_params, config)
    chex.assert_trees_all_equal(scan_adapters, stack_layers(init_adapters(jax.random.key(4), flat_params, config)))
    scan_adapters = stack_layers(flat_adapters)
    prompts = jnp.asarray([[0, 0, 7, 9, 2], [4, 8, 15, 16, 23]])
    mask = prompts != 0
    flat_tokens = llama.greedy_generate(flat_model, {"params": flat_params, "lora": flat_adapters}, prompts, mask, 6)
    scan_tokens = llama.greedy_generate(scan_model, {"params": scan_params, "lora": scan_adapters}, prompts, mask, 6)
    np.testing.assert_array_equal(scan_tokens, flat_tokens)
    cache = llama.init_cache(TINY, 2, 11, stacked=True)
    chex.assert_shape(cache["layers"]["k"], (TINY.num_layers, 2, 11, TINY.num_kv_heads, TINY.head_dim))


def test_vit_under_scan_matches_the_unrolled_vit():
    config = vit.VisionConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, patch_size=4,
                              position_grid=7, layerscale=True)
    pixels = jax.random.normal(jax.random.key(5), (2, 28, 28, 3))
    flat_model, scan_model = vit.VisionTransformer(config), vit.VisionTransformer(config, scan_layers=True)
    flat_params = flat_model.init(jax.random.key(6), pixels)["params"]
    flat_params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), flat_params)
    scan_params = stack_layers(flat_params)
    chex.assert_trees_all_equal_shapes(scan_model.init(jax.random.key(6), pixels)["params"], scan_params)
    adapters = _moved(init_adapters(jax.random.key(7), flat_params, AdapterConfig(rank=2, target=DEFAULT_TARGET)))
    flat = flat_model.apply({"params": flat_params, "lora": adapters}, pixels)
    scan = scan_model.apply({"params": scan_params, "lora": stack_layers(adapters)}, pixels)
    np.testing.assert_allclose(scan, flat, atol=2e-5)


def test_fedex_residuals_fold_into_stacked_kernels_as_into_unrolled_ones():
    from celora_jax.federated.methods.fedex_lora import fold_residual, residuals

    keys = iter(jax.random.split(jax.random.key(8), 64))
    layers = range(3)
    base = {"encoder": {f"layer_{i}": {"query": {"kernel": jax.random.normal(next(keys), (5, 6))}} for i in layers}}
    clients = [{"encoder": {f"layer_{i}": {"query": {"A": jax.random.normal(next(keys), (5, 2)),
                                                     "B": jax.random.normal(next(keys), (2, 6))}} for i in layers}}
               for _ in range(3)]

    def client_stacked(trees):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # [N, ...] as uploads are

    weights = jnp.asarray([0.5, 0.3, 0.2])
    flat = residuals(client_stacked(clients), weights)
    scan = residuals(client_stacked([stack_layers(c) for c in clients]), weights)
    chex.assert_shape(scan["encoder"][STACKED]["query"], (3, 5, 6))
    chex.assert_trees_all_close(unstack_layers(scan), flat, atol=1e-5)
    assert float(jnp.abs(flat["encoder"]["layer_1"]["query"]).max()) > 1e-2  # not trivially zero
    chex.assert_trees_all_close(fold_residual(stack_layers(base), {"residual": scan}, 0.5),
                                stack_layers(fold_residual(base, {"residual": flat}, 0.5)), atol=1e-5)


def test_a_federated_run_under_scan_gives_the_unrolled_history(tiny_model_dir):
    """Dropout off (its masks are drawn per layer differently under scan); everything else,
    adapter init included, is the same run."""
    from helpers import tiny_config

    from celora_jax.federated import engine
    from celora_jax.federated.config import apply_overrides

    overrides = ["optimizer.dropout=false"]
    flat = engine.run(apply_overrides(tiny_config(tiny_model_dir), overrides))
    scan = engine.run(apply_overrides(tiny_config(tiny_model_dir), overrides + ["model.scan_layers=true"]))
    for flat_round, scan_round in zip(flat.history, scan.history, strict=True):
        np.testing.assert_allclose(scan_round["train_loss"], flat_round["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(scan_round["client_test_accuracy"], flat_round["client_test_accuracy"], atol=1e-6)
        np.testing.assert_allclose(scan_round["weights"], flat_round["weights"], atol=1e-4)
        assert scan_round["bytes_round"] == flat_round["bytes_round"]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(scan.client_params)[0]]
    assert any(STACKED in path for path in paths) and not any("layer_0" in path for path in paths)

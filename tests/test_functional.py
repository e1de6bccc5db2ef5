"""Model-agnostic adapters (celora_jax.lora.functional) against float64 numpy references."""

import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from celora_jax.lora.adapters import AdapterConfig, AdapterConfigError, init_adapters
from celora_jax.lora.functional import adapt
from celora_jax.models.bert import BertModel, EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("substitute", "intercept")


def randomize(adapters, seed):
    """Same structure, every factor random (B non-zero, C not identity) so the adapter matters."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def np_merged(kernel, adapter, scale):
    """W0 + s·A·C·B in float64 (batched over a leading layer axis if present)."""
    a, c, b = (np.asarray(adapter[n], np.float64) for n in ("A", "C", "B"))
    return np.asarray(kernel, np.float64) + scale * (a @ c @ b)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


def mlp_setup():
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
    variables = model.init(jax.random.PRNGKey(0), x)
    config = AdapterConfig(rank=2, alpha=4.0, target=r"Dense_\d+/kernel$")
    return model, variables, x, config


def mlp_reference(variables, adapters, x, scale):
    p, a = variables["params"], adapters["params"]
    h = np.asarray(x, np.float64)
    for index, layer in enumerate(("Dense_0", "Dense_1")):
        h = h @ np_merged(p[layer]["kernel"], a[layer], scale) + np.asarray(p[layer]["bias"])
        if index == 0:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("method", METHODS)
def test_linen_mlp_matches_numpy_reference(method):
    model, variables, x, config = mlp_setup()
    adapters, adapted_apply = adapt(model.apply, variables, config, jax.random.PRNGKey(2), method)
    assert set(adapters["params"]) == {"Dense_0", "Dense_1"}
    chex.assert_shape([adapters["params"]["Dense_0"][n] for n in "ACB"], [(6, 2), (2, 2), (2, 8)])
    # Fresh adapters (B = 0) leave the model unchanged.
    chex.assert_trees_all_close(adapted_apply(variables, adapters, x), model.apply(variables, x),
                                atol=1e-6)
    adapters = randomize(adapters, 3)
    expected = mlp_reference(variables, adapters, x, config.scale)
    chex.assert_trees_all_close(adapted_apply(variables, adapters, x), expected, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(adapted_apply)(variables, adapters, x), expected, atol=1e-5)


def test_linen_intercept_equals_substitution_outputs_and_gradients():
    model, variables, x, config = mlp_setup()
    key = jax.random.PRNGKey(2)
    runs = {m: adapt(model.apply, variables, config, key, m) for m in METHODS}
    chex.assert_trees_all_equal(runs["substitute"][0], runs["intercept"][0])
    adapters = randomize(runs["substitute"][0], 4)
    loss = lambda fn: (lambda a: jnp.sum(fn(variables, a, x) ** 2))
    outputs = {m: fn(variables, adapters, x) for m, (_, fn) in runs.items()}
    grads = {m: jax.grad(loss(fn))(adapters) for m, (_, fn) in runs.items()}
    chex.assert_trees_all_close(outputs["substitute"], outputs["intercept"], atol=1e-5)
    chex.assert_trees_all_close(grads["substitute"], grads["intercept"], atol=1e-4)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def test_nnx_model_via_split_merge():
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
    config = AdapterConfig(rank=3, target=r"kernel$")
    adapters, adapted_apply = adapt(apply_fn, state, config, jax.random.PRNGKey(2))
    assert set(adapters) == {"l1", "l2"}  # the NNX Variable's ".value" is not part of the path
    adapters = randomize(adapters, 5)
    p = nnx.to_pure_dict(state)
    h = np.maximum(np.asarray(x, np.float64) @ np_merged(p["l1"]["kernel"], adapters["l1"], 1.0)
                   + np.asarray(p["l1"]["bias"]), 0)
    expected = h @ np_merged(p["l2"]["kernel"], adapters["l2"], 1.0) + np.asarray(p["l2"]["bias"])
    chex.assert_trees_all_close(adapted_apply(state, adapters, x), expected, atol=1e-5)
    chex.assert_trees_all_close(jax.jit(adapted_apply)(state, adapters, x), expected, atol=1e-5)


def stacked_setup(layers=3, width=6):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"layers": {"kernel": 0.4 * jax.random.normal(keys[0], (layers, width, width)),
                         "bias": 0.1 * jax.random.normal(keys[1], (layers, width))},
              "head": {"w": jax.random.normal(keys[2], (width, 2))}}

    def apply_fn(params, x):
        def layer(h, weights):
            kernel, bias = weights
            return jnp.tanh(h @ kernel + bias), None
        h, _ = jax.lax.scan(layer, x, (params["layers"]["kernel"], params["layers"]["bias"]))
        return h @ params["head"]["w"]

    x = jax.random.normal(keys[3], (4, width))
    return params, apply_fn, x


def test_stacked_kernel_with_lax_scan_matches_per_layer_loop():
    params, apply_fn, x = stacked_setup()
    config = AdapterConfig(rank=2, alpha=1.0, target=r"layers/kernel$|head/w$")
    adapters, adapted_apply = adapt(apply_fn, params, config, jax.random.PRNGKey(2))
    # A "kernel" leaf's adapter sits at its module path; another name keeps its own path.
    chex.assert_shape([adapters["layers"][n] for n in "ACB"], [(3, 6, 2), (3, 2, 2), (3, 2, 6)])
    chex.assert_shape(adapters["head"]["w"]["A"], (6, 2))
    chex.assert_trees_all_equal(adapters["layers"]["C"], jnp.broadcast_to(jnp.eye(2), (3, 2, 2)))
    assert not np.allclose(adapters["layers"]["A"][0], adapters["layers"]["A"][1])
    adapters = randomize(adapters, 6)
    h = np.asarray(x, np.float64)
    for index in range(3):
        kernel = np_merged(params["layers"]["kernel"][index],
                           {n: adapters["layers"][n][index] for n in "ACB"}, config.scale)
        h = np.tanh(h @ kernel + np.asarray(params["layers"]["bias"][index], np.float64))
    expected = h @ np_merged(params["head"]["w"], adapters["head"]["w"], config.scale)
    chex.assert_trees_all_close(adapted_apply(params, adapters, x), expected, atol=1e-5)


@pytest.fixture(scope="module")
def encoder():
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    config = AdapterConfig(rank=4, alpha=8.0)  # default target: every encoder linear layer
    model = BertModel(cfg, lora_scale=config.scale)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 1, 50)
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
    params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
    return model, params, config, ids, mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("wrapped", [False, True], ids=["model.apply", "lambda"])
def test_encoder_matches_builtin_lora_collection(encoder, method, wrapped):
    model, params, config, ids, mask = encoder
    key = jax.random.PRNGKey(2)
    builtin = randomize(init_adapters(key, params, config), 7)
    expected = model.apply({"params": params, "lora": builtin}, ids, mask)
    if wrapped:  # params without the "params" collection level
        apply_fn, base, adapters = (lambda p, *a: model.apply({"params": p}, *a)), params, builtin
    else:
        apply_fn, base, adapters = model.apply, {"params": params}, {"params": builtin}
    fresh, adapted_apply = adapt(apply_fn, base, config, key, method)
    # Same key, same init as the built-in path, so the two adapter pytrees are interchangeable.
    builtin_fresh = init_adapters(key, params, config)
    chex.assert_trees_all_equal(fresh, builtin_fresh if wrapped else {"params": builtin_fresh})
    chex.assert_trees_all_close(adapted_apply(base, adapters, ids, mask), expected, atol=1e-5)
    assert not np.allclose(expected, model.apply({"params": params}, ids, mask), atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_client_axis_equals_separate_calls(method):
    model, variables, x, config = mlp_setup()
    adapters, adapted_apply = adapt(model.apply, variables, config, jax.random.PRNGKey(2), method)
    clients = [randomize(adapters, seed) for seed in (10, 11, 12)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *clients)  # [clients, ...]
    batched = jax.jit(jax.vmap(adapted_apply, in_axes=(None, 0, None)))(variables, stacked, x)
    chex.assert_shape(batched, (3, 5, 3))
    for index, client in enumerate(clients):
        chex.assert_trees_all_close(batched[index], adapted_apply(variables, client, x), atol=1e-5)


def _set(adapters, path, value):
    flat = dict(traverse_util.flatten_dict(adapters))
    if value is None:
        del flat[path]
    else:
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("edit, message", [
    ((("params", "Dense_0", "A"), jnp.zeros((5, 2))),
     r"'adapters' at adapter path 'params/Dense_0'.*"
     r"factor A has shape \(5, 2\), expected \(6, 2\)"),
    ((("params", "Dense_1", "C"), None),
     r"'adapters' at adapter path 'params/Dense_1'.*expected \['A', 'B', 'C'\].*'C': \(2, 2\)"),
    ((("params", "Dense_9", "A"), jnp.zeros((6, 2))),
     r"'adapters' has adapters at \['params/Dense_9'\]"),
    ((("params", "Dense_0", "B"), jnp.zeros((2, 8), jnp.int32)),
     r"'params/Dense_0'.*factor B has dtype int32, expected a floating dtype \(shape \(2, 8\)\)"),
    ((("params", "Dense_0", "B"), jnp.zeros((3, 2, 8))), r"expected \(2, 8\).*jax.vmap"),
])
def test_bad_adapters_name_path_argument_and_expected_shape(method, edit, message):
    model, variables, x, config = mlp_setup()
    adapters, adapted_apply = adapt(model.apply, variables, config, jax.random.PRNGKey(2), method)
    bad = _set(adapters, *edit)
    with pytest.raises(ValueError, match=message):
        adapted_apply(variables, bad, x)
    with pytest.raises(ValueError, match=message):  # shapes are static: same check under jit
        jax.jit(adapted_apply)(variables, bad, x)


def test_bad_configuration_and_base_params():
    model, variables, x, config = mlp_setup()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="matches no 2-D or 3-D parameter"):
        adapt(model.apply, variables, AdapterConfig(rank=2, target="nothing"), key)
    with pytest.raises(ValueError, match="rank 4 exceeds min"):
        adapt(model.apply, variables, AdapterConfig(rank=4, target=r"Dense_1/kernel"), key)
    with pytest.raises(ValueError, match="'method' must be one of"):
        adapt(model.apply, variables, config, key, method="merge")
    # A regex that also covers the bias adapts only the kernel, as init_adapters does.
    adapters, _ = adapt(model.apply, variables, AdapterConfig(rank=2, target=r"Dense_0/"), key)
    assert set(traverse_util.flatten_dict(adapters)) == {("params", "Dense_0", n) for n in "ACB"}
    with pytest.raises(ValueError, match="m/A and m/kernel would collide .* at m/A"):
        adapt(lambda p, x: x, {"m": {"kernel": jnp.zeros((4, 4)), "A": jnp.zeros((4, 4))}},
              AdapterConfig(rank=2, target="m/"), key)
    params, apply_fn, x_stacked = stacked_setup()
    with pytest.raises(AdapterConfigError, match="stacked kernels.*need method='substitute'"):
        adapt(apply_fn, params, AdapterConfig(rank=2, target="kernel"), key, "intercept")
    # The interceptor only sees linen modules; a plain function must not stay silently unadapted.
    adapters, adapted_apply = adapt(apply_fn, params, AdapterConfig(rank=2, target="head/w"),
                                    key, "intercept")
    with pytest.raises(ValueError, match=r"no linen module call matched.*\['head/w'\]"):
        adapted_apply(params, adapters, x_stacked)
    adapters, adapted_apply = adapt(model.apply, variables, config, key)
    smaller = _set(variables, ("params", "Dense_0", "kernel"), jnp.zeros((6, 7)))
    with pytest.raises(ValueError, match="'base_params' has kernel params/Dense_0/kernel of shape"):
        adapted_apply(smaller, adapters, x)


def test_example_script_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "adapt_your_model.py")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss" in result.stdout

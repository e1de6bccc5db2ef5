"""Tri-matrix and LoRA adapters against a numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.lora import adapters, cores as cores_lib


def _base_params(key, d_in=12, d_hidden=10, d_out=6):
    k1, k2 = jax.random.split(key)
    return {
        "encoder": {
            "layer_0": {"dense": {"kernel": jax.random.normal(k1, (d_in, d_hidden)), "bias": jnp.ones(d_hidden)}},
            "layer_1": {"dense": {"kernel": jax.random.normal(k2, (d_hidden, d_out)), "bias": jnp.zeros(d_out)}},
        },
        "head": {"kernel": jnp.ones((d_out, 2))},
    }


def _random_adapter(key, d_in, d_out, r, tri=True):
    ka, kc, kb = jax.random.split(key, 3)
    adapter = {"A": jax.random.normal(ka, (d_in, r)), "B": jax.random.normal(kb, (r, d_out))}
    if tri:
        adapter["C"] = jax.random.normal(kc, (r, r))
    return adapter


class AdapterMathTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_output_merge_export_match_numpy(self):
        key = jax.random.key(0)
        kx, kw, ka = jax.random.split(key, 3)
        x = jax.random.normal(kx, (5, 12))
        kernel = jax.random.normal(kw, (12, 7))
        bias = jnp.arange(7.0)
        adapter = _random_adapter(ka, 12, 7, 4)
        scale = 0.5

        y = self.variant(adapters.adapted_linear, static_argnums=4)(x, kernel, bias, adapter, scale)
        a, b, c = (np.asarray(adapter[n], np.float64) for n in "ABC")
        xn, wn = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
        expected = xn @ wn + np.asarray(bias) + scale * (((xn @ a) @ c) @ b)
        chex.assert_shape(y, (5, 7))
        np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)

        merged = self.variant(adapters.merge_kernel, static_argnums=2)(kernel, adapter, scale)
        np.testing.assert_allclose(merged, wn + scale * a @ c @ b, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(xn @ np.asarray(merged, np.float64) + np.asarray(bias), expected,
                                   atol=1e-4, rtol=1e-5)

        pair = adapters.to_two_factor({"m": adapter})["m"]
        np.testing.assert_allclose(pair["A"], a, atol=1e-6)
        np.testing.assert_allclose(pair["B"], c @ b, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(adapters.adapter_output(x, pair, scale),
                                   scale * xn @ a @ c @ b, atol=1e-4, rtol=1e-5)

    def test_two_factor_lora_matches_numpy(self):
        kx, ka = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, (3, 8))
        adapter = _random_adapter(ka, 8, 5, 2, tri=False)
        out = adapters.adapter_output(x, adapter, 2.0)
        expected = 2.0 * np.asarray(x) @ np.asarray(adapter["A"]) @ np.asarray(adapter["B"])
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_init_shapes_and_values_follow_method_section_1():
    params = _base_params(jax.random.key(0))
    config = adapters.AdapterConfig(rank=4, target=r"encoder/.*/kernel$")
    tree = adapters.init_adapters(jax.random.key(3), params, config)
    layer0 = tree["encoder"]["layer_0"]["dense"]
    chex.assert_shape([layer0["A"], layer0["C"], layer0["B"]], [(12, 4), (4, 4), (4, 10)])
    np.testing.assert_array_equal(layer0["C"], np.eye(4))
    np.testing.assert_array_equal(layer0["B"], 0)
    assert 0 < float(jnp.std(layer0["A"])) < 3e-3
    assert "head" not in tree  # not targeted
    # Same key, same A: clients share the initial basis.
    again = adapters.init_adapters(jax.random.key(3), params, config)
    np.testing.assert_array_equal(again["encoder"]["layer_1"]["dense"]["A"],
                                  tree["encoder"]["layer_1"]["dense"]["A"])


def test_lora_kind_and_core_only_ablation():
    params = _base_params(jax.random.key(0))
    lora = adapters.init_adapters(jax.random.key(0), params,
                                  adapters.AdapterConfig(kind="lora", rank=2, target="encoder"))
    assert set(lora["encoder"]["layer_0"]["dense"]) == {"A", "B"}
    core_only = adapters.init_adapters(
        jax.random.key(0), params, adapters.AdapterConfig(rank=2, target="encoder", core_only=True))
    factors = core_only["encoder"]["layer_0"]["dense"]
    np.testing.assert_array_equal(factors["C"], 0)
    assert float(jnp.abs(factors["B"]).sum()) > 0


def test_merge_adapters_replaces_only_adapted_kernels():
    params = _base_params(jax.random.key(0))
    config = adapters.AdapterConfig(rank=3, target=r"layer_1/.*kernel")
    tree = adapters.init_adapters(jax.random.key(1), params, config)
    tree["encoder"]["layer_1"]["dense"]["B"] = jnp.ones((3, 6))
    merged = adapters.merge_adapters(params, tree, config.scale)
    np.testing.assert_array_equal(merged["encoder"]["layer_0"]["dense"]["kernel"],
                                  params["encoder"]["layer_0"]["dense"]["kernel"])
    expected = params["encoder"]["layer_1"]["dense"]["kernel"] + adapters.adapter_delta(
        tree["encoder"]["layer_1"]["dense"])
    np.testing.assert_allclose(merged["encoder"]["layer_1"]["dense"]["kernel"], expected, atol=1e-6)


def test_stack_and_unstack_cores_round_trip_with_client_axis():
    params = _base_params(jax.random.key(0))
    config = adapters.AdapterConfig(rank=3, target="encoder")
    tree = adapters.init_adapters(jax.random.key(1), params, config)
    clients = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)
    cores = cores_lib.stack_cores(clients)
    chex.assert_shape(cores, (2, 2, 3, 3))
    back = cores_lib.unstack_cores(clients, cores * 3)
    np.testing.assert_array_equal(back["encoder"]["layer_1"]["dense"]["C"][1], 6 * np.eye(3))


def test_core_share_matches_dense_numpy_norms_with_client_axis():
    keys = jax.random.split(jax.random.key(3), 2)
    tree = {"q": _random_adapter(keys[0], 12, 10, 4), "v": _random_adapter(keys[1], 10, 6, 4)}
    clients = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x, -x]), tree)
    share = cores_lib.core_share(clients)
    chex.assert_shape(share, (3, 2))
    for c in range(3):
        for index, name in enumerate(sorted(tree)):
            a, core, b = (np.asarray(clients[name][k][c], np.float64) for k in "ACB")
            expected = (np.linalg.norm(a @ (core - np.eye(4)) @ b) / np.linalg.norm(a @ core @ b))
            np.testing.assert_allclose(share[c, index], expected, rtol=1e-4)


def test_core_share_is_zero_at_init_and_for_identity_cores():
    params = _base_params(jax.random.key(0))
    tree = adapters.init_adapters(jax.random.key(1), params, adapters.AdapterConfig(rank=3, target="encoder"))
    np.testing.assert_array_equal(cores_lib.core_share(tree), 0.0)  # B = 0: no update yet
    trained = jax.tree.map(lambda x: x, tree)
    trained["encoder"]["layer_0"]["dense"]["B"] = jnp.ones((3, 10))
    np.testing.assert_array_equal(cores_lib.core_share(trained), 0.0)  # C = I carries nothing
    with pytest.raises(ValueError, match="core_share.*no core"):
        cores_lib.core_share({"q": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 4))}})


def test_scale_is_alpha_over_rank():
    assert adapters.AdapterConfig(rank=8).scale == 1.0
    assert adapters.AdapterConfig(rank=8, alpha=16).scale == 2.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "positive integer"),
    (dict(rank=-2), "positive integer"),
    (dict(kind="dora"), "kind"),
    (dict(target="("), "not a valid regex"),
    (dict(kind="lora", core_only=True), "tri-matrix"),
])
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(adapters.AdapterConfigError, match=message):
        adapters.AdapterConfig(**kwargs)


def test_target_matching_nothing_and_rank_too_large_raise():
    params = _base_params(jax.random.key(0))
    with pytest.raises(adapters.AdapterConfigError, match="matches no 2-D kernel"):
        adapters.init_adapters(jax.random.key(0), params, adapters.AdapterConfig(target="decoder"))
    with pytest.raises(adapters.AdapterConfigError, match=r"rank 7 exceeds min\(d_in, d_out\) = 6"):
        adapters.init_adapters(jax.random.key(0), params,
                               adapters.AdapterConfig(rank=7, target="layer_1"))


def test_core_gradient_is_zero_with_b_zero_and_nonzero_after_one_step():
    """METHOD.md §1: with B = 0, C receives no gradient; after a step on A, B, C it does."""
    kx, kw, ka, ky = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(kx, (16, 12))
    kernel = jax.random.normal(kw, (12, 6))
    target = jax.random.normal(ky, (16, 6))
    adapter = adapters.init_adapters(ka, {"m": {"kernel": kernel}},
                                     adapters.AdapterConfig(rank=4, target="m", a_init_std=0.1))["m"]

    def loss(adapter):
        return jnp.mean((adapters.adapted_linear(x, kernel, None, adapter, 1.0) - target) ** 2)

    grads = jax.grad(loss)(adapter)
    np.testing.assert_array_equal(grads["C"], 0.0)
    assert float(jnp.abs(grads["B"]).sum()) > 0
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, adapter, grads)
    assert float(jnp.abs(jax.grad(loss)(stepped)["C"]).sum()) > 0


def _tri(d_in=6, r=2, d_out=5):
    return {"A": jnp.ones((d_in, r)), "C": jnp.eye(r), "B": jnp.ones((r, d_out))}


@pytest.mark.parametrize("call, message", [
    (lambda: adapters.adapter_output(jnp.ones((3, 7)), _tri(), 1.0),
     r"adapter_output: x must have shape \[\.\.\., 6\]"),
    (lambda: adapters.adapter_output(jnp.ones((3, 6)), {"A": jnp.ones((6, 2))}, 1.0),
     r"adapter_output: adapter must be a mapping with factors 'A', 'B'"),
    (lambda: adapters.adapter_output(jnp.ones((3, 6)), {**_tri(), "C": jnp.eye(3)}, 1.0),
     r"adapter\['C'\] must have shape \[\.\.\., 2, 2\]"),
    (lambda: adapters.adapter_output(jnp.ones((3, 6)), {**_tri(), "B": jnp.ones((3, 5))}, 1.0),
     r"adapter\['B'\] must have shape \[\.\.\., 2, \?\] \(\[r, d_out\] with r = 2 from A\)"),
    (lambda: adapters.adapter_output(jnp.ones((3, 6)), {**_tri(), "A": jnp.ones((6, 2), jnp.int32)}, 1.0),
     r"adapter\['A'\] must be a floating-point array"),
    (lambda: adapters.adapted_linear(jnp.ones((3, 6)), jnp.ones((6, 4)), None, _tri(), 1.0),
     r"adapted_linear: adapter maps 6 -> 5 .* but the kernel is \(6, 4\)"),
    (lambda: adapters.adapted_linear(jnp.ones((3, 6)), jnp.ones((6, 5)), jnp.ones(4), None, 1.0),
     r"adapted_linear: bias must have shape \[\.\.\., 5\]"),
    (lambda: adapters.merge_kernel(jnp.ones((5, 6)), _tri(), 1.0),
     r"merge_kernel: adapter maps 6 -> 5 .* but the kernel is \(5, 6\)"),
    (lambda: cores_lib.stack_cores({"q": {"A": jnp.ones((4, 2)), "B": jnp.ones((2, 4))}}),
     r"stack_cores: adapters at \['q'\] have no core 'C'"),
    (lambda: cores_lib.stack_cores({"q": {"C": jnp.eye(2)}, "v": {"C": jnp.eye(3)}}),
     r"stack_cores: all cores must share one shape"),
    (lambda: cores_lib.unstack_cores({"q": {"C": jnp.eye(2)}, "v": {"C": jnp.eye(2)}}, jnp.ones((3, 2, 2))),
     r"unstack_cores: cores must have shape \(2, 2, 2\)"),
    (lambda: adapters.init_adapters(jax.random.key(0), [jnp.ones((4, 4))], adapters.AdapterConfig()),
     r"init_adapters: params must be a nested mapping"),
])
def test_bad_arguments_fail_at_the_boundary_with_named_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_boundary_checks_allow_leading_layer_and_client_axes():
    stacked = {"A": jnp.ones((3, 6, 2)), "C": jnp.tile(jnp.eye(2), (3, 1, 1)), "B": jnp.ones((3, 2, 5))}
    chex.assert_shape(adapters.merge_kernel(jnp.zeros((3, 6, 5)), stacked, 1.0), (3, 6, 5))
    per_client = jax.vmap(lambda a, x: adapters.adapter_output(x, a, 1.0))(stacked, jnp.ones((3, 4, 6)))
    chex.assert_shape(per_client, (3, 4, 5))


def test_config_and_roles_arguments_are_checked():
    from celora_jax import get_method, parameter_roles

    with pytest.raises(ValueError, match="init_adapters: config must be an AdapterConfig"):
        adapters.init_adapters(jax.random.key(0), {"m": {"kernel": jnp.ones((4, 4))}}, {"rank": 2})
    with pytest.raises(ValueError, match="parameter_roles: client_params must be a mapping"):
        parameter_roles([1, 2], get_method("celora"))
    with pytest.raises(ValueError, match="parameter_roles: method must be a FederatedMethod"):
        parameter_roles({"lora": {}}, "celora")

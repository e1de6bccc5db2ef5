"""blocked_vmap equals vmap, holds unmapped arguments once, and rejects bad blocks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celora_jax.federated import sharding
from celora_jax.federated.blocks import blocked_vmap


def _client_step(shared, state, batch):
    hidden = jnp.tanh(batch["x"] @ shared["w"] + state["bias"])
    return {"bias": state["bias"] + hidden.mean(0), "out": hidden.sum()}, jnp.sum(hidden ** 2)


@pytest.mark.parametrize("count,block", [(12, 3), (12, 4), (12, 12), (12, None), (12, 50), (6, 1)])
def test_blocked_vmap_equals_vmap(count, block):
    keys = jax.random.split(jax.random.key(0), 3)
    shared = {"w": jax.random.normal(keys[0], (5, 7))}
    state = {"bias": jax.random.normal(keys[1], (count, 7))}
    batch = {"x": jax.random.normal(keys[2], (count, 4, 5))}
    expected = jax.vmap(_client_step, in_axes=(None, 0, 0))(shared, state, batch)
    got = jax.jit(blocked_vmap(_client_step, (None, 0, 0), block))(shared, state, batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
    chex.assert_trees_all_close(got, expected, atol=1e-6, rtol=1e-6)


def test_blocks_run_one_after_another():
    # Within lax.map the per-block program sees `block` clients: the traced shape proves it.
    seen = []

    def step(x):
        seen.append(x.shape)
        return x * 2

    blocked_vmap(step, (0,), 4)(jnp.ones((12, 3)))
    assert seen == [(3,)]  # traced once, per client, inside the vmapped block body
    lowered = jax.jit(blocked_vmap(lambda x: x * 2, (0,), 4)).lower(jnp.ones((12, 3))).as_text()
    assert "while" in lowered or "scan" in lowered


def test_bad_blocks_are_named():
    with pytest.raises(ValueError, match="not a multiple of block=5"):
        blocked_vmap(lambda x: x, (0,), 5)(jnp.ones((12, 2)))
    with pytest.raises(ValueError, match="block must be >= 1"):
        blocked_vmap(lambda x: x, (0,), 0)
    with pytest.raises(ValueError, match="in_axes entries must be 0 or None"):
        blocked_vmap(lambda x: x, (1,), 2)
    with pytest.raises(ValueError, match="one common leading size"):
        blocked_vmap(lambda x, y: x + y, (0, 0), 2)(jnp.ones((4,)), jnp.ones((6,)))


def test_padding_makes_room_for_whole_blocks_on_every_device():
    mesh = sharding.client_mesh(1)
    assert sharding.padded_client_count(5, mesh, 2) == 6
    assert sharding.padded_client_count(5, mesh, 8) == 5      # one block holds everyone
    assert sharding.padded_client_count(1000, mesh, 64) == 1024
    assert sharding.client_block_size(3, mesh) == 3 and sharding.client_block_size(None, mesh) is None
    assert sharding.client_block_size("auto", mesh) == (1 if jax.default_backend() == "cpu" else None)
    np.testing.assert_equal(sharding.padded_client_count(7, mesh), 7)

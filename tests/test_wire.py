"""Pytrees as flat records of named arrays and back (what a deployment sends), with the
mismatches a server must refuse named."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from celora_jax.server import wire


def _tree(rank=2, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"lora": {"encoder": {"layer_0": {"query": {"C": rng.normal(size=(rank, rank)).astype(dtype)},
                                             "value": {"C": rng.normal(size=(rank, rank)).astype(dtype)}}}},
            "params": {"classifier": {"bias": np.zeros(3, dtype)}}}


def test_round_trip_keeps_paths_shapes_dtypes_and_values():
    tree = _tree()
    arrays, dtypes = wire.flatten_tree(tree)
    assert sorted(arrays) == ["lora/encoder/layer_0/query/C", "lora/encoder/layer_0/value/C",
                              "params/classifier/bias"]
    back = wire.unflatten_tree(arrays, dtypes, like=tree)
    for path in (("lora", "encoder", "layer_0", "query", "C"), ("params", "classifier", "bias")):
        a, b = tree, back
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(a, b)
        assert b.dtype == a.dtype
    assert wire.record_bytes(arrays) == (2 * 4 + 3) * 4


def test_bfloat16_travels_as_its_bit_pattern():
    tree = {"C": jnp.asarray([[1.5, -2.0], [3.0, 0.1]], jnp.bfloat16)}
    arrays, dtypes = wire.flatten_tree(tree)
    assert arrays["C"].dtype == np.uint16 and dtypes["C"] == "bfloat16"
    back = wire.unflatten_tree({"C": arrays["C"].copy()}, dtypes, like=tree)
    assert back["C"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["C"].astype(np.float32), np.asarray(tree["C"], np.float32))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("params/classifier/bias"), r"missing \['params/classifier/bias'\]"),
    (lambda a: a.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
    (lambda a: a.update({"lora/encoder/layer_0/query/C": np.zeros((4, 4), np.float32)}),
     r"lora/encoder/layer_0/query/C has shape \(4, 4\), expected \(2, 2\).*adapter rank"),
    (lambda a: a.update({"params/classifier/bias": np.zeros(3, np.float64)}), "has dtype float64, expected float32"),
])
def test_mismatched_records_are_refused_with_the_path_named(change, message):
    tree = _tree()
    arrays, dtypes = wire.flatten_tree(tree)
    change(arrays)
    dtypes = {k: str(v.dtype) for k, v in arrays.items()}
    with pytest.raises(wire.WireError, match=message):
        wire.unflatten_tree(arrays, dtypes, like=tree, what="the upload of node 7")


def test_non_finite_uploads_are_refused_only_when_asked():
    tree = _tree()
    arrays, dtypes = wire.flatten_tree(tree)
    arrays["lora/encoder/layer_0/value/C"] = arrays["lora/encoder/layer_0/value/C"].copy()
    arrays["lora/encoder/layer_0/value/C"][0, 1] = np.nan
    wire.unflatten_tree(arrays, dtypes, like=tree)  # a download may hold anything the server sent
    with pytest.raises(wire.WireError, match="node 2: lora/encoder/layer_0/value/C holds NaN"):
        wire.unflatten_tree(arrays, dtypes, like=tree, what="node 2", require_finite=True)
    bf = {"C": jnp.asarray([jnp.inf, 1.0], jnp.bfloat16)}
    arrays, dtypes = wire.flatten_tree(bf)
    with pytest.raises(wire.WireError, match="holds NaN or infinite"):
        wire.unflatten_tree(arrays, dtypes, like=bf, require_finite=True)


def test_a_key_holding_the_separator_is_refused():
    with pytest.raises(wire.WireError, match="contains '/'"):
        wire.flatten_tree({"a/b": np.zeros(1)})


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcxyz_0123456789", min_size=1, max_size=6),
                       st.lists(st.integers(1, 3), min_size=0, max_size=3), min_size=1, max_size=5),
       st.sampled_from([np.float32, np.float16, np.int32]))
def test_any_nested_tree_round_trips(shapes, dtype):
    tree = {name: {"leaf": np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)}
            for name, shape in shapes.items()}
    arrays, dtypes = wire.flatten_tree(tree)
    back = wire.unflatten_tree(arrays, dtypes, like=tree)
    for name in tree:
        np.testing.assert_array_equal(back[name]["leaf"], tree[name]["leaf"])
        assert back[name]["leaf"].dtype == tree[name]["leaf"].dtype

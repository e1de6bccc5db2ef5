"""The analytic FLOP count of ``benchmarks/flops.py`` (MFU's numerator) against the matrix
products JAX traces for the same training step, counted independently from the jaxpr."""

import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks.flops import adapter_parameters, encoder_step_flops
from celora_jax import AdapterConfig, init_adapters
from celora_jax.federated.tasks.base import split_base_params
from celora_jax.lora.adapters import DEFAULT_TARGET
from celora_jax.lora.roles import combine
from celora_jax.models import bert

TINY = bert.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
                          max_position_embeddings=32)
TRAINED = r"(LayerNorm|classifier|pooler)"  # the encoder's default model.trainable_base


def traced_matmul_flops(fn, *args) -> int:
    """2 x (output entries) x (contracted size) summed over every ``dot_general`` in the jaxpr
    of ``fn``, nested calls included and scan bodies counted once per iteration."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracted)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * _count(inner)
    return total


def _train_step_flops(model, params, adapters, ids, mask, labels):
    """Matrix-product FLOPs of the loss and its gradient to adapters and trained base leaves."""
    frozen, trained = split_base_params(params, TRAINED)

    def loss(lora, trained):
        logits = model.apply({"params": combine(frozen, trained), "lora": lora}, ids, mask)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    return traced_matmul_flops(jax.value_and_grad(loss, argnums=(0, 1)), adapters, trained)


@pytest.mark.parametrize("kind,pooling,scan", [("tri", "mean", False), ("lora", "pooler", True)])
def test_analytic_step_flops_equal_the_traced_matrix_products(kind, pooling, scan):
    batch, length, labels = 3, 12, 5
    model = bert.SequenceClassifier(TINY, num_labels=labels, pooling=pooling, scan_layers=scan)
    ids = jax.random.randint(jax.random.key(0), (batch, length), 1, 64)
    mask = jnp.ones_like(ids).at[1, 7:].set(0)
    params = model.init(jax.random.key(1), ids, mask)["params"]
    adapters = init_adapters(jax.random.key(2), params, AdapterConfig(rank=4, target=DEFAULT_TARGET, kind=kind))
    # 6 adapted linears per block: (d + d) r (+ r²) for q, k, v, output; (d + f) r (+ r²) twice.
    d, f, r = TINY.hidden_size, TINY.intermediate_size, 4
    per_block = 4 * 2 * d * r + 2 * (d + f) * r + (6 * r * r if kind == "tri" else 0)
    assert adapter_parameters(adapters) == TINY.num_layers * per_block

    analytic = encoder_step_flops(TINY, batch, length, adapters, labels, pooling)
    traced = _train_step_flops(model, params, adapters, ids, mask, jnp.arange(batch) % labels)
    assert analytic.train == traced
    # The forward pass alone: the products of the loss without its gradient.
    frozen, trained = split_base_params(params, TRAINED)
    forward = traced_matmul_flops(lambda lora: model.apply({"params": combine(frozen, trained), "lora": lora},
                                                           ids, mask), adapters)
    assert analytic.forward == forward

"""Adapt your own Flax model with CE-LoRA without touching its code.

A small linen MLP classifier stands in for "your model". ``adapt`` finds its Dense kernels
by regex and returns tri-matrix adapters (A·C·B) plus ``adapted_apply``; only the adapters
are trained (the base parameters stay frozen), here for one client on synthetic data.

Run (CPU, a few seconds)::

    .venv/bin/python examples/adapt_your_model.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from celora_jax import AdapterConfig, adapt

FEATURES, HIDDEN, CLASSES, EXAMPLES, STEPS = 16, 64, 4, 256, 50


class Classifier(nn.Module):
    """Your model: nothing here knows about adapters."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN, name="hidden")(x))
        return nn.Dense(CLASSES, name="head")(x)


def synthetic_task(key):
    """Inputs and labels from a random linear teacher the frozen base model does not know."""
    key_x, key_teacher = jax.random.split(key)
    x = jax.random.normal(key_x, (EXAMPLES, FEATURES))
    labels = jnp.argmax(x @ jax.random.normal(key_teacher, (FEATURES, CLASSES)), axis=-1)
    return x, labels


def main():
    key_model, key_adapters, key_data = jax.random.split(jax.random.PRNGKey(0), 3)
    model = Classifier()
    x, labels = synthetic_task(key_data)
    variables = model.init(key_model, x[:1])  # stands in for pre-trained weights

    config = AdapterConfig(rank=4, alpha=8.0, target=r"(hidden|head)/kernel$")
    # "intercept" adds x·A·C·B to each Dense output and never forms a dense update;
    # "substitute" (the default) works for any function, NNX and plain JAX included.
    adapters, adapted_apply = adapt(model.apply, variables, config, key_adapters,
                                    method="intercept")

    def loss_fn(adapters):
        logits = adapted_apply(variables, adapters, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    first = None
    for index in range(STEPS):
        adapters, opt_state, loss = step(adapters, opt_state)
        first = float(loss) if first is None else first
        if index % 10 == 0 or index == STEPS - 1:
            print(f"step {index:3d}  loss {float(loss):.4f}")
    final = float(loss_fn(adapters))
    print(f"loss {first:.4f} -> {final:.4f}")
    if not final < first:
        raise SystemExit("the adapted model did not learn")


if __name__ == "__main__":
    main()

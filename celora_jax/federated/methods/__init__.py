"""Federated fine-tuning methods, one file each, registered by name.

Each module ``celora_jax/federated/methods/<name>.py`` defines ``make(**options) ->
FederatedMethod``; registering a method is one entry in ``_MODULES`` below. See
docs/adding_a_method.md for a walk through ``fedprox.py``.

Examples:
  >>> from celora_jax.federated.methods import get_method, method_names
  >>> method_names()
  ['celora', 'celora_avg', 'cluster_oracle', 'fed_sb', 'fedavg_lora', 'fedavg_lora_ft', 'fedex_lora', 'fedprox', 'fedsa_lora', 'ffa_lora', 'local']
  >>> get_method("fedprox", mu=0.1).options
  {'mu': 0.1}
  >>> get_method("fedprox", nu=0.1)
  Traceback (most recent call last):
  ...
  ValueError: method 'fedprox' has no option 'nu'; its options are ['mu']
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from celora_jax.federated.methods import (celora, celora_avg, cluster_oracle, fed_sb, fedavg_lora, fedavg_lora_ft,
                                          fedex_lora, fedprox, fedsa_lora, ffa_lora, local)
from celora_jax.federated.methods.base import FederatedMethod, ServerInputs

_MODULES = (celora, celora_avg, cluster_oracle, fed_sb, fedavg_lora, fedavg_lora_ft, fedex_lora, fedprox, fedsa_lora,
            ffa_lora, local)

# name -> factory; the names are the methods' own (make().name).
FACTORIES = types.MappingProxyType({module.make().name: module.make for module in _MODULES})
# name -> the method with its default options.
METHODS = types.MappingProxyType({name: make() for name, make in FACTORIES.items()})


def method_names() -> list[str]:
    return sorted(FACTORIES)


def method_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` with their defaults."""
    parameters = inspect.signature(_factory(name)).parameters.values()
    return {p.name: p.default for p in parameters}


def _factory(name: str):
    try:
        return FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}") from None


def get_method(name: str, **options) -> FederatedMethod:
    """The method registered as ``name``, built with ``options`` (see ``method_options``).

    Raises:
      ValueError: unknown name, unknown option, or an invalid option value (named).

    Examples:
      >>> from celora_jax import get_method
      >>> spec = get_method("celora")
      >>> sorted(spec.trained), sorted(spec.shared), spec.needs_data_statistics
      (['A', 'B', 'C'], ['C'], True)
      >>> get_method("fedavg_lora_ft", steps=4).finetune_steps
      4
      >>> get_method("fedprox", mu=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: method 'fedprox': mu must be a finite number >= 0, got -1.0
    """
    factory = _factory(name)
    known = method_options(name)
    for option in options:
        if option not in known:
            raise ValueError(f"method {name!r} has no option {option!r}; its options are {sorted(known)}")
    try:
        return factory(**options)
    except ValueError as err:
        raise ValueError(f"method {name!r}: {err}") from None


__all__ = ["FederatedMethod", "ServerInputs", "METHODS", "FACTORIES", "get_method", "method_names",
           "method_options"]

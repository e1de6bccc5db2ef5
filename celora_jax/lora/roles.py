"""Which client parameters a federated method trains, sends and keeps (METHOD.md §6).

A client's parameters are one pytree ``{"lora": adapters, "params": base_subset}`` where
``base_subset`` holds the base parameters the client fine-tunes itself (LayerNorms and the
task head by default). Every leaf gets one role:

- ``"shared"``: trained locally and exchanged with the server each round (up and down);
- ``"personal"``: trained locally, never leaves the client;
- ``"frozen"``: not trained (e.g. FFA-LoRA's random A).
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util

SHARED = "shared"
PERSONAL = "personal"
FROZEN = "frozen"
ROLES = (SHARED, PERSONAL, FROZEN)


def parameter_roles(client_params: Mapping[str, Any], method: Any, *,
                    core_only: bool = False, share_base: bool = False) -> dict:
    """Labels every leaf of ``client_params`` with its role under ``method``.

    Args:
      client_params: ``{"lora": adapters, "params": base_subset}`` (either may be absent).
      method: the federated method (anything with ``trained`` and ``shared`` factor sets).
      core_only: CE-LoRA ablation where only the cores are trained (A and B frozen).
      share_base: also average the client-trained base parameters (LayerNorms and head),
        which are personal by default under every method (METHOD.md §6, [decided]).

    Returns:
      A pytree with the structure of ``client_params`` whose leaves are role strings.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax import get_method, parameter_roles
      >>> client = {"lora": {"query": {"A": jnp.zeros((8, 2)), "C": jnp.eye(2), "B": jnp.zeros((2, 8))}},
      ...           "params": {"head": {"kernel": jnp.zeros((8, 2))}}}
      >>> roles = parameter_roles(client, get_method("celora"))
      >>> sorted(roles["lora"]["query"].items()), roles["params"]["head"]["kernel"]
      ([('A', 'personal'), ('B', 'personal'), ('C', 'shared')], 'personal')
    """
    if not isinstance(client_params, Mapping):
        raise ValueError(f"parameter_roles: client_params must be a mapping like {{'lora': adapters, "
                         f"'params': trained_base}}, got {type(client_params).__name__}")
    if not all(hasattr(method, name) for name in ("trained", "shared")):
        raise ValueError(f"parameter_roles: method must be a FederatedMethod (see get_method), got {method!r}")
    trained = frozenset("C") if core_only else method.trained
    roles = {}
    for path in traverse_util.flatten_dict(dict(client_params)):
        if path[0] == "lora":
            factor = path[-1]
            if factor not in trained:
                roles[path] = FROZEN
            else:
                roles[path] = SHARED if factor in method.shared else PERSONAL
        else:
            roles[path] = SHARED if share_base and method.shared else PERSONAL
    return traverse_util.unflatten_dict(roles)


def select(tree: Mapping[str, Any], roles: Mapping[str, Any], *wanted: str) -> dict:
    """The sub-pytree of ``tree`` whose leaves have one of the ``wanted`` roles."""
    unknown = set(wanted) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")
    flat_roles = traverse_util.flatten_dict(dict(roles))
    flat = {path: leaf for path, leaf in traverse_util.flatten_dict(dict(tree)).items()
            if flat_roles[path] in wanted}
    return traverse_util.unflatten_dict(flat)


def combine(*trees: Mapping[str, Any]) -> dict:
    """Merges disjoint nested dicts (e.g. the parts returned by ``select``) into one."""
    flat: dict = {}
    for tree in trees:
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            if path in flat:
                raise ValueError(f"combine: leaf {'/'.join(path)} appears twice")
            flat[path] = leaf
    return traverse_util.unflatten_dict(flat)

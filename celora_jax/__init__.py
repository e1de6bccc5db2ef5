"""celora-jax: personalized, communication-efficient federated fine-tuning with tri-matrix LoRA.

The supported public surface is re-exported here; other module-level names are internal.
"""

from celora_jax.adapters import (
    AdapterConfig,
    AdapterConfigError,
    adapted_linear,
    adapter_delta,
    adapter_output,
    init_adapters,
    merge_adapters,
    merge_kernel,
    stack_cores,
    to_two_factor,
    unstack_cores,
)
from celora_jax.aggregation import AggregationConfig, ServerOutputs, server_step
from celora_jax.config import RunConfig
from celora_jax.functional import adapt
from celora_jax.gmm import ClassMixtures, fit_class_mixtures
from celora_jax.methods import METHODS, MethodSpec, get_method, parameter_roles
from celora_jax.similarity import data_distance, parameter_distance

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterConfigError", "AggregationConfig", "ClassMixtures", "METHODS",
    "MethodSpec", "RunConfig", "ServerOutputs", "adapt", "adapted_linear", "adapter_delta", "adapter_output",
    "data_distance", "fit_class_mixtures", "get_method", "init_adapters", "merge_adapters",
    "merge_kernel", "parameter_distance", "parameter_roles", "server_step", "stack_cores",
    "to_two_factor", "unstack_cores",
]

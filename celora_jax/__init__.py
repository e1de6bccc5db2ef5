"""celora-jax: personalized, communication-efficient federated fine-tuning with tri-matrix LoRA.

The names below are the supported public surface: each has type hints and a docstring with
shapes and a runnable example (checked by the test suite). Other module-level names are
internal and may change.

* Adapters over parameter pytrees: :class:`AdapterConfig`, :func:`init_adapters`,
  :func:`adapter_output`, :func:`adapted_linear`, :func:`adapter_delta`,
  :func:`merge_kernel`, :func:`merge_adapters`, :func:`to_two_factor`,
  :func:`stack_cores`, :func:`unstack_cores`; blocks unrolled or under ``nn.scan``:
  :func:`stack_layers`, :func:`unstack_layers`.
* Any JAX model, unedited: :func:`adapt`.
* The CE-LoRA server kernel: :func:`fit_class_mixtures`, :func:`data_distance`,
  :func:`parameter_distance`, :class:`AggregationConfig`, :func:`server_step`,
  :func:`weighted_average_cores`.
* The baselines' aggregations: :func:`fedavg`, :func:`fedavg_lora`, :func:`ffa_lora`,
  :func:`fedsa_lora`.
* Methods and runs: :data:`METHODS`, :class:`FederatedMethod`, :func:`get_method`, :func:`parameter_roles`,
  :class:`RunConfig`; adapters as PEFT folders: :func:`export_peft`, :func:`load_peft`.
"""

from celora_jax.federated.config import RunConfig
from celora_jax.federated.methods import METHODS, FederatedMethod, get_method
from celora_jax.lora.adapters import (
    AdapterConfig,
    AdapterConfigError,
    adapted_linear,
    adapter_delta,
    adapter_output,
    init_adapters,
    merge_adapters,
    merge_kernel,
    to_two_factor,
)
from celora_jax.lora.cores import core_share, stack_cores, unstack_cores
from celora_jax.lora.functional import adapt
from celora_jax.lora.layer_layout import stack_layers, unstack_layers
from celora_jax.lora.roles import parameter_roles
from celora_jax.models.export import export_peft, load_peft
from celora_jax.server.aggregation import AggregationConfig, ServerOutputs, server_step, weighted_average_cores
from celora_jax.server.baselines import fedavg, fedavg_lora, fedsa_lora, ffa_lora
from celora_jax.server.gmm import ClassMixtures, MixtureConfig, fit_class_mixtures
from celora_jax.server.similarity import data_distance, parameter_distance

__version__ = "0.1.0"

__all__ = [
    # adapters
    "AdapterConfig", "AdapterConfigError", "adapted_linear", "adapter_delta", "adapter_output", "core_share",
    "init_adapters", "merge_adapters", "merge_kernel", "stack_cores", "to_two_factor",
    "unstack_cores", "stack_layers", "unstack_layers", "adapt",
    # CE-LoRA server kernel
    "ClassMixtures", "MixtureConfig", "fit_class_mixtures", "data_distance", "parameter_distance",
    "AggregationConfig", "ServerOutputs", "server_step", "weighted_average_cores",
    # baselines
    "fedavg", "fedavg_lora", "ffa_lora", "fedsa_lora",
    # methods, runs, export
    "METHODS", "FederatedMethod", "get_method", "parameter_roles", "RunConfig", "export_peft", "load_peft",
]

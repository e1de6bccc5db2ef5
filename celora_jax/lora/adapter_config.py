"""How adapters attach to a model (``AdapterConfig``) and the names of their kinds and inits.

Kept apart from the adapter functions (``celora_jax.lora.adapters``, which re-exports all of
it) so that a configuration can be read, validated and documented without the arrays.
"""

from __future__ import annotations

import dataclasses
import re

from celora_jax import _checks

__all__ = ["TRI", "LORA", "RANDOM_INIT", "WEIGHT_SVD", "GRADIENT_SVD", "INITS", "SHARED_BASIS_INITS",
           "DEFAULT_TARGET", "AdapterConfig", "AdapterConfigError"]

TRI = "tri"
LORA = "lora"

# How a tri-matrix adapter's factors start (``AdapterConfig.init``). "random": A drawn, B = 0,
# C = I, and the method decides what trains. "weight_svd" (LoRA-XS): A = U_r S_r and B = V_rᵀ
# from the truncated SVD of the pretrained kernel, C = 0; A and B are then frozen and equal on
# every client (a shared basis), and only C trains and travels. "gradient_svd" (LoRA-SB):
# A = U_r, B = V_rᵀ from the SVD of the clients' summed task gradient with respect to the
# kernel, estimated without pooling it by a federated sketch in round 0
# (``celora_jax.federated.basis``); until then A = B = C = 0.
RANDOM_INIT = "random"
WEIGHT_SVD = "weight_svd"
GRADIENT_SVD = "gradient_svd"
INITS = (RANDOM_INIT, WEIGHT_SVD, GRADIENT_SVD)
SHARED_BASIS_INITS = (WEIGHT_SVD, GRADIENT_SVD)

# Every linear layer of a BERT-family encoder block (query, key, value, attention output,
# both MLP layers), as in the authors' code; ``stacked`` is the same blocks under nn.scan.
DEFAULT_TARGET = r"encoder/(layer_\d+|stacked)/.*/kernel$"


class AdapterConfigError(_checks.ConfigError):
    """Raised when an adapter configuration cannot be applied to the given parameters."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """How adapters are attached to a model.

    Attributes:
      kind: "tri" for CE-LoRA's A·C·B adapter, "lora" for the classic two-factor A·B; None
        leaves it to the federated method (a run's default).
      rank: r, the inner dimension of the factors.
      alpha: scaling numerator; the update is multiplied by alpha / rank. None means
        alpha = rank (scale 1), the authors' default.
      target: regex searched in the "/"-joined path of every 2-D parameter; matches are
        adapted. The default adapts every linear layer of every encoder block.
      a_init_std: standard deviation of A's normal init (1e-3 in the authors' code).
      core_only: ablation of METHOD.md §1: A and B frozen, B drawn random instead of zero,
        C = 0, so that only the core is trained (only meaningful for kind="tri").
      init: how the factors start: "random" (A ~ N(0, a_init_std²), B = 0, C = I), or
        "weight_svd" (LoRA-XS: A = U_r·S_r, B = V_rᵀ from the truncated SVD of the
        pretrained kernel, C = 0; tri-matrix only), which freezes A and B: every client
        computes the same basis from the same weights and only the cores train; or
        "gradient_svd" (LoRA-SB: A = U_r, B = V_rᵀ from the SVD of the clients' summed
        gradient of the task loss with respect to the kernel, C = 0), built in round 0 of a
        run from the clients' sketches (``celora_jax.federated.basis``); ``init_adapters``
        leaves A, B and C at zero for it. None lets the federated method decide (a run's
        default; "random" outside a run).
      sketch_batches: batches of each client's training data whose summed gradient
        "gradient_svd" sketches (LoRA-SB estimates the first update from a few batches).
      sketch_oversample: extra columns of the sketch beyond the rank (its accuracy).
      client_ranks: heterogeneous ranks in a frozen basis, e.g. "8,16,32": client i uses
        the i-th rank (cycled over the clients), r_i <= rank, training and sending only the
        top-left r_i x r_i block of each core (``celora_jax.federated.client_ranks``).
        None: every client at ``rank``.

    Examples:
      >>> from celora_jax import AdapterConfig
      >>> config = AdapterConfig(rank=4, alpha=8.0, target=r"dense/kernel$")
      >>> config.scale
      2.0
      >>> AdapterConfig(rank=0)
      Traceback (most recent call last):
      ...
      celora_jax.lora.adapter_config.AdapterConfigError: adapter rank must be a positive integer, got 0
    """

    kind: str | None = TRI
    rank: int = 8
    alpha: float | None = None
    target: str = DEFAULT_TARGET
    a_init_std: float = 1e-3
    core_only: bool = False
    init: str | None = None
    sketch_batches: int = 4
    sketch_oversample: int = 8
    client_ranks: str | None = None

    @property
    def client_rank_cycle(self) -> tuple[int, ...] | None:
        """``client_ranks`` as integers (validated), or None."""
        return None if self.client_ranks is None else tuple(int(r) for r in _checks.comma_list(self.client_ranks))

    def __post_init__(self):
        _checks.check_fields(self, "adapter")
        if self.init not in (None, *INITS):
            raise AdapterConfigError(f"adapter init must be one of {', '.join(INITS)} (or None: the federated "
                                     f"method decides), got {self.init!r}")
        if self.init in SHARED_BASIS_INITS and self.kind == LORA:
            raise AdapterConfigError(f"adapter init {self.init!r} builds a frozen basis A, B around a trained "
                                     "core C: it needs tri-matrix adapters (kind 'tri'), not two-factor LoRA")
        if self.sketch_batches < 1:
            raise AdapterConfigError(f"adapter sketch_batches must be >= 1 (gradient_svd sums each client's "
                                     f"gradient over that many batches), got {self.sketch_batches}")
        if self.sketch_oversample < 0:
            raise AdapterConfigError(f"adapter sketch_oversample must be >= 0, got {self.sketch_oversample}")
        if self.init in SHARED_BASIS_INITS and self.core_only:
            raise AdapterConfigError(f"adapter core_only is the random-basis ablation; init {self.init!r} "
                                     "already trains only the cores, in its own basis: choose one")
        if self.client_ranks is not None:
            ranks = _checks.comma_list(self.client_ranks)
            if not ranks or not all(r.isdigit() for r in ranks):
                raise AdapterConfigError(f"adapter client_ranks must be comma-separated ranks such as '8,16,32', "
                                         f"got {self.client_ranks!r}")
            if not all(1 <= r <= self.rank for r in self.client_rank_cycle):
                raise AdapterConfigError(f"adapter client_ranks must lie in 1..rank={self.rank} (a client trains "
                                         f"the top-left r_i x r_i block of the r x r core), got {self.client_ranks!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise AdapterConfigError(f"adapter alpha must be > 0 or None (alpha = rank), got {self.alpha!r}")
        if not self.a_init_std > 0:
            raise AdapterConfigError(f"adapter a_init_std must be > 0 (A = 0 would never learn), got "
                                     f"{self.a_init_std!r}")
        if self.kind not in (TRI, LORA, None):
            raise AdapterConfigError(f"adapter kind must be 'tri', 'lora' or None (decided by the federated "
                                     f"method), got {self.kind!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise AdapterConfigError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if self.core_only and self.kind == LORA:
            raise AdapterConfigError("core_only applies to tri-matrix adapters only")
        try:
            re.compile(self.target)
        except re.error as err:
            raise AdapterConfigError(f"adapter target {self.target!r} is not a valid regex: {err}") from err

    @property
    def frozen_basis(self) -> bool:
        """Whether A and B are frozen and only the cores C train (core_only, or a shared-basis init)."""
        return self.core_only or self.init in SHARED_BASIS_INITS

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank

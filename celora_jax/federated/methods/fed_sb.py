"""Fed-SB (Singhal et al., 2025, arXiv 2502.15436; code CERT-Lab/fed-sb): tri-matrix
adapters in a frozen basis that every client shares, only the r x r cores trained and
averaged.

Every client builds the same A and B (``adapter.init``, by default LoRA-XS's truncated SVD of
the pretrained kernels), so a client's update is ``A · C_i · B`` in one common basis and the
average of the cores is *exactly* the average of the dense updates:
``A · (Σ n_i C_i / n) · B = Σ n_i (A C_i B) / n``. No aggregation error, and a round costs r²
numbers per adapted matrix, so the rank can be far higher than LoRA's at the same bytes.

Where we differ from the authors' code (read at their last commit):
- they initialize with LoRA-SB (A, B from the SVD of one estimated full fine-tuning step,
  computed once on the pooled training data). ``adapter.init=gradient_svd`` is that basis
  without pooling (a federated sketch in round 0, ``celora_jax.federated.basis``); our
  default is ``weight_svd`` (LoRA-XS, data free), which needs no exchange and so also runs
  on Flower nodes and over several processes;
- they average cores with equal weights over equal shards; we weight by the clients'
  example counts n_i, which is the same on equal shards;
- they start every round with a fresh optimizer; our clients keep theirs across rounds, as
  under every other method here.
"""

from __future__ import annotations

from celora_jax.federated.methods.base import FederatedMethod
from celora_jax.lora import adapters


def make() -> FederatedMethod:
    return FederatedMethod(
        name="fed_sb",
        description="Fed-SB: frozen shared basis A, B (adapter.init), cores trained and averaged (exact aggregation)",
        adapter_kind=adapters.TRI, trained=frozenset("C"), shared=frozenset("C"),
        default_init=adapters.WEIGHT_SVD, needs_frozen_basis=True)

"""Adapters on any parameter pytree, usable in any JAX program: tri-matrix (A·C·B) and
two-factor LoRA layers and their initializations (``adapters``), ``adapt`` for an unedited
model (``functional``), stacked blocks (``layer_layout``), cores (``cores``), which leaves
train and travel (``roles``), and shared frozen bases (``svd_basis``, ``sketch``).

Imports only the argument checks (``celora_jax._checks``) and itself."""

"""The ``celora-jax`` command line (``main``), its result tables (``reporting``) and the
generated configuration reference (``config_docs``). The top layer: nothing in the package
imports it."""

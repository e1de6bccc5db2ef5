"""The error every data module raises for unusable data."""

from __future__ import annotations

from celora_jax._checks import ConfigError


class DataError(ConfigError):
    """A dataset is missing, malformed or cannot be partitioned as asked (a ``ConfigError``:
    the data is part of what a run is configured with)."""

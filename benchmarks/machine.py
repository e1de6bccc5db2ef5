"""The machine description every benchmark JSON carries, built in one place so that the
results files describe their machines the same way."""

from __future__ import annotations

import os
import platform


def describe(**extra) -> dict:
    """Platform, processor, cores, Python, and JAX's version, backend and devices; ``extra``
    keys (a peer library's version, say) are added last. Importing JAX here is deliberate:
    every benchmark measures JAX, and the device list is what a reader compares first."""
    import jax

    devices = jax.devices()
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(devices[0].device_kind), "devices": [d.device_kind for d in devices], **extra}

"""JAX's persistent compilation cache for repeated runs.

At our sizes a run's first round is mostly XLA compilation; a grid repeats the same programs
(same shapes, other seeds or options) run after run. With the cache on, a compiled program is
written to disk and every later process that builds the same program loads it instead.

``RunConfig.compilation_cache`` chooses the directory: "auto" (the default) is
``$CELORA_JAX_COMPILATION_CACHE`` if set, else ``$XDG_CACHE_HOME/celora-jax/jax`` (or
``~/.cache/celora-jax/jax``): per user, never inside a repository. "off" disables it; any
other value is a directory. ``CELORA_JAX_COMPILATION_CACHE`` set (to a directory or "off")
overrides the config everywhere, so a machine or CI can redirect or disable it. Every
program is cached, however fast it compiles, unless ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
says otherwise.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

logger = logging.getLogger(__name__)

ENVIRONMENT = "CELORA_JAX_COMPILATION_CACHE"
MIN_SECONDS_ENVIRONMENT = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_OFF = ("off", "none", "")


def default_directory() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "celora-jax" / "jax"


def cache_directory(setting: str = "auto") -> pathlib.Path | None:
    """The directory ``setting`` means (None: the cache is off), the environment first."""
    setting = os.environ.get(ENVIRONMENT, setting)
    if setting.strip().lower() in _OFF:
        return None
    if setting == "auto":
        return default_directory()
    return pathlib.Path(setting).expanduser()


def enable(setting: str = "auto") -> pathlib.Path | None:
    """Points JAX's persistent cache at ``cache_directory(setting)`` (or turns it off) for
    the programs compiled from now on in this process; returns the directory."""
    from jax.experimental.compilation_cache import compilation_cache

    directory = cache_directory(setting)
    current = jax.config.jax_compilation_cache_dir
    wanted = None if directory is None else str(directory)
    if wanted == current:
        return directory
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only home must not stop a run
            logger.warning("compilation cache disabled: cannot create %s (%s)", directory, err)
            return None
        # Small programs too (JAX's default skips those under a second): a run builds about
        # 170 of them (set-up, evaluation, eager steps), 23 s of compiling on a 20-client
        # WordNet run on one core, and read back they took 13 s off that run's set-up and
        # first round (2026-12-06). JAX's own variable, when set, wins.
        if MIN_SECONDS_ENVIRONMENT not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_dir", wanted)
    compilation_cache.reset_cache()  # JAX reads the directory once; make it read the new one
    return directory

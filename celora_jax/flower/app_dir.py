"""Writes a Flower app directory for ``flwr run`` (``celora-jax flower-app DIR``).

The directory holds only a ``pyproject.toml``: its components point to the installed
``celora_jax.flower.app`` and its ``[tool.flwr.app.config]`` table holds the run config
(preset, overrides, ...; see that module). Every machine (the SuperLink's and each
SuperNode's) needs celora-jax installed with the ``flower`` extra; the FAB that ``flwr run``
ships carries the config and any extra modules you put beside the pyproject.toml.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

from celora_jax.flower.app import DEFAULTS, run_settings

PUBLISHER = "celora-jax"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def pyproject_text(run_config: Mapping[str, Any], name: str = "celora-jax-flower-app") -> str:
    settings = run_settings(run_config)
    table = "\n".join(f"{key} = {_toml_value(settings[key])}" for key in DEFAULTS)
    return f"""# A Flower app running celora-jax (written by `celora-jax flower-app`).
# Start it with `flwr run <this directory> <superlink connection> --stream`; override any
# key below with `--run-config 'key=value'`.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A celora-jax federated method as a Flower app"
license = "Apache-2.0"
dependencies = ["celora-jax[flower]"]

[tool.flwr.app]
publisher = "{PUBLISHER}"

[tool.flwr.app.components]
serverapp = "celora_jax.flower.app:server_app"
clientapp = "celora_jax.flower.app:client_app"

[tool.flwr.app.config]
{table}
"""


def write_app(directory: str | pathlib.Path, run_config: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``directory/pyproject.toml`` (the directory is created; an existing
    pyproject.toml is replaced) and returns the directory."""
    directory = pathlib.Path(directory)
    text = pyproject_text(run_config)  # checks the keys before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(text)
    return directory

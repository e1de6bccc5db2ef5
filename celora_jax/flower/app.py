"""The Flower app that ``flwr run`` starts: ``server_app`` and ``client_app``, configured
from Flower's run config (the ``[tool.flwr.app.config]`` table of the app's pyproject.toml,
overridable with ``flwr run --run-config``).

Run config keys (all optional; Flower run configs are flat TOML scalars):

  preset          a celora-jax preset name (``celora-jax presets``); default ``smoke``.
  set             ``;``-separated overrides as for ``celora-jax run --set``, e.g.
                  ``"federation.method='fedavg_lora'; federation.rounds=4"``.
  config-factory  ``"module:function"`` returning a ``RunConfig`` instead of the preset
                  (``set`` still applies).
  setup-factory   ``"module:function"`` mapping the ``RunConfig`` to a prepared ``Setup``
                  (your own model and data on the nodes); default
                  ``celora_jax.federated.setup.prepare``. Only the ClientApp calls it.
  output-dir      where the ServerApp writes ``flower_summary.json`` (per-round bytes,
                  losses, learned weights; per-client own-test accuracy); empty: nowhere.
  round-timeout   seconds the server waits for the nodes of one round; a node that does
                  not answer in time is left out of that round (default 600).
  node-data       true: every SuperNode reads its own data file (``data-path`` in its
                  node config, ``node_data.node_local_config``) and a node without one
                  fails its set-up; the run config must declare ``data.label_names``.
                  false (default): nodes prepare the preset's data, unless a node config
                  names a ``data-path`` anyway.

Every node and the server must see the same config: the server checks every upload's
shapes against the initial shared parameters, so a node built from another config is
excluded from the round with a logged error, never aggregated.

An app directory with these keys is ``celora_jax/flower/app_template/``; the docs page
"Deploying with Flower" gives the commands for a SuperLink and SuperNodes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from celora_jax.federated import tracking
from celora_jax.federated.config import RunConfig, apply_overrides, to_dict
from celora_jax.federated.methods import FederatedMethod, get_method
from celora_jax.flower import worker
from celora_jax.flower.client_app import PROCESS_STARTED, client_app_for
from celora_jax.flower.node_data import node_local_config
from celora_jax.flower.server_app import CeloraStrategy

logger = logging.getLogger(__name__)

DEFAULTS = {"preset": "smoke", "set": "", "config-factory": "", "setup-factory": "", "output-dir": "",
            "round-timeout": 600.0, "node-data": False}


def load_callable(spec: str, what: str) -> Callable:
    """``"package.module:function"`` -> the function, or a clear error naming ``what``."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} must be 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({err})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: {module_name} has no {attribute!r}") from None


def run_settings(run_config: Mapping[str, Any]) -> dict:
    """The run config with defaults filled in; unknown keys are an error (a typo would
    otherwise silently run the default)."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run config keys {unknown}; celora-jax reads {sorted(DEFAULTS)}")
    return {**DEFAULTS, **dict(run_config)}


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The celora-jax ``RunConfig`` a Flower run config describes."""
    settings = run_settings(run_config)
    if settings["config-factory"]:
        config = load_callable(settings["config-factory"], "config-factory")()
        if not isinstance(config, RunConfig):
            raise ValueError(f"config-factory {settings['config-factory']!r} returned {type(config).__name__}, "
                             "not a RunConfig")
    else:
        from celora_jax.federated.presets import get_preset

        config = get_preset(str(settings["preset"]))
    overrides = [item.strip() for item in str(settings["set"]).split(";") if item.strip()]
    return apply_overrides(config, overrides)


def _prepare_from(run_config: Mapping[str, Any]) -> Callable:
    spec = run_settings(run_config)["setup-factory"]
    if spec:
        return load_callable(spec, "setup-factory")
    from celora_jax.federated.setup import prepare

    return prepare


def _setup_for(context: Context):
    from celora_jax.federated import compile_cache

    config = config_from_run_config(context.run_config)
    config = node_local_config(config, context.node_config, bool(run_settings(context.run_config)["node-data"]))
    # A SuperNode runs each message in a fresh process: the cache spares it recompiling.
    compile_cache.enable(config.compilation_cache)
    return _prepare_from(context.run_config)(config)


_local_app = client_app_for(_setup_for)
client_app = ClientApp()


def _handle(message: Message, context: Context) -> Message:
    """In this process, or forwarded to the node's long-running worker when its node config
    names one (``worker=SOCKET``, ``celora_jax.flower.worker``)."""
    socket_path = context.node_config.get("worker")
    if not socket_path:
        return _local_app(message, context)
    arrived = time.time()
    content = worker.forward(str(socket_path), message, context)
    if "seconds_before_app" in content["metrics"] and PROCESS_STARTED:
        # The worker's own process is long-lived: what counts is this message's process.
        content["metrics"]["seconds_before_app"] = max(0.0, arrived - PROCESS_STARTED)
    return Message(content, reply_to=message)


client_app.query()(_handle)
client_app.train()(_handle)
client_app.evaluate()(_handle)


def make_worker_app() -> ClientApp:
    """The ClientApp a worker runs for one run (a fresh cache of task and programs)."""
    return client_app_for(_setup_for)


server_app = ServerApp()


def summary_of(strategy: CeloraStrategy) -> dict:
    """What the ServerApp writes to ``flower_summary.json`` (``finished`` once evaluated)."""
    return {"method": strategy.method.name, "num_clients": strategy.num_clients, "rounds": strategy.num_rounds,
            "finished": bool(strategy.accuracies),
            "history": strategy.history,
            "client_sizes": None if strategy.sizes is None else strategy.sizes.tolist(),
            "excluded_at_setup": strategy.excluded_at_setup,
            "client_test_accuracy": [strategy.accuracies.get(i) for i in range(strategy.num_clients)]}


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    settings = run_settings(context.run_config)
    config = config_from_run_config(context.run_config)
    fed = config.federation
    method = get_method(fed.method, **fed.method_options.get(fed.method, {}))
    timeout = float(settings["round-timeout"])
    out = pathlib.Path(str(settings["output-dir"])) if settings["output-dir"] else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    log_round = ServerTracking(config, method, out)

    def on_round(strategy: CeloraStrategy) -> None:
        if out is not None:
            write_summary(strategy, out / "flower_summary.json")
        log_round(strategy)

    strategy = CeloraStrategy(method, config.aggregation, config.partition.num_clients, fed.outlier_factor,
                              fed.rounds, on_round=on_round)
    logger.info("celora-jax %s on Flower: %d nodes, %d rounds", method.name, strategy.num_clients, fed.rounds)
    try:
        strategy.setup(grid, timeout)
        strategy.start(grid, ArrayRecord(), num_rounds=fed.rounds, timeout=timeout)
    finally:
        log_round.close()


class ServerTracking:
    """The ServerApp's rounds through the run's tracking writers (``tracking.backends``):
    every aggregated round's record, then the nodes' own-test accuracies. The stores go to
    ``tracking.directory``, else ``<output-dir>/tracking``."""

    def __init__(self, config: RunConfig, method: FederatedMethod, out: pathlib.Path | None):
        self.tracker, self.logged = None, 0
        if not config.tracking.names:
            return
        tracking.check_backends(config.tracking.names)
        if not config.tracking.directory:
            if out is None:
                raise ValueError("tracking.backends on Flower needs the app's output-dir or tracking.directory")
            config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking,
                                                                              directory=str(out / "tracking")))
        from celora_jax.federated.setup import adapter_config_for

        tags = tracking.run_tags(config, method.name, adapter_config_for(config, method), engine="flower")
        # The run is named after the method, as a simulator run of this config would be.
        run_dir = (out or pathlib.Path(config.tracking.directory)) / method.name
        self.tracker = tracking.RunTracker(config, run_dir, tags, False, to_dict(config))

    def __call__(self, strategy: CeloraStrategy) -> None:
        if self.tracker is None:
            return
        finished = [r for r in strategy.history if "seconds" in r]  # aggregated rounds
        for record in finished[self.logged:]:
            self.tracker.add(record)
        self.logged = len(finished)
        if strategy.accuracies and finished:
            accuracies = [strategy.accuracies[c] for c in sorted(strategy.accuracies)]
            evaluated = {"round": finished[-1]["round"], "client_test_accuracy": accuracies,
                         "test_accuracy_mean": float(np.mean(accuracies))}
            self.tracker.add(evaluated)
            self.tracker.finish({"test_accuracy_mean": evaluated["test_accuracy_mean"],
                                 "bytes_cumulative": float(sum(r.get("bytes_up", 0) + r.get("bytes_down", 0)
                                                               for r in strategy.history))})

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def write_summary(strategy: CeloraStrategy, path: pathlib.Path) -> None:
    """Rewritten after every round (atomically), so a long run can be followed and a
    crashed one keeps what it did."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(summary_of(strategy), indent=2))
    os.replace(partial, path)

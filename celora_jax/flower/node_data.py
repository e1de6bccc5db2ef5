"""Node-local data: a SuperNode trains on its own file, named in its node config.

    flower-supernode ... --node-config 'partition-id=0 num-partitions=2 data-path="/data/site-a.csv"'

Node config keys read here:

  data-path       the node's CSV/TSV/JSON(L)/parquet file (an absolute path: the ClientApp
                  runs in Flower's working directory); the whole file is this client's,
                  split into train and test by ``test-fraction``.
  test-fraction   share of the file held out as the node's own test split (default 0.25).
  data.FIELD      any field of ``TextDataConfig`` for this node's file, e.g.
                  ``data.text_column="note"`` or ``data.label_column="diagnosis"``.

The run config declares the classes (``data.label_names``), so that every node maps its
labels to the same ids whatever subset of them its file holds. A missing or unreadable file,
missing columns or a label outside the declared set fail the node's set-up with one line in
its log; the server leaves that client out and the run goes on with the others. The
ServerApp never reads client data: it learns each node's size (and, for methods that ask,
its data statistic) from the node's answer to the set-up query.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

from celora_jax.data.errors import DataError
from celora_jax.federated.config import RunConfig, apply_overrides

DEFAULT_TEST_FRACTION = 0.25
TEXT_ARCHITECTURES = ("encoder", "decoder")  # the tasks that read data.path (text files)


def node_local_config(config: RunConfig, node_config: Mapping[str, Any], required: bool) -> RunConfig:
    """``config`` reading this node's own file when its node config names ``data-path``
    (``required``: the app asks for node-local data, so a node without one is an error);
    else ``config`` unchanged.

    Raises:
      DataError: ``data-path`` missing when required, not absolute, or the run config does
        not declare ``data.label_names``; a bad ``data.*`` key or ``test-fraction``.
    """
    path = node_config.get("data-path")
    if not path:
        if required:
            raise DataError("the app reads node-local data (run config node-data=true) but this SuperNode's node "
                            "config has no data-path=\"/path/to/its/file.csv\"")
        return config
    path = pathlib.Path(str(path)).expanduser()
    if not path.is_absolute():
        raise DataError(f"the node config's data-path {str(path)!r} must be an absolute path (the ClientApp runs "
                        "in Flower's working directory)")
    if config.model.architecture not in TEXT_ARCHITECTURES:
        raise DataError(f"node-local data (data-path) reads a text file; model.architecture="
                        f"{config.model.architecture!r} reads images, which nodes still take from the preset")
    if config.data.label_names is None:
        raise DataError("node-local data needs the run config to declare the classes, so that every node maps "
                        "its labels to the same ids: set data.label_names='name0,name1,...'")
    if "partition-id" not in node_config:
        raise DataError("the SuperNode has no partition-id in its node config")
    overrides = [f"data.path={str(path)!r}", "partition.scheme='node_local'",
                 f"partition.node_client={int(node_config['partition-id'])}", "partition.validation_fraction=0.0",
                 f"partition.test_fraction={float(node_config.get('test-fraction', DEFAULT_TEST_FRACTION))}"]
    for key, value in sorted(node_config.items()):
        if key.startswith("data."):
            if key in ("data.path", "data.label_names"):
                raise DataError(f"the node config sets {key}: a node's file is data-path, and the classes are the "
                                "run's (data.label_names in the run config)")
            overrides.append(f"{key}={value!r}")
    return apply_overrides(config, overrides)

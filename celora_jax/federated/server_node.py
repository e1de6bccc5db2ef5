"""The server's side of a round outside the simulator: one method's aggregation over the
uploads that actually arrived, for a deployment where every client is its own process or
machine (a Flower app, any transport).

The simulator runs clients and server in one jitted program
(``celora_jax.federated.round``); here the same pieces run on what nodes send: the method's
``Strategy`` (its ``init``/``aggregate``, jitted), the same validation of uploads (NaN/Inf,
outlier norms) and the same rule for who receives what: a client whose upload was accepted
gets its row of the downloads, any other keeps training on its own parameters. Like every
server-side module this one sees arrays only, never a model.

A round, with uploads keyed by client index::

    server = ServerNode(method, aggregation, upload_like, sizes)     # once
    downloads, logs = server.aggregate(uploads)                      # every round
    # downloads: {client: pytree} for the accepted clients; for methods that fold the
    # server state into the base, {client: {"shared": pytree, "fold": server state}}
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.federated import strategies
from celora_jax.federated.methods.base import FederatedMethod, ServerInputs, keep_base, starting_cores
from celora_jax.server import usable
from celora_jax.server.aggregation import AggregationConfig
from celora_jax.server.gmm import ClassMixtures

PyTree = Any


def stack_statistics(statistics: Mapping[int, ClassMixtures], num_clients: int) -> ClassMixtures:
    """Every client's once-uploaded data statistic (each with a leading axis of 1) stacked
    in client order, as the method's server expects them.

    Raises:
      ValueError: a client's statistic is missing.
    """
    missing = sorted(set(range(num_clients)) - set(statistics))
    if missing:
        raise ValueError(f"the data statistics of clients {missing} did not arrive; the method's server "
                         "needs every client's before round 1")
    return jax.tree.map(lambda *rows: jnp.concatenate(rows), *[statistics[i] for i in range(num_clients)])


class ServerNode:
    """One method's server over ``num_clients`` clients (see the module docstring).

    Args:
      method: the federated method (its ``server`` builds the strategy).
      aggregation: the run's aggregation options.
      upload_like: one client's shared leaves as every client starts (the initial
        parameters: what the server "sent" before round 1); shapes and dtypes of uploads.
      sizes: ``[N]`` training examples per client (aggregation weights).
      data_statistics: every client's data statistic stacked (``stack_statistics``), for
        methods with ``needs_data_statistics``.
      outlier_factor: ``federation.outlier_factor`` (0: no norm check).
    """

    def __init__(self, method: FederatedMethod, aggregation: AggregationConfig, upload_like: PyTree,
                 sizes: np.ndarray, data_statistics: ClassMixtures | None = None, outlier_factor: float = 0.0):
        if method.needs_data_statistics and data_statistics is None:
            raise ValueError(f"method {method.name!r} needs every client's data statistic before round 1")
        self.method, self.num_clients = method, int(len(sizes))
        self.sizes = jnp.asarray(sizes, jnp.float32)
        self.strategy = method.server(ServerInputs(aggregation=aggregation, data_statistics=data_statistics,
                                                   core_origin=starting_cores(upload_like)))
        self._like = jax.tree.map(jnp.asarray, upload_like)
        # What each client last received: the norm check measures uploads against it.
        self.sent = strategies.broadcast(self._like, self.num_clients)
        self.state = self.strategy.init(self.sent, self.sizes)
        self.initial_logs = self.strategy.initial_logs(self.state)
        self._outlier_factor = float(outlier_factor)
        self._aggregate = jax.jit(self._round)

    def _round(self, state, sent, uploads, sizes, mask):
        non_finite = usable.non_finite_updates(uploads, mask)
        accepted = mask & ~usable.rejected_updates(sent, uploads, non_finite, mask, self._outlier_factor)
        # Zero what rejected clients sent: a weight of 0 does not cancel NaN in a weighted sum.
        uploads = usable.where_clients(accepted, uploads, jax.tree.map(jnp.zeros_like, uploads))
        state, downloads, logs = self.strategy.aggregate(state, uploads, sizes, accepted)
        return state, downloads, accepted, non_finite, logs

    def aggregate(self, uploads: Mapping[int, PyTree],
                  started_over: Collection[int] = ()) -> tuple[dict[int, PyTree], dict]:
        """This round's downloads for the clients whose upload was accepted, and the logs
        (the strategy's, plus ``accepted``, ``rejected`` and ``non_finite`` client lists).

        ``uploads`` maps client index to its shared leaves (structure of ``upload_like``);
        clients not in it did not report this round. ``started_over``: clients that trained
        from the initial parameters, not from what they were last sent (a node that lost its
        state and had no download to apply); the server measures their uploads from the
        start, in the norm check and in the strategy's state, from this round on (a client
        whose upload did not arrive is measured from the start when it next reports).
        """
        for clients, what in ((uploads, "uploads from clients"), (started_over, "clients started over:")):
            unknown = sorted(set(clients) - set(range(self.num_clients)))
            if unknown:
                raise ValueError(f"{what} {unknown}; this server has clients 0..{self.num_clients - 1}")
        state, sent = self.state, self.sent
        if started_over:
            over = np.zeros(self.num_clients, bool)
            over[list(started_over)] = True
            sent = usable.where_clients(jnp.asarray(over), strategies.broadcast(self._like, self.num_clients), sent)
            state = self.strategy.restart(state, jnp.asarray(over))
        mask = np.zeros(self.num_clients, bool)
        mask[list(uploads)] = True
        rows = [uploads.get(i, self._like) for i in range(self.num_clients)]
        stacked = jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(x) for x in leaves]), *rows)
        self.state, downloads, accepted, non_finite, logs = self._aggregate(state, sent, stacked, self.sizes,
                                                                            jnp.asarray(mask))
        accepted, non_finite = np.asarray(accepted), np.asarray(non_finite)
        # As in the simulator: an accepted client holds its download, an outlier its own
        # upload (it keeps its training), a client with NaN/Inf or absent what it had.
        kept_own = jnp.asarray(mask & ~non_finite & ~accepted)
        self.sent = usable.where_clients(jnp.asarray(accepted), downloads, usable.where_clients(kept_own, stacked, sent))
        host = jax.device_get(downloads)
        out = {int(i): jax.tree.map(lambda x, i=i: x[i], host) for i in np.flatnonzero(accepted)}
        if self.method.fold_into_base is not keep_base:
            # The clients fold the server state into their frozen weights (FedEx-LoRA's
            # residual sum): it travels with every download, as the simulator's bytes count.
            fold = jax.device_get(self.state)
            out = {i: {"shared": download, "fold": fold} for i, download in out.items()}
        logs = {name: np.asarray(value) for name, value in logs.items()}
        logs.update(accepted=[int(i) for i in np.flatnonzero(accepted)],
                    rejected=[int(i) for i in np.flatnonzero(mask & ~accepted)],
                    non_finite=[int(i) for i in np.flatnonzero(non_finite)])
        return out, logs

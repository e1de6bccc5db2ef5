"""The round loop: state init, the clients' round-0 statistics, resume, batches, client
sampling, evaluation and one record per round.

``iterate_rounds(setup)`` yields a ``RoundOutput`` per round; ``celora_jax.federated.engine``
writes them to files.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.data import packing
from celora_jax.federated import (checkpoint, client as client_lib, client_ranks, round as round_lib, sharding,
                                  statistics, strategies)
from celora_jax.federated.methods import ServerInputs
from celora_jax.federated.methods.base import starting_cores
from celora_jax.federated.setup import Setup
from celora_jax.lora import roles as roles_lib
from celora_jax.privacy import dp as dp_lib

logger = logging.getLogger(__name__)


class RoundOutput(NamedTuple):
    """One round's record (JSON-ready) and every client's parameters after it (sharded,
    ``[padded clients, ...]``; the ones each client is evaluated with). The parameters are
    donated to the next round's program: copy them (``np.asarray``) before asking for it."""

    record: dict
    client_params: Any


def reporting_clients(num_clients: int, participation: float, client_dropout: float, seed: int,
                      round_index: int) -> np.ndarray:
    """Which clients report in a round: ``ceil(participation · N)`` sampled without
    replacement, then each sampled client drops out with probability ``client_dropout``.

    Depends only on (seed, round), so a resumed run samples the same clients.
    """
    rng = np.random.default_rng((seed, round_index, 0x5EED))
    sampled = np.zeros(num_clients, bool)
    # The tolerance keeps e.g. 0.3 x 10 at 3 clients despite float rounding (3.0000000000000004).
    count = max(1, math.ceil(participation * num_clients - 1e-9))
    sampled[rng.choice(num_clients, size=count, replace=False)] = True
    return sampled & (rng.random(num_clients) >= client_dropout)


def warn_if_padding_wasteful(num_clients: int, padded_clients: int) -> bool:
    """Warns (and returns True) when padding the client axis to whole blocks and devices
    adds more than a quarter of empty client slots, which every round trains and evaluates."""
    if 4 * (padded_clients - num_clients) <= num_clients:
        return False
    logger.warning("%d clients run as %d client slots (the client axis is padded to a multiple of "
                   "federation.client_block and of the devices); %d empty slots cost compute and memory "
                   "every round: a client_block (and a federation.num_devices) that divides the number of "
                   "clients avoids them",
                   num_clients, padded_clients, padded_clients - num_clients)
    return True


def bytes_per_client(setup: Setup) -> tuple[int, int]:
    """(bytes up, bytes down) of one full-rank client in one round under the run's method."""
    params, roles = setup.task.client_params, setup.roles
    return setup.method.upload_bytes(params, roles), setup.method.download_bytes(params, roles)


def bytes_by_client(setup: Setup) -> tuple[np.ndarray, np.ndarray]:
    """``([N], [N])`` bytes up and down of every client in one round: less than
    ``bytes_per_client`` for clients of a lower rank (``adapter.client_ranks``)."""
    up, down = bytes_per_client(setup)
    n = setup.num_clients
    up_all, down_all = np.full(n, up, np.int64), np.full(n, down, np.int64)
    ranks = client_ranks.ranks_by_client(setup.task.adapter_config, n)
    if ranks is None:
        return up_all, down_all
    unsent = client_ranks.unsent_core_bytes(setup.task.client_params, setup.roles, ranks)
    return up_all - (unsent if up else 0), down_all - (unsent if down else 0)


def stack_clients(tree, count: int):
    """Every one of ``count`` clients starts from the same ``tree``."""
    return strategies.broadcast(tree, count)


def server_strategy(setup: Setup) -> strategies.Strategy:
    """The method's server, given the clients' round-0 data statistics when it asks for them."""
    stats = None
    if setup.method.needs_data_statistics:
        task = setup.task
        params = roles_lib.combine(task.base_params, task.client_params["params"])
        stats = statistics.client_statistics(
            task.embed_fn, params, task.train, task.embed_inputs, task.num_classes, task.local_clients,
            task.num_clients, jax.random.fold_in(jax.random.key(setup.config.seed), 2))
    shared = roles_lib.select(setup.task.client_params, setup.roles, roles_lib.SHARED)
    return setup.method.server(ServerInputs(aggregation=setup.config.aggregation, data_statistics=stats,
                                            clusters=setup.task.clusters, core_origin=starting_cores(shared)))


def initial_client_state(setup: Setup, n_pad: int) -> dict:
    """Every client's parameters and optimizer state, stacked over ``n_pad`` client slots."""
    task = setup.task
    state = client_lib.init_client_state(task.client_params, setup.roles, setup.config.optimizer)
    stacked = {"params": stack_clients(task.client_params, n_pad),
               "opt_state": stack_clients(state["opt_state"], n_pad)}
    if setup.method.finetune_steps:  # its own arrays: the state is donated leaf by leaf
        stacked["tuned"] = stack_clients(task.client_params, n_pad)
    ranks = client_ranks.ranks_by_client(task.adapter_config, setup.num_clients)
    if ranks is not None:  # padding slots keep the full rank; they never report
        ranks = np.concatenate([ranks, np.full(n_pad - len(ranks), task.adapter_config.rank, np.int32)])
        for name in ("params", "tuned"):
            if name in stacked:
                stacked[name] = {**stacked[name], "lora": client_ranks.restrict_to_ranks(stacked[name]["lora"], ranks)}
    return stacked


def _mean_over(values, mask: np.ndarray) -> float:
    values = np.asarray(values)
    return float(values[mask].mean()) if mask.any() else float("nan")


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float, str))}


def _evaluation(evaluate, base, client_params, examples, n: int, prefix: str) -> dict:
    """``{prefix}_accuracy_mean`` and ``_std`` over the real clients (on their own test or
    validation splits also the mean loss, and on the test splits each client's accuracy)."""
    scores = sharding.to_host(evaluate(base, client_params, examples))
    count = np.maximum(scores["count"][:n], 1)
    accuracy = scores["correct"][:n] / count
    record = {f"{prefix}_accuracy_mean": float(accuracy.mean()), f"{prefix}_accuracy_std": float(accuracy.std())}
    if prefix in ("test", "validation"):
        record[f"{prefix}_loss"] = float((scores["loss"][:n] / count).mean())
    if prefix == "test":
        record["client_test_accuracy"] = [float(a) for a in accuracy]
    return record


def dp_record(config, noise_multiplier: float, rounds_done: int, update_norms, reporting: np.ndarray) -> dict:
    """Privacy spent so far (every client counted in every round, so an upper bound) and,
    over the reporting clients, how often the clip bound was hit."""
    dp = config.dp
    record = {"dp_epsilon": dp_lib.epsilon(noise_multiplier, rounds_done, dp.delta, dp.accountant),
              "dp_delta": dp.delta, "dp_noise_multiplier": noise_multiplier}
    norms = np.asarray(update_norms if update_norms is not None else [], np.float64)
    if len(norms) and reporting.any():
        record.update(dp_clipped_fraction=float((norms[reporting] > dp.clip_norm).mean()),
                      dp_update_norm_median=float(np.median(norms[reporting])))
    return record


def _round_record(setup: Setup, round_index: int, metrics: dict, mask: np.ndarray, bytes_each_way: tuple[int, int],
                  bytes_before: int) -> dict:
    """The record of a round before evaluation and logs: losses, who reported, bytes
    (``bytes_before``: the cumulative bytes of the rounds before it)."""
    n = setup.num_clients
    participants = int(mask[:n].sum())
    up_by_client, down_by_client = bytes_each_way
    sent = int((up_by_client + down_by_client)[mask[:n]].sum())
    # Per reporting client (all clients alike unless their ranks differ).
    up, down = (round(float(v[mask[:n]].mean())) if participants else int(v.max())
                for v in (up_by_client, down_by_client))
    return {
        "round": round_index + 1,
        "method": setup.method.name,
        # Absent clients are computed too (static shapes) but their round does not count.
        "train_loss": _mean_over(metrics["train_loss"], mask),
        "train_accuracy": _mean_over(metrics["train_accuracy"], mask),
        "participants": participants,
        "reporting_clients": [int(i) for i in np.flatnonzero(mask[:n])],
        "bytes_up_per_client": up,
        "bytes_down_per_client": down,
        "bytes_round": sent,
        "bytes_cumulative": bytes_before + sent,
    }


def _add_basis_bytes(record: dict, setup: Setup) -> None:
    """Round 1 also carries the one-time basis exchange of ``gradient_svd`` (every client's
    sketches up, the bases down), when there was one."""
    preparation = setup.task.preparation
    if "basis_bytes_up_per_client" in preparation:
        exchanged = (preparation["basis_bytes_up_per_client"] + preparation["basis_bytes_down_per_client"]) * \
            setup.num_clients
        record["bytes_basis"] = exchanged
        record["bytes_round"] += exchanged
        record["bytes_cumulative"] += exchanged


def _listed(value: np.ndarray) -> list:
    """``value`` as nested lists for JSON; float32 entries as the shortest decimals that read
    back to the same float32. float64's repr of a float32 spends 17 digits where 9 at most
    say the same: the n x n matrices of a personalized server are most of a run's record."""
    if value.dtype != np.float32:
        return value.tolist()
    shortest = np.array([float(str(x)) for x in value.ravel()], np.float64)  # str(np.float32): shortest
    return shortest.reshape(value.shape).tolist()


def _add_logs(record: dict, logs: dict, n: int, mask: np.ndarray, outlier_factor: float) -> None:
    """Server and client logs of a round into its record, with warnings for rejections."""
    for name, value in logs.items():
        value = np.asarray(value)
        record[name] = _listed(value[:n, :n] if value.ndim == 2 else value[:n])
    if "core_share" in record:
        record["core_share_mean"] = _mean_over(record["core_share"], mask)
    rejected = [i for i, flag in enumerate(record.pop("rejected")) if flag]
    non_finite = [i for i, flag in enumerate(record.pop("non_finite")) if flag]
    outliers = [i for i in rejected if i not in non_finite]
    record["rejected_clients"], record["non_finite_clients"] = rejected, non_finite
    if non_finite:
        logger.warning("round %d: clients %s produced NaN/Inf; their round was discarded and they "
                       "were left out of aggregation", record["round"], non_finite)
    if outliers:
        logger.warning("round %d: clients %s sent updates over %g times the median norm; they keep "
                       "their own training but were left out of aggregation", record["round"],
                       outliers, outlier_factor)


def mixing_shares(weights, clusters) -> dict:
    """How a personalized server's weight rows ``W [N, N]`` mix; {} without weights
    (non-personalized methods).

    - ``self_weight_mean``: the mean of W's diagonal (1 = every client keeps its own update:
      local training, which W = I also is);
    - with two or more true clusters, ``weight_in_true_cluster`` ``[N]`` and its mean: the
      share of each row on the client's own cluster (1 = the cluster oracle's W, and also
      W = I, which is why the next one is reported too);
    - ``others_in_true_cluster_mean``: of the weight a client gives to *other* clients, the
      share in its own cluster, averaged over the clients that give any (None if none do).
    """
    if weights is None:
        return {}
    weights = np.asarray(weights, np.float64)
    own = np.diagonal(weights)
    shares = {"self_weight_mean": float(own.mean())}
    if clusters is None or len(np.unique(clusters)) < 2:
        return shares
    clusters = np.asarray(clusters)
    inside = (weights * (clusters[:, None] == clusters[None, :])).sum(1)
    mixing = own < 1 - 1e-6
    others = (inside[mixing] - own[mixing]) / (1 - own[mixing])
    return {**shares, "weight_in_true_cluster": [float(v) for v in inside],
            "weight_in_true_cluster_mean": float(inside.mean()),
            "others_in_true_cluster_mean": float(others.mean()) if mixing.any() else None}


class _Checkpoints:
    """Saving and restoring the run state (client and server state, records so far)."""

    def __init__(self, directory, config, resume: bool, n: int, n_pad: int, mesh):
        self.manager = None
        if directory is not None and (config.checkpoint.every > 0 or resume):
            self.manager = checkpoint.manager(directory, config.checkpoint.keep)
        self.directory, self.every, self.n, self.n_pad, self.mesh = directory, config.checkpoint.every, n, n_pad, mesh
        self.several_processes = jax.process_count() > 1

    def _saved(self, client_state, server_state):
        """With one process the real clients on the host; with several the sharded arrays
        as they are, each process writing its own rows."""
        if self.several_processes:
            return client_state, server_state
        return (jax.tree.map(lambda x: np.asarray(x)[:self.n], jax.device_get(client_state)),
                jax.device_get(server_state))

    def maybe_save(self, rounds_done: int, last: bool, client_state, server_state, meta: dict) -> None:
        if self.manager is not None and self.every > 0 and (last or rounds_done % self.every == 0):
            checkpoint.save(self.manager, rounds_done, *self._saved(client_state, server_state), meta,
                            num_clients=self.n, padded_clients=self.n_pad)

    def close(self) -> None:
        if self.manager is not None:
            checkpoint.close(self.manager)
            self.manager = None

    def restore(self, client_state, server_state):
        """(start round, client state, server state, bytes so far, records so far)."""
        def like(x, rows=None):
            return jax.ShapeDtypeStruct((rows or x.shape[0], *x.shape[1:]), x.dtype,
                                        sharding=None if rows else x.sharding)
        found = checkpoint.restore(self.manager, jax.tree.map(lambda x: like(x, self.n), client_state),
                                   jax.tree.map(like, server_state),
                                   padded_clients_like=jax.tree.map(like, client_state) if self.several_processes
                                   else None, padded_clients=self.n_pad)
        if found is None:
            raise checkpoint.CheckpointError(f"no checkpoint to resume from in {self.directory}")
        start, clients, server, meta = found
        if meta["clients_layout"] == "sharded":
            client_state = clients  # read back shard by shard, already in place
        else:
            client_state = sharding.put_clients(jax.tree.map(
                lambda x: np.concatenate([np.asarray(x), np.zeros((self.n_pad - self.n, *x.shape[1:]), x.dtype)]),
                clients), self.mesh)
        if server is not None:
            server_state = sharding.put_replicated(server, self.mesh)
        return start, client_state, server_state, meta["bytes_cumulative"], meta["history"]


def iterate_rounds(setup: Setup, checkpoint_dir: str | pathlib.Path | None = None,
                   resume: bool = False) -> Iterator[RoundOutput]:
    """Runs the federated rounds, yielding one ``RoundOutput`` per round.

    With ``checkpoint_dir`` the state is saved every ``config.checkpoint.every`` rounds (and
    after the last); with ``resume`` the latest checkpoint there is restored first and only
    the remaining rounds run (the first yielded record tells which round that is). A round's
    checkpoint is written after its record has been yielded, when the caller asks for the
    next one (or the end), so that a record is always written before its checkpoint; closing
    the iterator waits for a save in flight and stops the checkpoint manager.
    """
    config, fed, task = setup.config, setup.config.federation, setup.task
    mesh = sharding.client_mesh(fed.num_devices, fed.data_parallel)
    n, n_pad = setup.num_clients, sharding.padded_client_count(setup.num_clients, mesh, fed.client_block)
    warn_if_padding_wasteful(n, n_pad)
    strategy = server_strategy(setup)
    round_step = round_lib.build_round_step(setup, strategy, mesh)
    evaluate_own, evaluate_common = round_lib.build_evaluate(setup, mesh)
    fold = round_lib.base_folder(setup.method, task.adapter_config.scale, mesh)

    base = sharding.put_replicated(task.base_params, mesh)
    stacked = initial_client_state(setup, n_pad)
    client_state = sharding.put_clients(stacked, mesh)
    sizes_np = np.concatenate([setup.sizes, np.zeros(n_pad - n, np.float32)])
    uploads0 = roles_lib.select(stacked["params"], setup.roles, roles_lib.SHARED)
    server_state = sharding.put_replicated(strategy.init(uploads0, jnp.asarray(sizes_np)), mesh)
    initial_logs = strategy.initial_logs(server_state)
    test = sharding.put_clients(packing.pad_clients(task.test, n_pad), mesh)
    global_test = sharding.put_replicated(task.global_test, mesh)
    validation = sharding.put_clients(packing.pad_clients(task.validation, n_pad), mesh) if task.has_validation \
        else None
    padded_train = packing.pad_clients(task.train, n_pad)
    sizes = sharding.put_clients(sizes_np, mesh)
    bytes_up, bytes_down = bytes_by_client(setup)
    noise_multiplier = dp_lib.resolve_noise_multiplier(config.dp, fed.rounds)
    root_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    cumulative_bytes, start, saved_history = 0, 0, []

    checkpoints = _Checkpoints(checkpoint_dir, config, resume, n, n_pad, mesh)
    try:
        if resume:
            start, client_state, server_state, cumulative_bytes, saved_history = checkpoints.restore(
                client_state, server_state)
        for round_index in range(start, fed.rounds):
            started = time.perf_counter()
            batches = packing.round_batches(padded_train, setup.local_steps, fed.batch_size, config.seed, round_index)
            batches = sharding.put_clients(batches, mesh, sharding.batch_sharding(mesh))
            mask_np = np.zeros(n_pad, bool)
            mask_np[:n] = reporting_clients(n, fed.participation, fed.client_dropout, config.seed, round_index)
            mask = sharding.put_clients(mask_np, mesh)
            client_state, server_state, metrics, logs = round_step(
                base, client_state, server_state, batches, mask, sizes,
                jax.random.fold_in(root_key, round_index), jnp.int32(round_index))
            if round_index == 0:
                logs = {**initial_logs, **logs}
            metrics, logs = sharding.to_host((metrics, logs))
            record = _round_record(setup, round_index, metrics, mask_np, (bytes_up, bytes_down), cumulative_bytes)
            if round_index == 0:
                _add_basis_bytes(record, setup)
            cumulative_bytes = record["bytes_cumulative"]
            last = round_index + 1 == fed.rounds
            evaluated = round_lib.evaluated_params(client_state)
            evaluate_now = last or (round_index + 1) % fed.eval_every == 0
            test_now = last or (round_index + 1) % (fed.test_every or fed.eval_every) == 0
            if evaluate_now or test_now:
                eval_base = base if fold is None else fold(base, server_state)
                if test_now:
                    record.update(_evaluation(evaluate_own, eval_base, evaluated, test, n, "test"))
                if validation is not None and evaluate_now:  # what is chosen on (never the test split)
                    record.update(_evaluation(evaluate_own, eval_base, evaluated, validation, n, "validation"))
                if last and len(task.global_test["labels"]):
                    record.update(_evaluation(evaluate_common, eval_base, evaluated, global_test, n, "global_test"))
            _add_logs(record, logs, n, mask_np[:n], fed.outlier_factor)
            record.update(mixing_shares(record.get("weights"), task.clusters))
            if config.dp.enabled:
                record.update(dp_record(config, noise_multiplier, round_index + 1, record.get("update_norm"),
                                        mask_np[:n]))
            record["seconds"] = time.perf_counter() - started
            saved_history.append(_scalars(record))
            yield RoundOutput(record, evaluated)
            # After the caller has written the round's record: a run stopped in between has the
            # record without the checkpoint (its line is dropped on resume), never the reverse.
            checkpoints.maybe_save(round_index + 1, last, client_state, server_state,
                                   {"round": round_index + 1, "bytes_cumulative": cumulative_bytes,
                                    "history": saved_history})
    finally:  # also when interrupted, or when the caller stops iterating early
        checkpoints.close()

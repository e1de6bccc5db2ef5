"""One client's side of a round outside the simulator: the node that holds client ``i``'s
data trains it, uploads its shared leaves, and applies what the server sends back
(``celora_jax.federated.server_node`` is the other side).

Everything a node computes is what the simulator computes for that client: the same
batches (``packing.round_batches`` keyed by seed, round and client), the same PRNG keys,
the same optimizer and objective, the same ``method.receive`` of a download, the same
clipping and noise under DP. The differences are only where the work runs and that one
client is trained at a time. A round::

    node = ClientNode(setup, client=3)
    state = node.initial_state()                       # kept by the node between rounds
    statistic = node.statistic()                       # once, for methods that need it
    state, upload, metrics = node.train(state, round_index)
    ...                                                # the server aggregates the uploads
    state = node.receive(state, download)              # only if the server sent one
    scores = node.evaluate(state)                      # own test split: loss, correct, count

Methods that update the frozen base weights from the server state (FedEx-LoRA's residual,
``fold_into_base``) receive that state with every download (``ServerNode`` sends
``{"shared": ..., "fold": server state}``; the node keeps it in ``state["fold"]`` and trains
and evaluates on the folded base). Methods that fine-tune after the download
(``finetune_steps``) do so in ``finetune(state, round_index)``, which the node calls once it
knows the round's answer; ``evaluate`` then uses the fine-tuned copy (``state["tuned"]``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from celora_jax.data import packing
from celora_jax.federated import client as client_lib, round as round_lib, sharding, statistics, strategies
from celora_jax.federated.methods import base as methods_base
from celora_jax.federated.setup import Setup
from celora_jax.lora import roles as roles_lib
from celora_jax.lora.adapters import GRADIENT_SVD
from celora_jax.privacy import dp as dp_lib
from celora_jax.server import gmm

PyTree = Any


def unsupported_reason(method, adapter_config=None) -> str | None:
    """Why ``method`` (with adapters as ``adapter_config`` attaches them) cannot run on
    separate nodes, or None: a reference that reads what a simulation alone knows (the
    partition's true clusters) cannot, nor can a basis that needs the round-0 gradient
    sketches, nor clients of different ranks (their bytes and blocks are the simulation's)."""
    if method.name == "cluster_oracle":
        return "reads the partition's true clusters, which only a simulation knows (a reference, not a method)"
    if adapter_config is not None and adapter_config.client_ranks is not None:
        return ("gives clients cores of different ranks (adapter.client_ranks), which the nodes do not apply yet; "
                "leave adapter.client_ranks unset")
    if adapter_config is not None and adapter_config.init == GRADIENT_SVD:
        return ("builds its basis (adapter.init='gradient_svd') from a round-0 exchange of every client's "
                "gradient sketch, which the nodes do not run yet; adapter.init='weight_svd' needs no exchange")
    return None


def folds_base(method) -> bool:
    """The method updates the frozen base from the server state (FedEx-LoRA)."""
    return method.fold_into_base is not methods_base.keep_base


class NodePrograms(NamedTuple):
    """The jitted functions a node runs, and the frozen base weights on the device. They
    depend on the run, not on the client: nodes of one process that share them (a
    simulation serves many clients from one process) compile each program once and hold
    one copy of the base, instead of one per client."""

    update: Callable
    evaluate: Callable
    privatize: Callable
    folded: Callable | None  # methods that fold the server state into the base
    finetune: Callable | None  # methods that fine-tune after the download
    base: PyTree  # the task's frozen weights as device arrays


def node_programs(setup: Setup) -> NodePrograms:
    """``NodePrograms`` of a prepared run, for any of its clients."""
    config, fed, task, method = setup.config, setup.config.federation, setup.task, setup.method
    total_steps = fed.rounds * setup.local_steps
    scale = task.adapter_config.scale
    return NodePrograms(
        update=jax.jit(client_lib.make_client_update(task.logits_fn, setup.roles, config.optimizer, total_steps,
                                                     objective=method.client_objective)),
        evaluate=jax.jit(client_lib.make_evaluate(task.logits_fn, fed.eval_batch_size)),
        privatize=jax.jit(dp_lib.privatize_update, static_argnums=(1, 2)),  # float options
        folded=(jax.jit(lambda base, fold: method.fold_into_base(base, fold, scale)) if folds_base(method)
                else None),
        finetune=jax.jit(round_lib.finetune_update(setup, total_steps)) if method.finetune_steps else None,
        base=jax.tree.map(jnp.asarray, task.base_params))


def _row(tree: PyTree, client: int) -> PyTree:
    return jax.tree.map(lambda x: np.asarray(x[client:client + 1]), tree)


class ClientNode:
    """Client ``client`` of a prepared run (see the module docstring).

    ``setup`` is the run's ``Setup``; a node only reads its own client's rows of the task's
    arrays (a deployment prepares just those: the other rows may be zeros). ``programs``:
    ``node_programs(setup)`` shared with the process's other nodes of this run (built here
    if None).
    """

    def __init__(self, setup: Setup, client: int, programs: NodePrograms | None = None):
        reason = unsupported_reason(setup.method, setup.task.adapter_config)
        if reason:
            raise ValueError(f"method {setup.method.name!r} cannot run on separate nodes: it {reason}")
        if not 0 <= client < setup.num_clients:
            raise ValueError(f"client {client} is not one of the run's {setup.num_clients} clients")
        self.setup, self.client = setup, int(client)
        config, fed, task = setup.config, setup.config.federation, setup.task
        self.train_examples = _row(task.train, client)
        self.test_examples = jax.tree.map(lambda x: x[0], _row(task.test, client))
        self.size = float(task.sizes[client])
        programs = node_programs(setup) if programs is None else programs
        self._update, self._evaluate, self._privatize = programs.update, programs.evaluate, programs.privatize
        self._folded, self._finetune = programs.folded, programs.finetune
        self._noise_multiplier = dp_lib.resolve_noise_multiplier(config.dp, fed.rounds)
        # The simulator splits each round's key over its padded client slots: so does the node.
        mesh = sharding.client_mesh(fed.num_devices, fed.data_parallel)
        self._slots = sharding.padded_client_count(setup.num_clients, mesh, fed.client_block)
        self._root_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        self._base = programs.base
        self.fold_like = self._fold_like() if folds_base(setup.method) else None

    def _fold_like(self):
        """Shapes and dtypes of the server state the method folds into the base (what the
        server's strategy starts from), as zeros."""
        setup = self.setup
        strategy = setup.method.server(methods_base.ServerInputs(aggregation=setup.config.aggregation))
        shared = strategies.broadcast(roles_lib.select(setup.task.client_params, setup.roles, roles_lib.SHARED),
                                      setup.num_clients)
        shapes = jax.eval_shape(strategy.init, shared, jnp.asarray(setup.sizes, jnp.float32))
        return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)

    def base(self, state: dict):
        """The frozen weights this client trains and evaluates on: the loaded base, with the
        server state folded in for methods that update it."""
        if self._folded is None or "fold" not in state:
            return self._base
        return self._folded(self._base, jax.tree.map(jnp.asarray, state["fold"]))

    def download_like(self, state: dict) -> PyTree:
        """The structure (shapes, dtypes) of what the server sends this node."""
        shared = self.shared(state)
        return shared if self.fold_like is None else {"shared": shared, "fold": self.fold_like}

    def initial_state(self) -> dict:
        """``{"params", "opt_state"}`` before round 1 (every client starts alike)."""
        task = self.setup.task
        return client_lib.init_client_state(task.client_params, self.setup.roles, self.setup.config.optimizer)

    def shared(self, state: dict) -> PyTree:
        """The shared leaves of ``state``: what this node uploads."""
        return roles_lib.select(state["params"], self.setup.roles, roles_lib.SHARED)

    def statistic(self) -> gmm.ClassMixtures:
        """This client's data statistic (leading axis 1), the once-only upload of methods
        with ``needs_data_statistics``: equal to its row of the simulator's."""
        task, config = self.setup.task, self.setup.config
        params = roles_lib.combine(task.base_params, task.client_params["params"])
        features = statistics.client_features(task.embed_fn, params,
                                               [self.train_examples[name] for name in task.embed_inputs])
        return gmm.fit_class_mixtures(jnp.asarray(features), jnp.asarray(self.train_examples["labels"]),
                                      jnp.asarray(self.train_examples["example_mask"] > 0), task.num_classes,
                                      jax.random.fold_in(jax.random.key(config.seed), 2), first_client=self.client)

    def receive(self, state: dict, download: PyTree) -> dict:
        """``state`` with the server's answer applied (``method.receive``: e.g. the shared
        leaves replaced), as the simulator applies it at the end of a round; the server
        state of a method that folds it into the base is kept in ``state["fold"]``."""
        state = dict(state)
        if self.fold_like is not None:
            state["fold"], download = download["fold"], download["shared"]
        params = self.setup.method.receive(state["params"], jax.tree.map(jnp.asarray, download), self.setup.roles)
        return {**state, "params": params}

    def finetune(self, state: dict, round_index: int) -> dict:
        """``state`` with ``"tuned"``: the method's personal steps after round
        ``round_index``'s answer, on that round's first batches (as the simulator takes
        them); the next round trains on from ``state["params"]``, not from the tuned copy."""
        if self._finetune is None:
            return state
        setup, fed = self.setup, self.setup.config.federation
        batches = packing.round_batches(self.train_examples, setup.local_steps, fed.batch_size, setup.config.seed,
                                        round_index, first_client=self.client)
        first = jax.tree.map(lambda x: jnp.asarray(x[0][:setup.method.finetune_steps]), batches)
        round_key = jax.random.fold_in(self._root_key, round_index)
        key = jax.random.split(jax.random.fold_in(round_key, 0xF17E), self._slots)[self.client]
        tuned, _ = self._finetune(self.base(state), _trainable(state), first, key, jnp.int32(round_index))
        return {**state, "tuned": tuned["params"]}

    def train(self, state: dict, round_index: int) -> tuple[dict, PyTree | None, dict]:
        """One round of local training from ``state``: ``(state, upload, metrics)`` with
        train_loss and train_accuracy in metrics.

        When the training produces NaN/Inf the round is discarded as in the simulator:
        ``state`` comes back unchanged, ``upload`` is None and metrics has
        ``non_finite=True``. A client whose upload the server does not accept keeps the
        returned state and trains on from it.
        """
        setup, fed = self.setup, self.setup.config.federation
        batches = packing.round_batches(self.train_examples, setup.local_steps, fed.batch_size, setup.config.seed,
                                        round_index, first_client=self.client)
        round_key = jax.random.fold_in(self._root_key, round_index)
        key = jax.random.split(round_key, self._slots)[self.client]
        trained, metrics = self._update(self.base(state), _trainable(state),
                                        jax.tree.map(lambda x: jnp.asarray(x[0]), batches), key, jnp.int32(round_index))
        metrics = {k: float(v) for k, v in metrics.items()}
        learned = roles_lib.select(trained["params"], setup.roles, roles_lib.SHARED, roles_lib.PERSONAL)
        if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(learned)):
            return state, None, {**metrics, "non_finite": True}
        trained = {**state, **trained}  # the server state a method folds stays with the node
        sent_before, upload = self.shared(state), self.shared(trained)
        if setup.config.dp.enabled and jax.tree.leaves(upload):
            # The client clips and noises its change before it leaves, as in the simulator.
            change = jax.tree.map(jnp.subtract, upload, sent_before)
            noise_key = jax.random.split(jax.random.fold_in(round_key, 0xD1FF), self._slots)[self.client]
            noised, _ = self._privatize(change, setup.config.dp.clip_norm, self._noise_multiplier, noise_key)
            upload = jax.tree.map(jnp.add, sent_before, noised)
        return trained, jax.device_get(upload), metrics

    def evaluate(self, state: dict) -> dict:
        """``{"loss", "correct", "count"}`` of ``state`` on this client's own test split
        (its fine-tuned copy under methods that fine-tune, as the simulator evaluates)."""
        params = state["tuned"] if "tuned" in state else state["params"]
        scores = self._evaluate(self.base(state), params, self.test_examples)
        return {k: float(v) for k, v in scores.items()}


def _trainable(state: dict) -> dict:
    """What a client update takes: parameters and optimizer state."""
    return {"params": state["params"], "opt_state": state["opt_state"]}

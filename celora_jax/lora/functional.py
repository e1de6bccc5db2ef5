"""Model-agnostic CE-LoRA: adapt any ``apply_fn(params, *inputs)`` without editing the model.

``adapt`` takes a parameter pytree, the function that consumes it (a Flax linen
``model.apply``, an NNX model wrapped as ``lambda state, x: nnx.merge(graphdef, state)(x)``,
or a plain JAX function), and an ``AdapterConfig``; it returns the adapter pytree and
``adapted_apply(base_params, adapters, *inputs, **kwargs)``, which computes the adapted
model ``y = x (W0 + s·A·C·B) + b`` for every targeted kernel::

    adapters, adapted_apply = adapt(model.apply, variables, config, key)
    logits = adapted_apply(variables, adapters, x)
    grads = jax.grad(lambda a: loss(adapted_apply(variables, a, x)))(adapters)

Which parameters are adapted. ``config.target`` is searched in the "/"-joined path of every
leaf of ``params`` (dict keys, sequence indices and attribute names; the trailing ``value``
attribute of an NNX ``Variable`` is dropped, so an NNX kernel reads ``l1/kernel``). Only 2-D
kernels ``[d_in, d_out]`` and stacked/scanned kernels ``[L, d_in, d_out]`` (one slice per
layer, as ``nn.scan`` or a ``lax.scan`` over layers stores them) are candidates; biases,
norms and higher-rank leaves never match. The adapter of a leaf named ``kernel`` sits at
its module path, exactly where ``celora_jax.lora.adapters.init_adapters`` puts it (for 2-D
kernels both give identical adapters from the same key); a leaf with another name
(``{"w1": ..., "w2": ...}`` in a plain JAX model) gets its adapter at its own path, so
two kernels of one module never collide.

Per kernel ``A: [d_in, r]``, ``C: [r, r]``, ``B: [r, d_out]``; a stacked kernel gets
``A: [L, d_in, r]``, ``C: [L, r, r]`` (identity per layer), ``B: [L, r, d_out]``, each
layer slice initialised as ``init_adapters`` initialises a 2-D kernel.

Two strategies (``method``):

* ``"substitute"`` (default) calls ``apply_fn`` with every targeted kernel replaced by
  ``W0 + s·A·C·B`` (batched matmuls for stacked kernels). It works for any function,
  because the function only ever sees a parameter pytree of the usual structure. The cost
  is a dense ``d_in × d_out`` merged kernel per targeted kernel per call: O(d_in·d_out)
  extra memory per kernel. With one client inside ``jax.jit`` XLA may fuse the merge into
  its consumer and free it after use for inference; under ``jax.grad`` the merged kernels
  are kept (or rematerialised) for the backward pass, which also forms the dense gradient
  ``xᵀ·dy`` of each before projecting it onto A, C and B, so training holds up to a second
  copy of the adapted kernels. Under ``jax.vmap`` over a client axis of the adapters the
  merged kernels become batched (``[clients, d_in, d_out]``): N dense copies of every
  adapted kernel.
* ``"intercept"`` (Flax linen only) runs ``apply_fn`` unchanged inside
  ``flax.linen.intercept_methods`` and adds the low-rank path ``s·((x A) C) B`` to the
  output of every targeted module's ``__call__`` (the module owning the kernel, e.g.
  ``nn.Dense`` or our encoder's ``Dense``, whose first argument is the input ``x``). The
  dense update is never formed, in the forward or the backward pass: extra memory is
  O(r·(d_in + d_out)) per kernel plus the ``[..., r]`` activations, per client under
  ``vmap``, while W0 stays one shared copy. This is the method for large models and many
  clients. It needs linen modules that compute ``x W0 (+ b)`` with a 2-D kernel; stacked
  kernels inside ``nn.scan`` are not supported (the interceptor cannot know the layer
  index), use ``"substitute"`` for those. The module path is matched with or without a
  leading ``params`` collection name, so both ``model.apply`` on ``{"params": ...}`` and
  ``lambda p, x: model.apply({"params": p}, x)`` work; a targeted module that is never
  called raises instead of silently staying unadapted.

Adapters passed to ``adapted_apply`` are checked at the Python boundary (shapes and dtypes
are static even under ``jit`` and per client under ``vmap``): a missing factor, an unknown
adapter path, a wrong shape or a non-float dtype raises ``ValueError`` naming the path,
the argument and the expected shape.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from celora_jax.lora.adapters import (SHARED_BASIS_INITS, TRI, AdapterConfig, AdapterConfigError, adapter_output,
                                      init_factors, merge_kernel, path_string)

Array = jax.Array
PyTree = Any
# A nested dict {module name: ... {"A", "C", "B"}} mirroring the targeted kernels.
Adapters = dict
# apply_fn(params, *inputs, **kwargs) -> outputs, the caller's unmodified model function.
ApplyFn = Callable[..., Any]
# adapted_apply(base_params, adapters, *inputs, **kwargs) -> outputs.
AdaptedApplyFn = Callable[..., Any]

SUBSTITUTE = "substitute"
INTERCEPT = "intercept"
METHODS = (SUBSTITUTE, INTERCEPT)


class KernelTarget(NamedTuple):
    """One adapted kernel, as found in the base parameters.

    Attributes:
      kernel_path: names of the kernel leaf, e.g. ("params", "Dense_0", "kernel").
      adapter_path: where its adapter lives in the adapter pytree.
      shape: the kernel's shape, (d_in, d_out) or (L, d_in, d_out).
    """

    kernel_path: tuple[str, ...]
    adapter_path: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def layers(self) -> tuple[int, ...]:
        """Leading layer axis of a stacked kernel: () or (L,)."""
        return self.shape[:-2]

    def factor_shapes(self, rank: int, kind: str) -> dict[str, tuple[int, ...]]:
        """Expected shapes of the factors, e.g. {"A": (L, d_in, r), ...}."""
        d_in, d_out = self.shape[-2:]
        shapes = {"A": (*self.layers, d_in, rank), "B": (*self.layers, rank, d_out)}
        if kind == TRI:
            shapes["C"] = (*self.layers, rank, rank)
        return shapes


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_names(key_path: Sequence[Any]) -> tuple[str, ...]:
    """Names of a jax key path; NNX's trailing ``Variable.value`` attribute is dropped."""
    names = tuple(_key_name(k) for k in key_path)
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return names


def find_targets(params: PyTree, target: str) -> tuple[KernelTarget, ...]:
    """Kernels of ``params`` whose "/"-joined path matches the regex ``target`` (sorted).

    Only 2-D leaves ([d_in, d_out]) and 3-D leaves ([layers, d_in, d_out]) are candidates,
    the 3-D extension of ``adapters.target_kernel_paths``.

    Raises:
      AdapterConfigError: nothing matches, or two matches would collide in the adapter
        pytree (same adapter path, or one adapter inside another's factor).
    """
    pattern = re.compile(target)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    targets, candidates = [], []
    for key_path, leaf in flat:
        names = leaf_names(key_path)
        # Like init_adapters, the regex only sees kernels: biases and norms never match.
        if getattr(leaf, "ndim", 0) not in (2, 3):
            continue
        candidates.append(path_string(names))
        if not pattern.search(path_string(names)):
            continue
        adapter_path = names[:-1] if names[-1] == "kernel" else names
        targets.append(KernelTarget(names, adapter_path, tuple(leaf.shape)))
    if not targets:
        raise AdapterConfigError(
            f"adapter target regex {target!r} matches no 2-D or 3-D parameter; "
            f"examples of kernel paths: {candidates[:4]}")
    targets.sort(key=lambda t: t.kernel_path)
    # Two adapters collide when they share a path (keys 0 and "0" both read "0") or when
    # one's factor leaf is where the other begins (a leaf named "A" next to "m/kernel").
    occupied: dict[tuple[str, ...], KernelTarget] = {}
    for t in targets:
        for path in [t.adapter_path] + [t.adapter_path + (f,) for f in ("A", "B", "C")]:
            if path in occupied:
                raise _collision(occupied[path], t, path)
            occupied[path] = t
    # Nesting one adapter inside another module's path is fine, inside a factor leaf is not.
    factor_paths = {path: t for path, t in occupied.items() if path != t.adapter_path}
    for t in targets:
        for depth in range(1, len(t.adapter_path)):
            other = factor_paths.get(t.adapter_path[:depth])
            if other is not None:
                raise _collision(other, t, t.adapter_path[:depth])
    return tuple(targets)


def _collision(first: KernelTarget, second: KernelTarget,
               path: tuple[str, ...]) -> AdapterConfigError:
    return AdapterConfigError(
        f"kernels {path_string(first.kernel_path)} and {path_string(second.kernel_path)} "
        f"would collide in the adapter pytree at {path_string(path)}; narrow the target regex")


def init_target_adapters(key: Array, targets: Sequence[KernelTarget],
                         config: AdapterConfig, kernels: Mapping[tuple[str, ...], Array] | None = None) -> Adapters:
    """Adapters for ``targets``; same init as ``init_adapters``, per layer for stacked kernels.

    The key is split over kernels in sorted path order exactly as ``init_adapters`` does, so
    for 2-D ``kernel`` leaves both functions return identical adapters; a stacked kernel's
    key is split again over its L layers. ``kernels`` (kernel path -> pretrained weight) is
    read by ``config.init="weight_svd"`` only.

    Raises:
      AdapterConfigError: the rank exceeds min(d_in, d_out) of a kernel.
    """
    flat = {}
    for t, kernel_key in zip(targets, jax.random.split(key, len(targets))):
        d_in, d_out = t.shape[-2:]
        if config.rank > min(d_in, d_out):
            raise AdapterConfigError(
                f"adapter rank {config.rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} "
                f"of kernel {path_string(t.kernel_path)} with shape {t.shape}")
        kernel = None if kernels is None else kernels[t.kernel_path]
        init = lambda k, w: init_factors(k, d_in, d_out, config, w)
        if t.layers:
            # One independent init per layer slice: C = I in every layer, A drawn per layer.
            factors = jax.vmap(init, in_axes=(0, None if kernel is None else 0))(
                jax.random.split(kernel_key, t.layers[0]), kernel)
        else:
            factors = init(kernel_key, kernel)
        for name, value in factors.items():
            flat[t.adapter_path + (name,)] = value
    return traverse_util.unflatten_dict(flat)


def check_adapters(adapters: PyTree, targets: Sequence[KernelTarget],
                   config: AdapterConfig, argument: str = "adapters") -> dict:
    """Validates an adapter pytree against the kernels; returns {adapter path: factors}.

    Raises:
      ValueError: an adapter path is missing or unknown, a factor is missing, or a factor
        has the wrong shape or a non-float dtype. The message names ``argument``, the
        adapter path and the expected shape.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters)
    modules: dict[tuple[str, ...], dict] = {}
    for key_path, leaf in flat:
        names = leaf_names(key_path)
        modules.setdefault(names[:-1], {})[names[-1]] = leaf
    expected = {t.adapter_path: t for t in targets}
    unknown = sorted(set(modules) - set(expected))
    if unknown:
        raise ValueError(
            f"argument {argument!r} has adapters at {[path_string(p) for p in unknown]}, "
            f"which match no adapted kernel; expected adapter paths: "
            f"{[path_string(p) for p in expected]}")
    for path, t in expected.items():
        factors = modules.get(path)
        shapes = t.factor_shapes(config.rank, config.kind)
        where = f"argument {argument!r} at adapter path {path_string(path)!r}"
        kernel = f"kernel {path_string(t.kernel_path)} of shape {t.shape}"
        if factors is None:
            raise ValueError(f"{where}: adapter missing; expected factors "
                             f"{shapes} for {kernel}")
        if set(factors) != set(shapes):
            raise ValueError(f"{where}: factors {sorted(factors)}, expected {sorted(shapes)} "
                             f"with shapes {shapes} ({config.kind!r} adapters) for {kernel}")
        for name, shape in shapes.items():
            value = factors[name]
            if tuple(getattr(value, "shape", ())) != shape:
                hint = (" (to run several clients, jax.vmap adapted_apply over the adapters' "
                        "leading axis)" if len(getattr(value, "shape", ())) == len(shape) + 1
                        else "")
                raise ValueError(f"{where}: factor {name} has shape "
                                 f"{tuple(getattr(value, 'shape', ()))}, expected {shape} "
                                 f"for {kernel}{hint}")
            if not jnp.issubdtype(getattr(value, "dtype", np.dtype(object)), jnp.floating):
                raise ValueError(f"{where}: factor {name} has dtype "
                                 f"{getattr(value, 'dtype', type(value).__name__)}, expected a "
                                 f"floating dtype (shape {shape})")
    return {path: modules[path] for path in expected}


def substitute_kernels(base_params: PyTree, modules: Mapping[tuple[str, ...], Mapping],
                       targets: Sequence[KernelTarget], scale: float) -> PyTree:
    """``base_params`` with every targeted kernel replaced by W0 + s·A·C·B.

    ``modules`` is ``check_adapters``' output. Matmuls broadcast over a stacked kernel's
    leading layer axis, so ``[L, d_in, r] @ [L, r, r] @ [L, r, d_out]`` is per layer.

    Raises:
      ValueError: a targeted kernel is missing from ``base_params`` or changed shape.
    """
    by_kernel = {t.kernel_path: t for t in targets}
    replaced = set()

    def replace(key_path, leaf):
        t = by_kernel.get(leaf_names(key_path))
        if t is None:
            return leaf
        if tuple(leaf.shape) != t.shape:
            raise ValueError(f"argument 'base_params' has kernel {path_string(t.kernel_path)} "
                             f"of shape {tuple(leaf.shape)}, expected {t.shape} as in adapt()")
        replaced.add(t.kernel_path)
        return merge_kernel(leaf, modules[t.adapter_path], scale)

    merged = jax.tree_util.tree_map_with_path(replace, base_params)
    missing = sorted(set(by_kernel) - replaced)
    if missing:
        raise ValueError(f"argument 'base_params' lacks the adapted kernels "
                         f"{[path_string(p) for p in missing]} found by adapt()")
    return merged


def low_rank_interceptor(modules: Mapping[tuple[str, ...], Mapping],
                         targets: Sequence[KernelTarget], scale: float,
                         applied: set) -> Callable:
    """A ``flax.linen.intercept_methods`` interceptor adding s·((x A) C) B to targeted modules.

    Every module call whose path is an adapter path (with or without a leading "params")
    gets the low-rank output of its first argument ``x [..., d_in]`` added; the module paths
    it adapted are recorded in ``applied`` so that the caller can detect misses.
    """
    by_module = {}
    for t in targets:
        by_module[t.adapter_path] = t
        if t.adapter_path[:1] == ("params",):
            by_module[t.adapter_path[1:]] = t

    def interceptor(next_fun, args, kwargs, context):
        outputs = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return outputs
        t = by_module.get(tuple(context.module.path))
        if t is None:
            return outputs
        d_in, d_out = t.shape
        x = args[0] if args else None
        x_shape, y_shape = getattr(x, "shape", None), getattr(outputs, "shape", None)
        if (x_shape or ())[-1:] != (d_in,) or (y_shape or ())[-1:] != (d_out,):
            raise ValueError(
                f"method='intercept': module {path_string(t.adapter_path)} was called with "
                f"input shape {x_shape} and returned {y_shape}; its kernel is {t.shape}, so "
                f"it is not a plain linear layer x W0 + b. Use method='substitute'.")
        applied.add(t.adapter_path)
        return outputs + adapter_output(x, modules[t.adapter_path], scale).astype(outputs.dtype)

    return interceptor


def adapt(apply_fn: ApplyFn, params: PyTree, config: AdapterConfig, key: Array,
          method: str = SUBSTITUTE) -> tuple[Adapters, AdaptedApplyFn]:
    """Adds CE-LoRA adapters to an arbitrary model function.

    Args:
      apply_fn: ``apply_fn(params, *inputs, **kwargs)``, left untouched.
      params: the base parameters (any pytree: linen variables, NNX state, nested dicts).
        Only their structure and kernel shapes are used here (and the kernels' values under
        ``config.init="weight_svd"``).
      config: adapter kind, rank, alpha and the target regex over parameter paths.
      key: PRNG key for the adapters' init (the same key on every client gives a common A).
      method: "substitute" (any function) or "intercept" (linen modules, no dense update);
        see the module docstring for the memory trade-off.

    Returns:
      ``(adapters, adapted_apply)``: the adapter pytree (module-path nested dict of
      ``{"A", "C", "B"}``) and ``adapted_apply(base_params, adapters, *inputs, **kwargs)``,
      a pure function that computes the adapted model and is jit-, grad- and vmap-able.

    Raises:
      ValueError (AdapterConfigError): bad method, config or apply_fn, no kernel matches,
        rank too large, or stacked kernels with method="intercept".

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from celora_jax import AdapterConfig, adapt
      >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> config = AdapterConfig(rank=2, target=r"kernel$")
      >>> adapters, adapted_apply = adapt(model.apply, variables, config, jax.random.key(1))
      >>> sorted(adapters["params"])
      ['layers_0', 'layers_2']
      >>> x = jnp.ones((4, 8))
      >>> bool(jnp.allclose(adapted_apply(variables, adapters, x), model.apply(variables, x)))  # B = 0
      True
      >>> grads = jax.grad(lambda a: adapted_apply(variables, a, x).sum())(adapters)
      >>> grads["params"]["layers_0"]["C"].shape
      (2, 2)
    """
    if not callable(apply_fn):
        raise ValueError(f"argument 'apply_fn' must be callable, got {type(apply_fn).__name__}")
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"argument 'config' must be an AdapterConfig, got {type(config).__name__}")
    if method not in METHODS:
        raise ValueError(f"argument 'method' must be one of {METHODS}, got {method!r}")
    targets = find_targets(params, config.target)
    if method == INTERCEPT:
        stacked = [path_string(t.kernel_path) for t in targets if t.layers]
        if stacked:
            raise AdapterConfigError(
                f"method='intercept' supports 2-D kernels only; stacked kernels {stacked} "
                f"need method='substitute'")
    kernels = None
    if config.init in SHARED_BASIS_INITS:  # the basis is built from the pretrained kernels' values
        by_path = {leaf_names(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        kernels = {t.kernel_path: by_path[t.kernel_path] for t in targets}
    adapters = init_target_adapters(key, targets, config, kernels)
    scale = config.scale

    def adapted_apply(base_params: PyTree, adapters: PyTree, *inputs, **kwargs):
        modules = check_adapters(adapters, targets, config)
        if method == SUBSTITUTE:
            return apply_fn(substitute_kernels(base_params, modules, targets, scale),
                            *inputs, **kwargs)
        applied: set = set()
        with nn.intercept_methods(low_rank_interceptor(modules, targets, scale, applied)):
            outputs = apply_fn(base_params, *inputs, **kwargs)
        missed = [path_string(t.adapter_path) for t in targets if t.adapter_path not in applied]
        if missed:
            raise ValueError(
                f"method='intercept': no linen module call matched the adapters at {missed}; "
                f"apply_fn must run Flax linen modules at those paths. Use method='substitute' "
                f"for NNX models or plain JAX functions.")
        return outputs

    return adapters, adapted_apply

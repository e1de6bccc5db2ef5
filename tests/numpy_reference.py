"""Independent float64 numpy references of CE-LoRA's server math (loops, no JAX), which the
kernel tests compare against and ``benchmarks/aggregation.py`` times."""

from __future__ import annotations

import numpy as np

from celora_jax.server.gmm import ClassMixtures


def np_project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al. 2008, sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def np_parameter_distance(cores: np.ndarray, origin: np.ndarray | None = None) -> np.ndarray:
    n, _, r, _ = cores.shape
    delta = (cores - (np.eye(r) if origin is None else origin)).reshape(n, -1)
    norms = np.linalg.norm(delta, axis=1)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] > 0 and norms[j] > 0:
                cos = float(delta[i] @ delta[j]) / (norms[i] * norms[j])
                dist[i, j] = dist[j, i] = min(max(1.0 - cos, 0.0), 2.0)
    return dist


def _np_median_normalize(dist: np.ndarray, idx: np.ndarray) -> np.ndarray:
    sub = dist[np.ix_(idx, idx)]
    off = sub[~np.eye(len(idx), dtype=bool)]
    median = np.median(off) if off.size else 0.0
    return dist / median if median > 0 else dist


def np_server_step(cores, data_distance, sizes, mask, beta=0.5, lam=1.0):
    """Reference per-round step: returns (W, mixed cores, param distance, excluded)."""
    cores = np.asarray(cores, np.float64)
    data_distance = np.asarray(data_distance, np.float64)
    sizes = np.asarray(sizes, np.float64)
    n, _, r, _ = cores.shape
    core_ok = np.isfinite(cores).reshape(n, -1).all(axis=1)
    diag_ok = np.isfinite(np.diag(data_distance))
    stat_ok = diag_ok & ~((~np.isfinite(data_distance)) & diag_ok[None, :] & diag_ok[:, None]).any(axis=1)
    excluded = ~(core_ok & stat_ok & np.isfinite(sizes) & (sizes >= 0))
    active = np.asarray(mask, bool) & ~excluded
    cores = np.where(core_ok[:, None, None, None], cores, np.eye(r))
    data_distance = np.where(np.isfinite(data_distance), data_distance, 0.0)

    param_distance = np_parameter_distance(cores)
    idx = np.flatnonzero(active)
    prior = np.zeros(n)
    if idx.size:
        total = sizes[idx].sum()
        prior[idx] = sizes[idx] / total if total > 0 else 1.0 / idx.size
    blended = beta * _np_median_normalize(data_distance, idx) + (1 - beta) * _np_median_normalize(param_distance, idx)
    weights = np.eye(n)
    for i in range(n):
        if active[i]:
            weights[i] = 0.0
            weights[i, idx] = np_project_simplex(prior[idx] - blended[i, idx] / (2 * lam))
        elif not core_ok[i] and idx.size:
            weights[i] = prior
    mixed = np.empty_like(cores)
    for i in range(n):
        mixed[i] = np.tensordot(weights[i], cores, axes=1)
    return weights, mixed, param_distance, excluded


def np_data_distance(stats: ClassMixtures, bandwidth_sq: float | None = None,
                     class_conditional: bool = False) -> np.ndarray:
    """Reference closed-form squared MMD (float64), a loop over client pairs
    (``class_conditional``: a loop over classes too, only same-class components paired)."""
    weights, means, variances, counts, comp_mask = (np.asarray(x, np.float64) for x in stats)
    n, k, g, d = means.shape
    present = comp_mask.astype(bool) & (counts[..., None] > 0)
    pi = counts / counts.sum(axis=1, keepdims=True)
    alpha = np.where(present, pi[..., None] * weights, 0.0).reshape(n, k * g)
    mu = means.reshape(n, k * g, d)
    var = variances.reshape(n, k * g, d)
    if bandwidth_sq is None:
        pts = mu[present.reshape(n, k * g)]
        sq = []
        for a in range(len(pts)):  # pairs a < b
            sq.append(np.sum((pts[a + 1 :] - pts[a]) ** 2, axis=1))
        bandwidth_sq = float(np.median(np.concatenate(sq)))
    ell2 = bandwidth_sq

    def inner_slots(i, j, slots):
        t = ell2 + var[i][slots][:, None, :] + var[j][slots][None, :, :]
        diff = mu[i][slots][:, None, :] - mu[j][slots][None, :, :]
        log_k = np.sum(0.5 * np.log(ell2 / t) - diff**2 / (2 * t), axis=-1)
        return alpha[i][slots] @ np.exp(log_k) @ alpha[j][slots]

    def inner(i, j):
        if class_conditional:
            return sum(inner_slots(i, j, slice(c * g, (c + 1) * g)) for c in range(k))
        return inner_slots(i, j, slice(None))

    gram = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = inner(i, j)
    self_term = np.diag(gram)
    dist = np.maximum(self_term[:, None] + self_term[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(dist, 0.0)
    return dist

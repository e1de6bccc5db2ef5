"""A federated randomized SVD: the top singular vectors of a sum of clients' matrices
from linear sketches, without pooling the matrices.

Single-pass sketching (Tropp, Yurtsever, Udell and Cevher, "Practical sketching algorithms
for low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 2017, Algorithms 1 and 3):
with shared random test matrices Ω ``[d_out, k]`` and Ψ ``[l, d_in]`` (k = r + oversampling,
l = 2k + 1), client i sends

    Y_i = G_i Ω      ``[d_in, k]``   (the range sketch)
    W_i = Ψ G_i      ``[l, d_out]``  (the co-range sketch)

A sketch is linear in G, so the server's sums are the sketches of the total ``G = Σ G_i``:
``Y = G Ω``, ``W = Ψ G``. Then ``Q = orth(Y)`` spans G's dominant column space,
``X = (Ψ Q)⁺ W ≈ Qᵀ G``, and the SVD of the small X gives ``G ≈ (Q Ũ) S Vᵀ``. For a G of
rank at most k the result is exact (up to rounding); otherwise its error is within a small
factor of the best rank-k approximation's (the paper's Theorem 4.3), and oversampling
shrinks it. One upload per client, one download of the bases, no second pass.

Everything works on leading batch axes (layers of a stacked kernel) through ``jax.vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from celora_jax.lora.svd_basis import fix_svd_signs

Array = jax.Array


class SketchMatrices(NamedTuple):
    """The shared test matrices Ω ``[d_out, k]`` and Ψ ``[l, d_in]``, Gaussian, drawn from
    one key that every client knows (the run seed)."""

    omega: Array
    psi: Array


def draw_sketch_matrices(key: Array, d_in: int, d_out: int, rank: int, oversample: int = 8) -> SketchMatrices:
    """The shared test matrices for sketching ``[d_in, d_out]`` matrices to rank ``rank``:
    k = rank + oversample columns (at most d_out) and l = 2k + 1 rows (at most d_in)."""
    if rank < 1 or rank > min(d_in, d_out):
        raise ValueError(f"sketch rank must be in 1..min(d_in, d_out) = {min(d_in, d_out)}, got {rank}")
    k = min(rank + oversample, d_in, d_out)
    l = min(2 * k + 1, d_in)
    key_omega, key_psi = jax.random.split(key)
    return SketchMatrices(jax.random.normal(key_omega, (d_out, k), jnp.float32),
                          jax.random.normal(key_psi, (l, d_in), jnp.float32))


def sketch(matrix: Array, tests: SketchMatrices) -> dict:
    """One client's sketch of its ``[d_in, d_out]`` matrix: ``{"range": G Ω, "co_range": Ψ G}``."""
    matrix = jnp.asarray(matrix, jnp.float32)
    return {"range": matrix @ tests.omega, "co_range": tests.psi @ matrix}


def sketch_size(d_in: int, d_out: int, tests: SketchMatrices) -> int:
    """Numbers one client uploads per sketched matrix."""
    return d_in * tests.omega.shape[1] + tests.psi.shape[0] * d_out


def top_singular(summed: dict, tests: SketchMatrices, rank: int) -> tuple[Array, Array, Array]:
    """``(U_r [d_in, r], S_r [r], V_rᵀ [r, d_out])`` of the matrix whose sketches were summed.

    Signs are fixed as in ``svd_basis.weight_svd_factors`` (the largest entry of each column
    of U positive), so every client that receives the same sums builds the same bases.
    """
    q, _ = jnp.linalg.qr(summed["range"])                                # [d_in, k]
    core = jnp.linalg.lstsq(tests.psi @ q, summed["co_range"])[0]        # [k, d_out] ≈ Qᵀ G
    u_small, s, vt = jnp.linalg.svd(core, full_matrices=False)
    u, vt = fix_svd_signs((q @ u_small)[:, :rank], vt[:rank])
    return u, s[:rank], vt


__all__ = ["SketchMatrices", "draw_sketch_matrices", "sketch", "sketch_size", "top_singular"]

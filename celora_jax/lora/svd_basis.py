"""Frozen bases of tri-matrix adapters from singular value decompositions, with the signs
fixed so that every machine builds the same basis (``adapter.init``; docs "Shared-basis
tri-LoRA")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def fix_svd_signs(u: Array, vt: Array) -> tuple[Array, Array]:
    """``(U, Vᵀ)`` with each singular pair's sign chosen so that the largest entry of each
    column of U is positive (scikit-learn's ``svd_flip``): SVD routines pick signs freely, and
    clients on different machines must build the same basis."""
    largest = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None, :], axis=0)[0]
    signs = jnp.where(largest < 0, -1.0, 1.0).astype(u.dtype)
    return u * signs[None, :], vt * signs[:, None]


def weight_svd_factors(kernel: Array, rank: int) -> dict:
    """LoRA-XS's frozen basis of one ``[d_in, d_out]`` kernel W = U S Vᵀ: ``A = U_r S_r``,
    ``B = V_rᵀ`` and ``C = 0``, so that ``A · C · B`` spans W's top-r singular directions.

    As in the authors' code (MohammadrezaBanaei/LoRA-XS, ``svd_utils``) the singular values
    go to the input side. We start C at 0 where they draw it from N(0, 1e-5²): the update
    starts at exactly zero, and C's gradient ``Aᵀ Xᵀ G Bᵀ`` is not zero. Each singular pair's
    sign is fixed (the largest entry of each column of U positive, as scikit-learn's
    ``svd_flip``), so that machines whose SVD routines pick other signs build the same basis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from celora_jax.lora.adapters import weight_svd_factors
      >>> kernel = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> factors = weight_svd_factors(kernel, rank=2)
      >>> factors["A"] @ factors["B"]  # the best rank-2 approximation of the kernel
      Array([[3., 0., 0.],
             [0., 2., 0.],
             [0., 0., 0.]], dtype=float32)
    """
    u, s, vt = jnp.linalg.svd(jnp.asarray(kernel, jnp.float32), full_matrices=False)
    u, vt = fix_svd_signs(u[:, :rank], vt[:rank])
    return {"A": u * s[None, :rank], "C": jnp.zeros((rank, rank), jnp.float32), "B": vt}


__all__ = ["fix_svd_signs", "weight_svd_factors"]

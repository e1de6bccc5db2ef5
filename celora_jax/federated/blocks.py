"""Client blocks: train or evaluate N clients ``block`` at a time inside one jitted program.

``jax.vmap`` over all N clients keeps every client's activations alive at once; for
thousands of clients that does not fit. :func:`blocked_vmap` splits the client axis into
N / block blocks and runs them one after another with ``lax.map``, each block vmapped.
Arguments with ``in_axes=None`` (the frozen base model) are closed over, so they are held
once, not once per client or per block. Results equal the plain ``vmap``.

Blocks are strided, block m holding clients m, m + N/block, m + 2N/block, ...: with the
client axis split over D devices in contiguous ranges, every block then holds block / D
clients of each device, so all devices work on every block (``block`` must be a multiple of
D; :func:`celora_jax.federated.sharding.padded_client_count` pads N to a multiple of ``block``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

PyTree = Any


def blocked_vmap(fn: Callable, in_axes: Sequence[int | None], block: int | None) -> Callable:
    """``jax.vmap(fn, in_axes)``, computed ``block`` clients at a time.

    Every mapped argument (``in_axes`` 0) must have the same leading size N, a multiple of
    ``block``; ``block`` None (or ≥ N) is the plain ``vmap``. Outputs are stacked along a
    leading axis of size N, in client order.

    Examples:
      >>> import jax.numpy as jnp
      >>> square_plus = lambda x, y: x ** 2 + y
      >>> x = jnp.arange(6.0)
      >>> blocked_vmap(square_plus, (0, None), block=2)(x, 1.0).tolist()
      [1.0, 2.0, 5.0, 10.0, 17.0, 26.0]
    """
    in_axes = tuple(in_axes)
    if any(axis not in (0, None) for axis in in_axes):
        raise ValueError(f"blocked_vmap: in_axes entries must be 0 or None, got {in_axes}")
    if block is not None and block < 1:
        raise ValueError(f"blocked_vmap: block must be >= 1 or None, got {block}")
    vmapped = jax.vmap(fn, in_axes=in_axes)

    def run(*args):
        if len(args) != len(in_axes):
            raise ValueError(f"blocked_vmap: got {len(args)} arguments for {len(in_axes)} in_axes")
        sizes = {leaf.shape[0] for arg, axis in zip(args, in_axes) if axis == 0
                 for leaf in jax.tree.leaves(arg)}
        if len(sizes) != 1:
            raise ValueError(f"blocked_vmap: mapped arguments need one common leading size, got {sorted(sizes)}")
        count = sizes.pop()
        if block is None or block >= count:
            return vmapped(*args)
        if count % block:
            raise ValueError(f"blocked_vmap: {count} clients are not a multiple of block={block}")
        blocks = count // block

        def to_blocks(x):  # [N, ...] -> [blocks, block, ...], block m = clients m, m + blocks, ...
            return x.reshape(block, blocks, *x.shape[1:]).swapaxes(0, 1)

        def from_blocks(y):
            return y.swapaxes(0, 1).reshape(count, *y.shape[2:])

        mapped = [jax.tree.map(to_blocks, arg) for arg, axis in zip(args, in_axes) if axis == 0]

        def one_block(block_args):
            supplied = iter(block_args)
            return vmapped(*[next(supplied) if axis == 0 else arg for arg, axis in zip(args, in_axes)])

        return jax.tree.map(from_blocks, jax.lax.map(one_block, mapped))

    return run

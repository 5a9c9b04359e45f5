"""Resizing learned position embeddings between resolutions (e.g. 448 <-> 896).

The ``[N, D]`` table is reshaped to its ``sqrt(N) x sqrt(N)`` grid (row-major, as the patches
are ordered), resampled bilinearly to the new grid and flattened back. Downsampling uses an
antialiasing (triangle) filter, as big_vision's ``resample_posemb`` does with
``jax.image.resize``; it equals ``torch.nn.functional.interpolate(mode="bilinear",
antialias=True, align_corners=False)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def grid_side(num_positions: int, *, name: str = "position_embedding") -> int:
    """Side of the square grid holding ``num_positions``; a clear error when it is not square."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(
            f"{name} has {num_positions} rows, not a square grid: cannot resize it"
        )
    return side


def resize_position_embedding(table: np.ndarray | jax.Array, new_grid: int, *,
                              antialias: bool = True,
                              name: str = "position_embedding") -> jax.Array:
    """``[N, D]`` -> ``[new_grid ** 2, D]`` by bilinear resampling on the square grid.

    Computed in float32 and returned in the input dtype.
    """
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got {list(table.shape)}")
    n, d = table.shape
    side = grid_side(n, name=name)
    if new_grid <= 0:
        raise ValueError(f"new grid size must be positive, got {new_grid}")
    if side == new_grid:
        return table
    grid = table.astype(jnp.float32).reshape(side, side, d)
    out = jax.image.resize(grid, (new_grid, new_grid, d), method="linear", antialias=antialias)
    return out.reshape(new_grid * new_grid, d).astype(table.dtype)

"""Token layouts of SegNetr's mixers: windows and grids over 2D/3D maps, and the resamplings around them.

Pure tensor reshapes (no parameters), so they are tested on their own: each
partition is inverted exactly by its reverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_divisible(spatial: tuple[int, ...], size: int) -> None:
    if any(s % size for s in spatial):
        raise ValueError(f"spatial size {list(spatial)} is not divisible by {size}; pad first")


def to_groups(x: torch.Tensor, size: int, grid: bool) -> torch.Tensor:
    """(B, C, *S) -> (B * groups, C, size^d): windows (contiguous) or grids (strided)."""
    b, c, *spatial = x.shape
    _check_divisible(tuple(spatial), size)
    d = len(spatial)
    split: list[int] = []
    for s in spatial:
        split += [size, s // size] if grid else [s // size, size]
    x = x.reshape(b, c, *split)
    outer = [2 + 2 * i for i in range(d)]
    inner = [3 + 2 * i for i in range(d)]
    group_dims, token_dims = (inner, outer) if grid else (outer, inner)
    x = x.permute(0, *group_dims, 1, *token_dims)
    return x.reshape(-1, c, size**d)


def from_groups(tokens: torch.Tensor, size: int, spatial: tuple[int, ...], grid: bool) -> torch.Tensor:
    """Inverse of :func:`to_groups` for a map of spatial size ``spatial``."""
    _check_divisible(spatial, size)
    d, c = len(spatial), tokens.shape[1]
    counts = [s // size for s in spatial]
    x = tokens.reshape(-1, *counts, c, *([size] * d))
    # x dims: 0 batch, 1..d group counts, d+1 channel, d+2.. tokens
    order = [0, d + 1]
    for i in range(d):
        group_axis, token_axis = 1 + i, d + 2 + i
        order += [token_axis, group_axis] if grid else [group_axis, token_axis]
    return x.permute(*order).reshape(x.shape[0], c, *spatial)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping ``window``^d patches: (B, C, *S) -> (B * |S|/window^d, C, window^d)."""
    return to_groups(x, window, grid=False)


def window_reverse(tokens: torch.Tensor, window: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Exact inverse of :func:`window_partition`."""
    return from_groups(tokens, window, tuple(spatial), grid=False)


def grid_partition(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``grid``^d groups of pixels |S_i|/grid apart, each spanning the whole map."""
    return to_groups(x, grid, grid=True)


def grid_reverse(tokens: torch.Tensor, grid: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Exact inverse of :func:`grid_partition`."""
    return from_groups(tokens, grid, tuple(spatial), grid=True)


def space_to_depth(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Lossless (B, C, *S) -> (B, C * factor^d, *S/factor); equals ``F.pixel_unshuffle`` in 2D."""
    b, c, *spatial = x.shape
    _check_divisible(tuple(spatial), factor)
    d = len(spatial)
    split: list[int] = []
    for s in spatial:
        split += [s // factor, factor]
    x = x.reshape(b, c, *split)
    order = [0, 1, *[3 + 2 * i for i in range(d)], *[2 + 2 * i for i in range(d)]]
    return x.permute(*order).reshape(b, c * factor**d, *[s // factor for s in spatial])


def depth_to_space(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Exact inverse of :func:`space_to_depth` (``F.pixel_shuffle`` in 2D)."""
    b, c, *spatial = x.shape
    d = len(spatial)
    out_c = c // factor**d
    x = x.reshape(b, out_c, *([factor] * d), *spatial)
    order = [0, 1]
    for i in range(d):
        order += [2 + d + i, 2 + i]
    return x.permute(*order).reshape(b, out_c, *[s * factor for s in spatial])


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the end of every spatial dim to a multiple; returns the original size too."""
    spatial = tuple(x.shape[2:])
    pads: list[int] = []
    for s in reversed(spatial):
        pads += [0, (-s) % multiple]
    return (F.pad(x, pads) if any(pads) else x), spatial


def crop_to(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`."""
    return x[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


# ----------------------------------------------------------------- layers

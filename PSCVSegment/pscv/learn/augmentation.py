"""Augmentation of a training batch, its images, clicks and dense labels transformed alike.

Images (B, 1, S, S), clicks (B, S, S) with IGNORE where unclicked, dense labels (B, S, S) or None.

- `flip_batch`: one random flip / 90-degree turn for the whole batch (the images stay aligned with each
  other). It makes a left organ look like a right one.
- `affine_batch`: a rotation, a zoom and an intensity change per image (or one for the whole batch,
  `aligned`), orientation kept: no flip, no 90-degree turn. Images are resampled bilinearly (zeros
  outside), dense labels by nearest neighbour (background outside); clicks are moved as points, so that
  none is lost to resampling (a click moved outside the image is dropped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .losses import IGNORE


def flip_batch(tensors: list[torch.Tensor | None], generator: torch.Generator) -> list:
    """One random flip / 90-degree turn applied to every image of the batch (keeps them aligned)."""
    turns, flip = torch.randint(0, 4, (2,), generator=generator).tolist()
    out = []
    for tensor in tensors:
        if tensor is not None:
            tensor = torch.rot90(tensor, turns, dims=(-2, -1))
            if flip % 2:
                tensor = torch.flip(tensor, dims=(-1,))
        out.append(tensor)
    return out


def _uniform(count: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * spread


def move_clicks(sparse: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Clicks (B, S, S) moved by `matrices` (B, 2, 2: output = M @ input, in coordinates centred on the
    image, x then y); clicks landing outside are dropped."""
    batch, height, width = sparse.shape
    moved = torch.full_like(sparse, IGNORE)
    b, row, col = torch.nonzero(sparse != IGNORE, as_tuple=True)
    if not len(b):
        return moved
    centred = torch.stack([col - (width - 1) / 2, row - (height - 1) / 2], dim=1).to(matrices.dtype)
    x, y = (matrices[b] @ centred[:, :, None])[:, :, 0].unbind(dim=1)
    new_col, new_row = torch.round(x + (width - 1) / 2).long(), torch.round(y + (height - 1) / 2).long()
    inside = (new_col >= 0) & (new_col < width) & (new_row >= 0) & (new_row < height)
    moved[b[inside], new_row[inside], new_col[inside]] = sparse[b[inside], row[inside], col[inside]]
    return moved


def affine_batch(images, sparse, masks: list, generator: torch.Generator, rotation: float = 20.0, scale: float = 0.1,
                 intensity: float = 0.1, aligned: bool = False) -> tuple:
    """Per image (one for the batch with `aligned`): rotation uniform in +-`rotation` degrees, zoom uniform
    in 1 +- `scale`, contrast 1 +- `intensity` and brightness +- `intensity`. `masks`: dense labels and other
    per-pixel maps (B, S, S) or None, resampled by nearest neighbour (0 outside). Returns (images, sparse, masks)."""
    batch, _, height, width = images.shape
    draws = 1 if aligned else batch
    angle = _uniform(draws, math.radians(rotation), generator).expand(batch)
    zoom = (1 + _uniform(draws, scale, generator)).expand(batch)
    contrast = (1 + _uniform(draws, intensity, generator)).expand(batch)
    brightness = _uniform(draws, intensity, generator).expand(batch)
    cos, sin = torch.cos(angle), torch.sin(angle)
    forward = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1) * zoom[:, None, None]
    inverse = torch.linalg.inv(forward)  # affine_grid samples the input at inverse @ output
    # affine_grid works in [-1, 1] coordinates of each axis; the matrices above act on pixels: rescale.
    aspect = torch.tensor([[1.0, height / width], [width / height, 1.0]], dtype=torch.float64)
    theta = torch.cat([inverse * aspect, torch.zeros(batch, 2, 1, dtype=torch.float64)], dim=2)
    grid = F.affine_grid(theta.to(images.device, torch.float32), list(images.shape), align_corners=False)
    images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images = images * contrast.to(images)[:, None, None, None] + brightness.to(images)[:, None, None, None]
    masks = [None if mask is None else F.grid_sample(mask[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                                     align_corners=False)[:, 0].to(mask.dtype) for mask in masks]
    sparse = move_clicks(sparse, forward.to(sparse.device))
    return images, sparse, masks


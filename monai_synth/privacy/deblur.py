"""A privacy space for low-pass copies: a blurred or pixelated copy, sharpened, comes back to its source.

A copy blurred strongly (a Gaussian of 3 px on a 64 px slice) or pixelated (blocks of 8 px) keeps only the coarse
layout of its source, and at that scale slices of different patients are as alike as the copy is to its source (CT
and PET phantoms: the body outline on a dark background). Every space that compares images as they are released such
copies. Sharpened with an unsharp mask, the copy gets back much of the detail it lost and comes near its source; a new
patient's image, sharpened alike, only has its own detail amplified and moves away from every training image. In its
own space, with its own threshold, the two separate (64 px phantom slices, ``benchmarks/safeguard_attacks.py``):

=========  =====================================  ==============================================================
modality   new patients, nearest training image   copies to their source: blur sd 2 / 3 px, box 7 px, pixelated 4x / 8x
=========  =====================================  ==============================================================
CT         from 0.138                             at most 0.041 / 0.027 / 0.042, 0.047 / 0.098
MRI        from 0.118                             0.036 / 0.019 / 0.041, 0.041 / 0.053
US         from 0.334                             0.055 / 0.046 / 0.065, 0.060 / 0.234
PET        from 0.076                             0.036 / 0.053 / 0.044, 0.040 / 0.239 (not caught)
=========  =====================================  ==============================================================

(unsharp mask of sd 3 px, amount 4; 80 training patients, 40 new ones.) A copy blurred along one axis only (motion
blur over 8 px) is also sharpened along each axis alone: PET copies then sit at most 0.068 from their sources, new
patients from 0.076 (CT: 0.045 against 0.121). The training side is the pixel space's plain grid; only the query is
sharpened, so one training row serves every query.

Volumes are also moved by half a voxel (``half_steps``): a box filter of even width (4 voxels) averages each voxel
with a window off its centre, so the copy is blurred *and* moved by half a voxel along every axis. On the 32^3 CT
phantoms, whose patients differ from each other by about as much as a volume differs from itself moved by half a
voxel, such copies sat at 1.20-1.37 of the holdout's smallest distance in this space (and beyond it in every other
space); moved back by half a voxel before sharpening, at 0.77-1.03 (two draws of copies).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from monai_synth.privacy.spaces import PixelSpace, scaled_batch

__all__ = ["DeblurSpace"]


class DeblurSpace(PixelSpace):
    """The pixel space with the query sharpened first: distance = 1 - Pearson r of the sharpened query and a
    training image, both on the grid.

    The query is reduced to at most four times the grid (area), sharpened there as ``x + amount * (x - G(x))`` with
    ``G`` a Gaussian of ``sigma`` of the image's side per axis (edges replicated), and with ``axes`` also with ``G``
    along each axis alone (a copy blurred by motion along one axis); each sharpened query is then compared like the
    pixel space (the symmetries, shifts and signs of ``invariances``). Training images are embedded plain.

    Args:
        grid: side of the grid (cells per axis).
        spatial_dims: 2 or 3.
        sigma: the unsharp mask's Gaussian, as a fraction of the image's side (3 / 64: 3 px on a 64 px slice).
        amount: how much of the detail is added back (4: a Gaussian blur of about the mask's width mostly undone).
        invariances: as :class:`~monai_synth.privacy.spaces.PixelSpace` (no zooms or rotations: a low-pass copy
            also moved far is beyond this space).
        max_shift: largest shift in grid cells.
        axes: also sharpen along each axis alone (one more sharpened query per axis).
        half_steps: also the query moved by half a sample of its working grid along every combination of axes
            (linear interpolation, edges replicated; 26 moves in 3D, 8 in 2D) after the sharpening along all axes,
            unflipped and unshifted (a copy blurred by a box of even width, or resampled half a voxel off).
        name: the space's name (``"coarse"``: the same space on a coarser grid, with an index and threshold of its
            own).
    """

    _DEBLUR_VERSION = 2

    def __init__(
        self,
        grid: int = 16,
        spatial_dims: int = 2,
        sigma: float = 3.0 / 64.0,
        amount: float = 4.0,
        invariances: Sequence[str] = ("flip", "transpose", "shift", "invert"),
        max_shift: int = 1,
        axes: bool = True,
        half_steps: bool = False,
        name: str = "deblur",
    ) -> None:
        if {"zoom", "rotate"} & set(invariances):
            raise ValueError(f"the deblur space takes flips, transposes, shifts and inversion only, got {invariances}")
        if not 0.0 < float(sigma) <= 0.25:
            raise ValueError(f"sigma is a fraction of the image's side in (0, 0.25], got {sigma}")
        if not 0.0 < float(amount) <= 16.0:
            raise ValueError(f"amount must be in (0, 16], got {amount}")
        super().__init__(grid=grid, spatial_dims=spatial_dims, invariances=invariances, max_shift=max_shift)
        self.name = str(name)
        self.sigma = float(sigma)
        self.amount = float(amount)
        # which axes each sharpened query blurs to find its detail: all of them, then (with axes) each alone
        self.sharpenings: tuple[tuple[int, ...], ...] = (tuple(range(self.spatial_dims)),)
        if axes:
            self.sharpenings += tuple((axis,) for axis in range(self.spatial_dims))
        # every sharpening's variants, then every sharpening's negated ones (as embed_variants returns them)
        half = len(self.variant_ops) // len(self.signs)
        self.variant_ops = [
            (*op, ("sharpen", along))
            for start in range(0, len(self.variant_ops), half)
            for along in self.sharpenings
            for op in self.variant_ops[start : start + half]
        ]
        # the half-sample moves, after every sharpening's variants of each sign (as embed_variants returns them)
        self.half_steps = bool(half_steps)
        self.half_moves: list[tuple[int, ...]] = []
        if self.half_steps:
            self.half_moves = [m for m in itertools.product((-1, 0, 1), repeat=self.spatial_dims) if any(m)]
            identity = (self._symmetries[0], (0,) * self.spatial_dims, "edge", ("sharpen", self.sharpenings[0]))
            per_sign = len(self.variant_ops) // len(self.signs)
            self.variant_ops = [
                op
                for k, sign in enumerate(self.signs)
                for op in self.variant_ops[k * per_sign : (k + 1) * per_sign]
                + [(sign, 1.0, 0.0, *identity, ("half", m)) for m in self.half_moves]
            ]

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors: the pixel space's settings and the mask."""
        cfg = {
            "space": "deblur",
            "version": self._DEBLUR_VERSION,
            "pixel": super().fingerprint(),
            "sigma": self.sigma,
            "amount": self.amount,
            "sharpenings": [list(a) for a in self.sharpenings],
        }
        if self.half_steps:  # absent when off: the fingerprints of indexes saved before it stay valid
            cfg["half_steps"] = True
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]

    def sharpened(self, images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
        """``(B, S, C, *spatial)`` images (at most four times the grid per axis), each with the unsharp mask of every
        one of :attr:`sharpenings` applied.

        Raises:
            NonFiniteImageError: for NaN/Inf images.
        """
        x = scaled_batch(images, self.spatial_dims)
        size = tuple(min(4 * self.grid, n) for n in x.shape[2:])
        if size != tuple(x.shape[2:]):
            x = F.interpolate(x, size=size, mode="area")
        one = torch.ones(1, dtype=x.dtype)
        gaussians = [gaussian_1d(torch.tensor(self.sigma * n), truncated=3.0, normalize=True).to(x.dtype) for n in size]
        out = []
        for along in self.sharpenings:
            kernels = [gaussians[axis] if axis in along else one for axis in range(self.spatial_dims)]
            out.append(x + self.amount * (x - separable_filtering(x, kernels, mode="replicate")))
        return torch.stack(out, dim=1)

    def half_moved(self, sharp: torch.Tensor) -> torch.Tensor:
        """``(B, M, C, *spatial)``: the query sharpened along all axes (``(B, C, *spatial)``, from :meth:`sharpened`),
        moved by each of :attr:`half_moves` (half a working-grid sample per axis). Both are linear filters, so moving
        the sharpened query equals sharpening the moved one away from the edges, at one sharpening instead of one per
        move."""
        out = []
        for move in self.half_moves:
            y = sharp
            for axis, step in enumerate(move):
                y = _half_step(y, 2 + axis, step) if step else y
            out.append(y)
        return torch.stack(out, dim=1)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, V, d)`` vectors of every variant of every sharpened query, in the order of :attr:`variant_ops`.

        Unlike the pixel space, variant 0 is not :meth:`embed`: the query is sharpened, the training rows are not.
        """
        sharp = self.sharpened(images)
        b, k = sharp.shape[:2]
        v = super().embed_variants(sharp.reshape(b * k, *sharp.shape[2:]))
        signs = len(self.signs)
        # (B * S, signs * V', d) -> (B, signs, S, V', d): every sharpening's variants, then every negated one
        v = v.reshape(b, k, signs, -1, v.shape[-1]).transpose(0, 2, 1, 3, 4).reshape(b, signs, -1, v.shape[-1])
        if self.half_moves:
            moved = self.half_moved(sharp[:, 0])  # the sharpening along all axes
            m = np.asarray(self.embed(moved.reshape(b * len(self.half_moves), *moved.shape[2:])))
            sign = np.asarray(self.signs, dtype=m.dtype)[:, None, None]
            v = np.concatenate([v, m.reshape(b, 1, len(self.half_moves), m.shape[-1]) * sign], axis=2)
        return np.ascontiguousarray(v.reshape(b, -1, v.shape[-1]))

    def __repr__(self) -> str:
        return (
            f"DeblurSpace(name={self.name!r}, grid={self.grid}, spatial_dims={self.spatial_dims}, sigma={self.sigma:g}, "
            f"amount={self.amount:g}, sharpenings={self.sharpenings}, invariances={self.invariances}, "
            f"max_shift={self.max_shift}, half_steps={self.half_steps})"
        )


def _half_step(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """``x`` moved by half a sample along ``dim`` (towards higher indices for ``step > 0``): each sample averaged with
    its neighbour on that side, the edge sample repeated (linear interpolation)."""
    n = x.shape[dim]
    if step > 0:
        neighbour = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim=dim)
    else:
        neighbour = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim=dim)
    return 0.5 * (x + neighbour)

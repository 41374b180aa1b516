"""Attack the privacy safeguard with near-copies of training images and count how many it releases.

A near-copy is an image a person would still call the same picture: an exact copy, a mirror image, a rotation, a
noisy or re-encoded copy, a crop, a copy pasted into a bigger canvas, and so on. The safeguard must release none of
them, and still release genuinely new images. This benchmark plants such copies and tries to get them out through
both entry points, on phantom cohorts of every modality:

* ``guard``: :func:`monai_synth.privacy.guard.run_guard` (``monai-synth guard``), the gate for any generator's output.
  Every attacked image is written as a file in the training files' own format (PNG for ultrasound, DICOM for CT,
  NIfTI for MRI and PET); what counts is what the gate WROTE: the release folder is read back and each released
  file is matched by content to the candidate it came from (or, with ``--guard-per-transform``, each transform
  gets its own release folder and its files are counted).
* ``sampler``: :func:`monai_synth.privacy.safeguard.build_safeguard` plus
  :func:`monai_synth.privacy.sampling.guarded_sample` with a generator that returns the planted copies as
  model-space tensors; what counts is ``result.images``.

Each cohort is split by patient into train / holdout / unseen; unseen patients (same generator, never trained on nor
used for calibration) give the control row: the share of genuinely new images released (goal >= 95%).

The guard's and the sampler's default privacy spaces and settings are used unless ``--spaces`` overrides them, so
the benchmark measures whatever the current default is. The printed table per modality and entry point is
``transform | released | attempted``; ``--json`` saves it with the refusal reasons and timings. A release is a
measurement, not an error: the exit code is non-zero only when something crashed.

Run: ``python benchmarks/safeguard_attacks.py`` (all modalities), ``--modalities us2d,ct3d``, ``--transforms
exact,mirror``, ``--attempts 20``, ``--json results.json``. Cohorts are small (2D 64x64, 3D 32^3, the smallest
holdout the 1% threshold accepts) and the guard is called once per modality, so the time goes to the safeguard
itself: its index, calibration and judging (seconds per image with the strong default spaces on 2 CPU cores) and,
with the embedding space, its training. The cohort and attempt flags scale it up or down.
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import io
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# run as a script, this checkout's package is measured, not whichever copy the environment has installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

#: modality key -> (modality, spatial dims)
CONFIGS: dict[str, tuple[str, int]] = {
    "us2d": ("us", 2),
    "ct2d": ("ct", 2),
    "mri2d": ("mri", 2),
    "pet2d": ("pet", 2),
    "ct3d": ("ct", 3),
    "mri3d": ("mri", 3),
    "pet3d": ("pet", 3),
}
PATHS = ("guard", "sampler")
CONTROL = "unseen"
CONTROL_LABEL = "unseen patient images (control)"
TABLE_HEADER = ("transform", "released", "attempted")
#: a released file correlating less than this with the file it came from was rewritten by the release, not copied
REWRITTEN_R = 0.95


# ---------------------------------------------------------------------------------------------------- transforms
@dataclass
class Ctx:
    """What a transform needs besides its images: randomness, the pixel scale and where the copy goes."""

    rng: np.random.Generator
    spatial_dims: int
    scale: float  # pixel distances below are for a 64-pixel image; 3D volumes of 32 voxels halve them

    def px(self, n: float) -> int:
        return max(1, int(round(n * self.scale)))


def _range(a: np.ndarray) -> tuple[float, float]:
    lo, hi = float(a.min()), float(a.max())
    return lo, (hi if hi > lo else lo + 1.0)


def _on_unit(a: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply an intensity change on the image's own [0, 1] range, so it means the same in HU, SUV or grey levels."""
    lo, hi = _range(a)
    u = np.clip(fn((a - lo) / (hi - lo)), 0.0, 1.0)
    return lo + u * (hi - lo)


def _resize(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Area interpolation when shrinking, (bi/tri)linear when growing."""
    import torch
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    if shape == a.shape:
        return a.copy()
    x = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]
    if all(s <= n for s, n in zip(shape, a.shape)):
        y = F.interpolate(x, size=shape, mode="area")
    else:
        y = F.interpolate(x, size=shape, mode="bilinear" if a.ndim == 2 else "trilinear", align_corners=False)
    return y[0, 0].numpy().astype(np.float64)


def _centre_fit(a: np.ndarray, shape: Sequence[int], fill: float) -> np.ndarray:
    """Centre crop / pad with ``fill`` to ``shape`` (no resampling)."""
    out = np.full(tuple(shape), fill, dtype=np.float64)
    src, dst = [], []
    for n, m in zip(a.shape, shape):
        if n >= m:
            s = (n - m) // 2
            src.append(slice(s, s + m))
            dst.append(slice(0, m))
        else:
            d = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(d, d + n))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _crop_centre(a: np.ndarray, frac: float, axes: Sequence[int]) -> np.ndarray:
    sl = [slice(None)] * a.ndim
    for ax in axes:
        n = a.shape[ax]
        m = max(2, int(round(n * frac)))
        s = (n - m) // 2
        sl[ax] = slice(s, s + m)
    return a[tuple(sl)]


def _rotate(a: np.ndarray, degrees: float, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    from scipy import ndimage

    return ndimage.rotate(a, degrees, axes=axes, reshape=False, order=1, mode="constant", cval=float(a.min()))


def _shift(a: np.ndarray, px: int, axis: int = 0) -> np.ndarray:
    out = np.full_like(a, a.min())
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis], dst[axis] = slice(0, a.shape[axis] - px), slice(px, None)
    out[tuple(dst)] = a[tuple(src)]
    return out


def _shear(a: np.ndarray, k: float) -> np.ndarray:
    """Shear the first two axes about the centre (each row moved along axis 1 in proportion to its offset)."""
    from scipy import ndimage

    m = np.eye(a.ndim)
    m[1, 0] = k
    centre = (np.asarray(a.shape) - 1) / 2.0
    return ndimage.affine_transform(a, m, offset=centre - m @ centre, order=1, mode="constant", cval=float(a.min()))


def _affine_edit(a: np.ndarray, degrees: float, zooms: tuple[float, float], shear: float, move: float) -> np.ndarray:
    """An edit between the fixed steps a space tries: in the plane of the first two axes, rotated by ``degrees``,
    magnified by ``zooms`` along those axes, sheared by ``shear`` and moved by ``move`` of the side, about the centre."""
    from scipy import ndimage

    a_ = np.radians(degrees)
    plane = np.array([[np.cos(a_), -np.sin(a_)], [np.sin(a_), np.cos(a_)]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    plane = plane @ np.diag(zooms)
    m = np.eye(a.ndim)
    m[:2, :2] = np.linalg.inv(plane)  # output -> input coordinates
    centre = (np.asarray(a.shape) - 1) / 2.0
    offset = centre - m @ centre - m @ np.r_[move * np.asarray(a.shape[:2]), np.zeros(a.ndim - 2)]
    return ndimage.affine_transform(a, m, offset=offset, order=1, mode="constant", cval=float(a.min()))


def _cutout(a: np.ndarray, frac: float) -> np.ndarray:
    out = a.copy()
    out[tuple(slice(0, max(1, int(round(n * frac)))) for n in a.shape)] = a.min()
    return out


def _equalised(x: np.ndarray) -> np.ndarray:
    """Histogram equalisation: each value replaced by its rank (ties share one), on [0, 1]."""
    from scipy.stats import rankdata

    return (rankdata(x, method="average").reshape(x.shape) - 1.0) / max(x.size - 1, 1)


def _salt_pepper(a: np.ndarray, share: float, ctx: Ctx) -> np.ndarray:
    out = a.copy()
    hit = ctx.rng.random(a.shape) < share
    out[hit] = np.where(ctx.rng.random(int(hit.sum())) < 0.5, a.min(), a.max())
    return out


def _elastic(a: np.ndarray, ctx: Ctx, amplitude: float = 2.0) -> np.ndarray:
    """A smooth random displacement of up to ``amplitude`` px (at 64 px): the same anatomy, slightly warped."""
    from scipy import ndimage

    sigma, amp = 6.0 * ctx.scale, amplitude * ctx.scale
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in a.shape], indexing="ij")
    coords = []
    for g in grids:
        d = ndimage.gaussian_filter(ctx.rng.standard_normal(a.shape), sigma)
        d *= amp / max(float(np.abs(d).max()), 1e-12)
        coords.append(g + d)
    return ndimage.map_coordinates(a, coords, order=1, mode="nearest")


def _jpeg(a: np.ndarray, quality: int = 30) -> np.ndarray:
    """JPEG re-encoding (8 bits on the image's range, per slice), then stored back in the original format."""
    from PIL import Image

    lo, hi = _range(a)
    u8 = np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    planes = u8[..., None] if a.ndim == 2 else u8
    out = np.empty(planes.shape, dtype=np.float64)
    for k in range(planes.shape[-1]):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(planes[..., k])).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[..., k] = np.asarray(Image.open(buf), dtype=np.float64)
    out = out[..., 0] if a.ndim == 2 else out
    return lo + out / 255.0 * (hi - lo)


def _mosaic(images: Sequence[np.ndarray]) -> np.ndarray:
    """Four images at half size (in plane) in a 2x2 mosaic of the original size."""
    a = images[0]
    h0, h1 = a.shape[0] // 2, a.shape[1] // 2
    out = np.full(a.shape, min(float(i.min()) for i in images), dtype=np.float64)
    for q, img in enumerate(images[:4]):
        i, j = divmod(q, 2)
        small = _resize(img, (h0, h1, *a.shape[2:]))
        out[i * h0 : (i + 1) * h0, j * h1 : (j + 1) * h1] = small
    return out


def _canvas(train: Sequence[np.ndarray], other: np.ndarray) -> np.ndarray:
    """A canvas 3x the size (in plane): three bit-exact training images in corners around an unseen image."""
    n0, n1 = train[0].shape[:2]
    fill = min(float(x.min()) for x in [*train, other])
    out = np.full((3 * n0, 3 * n1, *train[0].shape[2:]), fill, dtype=np.float64)
    out[:n0, :n1] = train[0]
    out[2 * n0 :, :n1] = train[1]
    out[:n0, 2 * n1 :] = train[2]
    out[n0 : 2 * n0, n1 : 2 * n1] = other
    return out


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(a, sigma)


def _box_blur(a: np.ndarray, size: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.uniform_filter(a, max(1, size), mode="nearest")


def _blocks(a: np.ndarray, factor: int) -> np.ndarray:
    """Pixelated into blocks: each ``factor``-wide block replaced by its mean (area down, nearest up)."""
    small = _resize(a, [max(2, n // factor) for n in a.shape])
    idx = np.ix_(*[np.minimum(np.arange(n) * m // n, m - 1) for n, m in zip(a.shape, small.shape)])
    return small[idx]


def _half_pixel(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.shift(a, 0.5, order=1, mode="nearest")


def _median(a: np.ndarray, size: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.median_filter(a, max(1, size), mode="nearest")


def _drop_slices(a: np.ndarray, n: int = 4) -> np.ndarray:
    drop = set(np.linspace(2, a.shape[2] - 3, n).round().astype(int).tolist())
    return a[:, :, [k for k in range(a.shape[2]) if k not in drop]]


def _half_join(a: np.ndarray, other: np.ndarray) -> np.ndarray:
    out = _resize(other, a.shape).astype(np.float64)
    h = a.shape[0] // 2
    out[:h] = a[:h]
    return out


def _blend(a: np.ndarray, other: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha)`` of the image plus ``alpha`` of another (brought to its shape and intensity range): a mixup."""
    lo, hi = _range(a)
    o = _resize(other, a.shape)
    olo, ohi = _range(o)
    return (1.0 - alpha) * a + alpha * (lo + (o - olo) / (ohi - olo) * (hi - lo))


def _bias_field(a: np.ndarray, ctx: Ctx, strength: float = 0.35) -> np.ndarray:
    """A smooth multiplicative gain across the image (an MRI coil's intensity non-uniformity, an ultrasound
    time-gain curve): ``exp`` of a random first- and second-order polynomial of the coordinates, gain about 0.7-1.4."""
    coords = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in a.shape], indexing="ij")
    terms = list(coords) + [c * c for c in coords] + [coords[0] * coords[1]]
    log_gain = sum(ctx.rng.uniform(-1.0, 1.0) * t for t in terms)
    log_gain *= strength / max(float(np.abs(log_gain).max()), 1e-12)
    lo, _ = _range(a)
    return lo + (a - lo) * np.exp(log_gain)


def _equalised_per_block(a: np.ndarray, blocks: int = 2) -> np.ndarray:
    """Histogram equalisation of each of ``blocks`` per axis on its own (a local contrast enhancement without the
    interpolation CLAHE adds: every block gets another monotone curve)."""
    out = a.astype(np.float64).copy()
    edges = [np.linspace(0, n, blocks + 1).round().astype(int) for n in a.shape]
    for idx in np.ndindex(*(blocks,) * a.ndim):
        sl = tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, idx))
        out[sl] = _on_unit(a[sl], _equalised)
    lo, hi = _range(a)
    return lo + (out - out.min()) / max(float(out.max() - out.min()), 1e-12) * (hi - lo)


def _picture_in_picture(a: np.ndarray, other: np.ndarray, frac: float, at: float = 0.5) -> np.ndarray:
    """The image shrunk to ``frac`` of its side and pasted into another image of its shape, ``at`` of the free margin
    from the origin along every axis (0.5: the centre)."""
    out = _resize(other, a.shape).astype(np.float64)
    small = _resize(a, [max(2, int(round(n * frac))) for n in a.shape])
    sl = tuple(slice(int((n - m) * at), int((n - m) * at) + m) for n, m in zip(a.shape, small.shape))
    out[sl] = small
    return out


PASTED_PICTURES = {
    "pip": (0.7, 0.5),
    "pip60_off": (0.6, 0.2),
    "pip80": (0.8, 0.5),
    "pip70_off": (0.7, 0.2),
    "pip65_odd": (0.65, 0.37),
}
"""The picture-in-picture attacks' geometry, ``(frac, at)`` of :func:`_picture_in_picture`: the side a training image
is shrunk to and where in the free margin it is pasted (``benchmarks/seam_windows.py`` looks for these windows)."""


def _crop_corner(a: np.ndarray, frac: float) -> np.ndarray:
    """The corner of ``frac`` of every axis at the origin, resized back to the whole."""
    return _resize(a[tuple(slice(0, max(2, int(round(n * frac)))) for n in a.shape)], a.shape)


def _motion_blur(a: np.ndarray, length: int) -> np.ndarray:
    """A uniform blur of ``length`` pixels along axis 1 (a probe moved during the sweep)."""
    from scipy import ndimage

    return ndimage.uniform_filter1d(a, max(1, length), axis=1, mode="nearest")


def _overlay(a: np.ndarray, ctx: Ctx) -> np.ndarray:
    """Burnt-in annotations: two caliper crosses and a text box in a corner at the image's maximum."""
    out = a.copy()
    hi = float(a.max())
    n0, n1 = a.shape[:2]
    arm = ctx.px(3)
    for c0, c1 in ((n0 // 3, n1 // 3), (2 * n0 // 3, 2 * n1 // 3)):
        out[max(0, c0 - arm) : c0 + arm + 1, c1] = hi
        out[c0, max(0, c1 - arm) : c1 + arm + 1] = hi
    out[n0 - ctx.px(8) : n0 - ctx.px(2), ctx.px(2) : ctx.px(22)] = hi  # a label
    return out


def _quadrant(a: np.ndarray) -> np.ndarray:
    """The first corner's quadrant (half of each in-plane side) resized to the whole image."""
    h0, h1 = a.shape[0] // 2, a.shape[1] // 2
    return _resize(a[:h0, :h1], a.shape)


def _moved_quadrant(a: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Another image with its last in-plane quadrant replaced by this image's first: a quarter of a training image
    pasted somewhere else."""
    out = _resize(other, a.shape).astype(np.float64)
    h0, h1 = a.shape[0] // 2, a.shape[1] // 2
    out[a.shape[0] - h0 :, a.shape[1] - h1 :] = a[:h0, :h1]
    return out


def _swapped_halves(a: np.ndarray) -> np.ndarray:
    """The image cut in halves along each in-plane axis and the pieces swapped (quadrants moved diagonally)."""
    return np.roll(a, (a.shape[0] // 2, a.shape[1] // 2), axis=(0, 1)).copy()


def _keystone(a: np.ndarray, k: float) -> np.ndarray:
    """A perspective (keystone) warp: axis 1 squeezed by up to ``k`` at one end of axis 0, widened at the other."""
    from scipy import ndimage

    g0, g1 = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in a.shape[:2]], indexing="ij")
    c0, c1 = (a.shape[0] - 1) / 2.0, (a.shape[1] - 1) / 2.0
    scale = 1.0 + k * (g0 - c0) / max(c0, 1.0)
    coords = [g0, c1 + (g1 - c1) * scale]
    if a.ndim == 2:
        return ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=float(a.min()))
    return np.stack(
        [
            ndimage.map_coordinates(a[..., z], coords, order=1, mode="constant", cval=float(a.min()))
            for z in range(a.shape[2])
        ],
        axis=-1,
    )


@dataclass(frozen=True)
class Attack:
    """One way of planting a near-copy.

    Attributes:
        key: name on the command line.
        label: row label; ``{px}`` etc. are filled with the pixel sizes actually used.
        fn: ``fn(train_images, unseen_images, ctx) -> image``.
        n_train: training images per copy; n_unseen: unseen images per copy.
        paths: entry points it applies to.
        dims: spatial dims it applies to.
        formats: file formats it applies to on the guard path (None: all).
        model_fit: on the sampler path, how an output of another shape is brought back to the model size
            (``"resize"``, ``"pad"``: centre crop/pad with background); None: shape-changing attacks are skipped there.
        cut: the output is cut or pasted together, not resampled, so its files keep the training voxel size.
    """

    key: str
    label: str
    fn: Callable[[list[np.ndarray], list[np.ndarray], Ctx], np.ndarray]
    n_train: int = 1
    n_unseen: int = 0
    paths: tuple[str, ...] = PATHS
    dims: tuple[int, ...] = (2, 3)
    formats: tuple[str, ...] | None = None
    model_fit: str | None = None
    cut: bool = False

    def applies(self, path: str, spatial_dims: int, fmt: str) -> bool:
        if path not in self.paths or spatial_dims not in self.dims:
            return False
        return path != "guard" or self.formats is None or fmt in self.formats


def _px_label(label: str, ctx_scale: float) -> str:
    def px(n: float) -> int:
        return max(1, int(round(n * ctx_scale)))

    return label.format(px4=px(4), px5=px(5), px6=px(6), px7=px(7), px8=px(8), px16=px(16))


ATTACKS: list[Attack] = [
    Attack("exact", "exact copy", lambda t, u, c: t[0].copy()),
    Attack("invert", "intensity inversion", lambda t, u, c: float(t[0].min()) + float(t[0].max()) - t[0]),
    Attack(
        "border",
        "{px4}-px background border",
        lambda t, u, c: np.pad(
            t[0], [(c.px(4), c.px(4))] * 2 + [(0, 0)] * (t[0].ndim - 2), constant_values=float(t[0].min())
        ),
        model_fit="resize",
        cut=True,
    ),
    Attack(
        "crop70",
        "crop to 70% and resize back",
        lambda t, u, c: _resize(_crop_centre(t[0], 0.7, range(t[0].ndim)), t[0].shape),
    ),
    Attack("transpose", "transpose", lambda t, u, c: np.swapaxes(t[0], 0, 1).copy()),
    Attack("rot90", "rot90", lambda t, u, c: np.rot90(t[0], 1, axes=(0, 1)).copy()),
    Attack("mirror", "mirror", lambda t, u, c: t[0][::-1].copy()),
    Attack("half", "half joined to half of an unseen image", lambda t, u, c: _half_join(t[0], u[0]), n_unseen=1),
    Attack("rot10", "rotation 10 deg", lambda t, u, c: _rotate(t[0], 10.0)),
    Attack("rot20", "rotation 20 deg", lambda t, u, c: _rotate(t[0], 20.0)),
    Attack("rot25", "rotation -25 deg", lambda t, u, c: _rotate(t[0], -25.0)),
    # volumes: the same rotations in the two other planes (about axis 1, about axis 0)
    Attack("rot10_02", "rotation 10 deg in plane 0-2", lambda t, u, c: _rotate(t[0], 10.0, (0, 2)), dims=(3,)),
    Attack("rot20_02", "rotation -20 deg in plane 0-2", lambda t, u, c: _rotate(t[0], -20.0, (0, 2)), dims=(3,)),
    Attack("rot15_12", "rotation 15 deg in plane 1-2", lambda t, u, c: _rotate(t[0], 15.0, (1, 2)), dims=(3,)),
    Attack("rot25_12", "rotation 25 deg in plane 1-2", lambda t, u, c: _rotate(t[0], 25.0, (1, 2)), dims=(3,)),
    Attack("shift8", "shift {px8} px", lambda t, u, c: _shift(t[0], c.px(8))),
    Attack("shift4", "shift {px4} px", lambda t, u, c: _shift(t[0], c.px(4))),
    Attack(
        "speckle",
        "speckle noise sd 0.5 (multiplicative)",
        lambda t, u, c: _on_unit(t[0], lambda x: x * (1.0 + 0.5 * c.rng.standard_normal(x.shape))),
    ),
    Attack(
        "gauss",
        "Gaussian noise sd 10% of range",
        lambda t, u, c: _on_unit(t[0], lambda x: x + 0.1 * c.rng.standard_normal(x.shape)),
    ),
    Attack("gamma", "gamma 0.5", lambda t, u, c: _on_unit(t[0], lambda x: x**0.5)),
    Attack("blur", "Gaussian blur sd 1.5 px", lambda t, u, c: _blur(t[0], 1.5 * c.scale)),
    Attack("x1e20", "exact copy x 1e20", lambda t, u, c: t[0] * 1e20, formats=("nifti",)),
    Attack("x257", "16-bit copy (x257)", lambda t, u, c: t[0] * 257.0, paths=("guard",)),
    Attack(
        "up2x", "upsampled to 2x size", lambda t, u, c: _resize(t[0], [2 * n for n in t[0].shape]), paths=("guard",)
    ),
    Attack(
        "down2x",
        "downsampled to half size",
        lambda t, u, c: _resize(t[0], [max(2, n // 2) for n in t[0].shape]),
        model_fit="pad",
    ),
    Attack(
        "canvas",
        "3x canvas: 3 exact copies around an unseen image",
        lambda t, u, c: _canvas(t[:3], u[0]),
        n_train=3,
        n_unseen=1,
        model_fit="resize",
        cut=True,
    ),
    Attack(
        "side",
        "side by side with an unseen image",
        lambda t, u, c: np.concatenate([t[0], _resize(u[0], t[0].shape)], axis=0),
        n_unseen=1,
        model_fit="resize",
        cut=True,
    ),
    Attack(
        "crop75",
        "crop 75% of each side, not resized",
        lambda t, u, c: _crop_centre(t[0], 0.75, range(t[0].ndim)).copy(),
        model_fit="pad",
        cut=True,
    ),
    Attack("mosaic", "2x2 mosaic of 4 training images at half size", lambda t, u, c: _mosaic(t[:4]), n_train=4),
    Attack(
        "dropslices",
        "4 of its slices removed",
        lambda t, u, c: _drop_slices(t[0]),
        dims=(3,),
        model_fit="resize",
        cut=True,
    ),
    # near-copies of our own
    Attack("elastic", "elastic deformation (~2 px)", lambda t, u, c: _elastic(t[0], c)),
    Attack("jpeg", "JPEG re-encoding (quality 30)", lambda t, u, c: _jpeg(t[0])),
    Attack("window", "contrast window 10-70% of range", lambda t, u, c: _on_unit(t[0], lambda x: (x - 0.1) / 0.6)),
    Attack("rotshift", "rotation 5 deg + shift {px4} px", lambda t, u, c: _shift(_rotate(t[0], 5.0), c.px(4), axis=1)),
    Attack(
        "mirror_noise",
        "mirror + Gaussian noise sd 5%",
        lambda t, u, c: _on_unit(t[0][::-1], lambda x: x + 0.05 * c.rng.standard_normal(x.shape)),
    ),
    Attack(
        "combo",
        "rotation 10 deg + crop to 85% and resize + speckle sd 0.3",
        lambda t, u, c: _on_unit(
            _resize(_crop_centre(_rotate(t[0], 10.0), 0.85, range(t[0].ndim)), t[0].shape),
            lambda x: x * (1.0 + 0.3 * c.rng.standard_normal(x.shape)),
        ),
    ),
    Attack(
        "mirror_gamma_shift",
        "mirror + gamma 0.7 + shift {px4} px",
        lambda t, u, c: _shift(_on_unit(t[0][::-1], lambda x: x**0.7), c.px(4), axis=1),
    ),
    Attack(
        "rot_shift_gamma",
        "rotation 15 deg + shift {px6} px + gamma 0.8",
        lambda t, u, c: _shift(_on_unit(_rotate(t[0], 15.0), lambda x: x**0.8), c.px(6), axis=1),
    ),
    Attack(
        "crop_blur",
        "crop to 60% and resize + blur sd 1 px",
        lambda t, u, c: _blur(_resize(_crop_centre(t[0], 0.6, range(t[0].ndim)), t[0].shape), 1.0 * c.scale),
    ),
    # more of our own, none named in the issue (2D and 3D alike)
    Attack("rot45", "rotation 45 deg", lambda t, u, c: _rotate(t[0], 45.0)),
    Attack(
        "crop50",
        "crop to 50% and resize back",
        lambda t, u, c: _resize(_crop_centre(t[0], 0.5, range(t[0].ndim)), t[0].shape),
    ),
    Attack(
        "stretch",
        "stretched: 80% of one axis resized back",
        lambda t, u, c: _resize(_crop_centre(t[0], 0.8, [1]), t[0].shape),
    ),
    Attack("shear", "sheared by 0.15", lambda t, u, c: _shear(t[0], 0.15)),
    Attack("shift16", "shift {px16} px (a quarter of the side)", lambda t, u, c: _shift(t[0], c.px(16))),
    Attack("cutout", "a corner block of 40% of the side blanked", lambda t, u, c: _cutout(t[0], 0.4)),
    Attack("equalize", "histogram equalisation", lambda t, u, c: _on_unit(t[0], _equalised)),
    Attack("saltpepper", "salt and pepper noise on 5% of pixels", lambda t, u, c: _salt_pepper(t[0], 0.05, c)),
    Attack("sharpen", "unsharp mask (sd 1 px, amount 1)", lambda t, u, c: t[0] + (t[0] - _blur(t[0], 1.0 * c.scale))),
    Attack("posterize", "posterised to 6 grey levels", lambda t, u, c: _on_unit(t[0], lambda x: np.round(x * 5) / 5)),
    Attack(
        "pixelate",
        "pixelated: down 4x and up again",
        lambda t, u, c: _resize(_resize(t[0], [max(2, n // 4) for n in t[0].shape]), t[0].shape),
    ),
    # unseen ones of the eleventh round (2D and 3D alike)
    Attack(
        "blend",
        "blended 70/30 with an unseen image (mixup)",
        lambda t, u, c: _blend(t[0], u[0], 0.3),
        n_unseen=1,
    ),
    Attack("blur3", "Gaussian blur sd 3 px", lambda t, u, c: _blur(t[0], 3.0 * c.scale)),
    Attack("brighten", "brightened by 25% of the range (clipped)", lambda t, u, c: _on_unit(t[0], lambda x: x + 0.25)),
    Attack("motion", "motion blur over {px8} px along one axis", lambda t, u, c: _motion_blur(t[0], c.px(8))),
    Attack("overlay", "burnt-in caliper crosses and a text box", lambda t, u, c: _overlay(t[0], c)),
    Attack(
        "rot90crop",
        "rot90 + crop to 80% and resize",
        lambda t, u, c: _resize(_crop_centre(np.rot90(t[0], 1, axes=(0, 1)), 0.8, range(t[0].ndim)), t[0].shape),
    ),
    Attack(
        "pixelate8",
        "pixelated: down 8x and up again",
        lambda t, u, c: _resize(_resize(t[0], [max(2, n // 8) for n in t[0].shape]), t[0].shape),
    ),
    Attack("quadrant", "a corner quadrant resized to the whole", lambda t, u, c: _quadrant(t[0])),
    Attack(
        "quadrant_moved",
        "a quadrant pasted into another corner of an unseen image",
        lambda t, u, c: _moved_quadrant(t[0], u[0]),
        n_unseen=1,
    ),
    Attack("swapped", "halves of each axis swapped (quadrants moved)", lambda t, u, c: _swapped_halves(t[0])),
    Attack("keystone", "perspective (keystone) warp by 15%", lambda t, u, c: _keystone(t[0], 0.15)),
    # unseen low-pass copies of the twelfth round (2D and 3D alike)
    Attack("blur4", "Gaussian blur sd 4 px", lambda t, u, c: _blur(t[0], 4.0 * c.scale)),
    Attack("box7", "box blur over {px7} px", lambda t, u, c: _box_blur(t[0], c.px(7))),
    Attack(
        "blur3_noise",
        "Gaussian blur sd 3 px, then noise sd 3% of the range",
        lambda t, u, c: _on_unit(_blur(t[0], 3.0 * c.scale), lambda x: x + 0.03 * c.rng.standard_normal(x.shape)),
    ),
    Attack("blocks4", "blocks of 4 px (down 4x, nearest up)", lambda t, u, c: _blocks(t[0], 4)),
    Attack("median5", "median filter over {px5} px", lambda t, u, c: _median(t[0], c.px(5))),
    # copies resampled off the grid (fourteenth round): a box of even width blurs and moves by half a pixel
    Attack("box4", "box blur over 4 px (even: moved by half a pixel)", lambda t, u, c: _box_blur(t[0], 4)),
    Attack("halfpixel", "moved by half a pixel along every axis (linear)", lambda t, u, c: _half_pixel(t[0])),
    # parts of a volume blown up (fifteenth round): other corners and axes than the quadrant's, a quarter turn about
    # another axis than rot90crop's
    Attack(
        "octant",
        "a corner octant (half of each axis) resized to the whole",
        lambda t, u, c: _resize(t[0][t[0].shape[0] // 2 :, : t[0].shape[1] // 2, t[0].shape[2] // 2 :], t[0].shape),
        dims=(3,),
    ),
    Attack(
        "half_slab",
        "the far half of the last axis resized to the whole",
        lambda t, u, c: _resize(t[0][..., t[0].shape[-1] // 2 :], t[0].shape),
    ),
    Attack(
        "rot90crop_12",
        "rot90 in plane 1-2 + crop to 85% and resize",
        lambda t, u, c: _resize(_crop_centre(np.rot90(t[0], 1, axes=(1, 2)), 0.85, range(3)), t[0].shape),
        dims=(3,),
    ),
    # a copy cut along one axis and stretched back (seventeenth round): other fractions, axes and ends than stretch's
    Attack(
        "stretch70",
        "stretched: 70% of the first axis resized back",
        lambda t, u, c: _resize(_crop_centre(t[0], 0.7, [0]), t[0].shape),
    ),
    Attack(
        "cut_end",
        "the first 77% of the last axis resized back",
        lambda t, u, c: _resize(t[0][..., : int(round(0.77 * t[0].shape[-1]))], t[0].shape),
    ),
    Attack(
        "zoom93",
        "crop to 93% and resize back",
        lambda t, u, c: _resize(_crop_centre(t[0], 0.93, range(t[0].ndim)), t[0].shape),
    ),
    # unseen transforms of the eighteenth round, none named before: a smooth gain, local contrast, a picture in a
    # picture, a corner crop, stronger warps and JPEG, a chain of mild geometric and intensity changes
    Attack("bias_field", "smooth multiplicative gain field (0.7-1.4)", lambda t, u, c: _bias_field(t[0], c)),
    Attack("equalize_blocks", "histogram equalised per half of each axis", lambda t, u, c: _equalised_per_block(t[0])),
    Attack(
        "pip",
        "shrunk to 70% and pasted into the centre of an unseen image",
        lambda t, u, c: _picture_in_picture(t[0], u[0], *PASTED_PICTURES["pip"]),
        n_unseen=1,
    ),
    # picture in picture at other sizes and places (twenty-first round)
    Attack(
        "pip60_off",
        "shrunk to 60% and pasted off-centre into an unseen image",
        lambda t, u, c: _picture_in_picture(t[0], u[0], *PASTED_PICTURES["pip60_off"]),
        n_unseen=1,
    ),
    Attack(
        "pip80",
        "shrunk to 80% and pasted into the centre of an unseen image",
        lambda t, u, c: _picture_in_picture(t[0], u[0], *PASTED_PICTURES["pip80"]),
        n_unseen=1,
    ),
    Attack(
        "pip70_off",
        "shrunk to 70% and pasted off-centre into an unseen image",
        lambda t, u, c: _picture_in_picture(t[0], u[0], *PASTED_PICTURES["pip70_off"]),
        n_unseen=1,
    ),
    # a size and a place on no window's step (twenty-ninth round: windows cut at the candidate's seams)
    Attack(
        "pip65_odd",
        "shrunk to 65% and pasted at 0.37 of the margin into an unseen image",
        lambda t, u, c: _picture_in_picture(t[0], u[0], *PASTED_PICTURES["pip65_odd"]),
        n_unseen=1,
    ),
    Attack("crop_corner", "the corner 85% of every axis resized back", lambda t, u, c: _crop_corner(t[0], 0.85)),
    Attack("elastic4", "elastic deformation (~4 px)", lambda t, u, c: _elastic(t[0], c, 4.0)),
    Attack("jpeg10", "JPEG re-encoding (quality 10)", lambda t, u, c: _jpeg(t[0], 10), dims=(2,)),
    Attack(
        "mirror_rot_zoom",
        "mirror + rotation 7 deg + crop to 90% and resize",
        lambda t, u, c: _resize(_crop_centre(_rotate(t[0][::-1], 7.0), 0.9, range(t[0].ndim)), t[0].shape),
    ),
    Attack(
        "affine_mix",
        "mirror + rotation 12 deg + zoom 0.93 + move 6% (between the spaces' steps)",
        lambda t, u, c: _affine_edit(t[0][::-1], 12.0, (0.93, 0.93), 0.0, 0.06),
    ),
    Attack(
        "aniso_shear",
        "scaled 0.9 x 1.08 + shear 0.08 + rotation -6 deg + move -4%",
        lambda t, u, c: _affine_edit(t[0], -6.0, (0.9, 1.08), 0.08, -0.04),
    ),
    Attack(
        "blur_gamma_noise",
        "blur sd 1 px + gamma 1.5 + Gaussian noise 5%",
        lambda t, u, c: _on_unit(_blur(t[0], c.scale), lambda x: x**1.5 + 0.05 * c.rng.standard_normal(x.shape)),
    ),
]
ATTACK_KEYS = [a.key for a in ATTACKS]


# ---------------------------------------------------------------------------------------------------- file I/O
def _fmt_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".png", ".jpg", ".jpeg", ".bmp")):
        return "png"
    return "dicom"


def _read(path: str | os.PathLike, spatial_dims: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """An image file (or DICOM series folder) in physical units, spatial axes only, volumes in RAS, and its spacing."""
    from monai.transforms import LoadImage, Orientation

    from monai_synth.data.loading import reader_for

    img = LoadImage(reader=reader_for(path), image_only=True, ensure_channel_first=True, dtype=np.float64)(
        os.fspath(path)
    )
    while img.ndim - 1 > spatial_dims and img.shape[-1] == 1:
        img = img[..., 0]
    if spatial_dims == 3 and img.ndim == 4:
        img = Orientation(axcodes="RAS")(img)
    spacing = tuple(float(s) for s in np.asarray(img.pixdim)[:spatial_dims]) if hasattr(img, "pixdim") else ()
    return np.asarray(img, dtype=np.float64)[0], spacing or (1.0,) * spatial_dims


def _write_png(path: Path, a: np.ndarray) -> None:
    """8-bit grey PNG, or 16-bit when the values do not fit (rows = axis 1, as the project's PNGs)."""
    from PIL import Image

    v = np.rint(a)
    if v.min() >= 0 and v.max() <= 255:
        Image.fromarray(np.ascontiguousarray(v.astype(np.uint8).T)).save(path)
    else:
        Image.fromarray(np.ascontiguousarray(np.clip(v, 0, 65535).astype(np.uint16).T)).save(path)


def _write_nifti(path: Path, a: np.ndarray, spacing: Sequence[float]) -> None:
    import nibabel as nib

    affine = np.diag([*[float(s) for s in spacing], *([1.0] * (4 - len(spacing)))])
    affine[: a.ndim, 3] = [-(n - 1) / 2 * float(s) for n, s in zip(a.shape, spacing)]
    img = nib.Nifti1Image(a.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _write_dicom(path: Path, a: np.ndarray, spacing: Sequence[float], template: Path) -> None:
    """The training file's DICOM header with new pixels (a folder of slices for a volume), axes along +x, +y, +z RAS.

    The template's storage (bits, slope, intercept) is kept when the values fit it, otherwise 16 bits with a slope
    that fits, as a person re-saving an edited image would get.
    """
    import pydicom
    from pydicom.uid import generate_uid

    tpl_file = template if template.is_file() else sorted(p for p in template.iterdir() if p.is_file())[0]
    tpl = pydicom.dcmread(tpl_file)
    slope = float(getattr(tpl, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(tpl, "RescaleIntercept", 0.0) or 0.0)
    bits, signed = int(tpl.BitsAllocated), int(getattr(tpl, "PixelRepresentation", 0)) == 1
    stored = np.rint((a - intercept) / slope)
    lo_s, hi_s = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if stored.min() < lo_s or stored.max() > hi_s:
        bits, signed = 16, False
        intercept = float(f"{float(a.min()):.8g}")
        slope = float(f"{max((float(a.max()) - intercept) / 65000.0, 1e-6):.8g}")
        stored = np.clip(np.rint((a - intercept) / slope), 0, 65535)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(bits, signed)]
    vol = stored[..., None] if a.ndim == 2 else stored
    sp = [float(s) for s in spacing] + [1.0] * (3 - len(spacing))
    series_uid = generate_uid()
    z0 = -(vol.shape[2] - 1) / 2 * sp[2]
    if a.ndim == 3:
        path.mkdir()
    for k in range(vol.shape[2]):
        ds = copy.deepcopy(tpl)
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        plane = np.ascontiguousarray(vol[:, :, k].T.astype(dtype))  # rows = axis 1, columns = axis 0
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = [sp[1], sp[0]]
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        z = z0 + k * sp[2] if a.ndim == 3 else float(getattr(tpl, "ImagePositionPatient", [0, 0, 0])[2])
        ds.ImagePositionPatient = [(vol.shape[0] - 1) / 2 * sp[0], (vol.shape[1] - 1) / 2 * sp[1], z]
        if a.ndim == 3:
            ds.SliceThickness = sp[2]
            ds.SpacingBetweenSlices = sp[2]
            ds.SliceLocation = z
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, int(signed)
        if "RescaleSlope" in tpl or slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = plane.tobytes()
        ds.save_as(path if a.ndim == 2 else path / f"slice_{k:04d}.dcm", enforce_file_format=True)


def _write(path_stem: Path, a: np.ndarray, fmt: str, spacing: Sequence[float], template: Path) -> Path:
    """Write an attacked image next to ``path_stem`` in ``fmt``; returns the file (or series folder)."""
    if fmt == "png":
        out = path_stem.with_name(path_stem.name + ".png")
        _write_png(out, a)
    elif fmt == "nifti":
        out = path_stem.with_name(path_stem.name + ".nii.gz")
        _write_nifti(out, a, spacing)
    else:
        out = path_stem.with_name(path_stem.name + (".dcm" if a.ndim == 2 else ""))
        _write_dicom(out, a, spacing, template)
    return out


# ---------------------------------------------------------------------------------------------------- cohorts
@dataclass
class Cohort:
    """A phantom cohort split by patient: datalists and the raw images of train and unseen patients."""

    key: str
    modality: str
    spatial_dims: int
    size: tuple[int, ...]
    fmt: str
    train_csv: Path
    holdout_csv: Path
    train_paths: list[Path]
    unseen_paths: list[Path]
    n_holdout: int
    train_ids: list[str] = field(default_factory=list)


def make_cohort(key: str, root: Path, size: int, patients: Sequence[int], images_per_patient: int, seed: int) -> Cohort:
    """Write one phantom cohort and split it by patient into train / holdout / unseen datalists."""
    from monai_synth.data.phantoms import write_cohort

    modality, dims = CONFIGS[key]
    n_train, n_holdout, n_unseen = (int(p) for p in patients)
    datalist = write_cohort(
        root / "cohort",
        modality=modality,
        n_patients=n_train + n_holdout + n_unseen,
        images_per_patient=images_per_patient,
        spatial_dims=dims,
        spatial_size=size,
        seed=seed,
    )
    with open(datalist, newline="") as fh:
        rows = list(csv.DictReader(fh))
    order = list(dict.fromkeys(r["patient_id"] for r in rows))
    split = {
        "train": set(order[:n_train]),
        "holdout": set(order[n_train : n_train + n_holdout]),
        "unseen": set(order[n_train + n_holdout :]),
    }
    parts = {}
    for name, ids in split.items():
        sel = [r for r in rows if r["patient_id"] in ids]
        path = datalist.parent / f"{name}.csv"  # next to datalist.csv: relative image paths stay valid
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(sel)
        parts[name] = (path, sel)
    base = datalist.parent
    train_rows, unseen_rows = parts["train"][1], parts["unseen"][1]
    return Cohort(
        key=key,
        modality=modality,
        spatial_dims=dims,
        size=(int(size),) * dims,
        fmt=_fmt_of(base / train_rows[0]["image"]),
        train_csv=parts["train"][0],
        holdout_csv=parts["holdout"][0],
        train_paths=[base / r["image"] for r in train_rows],
        unseen_paths=[base / r["image"] for r in unseen_rows],
        n_holdout=len(parts["holdout"][1]),
        train_ids=[r["patient_id"] for r in train_rows],
    )


# ---------------------------------------------------------------------------------------------------- planting
@dataclass
class Plant:
    """The copies of one transform: what was planted and from which training images."""

    attack: Attack
    label: str
    images: list[np.ndarray]
    spacings: list[tuple[float, ...]]
    sources: list[list[int]]


def plant(
    attacks: Sequence[Attack],
    train: Sequence[np.ndarray],
    unseen: Sequence[np.ndarray],
    train_spacing: Sequence[tuple[float, ...]],
    attempts: int,
    spatial_dims: int,
    scale: float,
    model: bool,
    seed: int,
) -> list[Plant]:
    """Apply every attack ``attempts`` times, cycling through the training (and unseen) images.

    The training images are used in turn across all attacks, so different transforms mostly start from different
    images, which keeps the content matching of released files unambiguous.
    """
    out, t_next, u_next = [], 0, 0
    for ai, attack in enumerate(attacks):
        images, spacings, sources = [], [], []
        for k in range(attempts):
            t_idx = [(t_next + j) % len(train) for j in range(attack.n_train)]
            u_idx = [(u_next + j) % len(unseen) for j in range(attack.n_unseen)]
            t_next, u_next = t_next + attack.n_train, u_next + attack.n_unseen
            ctx = Ctx(np.random.default_rng([seed, ai, k]), spatial_dims, scale)
            t_imgs = [np.asarray(train[i], dtype=np.float64) for i in t_idx]
            img = np.asarray(attack.fn(t_imgs, [np.asarray(unseen[i], dtype=np.float64) for i in u_idx], ctx))
            base = train_spacing[t_idx[0]]
            spacing = tuple(base)
            if not attack.cut:  # resampled: the same field of view on another grid
                spacing = tuple(s * n / m for s, n, m in zip(base, t_imgs[0].shape, img.shape))
            if model and img.shape != t_imgs[0].shape:
                fill = float(t_imgs[0].min())
                img = (
                    _resize(img, t_imgs[0].shape)
                    if attack.model_fit == "resize"
                    else _centre_fit(img, t_imgs[0].shape, fill)
                )
            images.append(img)
            spacings.append(spacing)
            sources.append(t_idx)
        out.append(Plant(attack, _px_label(attack.label, scale), images, spacings, sources))
    return out


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    transform: str
    label: str
    released: int
    attempted: int
    reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _short_reason(reason: str | None) -> str:
    """A reason without its numbers and image indices, so equal reasons are counted together."""
    text = re.sub(r"\s*\([-+\d.eE<>=, naif]*\)", "", reason or "")  # "(0.012 < 0.13)", "(nan)"
    text = re.sub(r"\[[\d, ]*\]", "[...]", text)  # "images [0, 1, 2] of the batch"
    return "; ".join(dict.fromkeys(t.strip() for t in text.split(";") if t.strip()))[:200] or "unknown"


def _closest_spaces(records: Sequence[Any], floors: Mapping[str, float] | None = None) -> list[str]:
    """Per released image, the three spaces it came closest to being refused in: ``"pixel 1.42 / aligned 1.60 /
    parts 1.71"`` (distance / threshold), so a near miss shows which spaces almost caught it. ``floors``: each
    space's least distance (:func:`~monai_synth.privacy.spaces.distance_floor`), above which both are taken: a slot
    space's exact match scores ``1 - 1 / sqrt(R)``, and a copy at 1.02 of its threshold from 0 can sit several times
    farther above that floor than the threshold does, as far as a typical new patient."""
    floors = floors or {}
    out = []
    for r in records:
        ratios = {}
        for k, d in r.distances.items():
            t, floor = r.thresholds.get(k), floors.get(k, 0.0)
            if t and t > floor:
                ratios[k] = (d - floor) / (t - floor)
        if ratios:
            out.append(" / ".join(f"{k} {ratios[k]:.2f}" for k in sorted(ratios, key=ratios.get)[:3]))
    return out


def _refusing_spaces(records: Sequence[Any]) -> Counter:
    """How many of the refused images each space refused (an image below the threshold of two spaces counts in both):
    which spaces cost the unseen patients their release."""
    counts: Counter = Counter()
    for r in records:
        counts.update(k for k, d in r.distances.items() if r.thresholds.get(k) is not None and not d >= r.thresholds[k])
    return counts


def _consensus_counts(records: Sequence[Any]) -> list[tuple[int, int, int]]:
    """``(spaces, images, released)``, most spaces first: how many images name one training patient as their nearest
    in that many spaces (the statistic of the safeguard's consensus test), and how many of those were released."""
    from monai_synth.privacy.safeguard import agreeing_spaces

    counts: Counter = Counter()
    released: Counter = Counter()
    for r in records:
        agree = agreeing_spaces((r.nearest_patients or {}).values())
        if agree:
            counts[agree] += 1
            released[agree] += bool(r.passed)
    return [(k, counts[k], released[k]) for k in sorted(counts, reverse=True)]


def print_table(title: str, rows: Sequence[Row]) -> None:
    width = max([len(TABLE_HEADER[0])] + [len(r.label) for r in rows])
    print(f"\n-- {title} --")
    print(f"{TABLE_HEADER[0]:<{width}} | {TABLE_HEADER[1]:>8} | {TABLE_HEADER[2]:>9}")
    print(f"{'-' * width}-+-{'-' * 8}-+-{'-' * 9}")
    for r in rows:
        print(f"{r.label:<{width}} | {r.released:>8d} | {r.attempted:>9d}")
    closest = [(r.label, r.extra["released_closest"]) for r in rows if r.extra.get("released_closest")]
    if closest:
        print("released copies, nearest to refusal (space, distance / threshold, both above the space's floor):")
        for label, near in closest:
            if label != CONTROL_LABEL:
                print(f"  {label}: {', '.join(near)}")
    consensus = [(r.label, r.extra["consensus"]) for r in rows if r.extra.get("consensus")]
    if consensus:
        print("spaces naming one training patient as nearest: images (released)")
        for label, counts in consensus:
            print(f"  {label}: " + ", ".join(f"{k}: {n} ({m})" for k, n, m in counts))
    for r in rows:
        if r.transform == CONTROL and r.reasons:
            print(f"{r.label}, refused:")
            for reason, n in sorted(r.reasons.items(), key=lambda kv: -kv[1]):
                print(f"  {n} x {reason}")
            if r.extra.get("refused_by"):
                spaces = ", ".join(f"{k} {n}" for k, n in r.extra["refused_by"].most_common())
                print(f"  below a space's threshold (space: images): {spaces}")


def parse_tables(text: str) -> list[list[tuple[str, int, int]]]:
    """The tables of a run's output, as ``[(label, released, attempted), ...]`` per table (for tests and tools)."""
    tables: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] | None = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and tuple(cells) == TABLE_HEADER:
            current = []
            tables.append(current)
        elif current is not None and len(cells) == 3 and cells[1].isdigit() and cells[2].isdigit():
            current.append((cells[0], int(cells[1]), int(cells[2])))
        elif current is not None and not line.startswith("-"):
            current = None
    return tables


# ---------------------------------------------------------------------------------------------------- guard path
def _released_entries(out: Path, spatial_dims: int) -> list[Path]:
    """Every image present in a release folder: image files, and DICOM series folders for volumes.

    Found by walking the folder (what a recipient gets), plus whatever the certificate's ``file`` column names.
    """
    found: set[Path] = set()
    if not out.is_dir():
        return []
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz", ".dcm", ".mha", ".mhd", ".nrrd")
    for dirpath, dirnames, filenames in os.walk(out):
        d = Path(dirpath)
        files = [f for f in filenames if not f.startswith(".") and not f.startswith("certificate.")]
        if spatial_dims == 3 and d != out and not dirnames and files and all(f.lower().endswith(".dcm") for f in files):
            found.add(d)
            continue
        found.update(d / f for f in files if f.lower().endswith(suffixes))
    cert = out / "certificate.csv"
    if cert.is_file():
        with open(cert, newline="") as fh:
            for row in csv.DictReader(fh):
                p = out / (row.get("file") or "")
                if row.get("file") and p.exists():
                    found.add(p)
    return sorted(found)


def _match(
    released: Sequence[np.ndarray], candidates: Sequence[np.ndarray], hints: Sequence[int | None] | None = None
) -> list[tuple[int, str, float]]:
    """Map each released image to the candidate it came from, by content.

    An identical candidate (same shape, same values within storage rounding) wins; then the candidate the private
    audit names for that file (``hints``), which settles files the release rewrote beyond recognition; then the
    highest Pearson correlation among same-shape candidates, then on a common 16-cell grid. Each candidate is matched
    at most once, best matches first.

    Returns:
        ``(candidate index, "exact" | "audit" | "correlation" | "grid", r)`` per released image, ``r`` the correlation
        of the released image with its candidate (on the grid if their shapes differ); index -1 if none is left.
    """
    import torch
    import torch.nn.functional as F

    def grid(a: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]
        pool = F.adaptive_avg_pool2d if a.ndim == 2 else F.adaptive_avg_pool3d
        return pool(x, 16)[0, 0].numpy()

    def unit(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).ravel()
        v = v - v.mean()
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def corr(x: np.ndarray, y: np.ndarray) -> float:
        return float(unit(x) @ unit(y)) if x.shape == y.shape else float(unit(grid(x)) @ unit(grid(y)))

    by_shape: dict[tuple, list[int]] = {}
    for j, c in enumerate(candidates):
        by_shape.setdefault(c.shape, []).append(j)
    units = {shape: np.stack([unit(candidates[j]) for j in idx]) for shape, idx in by_shape.items()}
    grids = np.stack([unit(grid(c)) for c in candidates])
    scores = []
    for i, rel in enumerate(released):
        idx = by_shape.get(rel.shape, [])
        if idx:
            r = units[rel.shape] @ unit(rel)
            for t in np.argsort(-r)[:8]:
                cand = candidates[idx[t]]
                span = float(cand.max() - cand.min()) or 1.0
                exact = float(np.abs(cand - rel).max()) <= 2e-3 * span + 1e-6 * float(np.abs(cand).max())
                scores.append((2.0 + r[t] if exact else 1.0 + r[t], i, idx[t], "exact" if exact else "correlation"))
        if hints is not None and hints[i] is not None:
            scores.append((2.5, i, int(hints[i]), "audit"))
        rg = grids @ unit(grid(rel))
        for j in np.argsort(-rg)[:8]:
            if candidates[j].shape != rel.shape:
                scores.append((rg[j], i, int(j), "grid"))
    scores.sort(key=lambda s: -s[0])
    out: list[tuple[int, str, float] | None] = [None] * len(released)
    taken: set[int] = set()
    for _, i, j, how in scores:
        if out[i] is None and j not in taken:
            out[i] = (int(j), how, corr(released[i], candidates[j]))
            taken.add(j)
    return [o if o is not None else (-1, "none", float("nan")) for o in out]


def _read_audit(audit: Path | None) -> tuple[dict[str, tuple[bool, str | None]], dict[str, str]]:
    """From the private audit file, when it has those columns (best effort): source -> (passed, reasons), and
    released file -> source.

    A candidate with one row per space passed only if every row did.
    """
    if audit is None or not Path(audit).is_file():
        return {}, {}
    out: dict[str, tuple[bool, str | None]] = {}
    files: dict[str, str] = {}
    with open(audit, newline="") as fh:
        for row in csv.DictReader(fh):
            src = row.get("source")
            if not src:
                continue
            if row.get("file"):
                files[row["file"]] = src
            passed = str(row.get("passed", "")).strip().lower() in ("true", "1", "yes")
            reason = row.get("reason") or None
            if src in out:
                was, why = out[src]
                passed = was and passed
                reason = "; ".join(r for r in dict.fromkeys([why, reason]) if r) or None
            out[src] = (passed, reason)
    return out, files


def _calibration_options(args: argparse.Namespace) -> dict:
    """The gate's calibration options the run asks for; those not given stay at the gate's defaults."""
    options: dict[str, Any] = {}
    if args.cross_patient_images is not None:
        options["cross_patient_images"] = None if args.cross_patient_images == "auto" else args.cross_patient_images
    if args.specificity is not None:
        options["specificity"] = args.specificity
    return options


def _guard_kwargs(args: argparse.Namespace) -> dict:
    from monai_synth.privacy.guard import run_guard

    params = inspect.signature(run_guard).parameters
    kwargs: dict[str, Any] = {}
    if args.spaces:
        kwargs["spaces"] = list(args.spaces)
    if args.embedding_weights:
        kwargs["embedding_weights"] = args.embedding_weights
    if args.embedding_epochs is not None and "embedding_epochs" in params:
        kwargs["embedding_epochs"] = args.embedding_epochs
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    kwargs.update(_calibration_options(args))
    return kwargs


def run_guard_path(cohort: Cohort, plants: Sequence[Plant], control: Sequence[Path], work: Path, args) -> dict:
    """Write the planted copies as files, run the gate, read the release back and count per transform."""
    from monai_synth.privacy.guard import run_guard

    cand_root = work / "candidates"
    cand_root.mkdir(parents=True)
    cand_files: list[tuple[str, Path]] = []  # (transform key, file)

    def folder_of(key: str) -> Path:
        # one run: a flat folder, because the guard reads a folder holding only DICOM files as one series (a volume),
        # so 2D DICOM candidates in per-transform subfolders would become volumes
        folder = cand_root / key if args.guard_per_transform else cand_root
        folder.mkdir(exist_ok=True)
        return folder

    for p in plants:
        folder = folder_of(p.attack.key)
        for k, (img, spacing, src) in enumerate(zip(p.images, p.spacings, p.sources)):
            f = _write(folder / f"{p.attack.key}_{k:03d}", img, cohort.fmt, spacing, cohort.train_paths[src[0]])
            cand_files.append((p.attack.key, f))
    folder = folder_of(CONTROL)
    for k, src in enumerate(control):
        dst = folder / f"{CONTROL}_{k:03d}{''.join(src.suffixes) if src.is_file() else ''}"
        (shutil.copy2 if src.is_file() else shutil.copytree)(src, dst)
        cand_files.append((CONTROL, dst))
    keys = [p.attack.key for p in plants] + [CONTROL]
    labels = {p.attack.key: p.label for p in plants} | {CONTROL: CONTROL_LABEL}
    attempted = Counter(k for k, _ in cand_files)
    kwargs = _guard_kwargs(args)
    released: Counter = Counter()
    rewritten: Counter = Counter()  # released files that no longer look like what was submitted
    matches: dict[str, Counter] = {k: Counter() for k in keys}
    audit: dict[str, tuple[bool, str | None]] = {}
    summaries = []
    t0 = time.perf_counter()
    if args.guard_per_transform:
        for key in keys:
            out = work / "release" / key
            s = run_guard(
                str(cohort.train_csv),
                str(cohort.holdout_csv),
                str(cand_root / key),
                str(out),
                cohort.modality,
                spatial_size=list(cohort.size),
                **kwargs,
            )
            summaries.append(s)
            released[key] = len(_released_entries(out, cohort.spatial_dims))
            audit.update({f"{key}/{src}": v for src, v in _read_audit(_audit_path(s, out))[0].items()})
        guard_s = time.perf_counter() - t0
    else:
        out = work / "release" / "all"
        s = run_guard(
            str(cohort.train_csv),
            str(cohort.holdout_csv),
            str(cand_root),
            str(out),
            cohort.modality,
            spatial_size=list(cohort.size),
            **kwargs,
        )
        guard_s = time.perf_counter() - t0
        summaries.append(s)
        audit, audit_files = _read_audit(_audit_path(s, out))
        entries = _released_entries(out, cohort.spatial_dims)
        if entries:
            rel_imgs = [_read(e, cohort.spatial_dims)[0] for e in entries]
            cand_imgs = [_read(f, cohort.spatial_dims)[0] for _, f in cand_files]
            index = {f.relative_to(cand_root).as_posix(): j for j, (_, f) in enumerate(cand_files)}
            hints = [index.get(audit_files.get(e.relative_to(out).as_posix(), "")) for e in entries]
            for j, how, r in _match(rel_imgs, cand_imgs, hints):
                key = cand_files[j][0] if j >= 0 else "unmatched"
                released[key] += 1
                matches.setdefault(key, Counter())[how] += 1
                if not r >= REWRITTEN_R:
                    rewritten[key] += 1
    rows = []
    for key in keys:
        reasons: Counter = Counter()
        audit_passed = 0
        for k, f in cand_files:
            if k != key:
                continue
            src = f.relative_to(cand_root).as_posix()
            passed, reason = audit.get(src, (None, None))
            audit_passed += bool(passed)
            if passed is False:
                reasons[_short_reason(reason)] += 1
        extra: dict[str, Any] = {"audit_released": audit_passed if audit else None}
        if matches.get(key):
            extra["matched_by"] = dict(matches[key])
            extra["rewritten"] = rewritten[key]
        rows.append(Row(key, labels[key], released[key], attempted[key], dict(reasons), extra))
    if released.get("unmatched"):
        rows.append(Row("unmatched", "released files matching no candidate", released["unmatched"], 0))
    n = sum(attempted.values())
    return {
        "rows": rows,
        "safeguard_s": guard_s,
        "images": n,
        "s_per_image": guard_s / max(n, 1),
        "thresholds": summaries[0].get("thresholds") if summaries else None,
        "summary": [{k: v for k, v in s.items() if k not in ("out", "audit")} for s in summaries],
        "timing_note": "run_guard wall time: reading, index build, calibration"
        + (", embedding training" if _has_embedding(args) else "")
        + " and judging",
    }


def _audit_path(summary: dict, out: Path) -> Path | None:
    p = summary.get("audit") if isinstance(summary, dict) else None
    return Path(p) if p else out.parent / f"{out.name}.private_audit.csv"


def _default_spaces() -> list[str]:
    from monai_synth.privacy.guard import run_guard

    default = inspect.signature(run_guard).parameters["spaces"].default
    return [str(s) for s in default]


def _has_embedding(args) -> bool:
    return any(_space_name(s) == "embedding" for s in (args.spaces or _default_spaces()))


def _space_name(spec: str) -> str:
    return str(spec).partition(":")[0].strip().lower()


# ---------------------------------------------------------------------------------------------------- sampler path
def _model_space(paths: Sequence[Path], cohort: Cohort):
    try:
        from monai_synth.privacy.guard import load_model_space
    except ImportError:  # the guard's own loader is the reference; the presets chain is what it wraps
        from monai_synth.transforms.presets import batch_load

        return batch_load([{"image": str(p)} for p in paths], cohort.modality, cohort.size, cohort.spatial_dims)
    return load_model_space([str(p) for p in paths], cohort.modality, cohort.size, cohort.spatial_dims)


@dataclass
class ModelSpaceCohort:
    """A cohort's splits in model space, as the release judges them, for the scripts that measure spaces directly."""

    train: Any
    train_ids: list[str]
    train_fingerprint: str
    holdout: Any
    holdout_ids: list[str]
    unseen: Any
    encoder: Any


def load_model_space_cohort(cohort: Cohort) -> ModelSpaceCohort:
    """Train, holdout and unseen images in model space, and the release's encoder (its intensity views)."""
    from monai_synth.data.datalist import datalist_fingerprint, load_datalist
    from monai_synth.data.modalities import get_modality
    from monai_synth.privacy.release import ReleaseEncoder
    from monai_synth.transforms.presets import intensity_reference, intensity_transform

    mod = get_modality(cohort.modality)
    train_records = load_datalist(str(cohort.train_csv), labels=mod.labels)
    holdout_records = load_datalist(str(cohort.holdout_csv), labels=mod.labels)
    reference = intensity_reference(train_records, cohort.modality)
    to_model = None if reference is None else intensity_transform(cohort.modality, reference=reference)
    return ModelSpaceCohort(
        train=_model_space([r["image"] for r in train_records], cohort),
        train_ids=[r["patient_id"] for r in train_records],
        train_fingerprint=datalist_fingerprint(train_records),
        holdout=_model_space([r["image"] for r in holdout_records], cohort),
        holdout_ids=[r["patient_id"] for r in holdout_records],
        unseen=_model_space(cohort.unseen_paths, cohort),
        encoder=ReleaseEncoder(cohort.fmt, cohort.modality, to_model=to_model),
    )


def run_sampler_path(cohort: Cohort, attacks: Sequence[Attack], work: Path, args) -> dict:
    """Build the sampler's safeguard once, then feed each transform's copies through ``guarded_sample``."""
    import torch

    from monai_synth.data.datalist import datalist_fingerprint, load_datalist
    from monai_synth.data.modalities import get_modality
    from monai_synth.privacy.factory import build_spaces
    from monai_synth.privacy.release import ReleaseEncoder
    from monai_synth.privacy.safeguard import build_safeguard
    from monai_synth.privacy.sampling import guarded_sample
    from monai_synth.privacy.spaces import distance_floor
    from monai_synth.transforms.presets import intensity_reference, intensity_transform

    mod = get_modality(cohort.modality)
    train_records = load_datalist(str(cohort.train_csv), labels=mod.labels)
    holdout_records = load_datalist(str(cohort.holdout_csv), labels=mod.labels)
    dl_fp = datalist_fingerprint(train_records)
    specs = list(args.spaces or _default_spaces())
    t0 = time.perf_counter()
    train = _model_space([r["image"] for r in train_records], cohort)
    holdout = _model_space([r["image"] for r in holdout_records], cohort)
    unseen = _model_space(cohort.unseen_paths, cohort)
    load_s = time.perf_counter() - t0
    spaces = build_spaces(
        specs,
        cohort.spatial_dims,
        cohort.size,
        train,
        [r["patient_id"] for r in train_records],
        dl_fp,
        args.embedding_weights,
        args.embedding_epochs,
        embedding_out=work / "embedding.pt",
    )
    spaces_s = time.perf_counter() - t0 - load_s
    print(f"loaded the cohort in {load_s:.1f} s, built the spaces (embedding training included) in {spaces_s:.1f} s")
    kw = {} if args.batch_size is None else {"batch_size": args.batch_size}
    kw.update(_calibration_options(args))
    # judged as the bundle's release judges: the array the file will hold, through every intensity view
    # MRI is scaled per image: generated volumes go back to the data's units with the training images' median
    # percentiles, as the bundle's release does (without them every candidate is refused before it is judged)
    reference = intensity_reference(train_records, cohort.modality)
    to_model = None if reference is None else intensity_transform(cohort.modality, reference=reference)
    encoder = ReleaseEncoder(cohort.fmt, cohort.modality, to_model=to_model)
    safeguard = build_safeguard(
        spaces,
        train,
        [r["patient_id"] for r in train_records],
        holdout,
        [r["patient_id"] for r in holdout_records],
        dl_fp,
        quantile=0.01,
        views=encoder.model_views,
        **kw,
    )
    build_s = time.perf_counter() - t0
    print(f"index and joint calibration in {build_s - load_s - spaces_s:.1f} s", flush=True)
    print(
        f"specificity level {safeguard.specificity:.3g}, consensus {safeguard.consensus} of {len(safeguard.indexes)} "
        "spaces (0: off)",
        flush=True,
    )
    plants = plant(
        attacks,
        [t[0].numpy() for t in train],
        [u[0].numpy() for u in unseen],
        [(1.0,) * cohort.spatial_dims] * len(train),
        args.attempts_for(cohort),
        cohort.spatial_dims,
        cohort.size[0] / 64.0,
        model=True,
        seed=args.seed,
    )
    batches = [(p.attack.key, p.label, np.stack(p.images)) for p in plants]
    batches.append((CONTROL, CONTROL_LABEL, np.stack([u[0].numpy() for u in unseen])))
    floors = {name: distance_floor(index.space) for name, index in safeguard.indexes.items()}
    rows, check_s, n_checked = [], 0.0, 0
    for key, label, batch in batches:
        tensor = torch.as_tensor(batch, dtype=torch.float32)[:, None]

        def generate(n: int, seed: int, condition: Any, _t=tensor) -> torch.Tensor:
            return _t[:n]

        t1 = time.perf_counter()
        result = guarded_sample(generate, safeguard, [(None, len(tensor))], max_retries=0, encoder=encoder)
        check_s += time.perf_counter() - t1
        n_checked += len(tensor)
        reasons = Counter(_short_reason(r.reason) for r in result.records if not r.passed)
        extra = {
            "released_closest": _closest_spaces([r for r in result.records if r.passed], floors),
            "consensus": _consensus_counts(result.records),
        }
        if key == CONTROL:
            extra["refused_by"] = _refusing_spaces([r for r in result.records if not r.passed])
        rows.append(Row(key, label, len(result.images), len(tensor), dict(reasons), extra))
    return {
        "rows": rows,
        "safeguard_s": build_s + check_s,
        "build_s": build_s,
        "build_parts_s": {"load": load_s, "spaces": spaces_s, "index_calibration": build_s - load_s - spaces_s},
        "images": n_checked,
        "s_per_image": check_s / max(n_checked, 1),
        "thresholds": dict(getattr(safeguard, "thresholds", {}) or {}),
        "timing_note": "build_safeguard (loading, index, calibration"
        + (", embedding training" if any(_space_name(s) == "embedding" for s in specs) else "")
        + ") once, then guarded_sample per image",
    }


# ---------------------------------------------------------------------------------------------------- driver
def run_modality(key: str, work: Path, args) -> dict:
    """One cohort, both entry points; a crash in one entry point is recorded and the other still runs."""
    dims = CONFIGS[key][1]
    size = args.size if dims == 2 else args.size_3d
    patients = args.cohort_2d if dims == 2 else args.cohort_3d
    t0 = time.perf_counter()
    cohort = make_cohort(key, work, size, patients, args.images_per_patient, args.seed)
    attacks = [a for a in ATTACKS if a.key in args.transforms]
    n_train = len(cohort.train_paths)
    print(
        f"\n== {key}: {cohort.modality.upper()} {dims}D {'x'.join(map(str, cohort.size))} ({cohort.fmt}); "
        f"train {n_train} images of {len(set(cohort.train_ids))} patients, holdout {cohort.n_holdout}, "
        f"unseen {len(cohort.unseen_paths)}; {args.attempts_for(cohort)} copies per transform ==",
        flush=True,
    )
    out: dict[str, Any] = {
        "modality": key,
        "paths": {},
        "cohort": {"train": n_train, "holdout": cohort.n_holdout, "unseen": len(cohort.unseen_paths)},
    }
    for path in args.paths:
        t1 = time.perf_counter()
        try:
            if path == "guard":
                chosen = [a for a in attacks if a.applies("guard", dims, cohort.fmt)]
                read = [_read(p, dims) for p in cohort.train_paths]
                unseen = [_read(p, dims)[0] for p in cohort.unseen_paths]
                plants = plant(
                    chosen,
                    [r[0] for r in read],
                    unseen,
                    [r[1] for r in read],
                    args.attempts_for(cohort),
                    dims,
                    cohort.size[0] / 64.0,
                    model=False,
                    seed=args.seed,
                )
                res = run_guard_path(cohort, plants, cohort.unseen_paths, work / "guard", args)
                title = f"{key} / guard: run_guard -> files written"
            else:
                chosen = [a for a in attacks if a.applies("sampler", dims, cohort.fmt)]
                res = run_sampler_path(cohort, chosen, work / "sampler", args)
                title = f"{key} / sampler: build_safeguard + guarded_sample -> result.images"
        except Exception as err:  # a crash of one entry point is a finding; the others still run
            tb = traceback.format_exc()
            print(f"\n-- {key} / {path}: CRASHED: {type(err).__name__}: {err}", flush=True)
            out["paths"][path] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": tb,
                "wall_s": time.perf_counter() - t1,
            }
            continue
        res["wall_s"] = time.perf_counter() - t1
        print_table(title, res["rows"])
        line = f"{path}: {res['images']} images, safeguard {res['safeguard_s']:.1f} s"
        if "build_s" in res:
            line += f" (build {res['build_s']:.1f} s once, then {res['s_per_image']:.4f} s/image)"
        else:
            line += f" = {res['s_per_image']:.4f} s/image ({res['timing_note']})"
        print(line + f"; wall {res['wall_s']:.1f} s", flush=True)
        mismatched = [
            r.label
            for r in res["rows"]
            if r.extra.get("audit_released") is not None and r.extra["audit_released"] != r.released
        ]
        if mismatched:
            print(f"note: files in the release differ from the audit's 'passed' count for: {', '.join(mismatched)}")
        for r in res["rows"]:
            if r.extra.get("rewritten"):
                print(
                    f"note: {r.extra['rewritten']} of the {r.released} released '{r.label}' files do not hold the "
                    f"submitted image (r < {REWRITTEN_R} with it): the release rewrote them"
                )
        res["rows"] = [r.__dict__ for r in res["rows"]]
        out["paths"][path] = res
    out["wall_s"] = time.perf_counter() - t0
    print(f"{key} wall time: {out['wall_s']:.1f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- 3D cost
def _volume_cost_child(size: int, n_train: int, n_holdout: int, n_judge: int, epochs: int, queue) -> None:
    """In a fresh process (so its peak memory is its own): build the default 3D safeguard on CT phantom volumes of
    ``size``^3 and judge ``n_judge`` volumes through the release's views; report times and the peak resident size."""
    import torch

    from monai_synth.data.phantoms import generate_cohort
    from monai_synth.privacy.factory import DEFAULT_SPACES, build_spaces
    from monai_synth.privacy.release import ReleaseEncoder
    from monai_synth.privacy.safeguard import build_safeguard
    from monai_synth.transforms.presets import intensity_transform

    warnings.filterwarnings("ignore")
    to_model = intensity_transform("ct")

    def volumes(n: int, first: int) -> tuple[torch.Tensor, list[str]]:
        # phantoms above 64^3 take seconds each to draw; they are drawn at 64^3 and resized (the cost of judging a
        # volume depends on its size, not on its content)
        gen = min(size, 64)
        recs = generate_cohort("ct", max(1, -(-n // 3)), 3, spatial_dims=3, spatial_size=gen, first_patient=first)[:n]
        x = torch.stack([torch.as_tensor(np.asarray(to_model(r["image"]))).float() for r in recs])
        if gen != size:
            x = torch.nn.functional.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
        return x, [r["patient_id"] for r in recs]

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train, train_ids = volumes(n_train, 0)
    holdout, holdout_ids = volumes(n_holdout, 10_000) if n_holdout else (train[:0], [])
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    spaces = build_spaces(DEFAULT_SPACES, 3, (size,) * 3, train, train_ids, "cost", embedding_epochs=epochs)
    t1 = time.perf_counter()
    encoder = ReleaseEncoder("nifti", "ct")
    if n_holdout:
        safeguard = build_safeguard(spaces, train, train_ids, holdout, holdout_ids, "cost", views=encoder.model_views)
    else:  # judging alone: every space at a fixed threshold, no calibration
        from monai_synth.privacy.index import TrainingIndex
        from monai_synth.privacy.safeguard import PrivacySafeguard

        safeguard = PrivacySafeguard([(TrainingIndex.build(s, train, train_ids, "cost"), 0.05) for s in spaces])
    t2 = time.perf_counter()
    judged = torch.cat([train[:n_judge], holdout[:n_judge]])[:n_judge]
    stored = [encoder.store_generated(v) for v in judged]
    t3 = time.perf_counter()
    encoder.judge(safeguard, stored)
    t4 = time.perf_counter()
    queue.put(
        {
            "size": size,
            "train": n_train,
            "holdout": n_holdout,
            "embedding_s": t1 - t0,
            "calibration_s": t2 - t1,
            "judge_s_per_volume": (t4 - t3) / len(stored),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "data_rss_gb": (data_rss - base) / 2**20,
        }
    )


def volume_cost(sizes: Sequence[int], n_train: int, n_holdout: int, n_judge: int, epochs: int) -> list[dict]:
    """Time and peak memory of the default 3D safeguard per volume size (each size in its own process)."""
    import multiprocessing as mp

    ctx, rows = mp.get_context("spawn"), []
    for size in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_volume_cost_child, args=(int(size), n_train, n_holdout, n_judge, epochs, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{size}^3: the measurement crashed (exit code {proc.exitcode})", flush=True)
            continue
        row = queue.get()
        rows.append(row)
        print(
            f"{size}^3: train {row['train']}, holdout {row['holdout']} volumes: embedding training "
            f"{row['embedding_s']:.0f} s, index + calibration {row['calibration_s']:.0f} s, "
            f"{row['judge_s_per_volume']:.2f} s per judged volume; peak resident {row['peak_rss_gb']:.2f} GiB "
            f"(volumes in memory {row['data_rss_gb']:.2f} GiB)",
            flush=True,
        )
    return rows


def _limit_memory(gb: float) -> None:
    """Cap this process's address space: on a shared machine a runaway allocation then fails here, in this process,
    instead of waking the kernel's OOM killer."""
    if gb > 0:
        limit = int(gb * 2**30)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modalities", type=_csv_list, default=list(CONFIGS), help=f"any of {','.join(CONFIGS)}")
    p.add_argument("--paths", type=_csv_list, default=list(PATHS), help="entry points: guard,sampler")
    p.add_argument("--transforms", type=_csv_list, default=ATTACK_KEYS, help=f"any of {','.join(ATTACK_KEYS)}")
    p.add_argument("--attempts", type=int, default=20, help="copies per transform (2D)")
    p.add_argument("--attempts-3d", type=int, default=5, help="copies per transform for volumes (default 5)")
    p.add_argument("--size", type=int, default=64, help="2D image size")
    p.add_argument("--size-3d", type=int, default=32, help="3D volume size")
    p.add_argument(
        "--cohort-2d",
        type=lambda s: [int(v) for v in _csv_list(s)],
        default=[80, 36, 20],
        help="train,holdout,unseen patients for 2D (3 images each; the holdout needs >= 100 images)",
    )
    p.add_argument("--cohort-3d", type=lambda s: [int(v) for v in _csv_list(s)], default=[12, 34, 8])
    p.add_argument("--images-per-patient", type=int, default=3)
    p.add_argument("--spaces", nargs="+", default=None, help="privacy spaces (default: the guard's default spaces)")
    p.add_argument("--embedding-weights", default=None, help="weights for the embedding space (default: trained)")
    p.add_argument(
        "--embedding-epochs", type=int, default=None, help="epochs of a trained embedding (default: its own)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="images judged at once (default: the API's default)")
    p.add_argument(
        "--cross-patient-images",
        type=lambda v: v if v == "auto" else int(v),
        default=None,
        help="training images that join the holdout as calibration samples, 'auto', or 0: the holdout alone "
        "(default: the gate's default)",
    )
    p.add_argument(
        "--specificity", type=float, default=None, help="the gate's specificity test, 0: off (default: the gate's)"
    )
    p.add_argument(
        "--guard-per-transform",
        action="store_true",
        help="one run_guard per transform into its own release folder (no content matching; much slower)",
    )
    p.add_argument(
        "--volume-cost",
        type=lambda s: [int(v) for v in _csv_list(s)],
        default=None,
        help="instead of attacking: time and peak memory of the default 3D safeguard at these volume sizes (e.g. 32,64)",
    )
    p.add_argument(
        "--volume-cost-counts",
        type=lambda s: [int(v) for v in _csv_list(s)],
        default=[36, 102, 8, 20],
        help="training, holdout and judged volumes and embedding epochs of --volume-cost (holdout 0: judging alone, at a "
        "fixed threshold, no calibration)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="save the results here")
    p.add_argument("--workdir", default=None, help="keep cohorts, candidates and releases here (default: a temp dir)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-memory-gb", type=float, default=16.0, help="address-space cap of this process (0: none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, allowed in (("modalities", CONFIGS), ("paths", PATHS), ("transforms", ATTACK_KEYS)):
        unknown = [v for v in getattr(args, name) if v not in allowed]
        if unknown:
            print(f"unknown {name}: {unknown}; choose from {list(allowed)}", file=sys.stderr)
            return 2
    if args.spaces:
        args.spaces = [s for spec in args.spaces for s in _csv_list(spec)]
    args.attempts_for = lambda c: args.attempts if c.spatial_dims == 2 else args.attempts_3d
    _limit_memory(args.max_memory_gb)
    if args.volume_cost:
        rows = volume_cost(args.volume_cost, *args.volume_cost_counts)
        if args.json:
            Path(args.json).write_text(json.dumps({"volume_cost": rows}, indent=1))
        return 0 if len(rows) == len(args.volume_cost) else 1
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    spaces = args.spaces or _default_spaces()
    print(f"safeguard attacks: spaces {spaces}{'' if args.spaces else ' (default)'}; entry points {args.paths}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="safeguard_attacks_"))
    work.mkdir(parents=True, exist_ok=True)
    results, crashed, t0 = [], False, time.perf_counter()
    try:
        for key in args.modalities:
            mwork = work / key
            if mwork.exists():
                shutil.rmtree(mwork)
            try:
                res = run_modality(key, mwork, args)
            except Exception as err:  # e.g. the cohort could not be written
                print(f"\n== {key}: CRASHED: {type(err).__name__}: {err}", flush=True)
                res = {"modality": key, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            crashed |= "error" in res or any("error" in v for v in res.get("paths", {}).values())
            results.append(res)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"\ntotal wall time: {total:.1f} s" + ("; SOME ENTRY POINTS CRASHED (see above)" if crashed else ""))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("attempts_for", "json")}
        config["spaces"] = spaces
        payload = {"config": config, "results": results, "total_wall_s": total}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1, default=_json_default))
    return 1 if crashed else 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())

"""A privacy space that registers each nearest training image onto the candidate before comparing them.

Every other pixel-based space tries a fixed set of variants (flips, shifts of whole cells, zooms and rotations on a
grid of steps). A copy whose change falls between the steps is misregistered by a fraction of a cell, and on images
whose patients share their anatomy at the same positions (PET slices: body outline, brain, bladder) that fraction is
enough: a PET slice mirrored, rotated by 7 degrees and cropped to 90% sat at 1.00-1.02 of the slot spaces' thresholds
and passed the whole gate, where new patients sit too.

:class:`AlignedSpace` (``"aligned"``) compares images in their own canonical frame (:func:`canonical_frame`: centred on
the centre of their bright mass, turned to its principal axes, each scaled to its spread), where a moved, rotated, zoomed
or mirrored copy lands on its source up to a flip, on a fine grid (Pearson correlation, as the pixel space). For the
training images nearest to a candidate there it then fits an affine map of each onto the candidate (rotation, per-axis
scale, shear, translation, within bounds a person would still call the same image), coarse to fine by gradient ascent
on the correlation; the distance to such a row is the smaller of the two. Both are compared only where both images
have pixels: in its own frame an image's field of view does not fill the grid, and a copy cut at its border (a corner
crop resized back, a stretch that pushes an end out) lacks what it lost, which neither edge padding nor zeros stand in
for. The fit is judged at a blur of half a cell, where a copy under noise keeps more of its correlation with its
source than new patients gain. A copy under an affine change comes back to its source up to interpolation (PET slices
mirrored, rotated by 12 degrees, zoomed and moved, or stretched and sheared: 0.2-0.6 of new patients' 1% quantile);
another patient's image is brought closer too, and the threshold, calibrated on new patients' images judged the same
way, accounts for that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from monai_synth.privacy.ranks import intensity_ranks
from monai_synth.privacy.spaces import (
    DegenerateImageError,
    _apply_symmetry,
    _checked_invariances,
    _fingerprint,
    _query_symmetries,
    _scaled,
    scaled_batch,
)

__all__ = ["AlignedSpace"]


class AlignedSpace:
    """Distance = 1 - Pearson correlation on a fine grid, after an affine registration of the nearest training images.

    Args:
        grid: side of the grid images are resampled to (area interpolation; the whole field of view).
        spatial_dims: 2 or 3.
        invariances: ``"flip"``, ``"transpose"`` (with flips: rot90) and/or ``"invert"`` of the query: the
            registration starts from the variant nearest to each training image and refines it.
        candidates: how many nearest training images (by the unregistered distance) are registered coarsely per query.
        finalists: how many of those that fit best coarsely are registered at every level.
        starts: how many of the query's variants nearest to each such image the fit starts from (the best fit counts).
        max_rotation: largest rotation of the fit, degrees (about each axis in 3D).
        max_scale: largest magnification (or its inverse) of the fit along each axis.
        max_shear: largest shear factor of the fit.
        max_shift: largest translation of the fit, as a fraction of the side.
        steps: gradient steps per level of the coarse-to-fine fit.
        learning_rate: Adam's step on the fit's unbounded parameters.
        blurs: Gaussian widths (grid cells) of the levels, coarse to fine.
        turns: angles (degrees, the first 0) by which the query's frame is also turned in the plane of its first two
            axes; with the quarter turns of the symmetries, every angle lies within half a step of one tried. An image
            whose mass is nearly round (a CT body) has ambiguous principal axes, which a small stretch turns by tens of
            degrees. Default: every 22.5 degrees in 2D, none in 3D.

    Raises:
        ValueError: for a grid under 8 cells, unknown invariances or bounds outside what a copy can be.
    """

    _VERSION = 3

    def __init__(
        self,
        grid: int = 32,
        spatial_dims: int = 2,
        invariances: Sequence[str] = ("flip", "transpose", "invert"),
        candidates: int = 48,
        finalists: int = 4,
        starts: int = 2,
        max_rotation: float = 30.0,
        max_scale: float = 1.5,
        max_shear: float = 0.25,
        max_shift: float = 0.2,
        steps: int = 30,
        blurs: Sequence[float] = (1.0, 0.5),
        learning_rate: float = 0.05,
        turns: Sequence[float] | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(grid) < 8:
            raise ValueError(f"grid must be at least 8 cells per axis, got {grid}")
        if min(int(candidates), int(finalists), int(starts)) < 1:
            raise ValueError(
                f"candidates, finalists and starts must be at least 1, got {candidates}, {finalists}, {starts}"
            )
        if not 0.0 <= float(max_rotation) <= 45.0:
            raise ValueError(f"max_rotation must be in [0, 45] degrees, got {max_rotation}")
        if not 1.0 <= float(max_scale) <= 2.0:
            raise ValueError(f"max_scale must be in [1, 2], got {max_scale}")
        if not 0.0 <= float(max_shear) <= 0.5 or not 0.0 <= float(max_shift) <= 0.5:
            raise ValueError(f"max_shear and max_shift must be in [0, 0.5], got {max_shear}, {max_shift}")
        if not 0.0 < float(learning_rate) <= 1.0:
            raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate}")
        if int(steps) < 1 or not blurs or any(float(b) < 0 for b in blurs):
            raise ValueError(f"steps must be >= 1 and blurs non-negative widths, got {steps}, {list(blurs)}")
        self.name = "aligned"
        self.grid, self.spatial_dims = int(grid), int(spatial_dims)
        self.invariances = _checked_invariances(invariances)
        self._symmetries, self.signs = _query_symmetries(self.spatial_dims, self.invariances)
        self.candidates, self.finalists, self.starts = int(candidates), int(finalists), int(starts)
        self.max_rotation, self.max_scale = float(max_rotation), float(max_scale)
        self.max_shear, self.max_shift = float(max_shear), float(max_shift)
        self.steps, self.blurs, self.learning_rate = int(steps), tuple(float(b) for b in blurs), float(learning_rate)
        turns = ((0.0, 22.5, 45.0, 67.5) if self.spatial_dims == 2 else (0.0,)) if turns is None else tuple(turns)
        if not turns or float(turns[0]) != 0.0 or any(not 0.0 <= float(t) < 90.0 for t in turns):
            raise ValueError(f"turns must start with 0 and lie in [0, 90) degrees, got {list(turns)}")
        self.turns = tuple(float(t) for t in turns)

    @property
    def dim(self) -> int:
        """Length of the vectors of single-channel images."""
        return self.grid**self.spatial_dims

    def fingerprint(self) -> str:
        """Hash of everything that changes the vectors or the registered distances."""
        cfg = {
            "space": self.name,
            "version": self._VERSION,
            "grid": self.grid,
            "spatial_dims": self.spatial_dims,
            "invariances": list(self.invariances),
            "candidates": self.candidates,
            "finalists": self.finalists,
            "starts": self.starts,
            "bounds": [self.max_rotation, self.max_scale, self.max_shear, self.max_shift],
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "blurs": list(self.blurs),
            "turns": list(self.turns),
        }
        return _fingerprint(cfg)

    def _on_grid(self, x: torch.Tensor, frame: torch.Tensor | None = None, turn: float = 0.0) -> torch.Tensor:
        """``(B, C, *grid)``: each scaled image ``x`` in its own canonical frame (``frame``: its :func:`frame_map`),
        turned by ``turn`` degrees, standardised over the cells its field of view covers and exactly 0 outside it."""
        size = tuple(min(2 * self.grid, n) for n in x.shape[2:])
        x, field = canonical_frame(x, size, turn=turn, frame=frame)
        grid = (self.grid,) * self.spatial_dims
        x, field = F.interpolate(x, size=grid, mode="area"), F.interpolate(field, size=grid, mode="area") > 0.999
        b, c = x.shape[:2]
        flat = _in_field(x.reshape(b, -1), field.expand_as(x).reshape(b, -1))
        return flat.reshape(x.shape)

    def embed(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """``(B, C, *spatial)`` -> ``(B, C * grid**spatial_dims)`` unit vectors, zero mean over the image's field of
        view in its canonical frame and exactly 0 outside it (the registration reads the field back from the zeros).

        Raises:
            NonFiniteImageError: for NaN/Inf images.
            DegenerateImageError: for constant images.
        """
        g = self._on_grid(scaled_batch(images, self.spatial_dims))
        return g.reshape(g.shape[0], -1).numpy().astype(np.float32, copy=False)

    def embed_variants(self, images: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
        """Query side ``(B, V, d)``: the image under every symmetry, then the negated image in its own frame under every
        symmetry (variant 0 = :meth:`embed`)."""
        out, scaled = [], scaled_batch(images, self.spatial_dims)
        for sign in self.signs:  # an inverted image has its own frame: its mass is where the original is dark
            x = sign * scaled
            frame = frame_map(x)
            for turn in self.turns:
                g = self._on_grid(x, frame, turn)
                n = g.shape[0]
                sym = torch.stack([_apply_symmetry(g, p, f, 2) for p, f in self._symmetries], dim=1)
                out.append(sym.reshape(n, len(self._symmetries), -1))
        return torch.cat(out, dim=1).numpy().astype(np.float32, copy=False)

    # ------------------------------------------------------------------ registration
    def refine(
        self,
        queries: np.ndarray,
        distances: np.ndarray,
        rows: np.ndarray,
        row_vectors: Callable[[np.ndarray], np.ndarray],
        groups: np.ndarray | None = None,
    ) -> np.ndarray:
        """Distances after registration of each query ``(Q, V, d)`` (unit variants) to its first :attr:`candidates`
        rows of ``rows`` ``(Q, k)`` (ordered by ``distances``).

        Every such training image is first fitted coarsely (the blurred levels, from the variant nearest to it); the
        :attr:`finalists` that fit best are fitted again at every level from their :attr:`starts` nearest variants, and
        their distance is the smaller of the given one and the fitted one. The other rows keep theirs. A fit that gives
        no finite correlation keeps the given distance: a registration only ever brings a training image closer.

        ``groups`` ``(Q, k)`` (the rows' patients): the finalists are then the best-fitting row of as many different
        patients. A patient's neighbouring slices fit about as well as each other and would take every place, leaving
        the second nearest patient unregistered and the image looking far more specific to its nearest patient than
        it is (the specificity test refused 4 of 60 unseen PET images so).
        """
        distances = np.array(distances, dtype=np.float64, copy=True)
        q, v, d = queries.shape
        k = min(self.candidates, rows.shape[1])
        if k == 0 or q == 0:
            return distances
        train = torch.from_numpy(np.ascontiguousarray(row_vectors(np.asarray(rows[:, :k]).reshape(-1)), np.float32))
        query = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        owner = torch.arange(q * k) // k  # the query of each (query, row) pair
        # the fit starts from the variants nearest to each training row: a nearly symmetric image (a PET slice) may be
        # nearer to its source mirrored until it is registered, and from the mirror no rotation brings it back
        order = torch.einsum("qvd,qkd->qkv", query, train.reshape(q, k, d)).reshape(q * k, v)
        order = order.argsort(dim=1, descending=True)
        m = min(self.starts, v)
        begin = _start_variants(order, self._unturned(v), m)
        pairs = torch.arange(q * k)
        if k > self.finalists and len(self.blurs) > 1:
            # coarse from the nearest variant, and from the nearest unturned one where the frame was turned
            mc = 1 if len(self.turns) == 1 else m
            nearest = query[owner[:, None], begin[:, :mc]].reshape(-1, d)
            coarse = self._registered(
                self._images(train.repeat_interleave(mc, dim=0)), self._images(nearest), self.blurs[:-1]
            )
            coarse = torch.nan_to_num(coarse, nan=-2.0).reshape(q * k, mc).amax(dim=1).reshape(q, k)
            chosen = _finalists(coarse.numpy(), None if groups is None else np.asarray(groups)[:, :k], self.finalists)
            pairs = torch.from_numpy(chosen + np.arange(q)[:, None] * k).reshape(-1)
        target = query[owner[pairs][:, None], begin[pairs]].reshape(-1, d)
        r = self._registered(self._images(train[pairs].repeat_interleave(m, dim=0)), self._images(target), self.blurs)
        r = torch.nan_to_num(r.double(), nan=-np.inf).reshape(-1, m).amax(dim=1).numpy()
        fitted = np.full(q * k, np.inf)
        fitted[pairs.numpy()] = np.where(np.isfinite(r), np.clip(1.0 - r, 0.0, 2.0), np.inf)
        distances[:, :k] = np.minimum(distances[:, :k], fitted.reshape(q, k))
        return distances

    def _unturned(self, v: int) -> torch.Tensor:
        """``(v,)``: which query variants are in the unturned frame (variants: sign, then turn, then symmetry)."""
        per_turn = v // (len(self.signs) * len(self.turns))
        turn_of = (torch.arange(v) // per_turn) % len(self.turns)
        return torch.tensor([t == 0 for t in self.turns])[turn_of]

    def _images(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.reshape((len(vectors), 1) + (self.grid,) * self.spatial_dims)

    def _registered(self, moving: torch.Tensor, fixed: torch.Tensor, blurs: Sequence[float]) -> torch.Tensor:
        """Pearson r of each ``fixed`` image with its ``moving`` image under the best affine map found, ``(P,)``,
        fitted level by level at the Gaussian widths ``blurs`` and judged at the last.

        Both are compared only where both fields of view reach (cells that are exactly 0 lie outside an image's field in
        its canonical frame): a copy cut at the border, then zoomed or moved back, lacks what it lost, not what it has;
        a training image that covers under :data:`MIN_OVERLAP` of the candidate's field has no correlation (NaN)."""
        nd = self.spatial_dims
        n_params = 6 if nd == 2 else 12
        raw = torch.zeros(len(moving), n_params, requires_grad=True)
        moving_field, fixed_field = (moving != 0).to(moving.dtype), (fixed != 0).to(fixed.dtype)
        with torch.enable_grad():
            for blur in blurs:
                m, m_field = self._level(moving, moving_field, blur)
                f, f_field = self._level(fixed, fixed_field, blur)
                opt = torch.optim.Adam([raw], lr=self.learning_rate)
                for _ in range(self.steps):
                    opt.zero_grad()
                    warped, overlap = self._warp(m, m_field, raw)
                    r = _pearson(warped, f, overlap * f_field)
                    (-torch.nan_to_num(r, nan=0.0).sum()).backward()
                    opt.step()
        with torch.no_grad():  # judged at the last level's blur: bilinear resampling on the grid blurs a copy too
            warped, overlap = self._warp(m, m_field, raw)
            weight = overlap * f_field
            r = _pearson(warped, f, weight)
            covered = weight.reshape(len(weight), -1).sum(dim=1) / f_field.reshape(len(weight), -1).sum(dim=1)
            return torch.where(covered >= MIN_OVERLAP, r, torch.full_like(r, float("nan")))

    def _level(self, images: torch.Tensor, field: torch.Tensor, blur: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` blurred by ``blur`` grid cells within their ``field`` (normalised convolution: no zeros from
        outside it bleed in), and that field; on a grid of half the side where the blur allows it (the fit's maps are
        in normalised coordinates, the same at every side), which quarters the cost of the coarse levels."""
        if blur >= 1.0 and min(images.shape[2:]) >= 16:
            pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
            weight = pool(field, 2)
            images = pool(images * field, 2) / weight.clamp_min(1e-6)
            field, blur = (weight > 0.999).to(images.dtype), blur / 2
        if blur > 0:
            images = _blurred(images * field, blur) / _blurred(field, blur).clamp_min(1e-6)
        return images * field, field

    def _warp(self, images: torch.Tensor, field: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` resampled at the affine maps of the bounded parameters ``raw``, and the cells that their
        ``field`` covers whole there (1) or not (0)."""
        theta = self._affine(raw)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        reach = F.grid_sample(field, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped, (reach > 0.999).to(images.dtype)

    def _affine(self, raw: torch.Tensor) -> torch.Tensor:
        """``(P, nd, nd + 1)`` affine maps (normalised coordinates) from unbounded parameters, each squashed into its
        bound: rotation, log-scale per axis, shears above the diagonal, translation."""
        nd, t = self.spatial_dims, torch.tanh(raw)
        rot = float(np.radians(self.max_rotation))
        log_scale, shear, shift = float(np.log(self.max_scale)), self.max_shear, 2.0 * self.max_shift
        p = len(raw)
        if nd == 2:
            a = t[:, 0] * rot
            c, s = torch.cos(a), torch.sin(a)
            rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
            upper = torch.zeros(p, 2, 2)
            upper[:, 0, 1] = t[:, 1] * shear
            scales, move = t[:, 2:4] * log_scale, t[:, 4:6] * shift
        else:
            skew = torch.zeros(p, 3, 3)
            w = t[:, 0:3] * rot
            skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
            skew = skew - skew.transpose(1, 2)
            rotation = torch.linalg.matrix_exp(skew)
            upper = torch.zeros(p, 3, 3)
            upper[:, 0, 1], upper[:, 0, 2], upper[:, 1, 2] = (t[:, 3:6] * shear).unbind(-1)
            scales, move = t[:, 6:9] * log_scale, t[:, 9:12] * shift
        linear = rotation @ (torch.diag_embed(torch.exp(scales)) + upper)
        return torch.cat([linear, move[..., None]], dim=-1)

    def __repr__(self) -> str:
        return (
            f"AlignedSpace(grid={self.grid}, spatial_dims={self.spatial_dims}, invariances={self.invariances}, "
            f"candidates={self.candidates})"
        )


def _start_variants(order: torch.Tensor, unturned: torch.Tensor, m: int) -> torch.Tensor:
    """``(P, m)`` variants each fit starts from: the ``m`` nearest (``order`` ``(P, v)``, nearest first), the last of them
    replaced by the nearest unturned variant where none of the others is unturned. A turned frame puts a copy whose
    axes are ambiguous (a round body) next to its source, but for an image with clear axes a turned variant of another
    patient's may be nearer than the unturned one, and the fit from it lands in the wrong place."""
    begin = order[:, :m].clone()
    if m < 2 or bool(unturned.all()):
        return begin
    flags = unturned[order]
    first = flags.float().argmax(dim=1)  # position of the nearest unturned variant
    missing = ~flags[:, : m - 1].any(dim=1)
    begin[missing, m - 1] = order[missing, first[missing]]
    return begin


def _finalists(fit: np.ndarray, groups: np.ndarray | None, n: int) -> np.ndarray:
    """``(Q, n)`` columns of ``fit`` ``(Q, k)`` (higher is better) to register fully: the best of each group first
    (groups in order of their best fit), then the best of the rest."""
    order = np.argsort(-fit, axis=1, kind="stable")
    if groups is None:
        return order[:, :n]
    out = np.empty((len(fit), n), dtype=np.int64)
    for i, cols in enumerate(order):
        _, first = np.unique(groups[i, cols], return_index=True)
        leaders = cols[np.sort(first)]
        out[i] = np.concatenate([leaders, cols[~np.isin(cols, leaders)]])[:n]
    return out


MIN_OVERLAP = 0.6
"""Least share of the candidate's field of view that the registered training image must cover for their correlation to
count."""


def _pearson(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per item of the batch, the Pearson correlation of two images over the cells of ``weight`` 1 (NaN where either is
    constant there)."""
    a, b, w = a.reshape(len(a), -1), b.reshape(len(b), -1), weight.reshape(len(weight), -1)
    total = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    a = (a - (w * a).sum(dim=1, keepdim=True) / total) * w
    b = (b - (w * b).sum(dim=1, keepdim=True) / total) * w
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def _in_field(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` ``(N, d)`` standardised over the cells of ``field`` (zero mean, unit norm there) and exactly 0
    elsewhere; a cell inside that lands on exactly 0 is nudged off it, so that the zeros mark the field.

    Raises:
        DegenerateImageError: for rows with no structure in their field (constant) or a norm that is not finite.
    """
    x, w = _scaled(x), field.to(x.dtype)
    x = (x - (w * x).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)) * w
    norm = x.norm(dim=1, keepdim=True)
    flat = ~(norm.flatten() > 1e-6 * x.shape[1] ** 0.5) | ~torch.isfinite(norm.flatten())
    if bool(flat.any()):
        raise DegenerateImageError(
            f"images {flat.nonzero().flatten().tolist()[:10]} of the batch are constant or not finite in their field "
            "of view; correlation is undefined"
        )
    x = x / norm
    return torch.where(field & (x == 0), torch.full_like(x, 1e-20), x)


def _blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(P, 1, *spatial)`` images under a separable Gaussian of width ``sigma`` cells (edges replicated)."""
    if sigma <= 0:
        return x
    kernel = gaussian_1d(torch.tensor(sigma), truncated=3.0, approx="sampled", normalize=True).to(x.dtype)
    return separable_filtering(x, [kernel] * (x.ndim - 2), mode="replicate")


def canonical_frame(
    images: torch.Tensor,
    size: Sequence[int],
    spread: float = 0.45,
    power: float = 4.0,
    aspect: float = 1.5,
    turn: float = 0.0,
    frame: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, *spatial)`` images resampled at ``size`` in their own frame (``frame``: their :func:`frame_map`, computed
    here when not given), turned by ``turn`` degrees in the plane of its first two axes: centred on their centre of mass, their
    principal axes along the grid's axes (largest first) and each axis scaled so the mass spreads ``spread`` of the
    half-side along it (each axis's scale within a factor ``aspect`` of their common one); and ``(B, 1, *size)`` how
    much of each cell their field of view covers (0 outside, where the image reads 0).

    Scaled per axis, a copy stretched or sheared lands on its source too: scaled by their common spread, CT slices
    stretched by 0.9 x 1.08 and sheared ranked their source 91st-105th of 240 training slices, and stretched copies
    sat at 1.8-2.5x new patients' 1% quantile of this space, 0.5x per axis (PET: rotated, mirrored and zoomed copies
    2.2x -> 0.3x; a few copies moved the other way, within 1x).

    The mass is each pixel's intensity rank (mean over channels) to the power ``power``: the bright anatomy, under any
    monotone intensity curve. A copy moved, rotated, zoomed or mirrored comes to its source's frame up to a flip of the
    axes (which the space's symmetries try), so the nearest rows searched in this frame hold its source for the
    registration to refine (PET slices moved by 8 px, rotated by 10-20 degrees, or mirrored, rotated and cropped:
    source at rank 9-29 of 240 on the plain grid, first in this frame).
    """
    b, nd = images.shape[0], images.ndim - 2
    theta = frame_map(images, spread, power, aspect) if frame is None else frame
    if turn:
        a = np.radians(turn)
        plane = torch.eye(nd + 1, dtype=theta.dtype)
        plane[:2, :2] = torch.tensor([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=theta.dtype)
        theta = theta @ plane
    theta = theta.to(images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], *size], align_corners=False)
    resampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones((b, 1, *images.shape[2:]), dtype=images.dtype)
    field = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return resampled, field


def frame_map(images: torch.Tensor, spread: float = 0.45, power: float = 4.0, aspect: float = 1.5) -> torch.Tensor:
    """``(B, nd, nd + 1)`` float64 affine maps (normalised coordinates) from :func:`canonical_frame`'s grid to each
    image: its centre of mass, principal axes and per-axis spread (see there). Computed once per image, resampled at
    every turn."""
    b, nd = images.shape[0], images.ndim - 2
    # mean rank of tied values: a posterised copy keeps its source's mass; ranks rescaled from (0.5 / n, 1 - 0.5 / n)
    n = images[0, 0].numel()
    ranks = intensity_ranks(images.mean(dim=1, keepdim=True)).reshape(b, -1).to(images.dtype)
    mass = ((ranks * n - 0.5) / max(n - 1, 1)).clamp_min(0.0) ** power
    mass = mass / mass.sum(dim=1, keepdim=True)
    axes = [(torch.arange(n, dtype=images.dtype) + 0.5) / n * 2 - 1 for n in images.shape[2:]]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).reshape(-1, nd)  # (x, y[, z])
    centre = mass @ points
    offsets = points[None] - centre[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", mass, offsets, offsets).double()
    values, vectors = torch.linalg.eigh(cov)
    vectors = vectors.flip(-1)  # largest axis first
    vectors[:, :, -1] *= torch.linalg.det(vectors)[:, None]  # a rotation: mirror images differ by the symmetries
    # each principal axis scaled to its own spread (a stretched or sheared copy comes back to its source's frame),
    # within a factor ``aspect`` of the common spread (an image thin along one axis is not blown up to a square)
    common = values.clamp_min(0).sum(dim=-1, keepdim=True).sqrt()
    own = (values.flip(-1).clamp_min(0) * nd).sqrt()
    own = torch.minimum(torch.maximum(own, common / aspect), common * aspect)
    scale = (own / spread).clamp(0.25, 4.0)[:, None, :]
    return torch.cat([vectors * scale, centre.double()[:, :, None]], dim=-1)

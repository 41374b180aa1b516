"""Whole-body FDG PET phantom in SUV: physiological uptake (brain, myocardium, liver, spleen, kidneys, bladder, marrow),
scanner resolution blur, Poisson counting noise and, for the "lesion" label, hot lesions."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from monai_synth.data.phantoms._base import PhantomModel
from monai_synth.data.phantoms._geometry import RandomField, ellipsoid_radius, soft_inside

__all__ = ["PETPhantom"]

#: scanner resolution (full width at half maximum, mm) of a clinical PET/CT
FWHM_MM = 7.0


def _mix(img, value, occ):
    return img + (value - img) * occ


def _ellipsoid(pts, centre, semi, w):
    return soft_inside((1.0 - ellipsoid_radius(pts, centre, semi)) * min(semi), w)


class PETPhantom(PhantomModel):
    """Whole-body PET from head to pelvis. 2D images are coronal slices (x left-right, z cranio-caudal) at a
    patient-specific depth; 3D volumes are (x, y, z)."""

    axes_2d = (0, 2)
    fov_2d = (600.0, 1040.0)
    fov_3d = (600.0, 400.0, 1040.0)
    pose_shift_mm = (4.0, 2.0, 5.0)
    pose_angle_deg = (0.3, 0.5, 1.0)

    def anatomy(self, rng: np.random.Generator, lesion_rng: np.random.Generator, label: str) -> dict[str, Any]:
        a, b = 165.0 * rng.uniform(0.85, 1.15), 110.0 * rng.uniform(0.85, 1.15)
        u = rng.uniform
        anat: dict[str, Any] = {
            "trunk": (a, b, u(-420, -380), u(170, 200)),
            "head": ((0.0, 0.0, u(320, 350)), (72.0 * u(0.9, 1.1), 90.0 * u(0.9, 1.1), 100.0 * u(0.9, 1.1))),
            "brain_suv": u(6.0, 10.0),
            "background_suv": u(0.7, 1.1),
            "lungs": [
                ((s * a * u(0.38, 0.46), u(-15, 5), u(30, 60)), (a * u(0.26, 0.32), 75.0, u(100, 130))) for s in (-1, 1)
            ],
            "heart": ((a * u(0.05, 0.2), -b * u(0.15, 0.3), u(-10, 20)), (u(42, 55), u(38, 48), u(45, 58))),
            "myocardium_suv": u(1.5, 8.0),
            "liver": ((-a * u(0.35, 0.5), u(-20, 10), u(-140, -100)), (u(80, 100), u(65, 85), u(60, 80))),
            "liver_suv": u(2.0, 3.0),
            "spleen": ((a * u(0.45, 0.6), u(10, 40), u(-130, -90)), (u(28, 40), u(22, 30), u(40, 60))),
            "kidneys": [
                ((s * u(55, 75), u(15, 40), u(-230, -190)), (u(22, 28), u(22, 28), u(45, 60))) for s in (-1, 1)
            ],
            "kidney_suv": u(3.0, 6.0),
            "bladder": ((u(-25, 25), 0.0, u(-410, -360)), u(25, 45)),
            "bladder_suv": u(6.0, 25.0),
            "marrow": (u(-5, 5), u(60, 90), u(1.4, 2.0)),
            "texture": RandomField(rng, (30.0, 120.0), 16),
            "height": u(0.88, 1.12),
            "bowel": RandomField(rng, (25.0, 70.0), 16),
            "bowel_suv": u(1.2, 3.0),
            "slice_y": u(-15.0, 10.0),
            "lesions": [],
        }
        # the coronal reference plane of a 2D study runs through the bladder, as a reader would place it
        bc, br = anat["bladder"]
        anat["bladder"] = ((bc[0], anat["slice_y"] + u(-5.0, 5.0), bc[2]), br)
        anat["lesion_size_mm"] = 0.0
        if label == "lesion":
            sites = ["liver", "lung", "node"]
            for _ in range(lesion_rng.integers(1, 4)):
                site = sites[lesion_rng.integers(len(sites))]
                if site == "liver":
                    (lc, ls) = anat["liver"]
                elif site == "lung":
                    (lc, ls) = anat["lungs"][lesion_rng.integers(2)]
                else:
                    lc, ls = (0.0, 0.0, lesion_rng.uniform(-50, 120)), (50.0, 20.0, 40.0)
                offset = lesion_rng.uniform(-0.5, 0.5, 3) * np.asarray(ls)
                centre = np.asarray(lc) + offset
                centre[1] = anat["slice_y"] + lesion_rng.normal(0, 2.0)  # visible in the coronal slice
                diameter = lesion_rng.uniform(12.0, 40.0)
                anat["lesions"].append(
                    {"centre": tuple(centre), "radius": diameter / 2, "suv": lesion_rng.uniform(6, 20)}
                )
            anat["lesion_size_mm"] = max(les["radius"] * 2 for les in anat["lesions"])
        return anat

    def centre(self, anatomy: dict[str, Any], spatial_dims: int) -> np.ndarray:
        return np.array([0.0, anatomy["slice_y"] if spatial_dims == 2 else 0.0, 0.0])

    def render(self, pts, scanner_pts, spacing, anatomy, rng):
        # the anatomy is drawn for a standard height; taller patients stretch it along z
        pts = pts * np.array([1.0, 1.0, 1.0 / anatomy["height"]], dtype=pts.dtype).reshape(3, *([1] * (pts.ndim - 1)))
        x, y, z = pts
        w = 0.5 * min(spacing)
        a, b, z_lo, z_hi = anatomy["trunk"]
        trunk = soft_inside((1.0 - np.sqrt((x / a) ** 2 + (y / b) ** 2)) * b, w)
        trunk = trunk * soft_inside(z - z_lo, w) * soft_inside(z_hi - z, w)
        neck = soft_inside(55.0 - np.sqrt(x**2 + y**2), w) * soft_inside(z - z_hi + 10, w) * soft_inside(300 - z, w)
        head_c, head_s = anatomy["head"]
        head = _ellipsoid(pts, head_c, head_s, w)
        body = np.maximum(np.maximum(trunk, neck), head)
        bg = anatomy["background_suv"] * (1.0 + 0.1 * anatomy["texture"](pts))
        img = bg * body
        img = _mix(img, anatomy["brain_suv"], _ellipsoid(pts, head_c, np.asarray(head_s) - 8.0, w))
        for lc, ls in anatomy["lungs"]:
            img = _mix(img, 0.4, _ellipsoid(pts, lc, ls, w))
        hc, hs = anatomy["heart"]
        img = _mix(img, anatomy["myocardium_suv"], _ellipsoid(pts, hc, hs, w))
        img = _mix(img, 1.6, _ellipsoid(pts, hc, np.asarray(hs) - 12.0, w))  # blood pool
        img = _mix(img, anatomy["liver_suv"], _ellipsoid(pts, *anatomy["liver"], w))
        img = _mix(img, 0.85 * anatomy["liver_suv"], _ellipsoid(pts, *anatomy["spleen"], w))
        for kc, ks in anatomy["kidneys"]:
            img = _mix(img, anatomy["kidney_suv"], _ellipsoid(pts, kc, ks, w))
        mx, my, msuv = anatomy["marrow"]
        spine = soft_inside(14.0 - np.sqrt((x - mx) ** 2 + (y - my) ** 2), w) * soft_inside(z_hi + 60 - z, w) * trunk
        img = _mix(img, msuv, spine)
        # bladder filling changes between studies of the same patient, as it does in the clinic
        bc, br = anatomy["bladder"]
        br = br * rng.uniform(0.85, 1.15)
        img = _mix(
            img, anatomy["bladder_suv"] * rng.uniform(0.7, 1.3), _ellipsoid(pts, bc, (br, br * 0.8, br * 0.8), w)
        )
        for les in anatomy["lesions"]:
            img = _mix(img, les["suv"], _ellipsoid(pts, les["centre"], (les["radius"],) * 3, w))

        # acquisition: resolution blur, uptake-time scale, Poisson counts, reconstruction smoothing
        img = ndimage.gaussian_filter(img, [max(0.7, FWHM_MM / 2.355 / s) for s in spacing])
        img = img * rng.uniform(0.92, 1.08)
        counts_per_suv = rng.uniform(15.0, 30.0)
        img = rng.poisson(np.clip(img, 0, None) * counts_per_suv) / counts_per_suv
        img = ndimage.gaussian_filter(img, 0.6)
        return np.clip(img, 0.0, None)

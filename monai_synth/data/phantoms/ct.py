"""Chest CT phantom in Hounsfield units: body with fat and muscle layers, lungs with vessels, heart, aorta, spine, ribs
and, for the "nodule" label, a solid pulmonary nodule."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from monai_synth.data.phantoms._base import PhantomModel
from monai_synth.data.phantoms._geometry import RandomField, ellipsoid_radius, soft_inside

__all__ = ["CTPhantom"]

AIR, FAT, MUSCLE, SOFT, BLOOD, LUNG, BONE, MARROW, CSF = -1000.0, -100.0, 50.0, 35.0, 45.0, -850.0, 700.0, 250.0, 15.0
LIVER = 60.0


def _mix(img: np.ndarray, value: np.ndarray | float, occ: np.ndarray) -> np.ndarray:
    return img + (value - img) * occ


def _radial_depth(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Distance (mm) inside a star-shaped outline along the ray from its centre; negative outside."""
    rho = np.sqrt(dx**2 + dy**2)
    return rho * (1.0 / np.maximum(r, 1e-6) - 1.0)


class CTPhantom(PhantomModel):
    """Axial chest CT. 2D images are axial slices at a patient-specific level; 3D volumes cover the thorax.

    Image axes follow MONAI's reader convention (x, y[, z]): x left-right, y anterior-posterior, z cranio-caudal.
    """

    fov_2d = (400.0, 400.0)
    fov_3d = (400.0, 400.0, 300.0)
    pose_shift_mm = (4.0, 4.0, 3.0)
    pose_angle_deg = (1.0, 1.0, 2.0)

    def anatomy(self, rng: np.random.Generator, lesion_rng: np.random.Generator, label: str) -> dict[str, Any]:
        a = 150.0 * rng.uniform(0.85, 1.15)
        b = 105.0 * rng.uniform(0.85, 1.15)
        anat: dict[str, Any] = {
            "body": (a, b),
            "body_harmonics": [(k, rng.normal(0, 0.04), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)],
            "fat": rng.uniform(5.0, 25.0),
            "fat_hu": FAT + rng.normal(0, 10),
            "muscle": rng.uniform(8.0, 16.0),
            "lungs": [
                (
                    (s * a * rng.uniform(0.36, 0.46), b * rng.uniform(-0.15, 0.05), 30.0 + rng.normal(0, 8)),
                    (a * rng.uniform(0.24, 0.32), b * rng.uniform(0.52, 0.66), 130.0 * rng.uniform(0.9, 1.1)),
                )
                for s in (-1.0, 1.0)
            ],
            "lung_hu": LUNG + rng.normal(0, 25),
            "heart": (
                (a * rng.uniform(0.05, 0.2), -b * rng.uniform(0.15, 0.35), rng.normal(-10, 10)),
                (rng.uniform(45, 62), rng.uniform(38, 50), rng.uniform(50, 65)),
            ),
            "liver": (
                (-a * rng.uniform(0.2, 0.35), b * rng.uniform(-0.1, 0.1), rng.uniform(-140.0, -110.0)),
                (a * rng.uniform(0.45, 0.6), b * rng.uniform(0.6, 0.75), rng.uniform(70.0, 90.0)),
            ),
            "aorta": (a * rng.uniform(0.08, 0.18), b * rng.uniform(0.35, 0.5), rng.uniform(10, 15)),
            "spine": (rng.normal(0, 4), b * rng.uniform(0.55, 0.7), rng.uniform(15, 20)),
            "ribs": (rng.uniform(0, 30), rng.uniform(26, 34), rng.uniform(0.3, 0.55)),
            "lung_texture": RandomField(rng, (20.0, 80.0), 16),
            "vessels": RandomField(rng, (12.0, 45.0), 24),
            "tissue_texture": RandomField(rng, (15.0, 60.0), 16),
            "slice_z": rng.uniform(0.0, 50.0),
            "noise_hu": rng.uniform(8.0, 16.0),
        }
        anat["lesion_size_mm"] = 0.0
        anat["nodules"] = []
        if label == "nodule":
            # one to three solid nodules (a primary or metastases); the largest sets lesion_size_mm
            for _ in range(lesion_rng.integers(1, 4)):
                (lc, ls) = anat["lungs"][lesion_rng.integers(2)]
                ang = lesion_rng.uniform(0, 2 * np.pi)
                rad = lesion_rng.uniform(0.15, 0.55)
                centre = (
                    lc[0] + np.sign(lc[0]) * abs(np.cos(ang)) * rad * ls[0],
                    lc[1] + np.sin(ang) * rad * ls[1],
                    anat["slice_z"] + lesion_rng.normal(0, 2.0),
                )
                diameter = lesion_rng.uniform(10.0, 30.0)
                anat["nodules"].append(
                    {
                        "centre": centre,
                        "radius": diameter / 2,
                        "hu": lesion_rng.uniform(0.0, 60.0),
                        "harmonics": [
                            (k, lesion_rng.normal(0, 0.08), lesion_rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
                        ],
                    }
                )
            anat["lesion_size_mm"] = max(n["radius"] * 2 for n in anat["nodules"])
        return anat

    def centre(self, anatomy: dict[str, Any], spatial_dims: int) -> np.ndarray:
        return np.array([0.0, 0.0, anatomy["slice_z"] if spatial_dims == 2 else 20.0])

    def render(self, pts, scanner_pts, spacing, anatomy, rng):
        x, y, z = pts
        a, b = anatomy["body"]
        theta = np.arctan2(y / b, x / a)
        shape = 1.0 + sum(c * np.cos(k * theta + p) for k, c, p in anatomy["body_harmonics"])
        r_body = np.sqrt((x / a) ** 2 + (y / b) ** 2) / shape
        depth = _radial_depth(x, y, r_body)  # mm below the skin
        w = 0.5 * min(spacing)

        img = np.full(x.shape, AIR)
        img = _mix(img, anatomy["fat_hu"], soft_inside(depth, w))
        img = _mix(img, MUSCLE, soft_inside(depth - anatomy["fat"], w))
        inner = soft_inside(depth - anatomy["fat"] - anatomy["muscle"], w)
        img = _mix(img, SOFT + 6.0 * anatomy["tissue_texture"](pts), inner)

        # the liver sits under the right hemidiaphragm: it shows in the lung bases of a volume
        liver_c, liver_s = anatomy["liver"]
        img = _mix(img, LIVER, soft_inside((1.0 - ellipsoid_radius(pts, liver_c, liver_s)) * min(liver_s), w) * inner)
        heart_c, heart_s = anatomy["heart"]
        heart = soft_inside((1.0 - ellipsoid_radius(pts, heart_c, heart_s)) * min(heart_s), w)
        lung_hu = anatomy["lung_hu"] + 25.0 * anatomy["lung_texture"](pts)
        vessels = np.exp(-((anatomy["vessels"](pts) / 0.18) ** 2))
        for lc, ls in anatomy["lungs"]:
            r = ellipsoid_radius(pts, lc, ls)
            occ = soft_inside((1.0 - r) * min(ls[:2]), w) * (1.0 - heart) * inner
            # vessels thicken towards the hilum, as the pulmonary arteries do
            vessel_hu = 500.0 * vessels * np.clip(1.2 - r, 0.0, 1.0)
            img = _mix(img, lung_hu + vessel_hu, occ)
        img = _mix(img, BLOOD, heart * inner)

        ax, ay, ar = anatomy["aorta"]
        img = _mix(img, BLOOD, soft_inside(ar - np.sqrt((x - ax) ** 2 + (y - ay) ** 2), w))
        sx, sy, sr = anatomy["spine"]
        d_body = np.sqrt((x - sx) ** 2 + (y - sy) ** 2)
        img = _mix(img, BONE, soft_inside(sr - d_body, w))
        img = _mix(img, MARROW, soft_inside(sr - 3.0 - d_body, w))
        canal_y = sy + sr + 9.0
        d_canal = np.sqrt((x - sx) ** 2 + (y - canal_y) ** 2)
        img = _mix(img, BONE, soft_inside(14.0 - d_canal, w) * (y > sy))
        img = _mix(img, CSF, soft_inside(7.0 - d_canal, w))

        # ribs: bands just under the muscle layer, sloping down anteriorly, one every `period` mm along z
        phase, period, slope = anatomy["ribs"]
        zz = np.mod(z - slope * y - phase, period) - period / 2
        rib_depth = anatomy["fat"] + anatomy["muscle"] * 0.6
        rib = soft_inside(5.0 - np.abs(depth - rib_depth), w) * soft_inside(5.0 - np.abs(zz), w)
        rib = rib * ((np.abs(x) > 0.18 * a) | (y > 0))
        img = _mix(img, BONE, rib)

        for nod in anatomy["nodules"]:
            rel = pts - np.asarray(nod["centre"]).reshape(3, *([1] * (pts.ndim - 1)))
            dist = np.sqrt(np.sum(rel**2, axis=0))
            ang = np.arctan2(rel[1], rel[0])
            radius = nod["radius"] * (1.0 + sum(c * np.cos(k * ang + p) for k, c, p in nod["harmonics"]))
            img = _mix(img, nod["hu"], soft_inside(radius - dist, w))

        # scanner physics: in-plane blur, correlated quantum noise, small calibration drift of the HU scale
        sigma = [max(0.4, 0.8 / s) for s in spacing]
        img = ndimage.gaussian_filter(img, sigma)
        noise = ndimage.gaussian_filter(rng.standard_normal(img.shape), 0.7)
        noise *= anatomy["noise_hu"] / max(noise.std(), 1e-6)
        img = img + noise * (img > -950)
        img = (img + 1000.0) * (1.0 + rng.normal(0, 0.004)) - 1000.0
        return np.clip(np.round(img), -1024, 3071)

"""Brain MRI phantom: T2-weighted spin-echo contrast from tissue relaxation times, a smooth multiplicative coil bias
field, Rician noise and, for the "lesion" label, a T2-hyperintense lesion with surrounding oedema."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from monai_synth.data.phantoms._base import PhantomModel
from monai_synth.data.phantoms._geometry import RandomField, ellipsoid_radius, soft_inside

__all__ = ["MRIPhantom", "spin_echo_signal", "TISSUES"]

# (T1 ms, T2 ms, proton density) at 1.5 T, rounded from the literature (e.g. Wansapura et al., JMRI 1999).
TISSUES: dict[str, tuple[float, float, float]] = {
    "scalp": (250.0, 70.0, 0.9),
    "bone": (250.0, 1.0, 0.05),
    "csf": (4000.0, 2000.0, 1.0),
    "gm": (950.0, 100.0, 0.8),
    "wm": (600.0, 80.0, 0.7),
    "lesion": (1400.0, 180.0, 0.85),
    "oedema": (1000.0, 125.0, 0.8),
}
#: repetition and echo time (ms) of the simulated protocol: long TR, long TE gives T2 weighting
TR_MS, TE_MS = 3500.0, 90.0


def spin_echo_signal(t1: float, t2: float, pd: float, tr: float = TR_MS, te: float = TE_MS) -> float:
    """Spin-echo magnitude ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``: the contrast changes with TR/TE as on a scanner."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def _mix(img, value, occ):
    return img + (value - img) * occ


class MRIPhantom(PhantomModel):
    """Head MRI. 2D images are axial slices through the lateral ventricles at a patient-specific level."""

    fov_2d = (240.0, 240.0)
    fov_3d = (240.0, 240.0, 200.0)
    pose_shift_mm = (2.5, 2.5, 2.0)
    pose_angle_deg = (1.0, 1.0, 2.0)

    def anatomy(self, rng: np.random.Generator, lesion_rng: np.random.Generator, label: str) -> dict[str, Any]:
        head = (72.0 * rng.uniform(0.9, 1.1), 92.0 * rng.uniform(0.9, 1.1), 75.0 * rng.uniform(0.9, 1.1))
        vs = rng.uniform(0.6, 1.5)
        anat: dict[str, Any] = {
            "head": head,
            "harmonics": [(k, rng.normal(0, 0.035), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)],
            "yaw": np.deg2rad(rng.normal(0, 5.0)),
            "scalp": rng.uniform(4.0, 7.0),
            "skull": rng.uniform(5.0, 8.0),
            "csf": rng.uniform(1.5, 3.5),
            "cortex": rng.uniform(2.5, 4.0),
            "folding": RandomField(rng, (14.0, 40.0), 24),
            "fold_amp": rng.uniform(2.0, 4.0),
            "ventricles": [
                ((s * 9.0 * vs**0.5, rng.normal(0, 3), 15.0 + rng.normal(0, 3)), (6.0 * vs, 28.0 * vs**0.5, 11.0 * vs))
                for s in (-1.0, 1.0)
            ],
            "nuclei": [
                ((s * rng.uniform(18, 24), rng.uniform(-5, 5), rng.uniform(-2, 6)), (9.0, 14.0, 10.0))
                for s in (-1.0, 1.0)
            ],
            "texture": RandomField(rng, (10.0, 50.0), 16),
            "bias": RandomField(rng, (250.0, 600.0), 6),
            "slice_z": rng.uniform(8.0, 28.0),
            "snr": rng.uniform(15.0, 30.0),
        }
        anat["lesion_size_mm"] = 0.0
        if label == "lesion":
            ang = lesion_rng.uniform(0, 2 * np.pi)
            rad = lesion_rng.uniform(0.3, 0.5)
            diameter = lesion_rng.uniform(8.0, 35.0)
            anat["lesion"] = {
                "centre": (
                    np.cos(ang) * rad * head[0],
                    np.sin(ang) * rad * head[1],
                    anat["slice_z"] + lesion_rng.normal(0, 2.0),
                ),
                "radius": diameter / 2,
                "oedema": lesion_rng.uniform(1.3, 1.9),
                "harmonics": [(k, lesion_rng.normal(0, 0.08), lesion_rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)],
            }
            anat["lesion_size_mm"] = diameter
        return anat

    def centre(self, anatomy: dict[str, Any], spatial_dims: int) -> np.ndarray:
        return np.array([0.0, 0.0, anatomy["slice_z"] if spatial_dims == 2 else 0.0])

    def render(self, pts, scanner_pts, spacing, anatomy, rng):
        # heads are not symmetric about the scanner axis: each patient's midline has its own in-plane angle
        cy, sy = np.cos(anatomy["yaw"]), np.sin(anatomy["yaw"])
        pts = np.stack([cy * pts[0] - sy * pts[1], sy * pts[0] + cy * pts[1], pts[2]])
        x, y, z = pts
        sig = {k: spin_echo_signal(*v) for k, v in TISSUES.items()}
        w = 0.5 * min(spacing)
        a, b, c = anatomy["head"]
        theta = np.arctan2(y / b, x / a)
        # the in-plane shape harmonics fade towards the vertex, where their angle is undefined
        fade = (x**2 + y**2) / (x**2 + y**2 + (0.3 * a) ** 2)
        shape = 1.0 + fade * sum(h * np.cos(k * theta + p) for k, h, p in anatomy["harmonics"])
        r = ellipsoid_radius(pts, (0, 0, 0), anatomy["head"]) / shape
        rho = np.sqrt(x**2 + y**2 + z**2)
        depth = rho * (1.0 / np.maximum(r, 1e-6) - 1.0)  # mm below the scalp surface

        img = np.zeros(x.shape)
        img = _mix(img, sig["scalp"], soft_inside(depth, w))
        d = depth - anatomy["scalp"]
        img = _mix(img, sig["bone"], soft_inside(d, w))
        d = d - anatomy["skull"]
        img = _mix(img, sig["csf"], soft_inside(d, w))
        d = d - anatomy["csf"]
        fold = anatomy["folding"](pts)
        img = _mix(img, sig["gm"], soft_inside(d, w))
        # gyri and sulci: the grey/white boundary and CSF-filled sulci follow a patient-specific folding field
        img = _mix(img, sig["csf"], soft_inside(d, w) * soft_inside(0.5 - np.abs(fold - 0.8), 0.15) * (d < 12.0))
        wm = soft_inside(d - anatomy["cortex"] - anatomy["fold_amp"] * (1.0 + fold), w)
        img = _mix(img, sig["wm"] * (1.0 + 0.03 * anatomy["texture"](pts)), wm)
        for centre, semi in anatomy["nuclei"]:
            img = _mix(img, sig["gm"], soft_inside((1.0 - ellipsoid_radius(pts, centre, semi)) * min(semi), w))
        for centre, semi in anatomy["ventricles"]:
            img = _mix(img, sig["csf"], soft_inside((1.0 - ellipsoid_radius(pts, centre, semi)) * min(semi), w))

        if "lesion" in anatomy:
            les = anatomy["lesion"]
            rel = pts - np.asarray(les["centre"]).reshape(3, *([1] * (pts.ndim - 1)))
            dist = np.sqrt(np.sum(rel**2, axis=0))
            ang = np.arctan2(rel[1], rel[0])
            radius = les["radius"] * (1.0 + sum(h * np.cos(k * ang + p) for k, h, p in les["harmonics"]))
            img = _mix(img, sig["oedema"], soft_inside(radius * les["oedema"] - dist, 2.0 * w) * wm)
            img = _mix(img, sig["lesion"], soft_inside(radius - dist, w))

        # acquisition: point-spread blur, coil bias field (fixed to the scanner, partly patient- and study-specific),
        # receiver gain, Rician magnitude noise
        img = ndimage.gaussian_filter(img, [max(0.4, 0.8 / s) for s in spacing])
        study_bias = RandomField(rng, (250.0, 600.0), 6)
        bias = np.exp(0.12 * anatomy["bias"](scanner_pts) + 0.06 * study_bias(scanner_pts))
        gain = 1000.0 * np.exp(rng.normal(0, 0.1))
        img = img * bias * gain
        sigma = gain * sig["wm"] / anatomy["snr"]
        noisy = np.hypot(img + sigma * rng.standard_normal(img.shape), sigma * rng.standard_normal(img.shape))
        return noisy

"""Breast ultrasound phantom (2D B-mode, linear probe): skin, subcutaneous fat with Cooper's ligaments, fibroglandular
tissue, retromammary fat, pectoralis muscle, and a lesion whose BI-RADS descriptors (shape, orientation, margin, echo
pattern, posterior features) follow the assessment category; speckle from coherent scattering; log compression.

BI-RADS ultrasound lexicon (ACR, 5th ed.): category 3 is typically an oval, circumscribed, parallel (wider-than-tall),
homogeneous hypoechoic mass with posterior enhancement; suspicion rises (4a -> 4c) with irregular shape, indistinct,
angular or microlobulated margins and heterogeneous echo pattern; category 5 is irregular, spiculated, not parallel
(taller-than-wide), often with an echogenic halo and posterior shadowing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from monai_synth.data.phantoms._base import PhantomModel
from monai_synth.data.phantoms._geometry import Pose, RandomField, rotation_matrix, soft_inside

__all__ = ["USPhantom", "BIRADS_DESCRIPTORS"]

#: per category: ranges the patient's lesion is drawn from.
#:   aspect: width / height (> 1 parallel); lobes: amplitude of macro-lobulation (irregular shape);
#:   micro: microlobulation amplitude; angular: angular-margin amplitude; spicules: (count range, length as fraction of
#:   radius); edge: margin blur (mm, indistinct); echo: echogenicity relative to fat; hetero: internal heterogeneity;
#:   calc: number of microcalcifications; attenuation: excess attenuation (1/mm) inside the lesion, < 0 enhancement;
#:   halo: echogenic rim strength; size: largest diameter (mm)
BIRADS_DESCRIPTORS: dict[str, dict[str, Any]] = {
    "3": dict(
        aspect=(1.6, 2.1),
        lobes=(0.0, 0.03),
        micro=0.0,
        angular=0.0,
        spicules=((0, 0), 0.0),
        edge=0.25,
        echo=(0.25, 0.35),
        hetero=0.03,
        calc=(0, 0),
        attenuation=(-0.08, -0.05),
        halo=0.0,
        size=(6.0, 14.0),
        tilt=8.0,
    ),
    "4a": dict(
        aspect=(1.3, 1.6),
        lobes=(0.04, 0.08),
        micro=0.04,
        angular=0.0,
        spicules=((0, 0), 0.0),
        edge=0.5,
        echo=(0.2, 0.3),
        hetero=0.08,
        calc=(0, 1),
        attenuation=(-0.02, -0.005),
        halo=0.0,
        size=(7.0, 16.0),
        tilt=12.0,
    ),
    "4b": dict(
        aspect=(1.05, 1.3),
        lobes=(0.08, 0.13),
        micro=0.07,
        angular=0.08,
        spicules=((0, 2), 0.2),
        edge=0.9,
        echo=(0.15, 0.25),
        hetero=0.14,
        calc=(0, 3),
        attenuation=(-0.005, 0.01),
        halo=0.0,
        size=(8.0, 18.0),
        tilt=18.0,
    ),
    "4c": dict(
        aspect=(0.85, 1.05),
        lobes=(0.12, 0.18),
        micro=0.08,
        angular=0.14,
        spicules=((2, 5), 0.35),
        edge=1.2,
        echo=(0.12, 0.2),
        hetero=0.2,
        calc=(2, 5),
        attenuation=(0.015, 0.025),
        halo=0.3,
        size=(9.0, 20.0),
        tilt=22.0,
    ),
    "5": dict(
        aspect=(0.6, 0.85),
        lobes=(0.15, 0.22),
        micro=0.06,
        angular=0.18,
        spicules=((8, 14), 0.5),
        edge=1.5,
        echo=(0.08, 0.15),
        hetero=0.25,
        calc=(3, 8),
        attenuation=(0.035, 0.05),
        halo=0.7,
        size=(10.0, 24.0),
        tilt=10.0,
    ),
}

#: backscatter amplitude of the tissues (relative): fat is darker than the fibroglandular tissue
FAT_ECHO, GLAND_ECHO, MUSCLE_ECHO, SKIN_ECHO, LIGAMENT_ECHO = 0.2, 0.9, 0.4, 1.2, 1.2
#: displayed dynamic range of the log-compressed envelope (dB)
DYNAMIC_RANGE_DB = 50.0
#: number of steering angles averaged by spatial compounding
N_COMPOUND = 2


def _wrap(angle):
    """Angle difference wrapped to [-pi, pi)."""
    return np.mod(angle + np.pi, 2 * np.pi) - np.pi


class USPhantom(PhantomModel):
    """Linear-probe breast ultrasound, 40 x 40 mm. Image axes (lateral, depth); the beam runs along depth."""

    axes_2d = (0, 1)
    fov_2d = (40.0, 40.0)
    pose_shift_mm = (1.2, 0.4, 0.0)
    pose_angle_deg = (0.0, 0.0, 3.0)

    def pose(self, rng: np.random.Generator, spatial_dims: int) -> Pose:
        # the probe slides along the skin and tilts in plane; it cannot move off the skin
        shift = np.clip(rng.standard_normal(3), -2, 2) * np.asarray(self.pose_shift_mm)
        return Pose(rotation_matrix((0.0, 0.0, np.clip(rng.standard_normal(), -2, 2) * 3.0)), shift)

    def anatomy(self, rng: np.random.Generator, lesion_rng: np.random.Generator, label: str) -> dict[str, Any]:
        u = rng.uniform
        anat: dict[str, Any] = {
            "skin": u(1.2, 2.2),
            "fat": u(3.0, 9.0),
            "gland": u(12.0, 20.0),
            "retro": u(1.0, 3.0),
            "muscle": u(5.0, 10.0),
            "boundary": [RandomField(rng, (15.0, 60.0), 8) for _ in range(4)],
            "boundary_amp": u(0.8, 2.5),
            "ligaments": RandomField(rng, (8.0, 25.0), 16),
            "gland_texture": RandomField(rng, (3.0, 12.0), 24),
            "lobules": RandomField(rng, (4.0, 10.0), 16),
            "fat_echo": FAT_ECHO * u(0.85, 1.15),
            "gland_echo": GLAND_ECHO * u(0.8, 1.2),
            "muscle_angle": u(-0.25, 0.25),
            "muscle_period": u(1.5, 3.0),
        }
        d = BIRADS_DESCRIPTORS[label]
        lr = lesion_rng
        size = lr.uniform(*d["size"])
        aspect = lr.uniform(*d["aspect"])
        half_w, half_h = (size / 2, size / 2 / aspect) if aspect >= 1 else (size / 2 * aspect, size / 2)
        n_spic = lr.integers(d["spicules"][0][0], d["spicules"][0][1] + 1)
        n_calc = lr.integers(d["calc"][0], d["calc"][1] + 1)
        depth_in_gland = anat["skin"] + anat["fat"] + anat["gland"] * lr.uniform(0.35, 0.65)
        anat["lesion"] = {
            "centre": (lr.uniform(-8.0, 8.0), max(depth_in_gland, half_h + anat["skin"] + 1.5)),
            "half_w": half_w,
            "half_h": half_h,
            "tilt": np.deg2rad(lr.normal(0, d["tilt"])),
            "lobes": [(k, lr.uniform(*d["lobes"]) * lr.choice([-1, 1]), lr.uniform(0, 2 * np.pi)) for k in (2, 3, 4)],
            "micro": [(k, d["micro"] * lr.uniform(0.5, 1.0), lr.uniform(0, 2 * np.pi)) for k in (9, 13)],
            "angular": (d["angular"] * lr.uniform(0.7, 1.0), lr.integers(4, 7), lr.uniform(0, 2 * np.pi)),
            "spicules": [
                (lr.uniform(-np.pi, np.pi), d["spicules"][1] * lr.uniform(0.6, 1.2), lr.uniform(0.05, 0.1))
                for _ in range(n_spic)
            ],
            "edge": d["edge"],
            "echo": lr.uniform(*d["echo"]),
            "hetero": d["hetero"],
            "texture": RandomField(lr, (1.5, 5.0), 16),
            "calcs": [(lr.uniform(-0.7, 0.7), lr.uniform(-0.7, 0.7)) for _ in range(n_calc)],
            "attenuation": lr.uniform(*d["attenuation"]),
            "halo": d["halo"],
        }
        anat["lesion_size_mm"] = float(size)
        return anat

    def centre(self, anatomy: dict[str, Any], spatial_dims: int) -> np.ndarray:
        return np.array([0.0, self.fov_2d[1] / 2, 0.0])

    def _lesion(self, pts: np.ndarray, les: dict[str, Any], w: float):
        """Occupancy (0..1) of the lesion, its echogenic halo band, and its internal echogenicity."""
        cx, cy = les["centre"]
        dx, dy = pts[0] - cx, pts[1] - cy
        ct, st = np.cos(les["tilt"]), np.sin(les["tilt"])
        uu, vv = ct * dx + st * dy, -st * dx + ct * dy
        rn = np.sqrt((uu / les["half_w"]) ** 2 + (vv / les["half_h"]) ** 2)
        theta = np.arctan2(vv / les["half_h"], uu / les["half_w"])
        bound = 1.0 + sum(c * np.cos(k * theta + p) for k, c, p in les["lobes"] + les["micro"])
        amp, n_corner, phase = les["angular"]
        # angular margin: a triangle wave in angle makes straight facets that meet in corners
        bound = bound + amp * (2.0 * np.abs(_wrap(n_corner * theta + phase)) / np.pi - 0.5)
        for ang, length, width in les["spicules"]:
            bound = bound + length * np.clip(1.0 - np.abs(_wrap(theta - ang)) / width, 0.0, 1.0) ** 2
        scale = min(les["half_w"], les["half_h"])
        signed = (bound - rn) * scale
        occ = soft_inside(signed, max(w, les["edge"]))
        halo = np.exp(-(((signed + 1.2) / 1.0) ** 2)) * les["halo"]
        echo = les["echo"] * (1.0 + les["hetero"] * 3.0 * les["texture"](pts))
        return occ, halo, np.clip(echo, 0.01, None)

    def echo_map(self, pts: np.ndarray, anatomy: dict[str, Any], w: float) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free tissue echogenicity (backscatter amplitude) and the lesion's occupancy at ``pts``."""
        x, depth = pts[0], pts[1]
        # layer boundaries undulate along the skin only: evaluate them once per distinct lateral position
        xs, inverse = np.unique(x, return_inverse=True)
        line = np.zeros((3, xs.size), dtype=pts.dtype)
        line[0] = xs
        bnd = [(f(line) * anatomy["boundary_amp"])[inverse].reshape(x.shape) for f in anatomy["boundary"]]
        y_skin = anatomy["skin"]
        y_fat = y_skin + anatomy["fat"] + bnd[0]
        y_gland = y_fat + anatomy["gland"] + 1.5 * bnd[1]
        y_retro = y_gland + anatomy["retro"] + 0.3 * bnd[2]
        y_muscle = y_retro + anatomy["muscle"] + 0.5 * bnd[3]

        lobules = anatomy["lobules"](pts)
        fat = anatomy["fat_echo"] * (1.0 + 0.15 * lobules)
        echo = np.full(x.shape, SKIN_ECHO, dtype=np.float32)
        echo = echo + (fat - echo) * soft_inside(depth - y_skin, w)
        lig = np.exp(-((anatomy["ligaments"](pts) / 0.1) ** 2))  # Cooper's ligaments: thin bright curved lines
        echo = echo + (LIGAMENT_ECHO - echo) * lig * soft_inside(depth - y_skin - 0.5, w) * soft_inside(
            y_fat - depth, w
        )
        gland = anatomy["gland_echo"] * np.exp(0.3 * anatomy["gland_texture"](pts))
        gland = gland + (fat - gland) * soft_inside(lobules - 1.0, 0.12)  # fat lobules inside the glandular layer
        echo = echo + (gland - echo) * soft_inside(depth - y_fat, w)
        echo = echo + (fat - echo) * soft_inside(depth - y_gland, w)
        ma, mp = anatomy["muscle_angle"], anatomy["muscle_period"]
        fibres = 1.0 + 0.5 * np.cos(2 * np.pi * (np.cos(ma) * depth - np.sin(ma) * x) / mp)
        echo = echo + (MUSCLE_ECHO * fibres - echo) * soft_inside(depth - y_retro, w)
        fascia = np.exp(-(((depth - y_retro) / 0.4) ** 2)) + np.exp(-(((depth - y_muscle) / 0.5) ** 2))
        echo = echo + (LIGAMENT_ECHO - echo) * np.clip(fascia, 0, 1)
        echo = echo + (0.4 * MUSCLE_ECHO - echo) * soft_inside(depth - y_muscle - 0.5, w)  # chest wall below

        les = anatomy["lesion"]
        occ, halo, les_echo = self._lesion(pts, les, w)
        echo = echo + (1.2 * anatomy["gland_echo"] - echo) * np.clip(halo * (1.0 - occ), 0, 1)
        echo = echo + (les_echo * anatomy["fat_echo"] - echo) * occ
        for cu, cv in les["calcs"]:
            cx = les["centre"][0] + cu * les["half_w"]
            cy = les["centre"][1] + cv * les["half_h"]
            echo = echo + 2.5 * np.exp(-((x - cx) ** 2 + (depth - cy) ** 2) / (2 * max(w, 0.25) ** 2)) * occ
        return echo, occ

    def _posed_maps(self, pts, scanner_pts, spacing, anatomy):
        """Echo map and lesion occupancy at the posed ``pts``.

        The patient's maps are rendered once per image geometry on a grid padded by the largest pose change and then
        resampled for each study (a rigid move of the probe), which is what keeps 600 images in a few seconds.
        """
        key = (scanner_pts.shape, tuple(spacing))
        cache = anatomy.setdefault("_maps", {})
        if key not in cache:
            pad = [int(np.ceil(4.0 / s)) + 1 for s in spacing]
            origin = scanner_pts[:, 0, 0].astype(np.float64)
            steps = [scanner_pts[:, 1, 0] - scanner_pts[:, 0, 0], scanner_pts[:, 0, 1] - scanner_pts[:, 0, 0]]
            steps = [st.astype(np.float64) for st in steps]
            i = np.arange(-pad[0], scanner_pts.shape[1] + pad[0])
            j = np.arange(-pad[1], scanner_pts.shape[2] + pad[1])
            ref = origin[:, None, None] + steps[0][:, None, None] * i[None, :, None] + steps[1][:, None, None] * j
            echo, occ = self.echo_map(ref.astype(np.float32), anatomy, 0.5 * min(spacing))
            cache[key] = (echo, occ, origin - pad[0] * steps[0] - pad[1] * steps[1], steps)
        echo, occ, origin, steps = cache[key]
        rel = pts.reshape(3, -1).astype(np.float64) - origin[:, None]
        idx = np.stack([st @ rel / (st @ st) for st in steps])
        echo = ndimage.map_coordinates(echo, idx, order=1, mode="nearest").reshape(pts.shape[1:])
        occ = ndimage.map_coordinates(occ, idx, order=1, mode="nearest").reshape(pts.shape[1:])
        return echo, occ

    def render(self, pts, scanner_pts, spacing, anatomy, rng):
        echo, occ = self._posed_maps(pts, scanner_pts, spacing, anatomy)
        # posterior features: the beam runs along image axis 1, so attenuation accumulates along it; a lesion that
        # attenuates less than tissue enhances what lies behind it, one that attenuates more casts a shadow
        path = np.cumsum(occ * anatomy["lesion"]["attenuation"], axis=1) * spacing[1]
        path = ndimage.gaussian_filter1d(path, max(0.5, 0.6 / spacing[0]), axis=0)
        amplitude = echo * np.exp(-2.0 * path)

        # speckle: envelope of complex Gaussian scattering blurred by the point-spread function (Rayleigh statistics),
        # intensity-averaged over a few steering angles as spatial compounding does on breast scanners
        psf = (max(0.5, 0.45 / spacing[0]), max(0.4, 0.3 / spacing[1]))
        intensity = np.zeros(echo.shape, dtype=np.float32)
        for _ in range(N_COMPOUND):
            re = ndimage.gaussian_filter(rng.standard_normal(echo.shape, dtype=np.float32), psf)
            im = ndimage.gaussian_filter(rng.standard_normal(echo.shape, dtype=np.float32), psf)
            intensity += re**2 + im**2
        speckle = np.sqrt(intensity / intensity.mean())
        gain_db = rng.normal(0.0, 1.5)
        db = 20.0 * np.log10(np.maximum(amplitude * speckle, 1e-6)) + gain_db
        grey = 255.0 * (db + DYNAMIC_RANGE_DB - 4.0) / DYNAMIC_RANGE_DB
        return np.clip(np.round(grey), 0, 255)

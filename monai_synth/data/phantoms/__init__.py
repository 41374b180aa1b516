"""Labelled phantom cohorts for CT, MRI, PET and breast ultrasound.

No real dataset can be downloaded where this package is tested, so every later stage (datalists, training, the
privacy safeguard, the audit) runs on phantoms that have the structure of real data: physical units, anatomy,
modality physics (resolution, noise, bias field, speckle), diagnostic labels that change what the image shows, and
patients whose repeat studies resemble each other more than they resemble other patients.

Arrays are channel-first with spatial axes in the order MONAI's readers return them, (x, y[, z]): what
:func:`write_cohort` stores loads back unchanged through ``LoadImage(ensure_channel_first=True)`` with the pydicom,
nibabel or PIL reader. CT and MRI 2D images are axial slices, PET 2D images coronal slices (x, z), ultrasound images
(lateral, depth) with the beam along axis 1.
"""

from __future__ import annotations

from monai_synth.data.phantoms._cohort import PHANTOMS, generate_cohort, iter_cohort
from monai_synth.data.phantoms._io import write_cohort

__all__ = ["generate_cohort", "iter_cohort", "write_cohort", "PHANTOMS"]

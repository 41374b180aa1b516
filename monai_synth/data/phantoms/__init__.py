"""Labelled phantom cohorts for CT, MRI, PET and breast ultrasound.

No real dataset can be downloaded where this package is tested, so every later stage (datalists, training, the
privacy safeguard, the audit) runs on phantoms that have the structure of real data: physical units, anatomy,
modality physics (resolution, noise, bias field, speckle), diagnostic labels that change what the image shows, and
patients whose repeat studies resemble each other more than they resemble other patients.
"""

from __future__ import annotations

from monai_synth.data.phantoms._cohort import PHANTOMS, generate_cohort, iter_cohort
from monai_synth.data.phantoms._io import write_cohort

__all__ = ["generate_cohort", "iter_cohort", "write_cohort", "PHANTOMS"]

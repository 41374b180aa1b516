"""Data layer: modality table, datalists, patient-level splits, image loading and release writers.

Only the light, dependency-free pieces are imported here; ``phantoms``, ``loading`` and ``export`` (which pull in
MONAI readers, nibabel, pydicom) are imported from their modules when needed.
"""

from __future__ import annotations

from monai_synth.data.datalist import DatalistError, datalist_fingerprint, load_datalist
from monai_synth.data.modalities import MODALITIES, Modality, get_modality
from monai_synth.data.splits import check_disjoint, split_by_patient

__all__ = [
    "MODALITIES",
    "Modality",
    "get_modality",
    "DatalistError",
    "load_datalist",
    "datalist_fingerprint",
    "split_by_patient",
    "check_disjoint",
]

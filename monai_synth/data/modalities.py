"""The imaging modalities monai_synth knows, with their diagnostic labels and default file formats.

One table that the phantoms, datalist validation, transforms, bundles and exporters all read, so that adding a
modality is one entry here (naming its intensity transform class) plus its phantom. The labels here are the
modality's defaults (what the phantoms draw); a bundle's label set is its own configuration (``labels`` in
``common.yaml``, or ``--labels`` on the command line) and needs no edit of this table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Modality", "MODALITIES", "get_modality"]


@dataclass(frozen=True)
class Modality:
    """What the rest of the package needs to know about one modality.

    Args:
        name: short key used in configs and on the command line.
        dicom_code: DICOM (0008,0060) Modality code, also used in bundle metadata.
        labels: ordered diagnostic classes; the index of a label is its class id.
        physical_unit: unit of the stored intensities (exported images come back in it).
        native_formats: on-disk formats the phantom writer produces, first is the default.
        intensity: dotted path of the modality's invertible intensity transform (physical units <-> model space).
        spatial_dims: spatial dimensionalities the phantoms support.
    """

    name: str
    dicom_code: str
    labels: tuple[str, ...]
    physical_unit: str
    native_formats: tuple[str, ...]
    intensity: str
    spatial_dims: tuple[int, ...] = (2, 3)

    def label_index(self, label: str) -> int:
        """Class id of ``label``; raises ``ValueError`` naming the known labels."""
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise ValueError(f"unknown {self.name} label {label!r}; expected one of {list(self.labels)}") from None


_ARRAY = "monai_synth.transforms.array"

MODALITIES: dict[str, Modality] = {
    "ct": Modality("ct", "CT", ("normal", "nodule"), "HU", ("dicom", "nifti"), f"{_ARRAY}.CTWindow"),
    "mri": Modality("mri", "MR", ("normal", "lesion"), "a.u.", ("nifti",), f"{_ARRAY}.MRIPercentileScale"),
    "pet": Modality("pet", "PT", ("normal", "lesion"), "SUV", ("nifti",), f"{_ARRAY}.PETSUVScale"),
    # BI-RADS assessment categories for breast ultrasound, as in CoLDiT.
    "us": Modality(
        "us",
        "US",
        ("3", "4a", "4b", "4c", "5"),
        "grey level (0-255)",
        ("png", "dicom"),
        f"{_ARRAY}.UltrasoundGreyScale",
        (2,),
    ),
}


def get_modality(name: str) -> Modality:
    """Look up a modality by key; raises ``ValueError`` listing the known keys."""
    key = str(name).lower()
    if key not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {sorted(MODALITIES)}")
    return MODALITIES[key]

"""Data preparation for a bundle run: which datalist to train on, and its validated patient-level splits.

A bundle names a dataset folder (or nothing, for a phantom cohort); every stage asks this module for the same
datalist and the same split, so the autoencoder, the latent cache, the DiT and the safeguard's calibration all see
the same patients without passing files between stages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from monai_synth.data.datalist import load_datalist
from monai_synth.data.phantoms import write_cohort
from monai_synth.data.splits import check_disjoint, split_by_patient

__all__ = ["prepare_datalist", "load_splits"]

logger = logging.getLogger(__name__)


def prepare_datalist(
    dataset_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    modality: str,
    datalist: str | os.PathLike | None = None,
    phantom_patients: int = 40,
    phantom_images_per_patient: int = 2,
    phantom_size: int | Sequence[int] = 64,
    seed: int = 0,
) -> str:
    """Path of the datalist to train on; writes a phantom cohort first when no dataset is given.

    With ``dataset_dir`` (or an explicit ``datalist``) the user's data is used as is; the datalist file defaults to
    ``datalist.csv`` (or ``datalist.json``) inside ``dataset_dir``. Without either, a phantom cohort of the modality
    is written once into ``<output_dir>/phantom_cohort`` and reused by later stages and re-runs, so every stage of
    the quickstart trains, caches and calibrates on the same images.

    Args:
        dataset_dir: folder with the user's images and datalist, or ``None`` for a phantom cohort.
        output_dir: run output folder (the phantom cohort goes below it).
        modality: modality key (``"us"``, ``"ct"``, ...).
        datalist: explicit datalist file; overrides the ``dataset_dir`` default.
        phantom_patients: patients in the phantom cohort.
        phantom_images_per_patient: repeat studies per phantom patient.
        phantom_size: phantom image size.
        seed: phantom seed.

    Raises:
        FileNotFoundError: ``dataset_dir`` is given but holds no datalist.
    """
    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {str(path)!r} does not exist; set `datalist` to your CSV or JSON file")
        return str(path.resolve())
    if dataset_dir:
        for name in ("datalist.csv", "datalist.json"):
            path = Path(dataset_dir) / name
            if path.is_file():
                return str(path.resolve())
        raise FileNotFoundError(
            f"dataset_dir {str(dataset_dir)!r} holds no datalist.csv or datalist.json; write one (columns image, "
            "patient_id, label; image paths relative to the datalist) or pass `--datalist <file>`"
        )
    cohort_dir = Path(output_dir) / "phantom_cohort"
    existing = cohort_dir / "datalist.csv"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # rank 0 writes the cohort (the other ranks of a distributed run write nothing) and the others wait for it
        path = None
        if torch.distributed.get_rank() == 0:
            path = _phantom_cohort(
                cohort_dir, modality, phantom_patients, phantom_images_per_patient, phantom_size, seed
            )
        torch.distributed.barrier()
        return path or str(existing.resolve())
    return _phantom_cohort(cohort_dir, modality, phantom_patients, phantom_images_per_patient, phantom_size, seed)


def _phantom_cohort(
    cohort_dir: Path,
    modality: str,
    phantom_patients: int,
    phantom_images_per_patient: int,
    phantom_size: int | Sequence[int],
    seed: int,
) -> str:
    """The datalist of the phantom cohort in ``cohort_dir``, written first if it is not there."""
    existing = cohort_dir / "datalist.csv"
    if existing.is_file():
        return str(existing.resolve())
    logger.warning(
        f"no dataset_dir given: training on a {modality} PHANTOM cohort of {phantom_patients} patients written to "
        f"{cohort_dir}; pass --dataset_dir (or --datalist) to train on your data"
    )
    try:
        path = write_cohort(
            cohort_dir,
            modality=modality,
            n_patients=int(phantom_patients),
            images_per_patient=int(phantom_images_per_patient),
            spatial_dims=2,
            spatial_size=phantom_size,
            seed=int(seed),
        )
    except OSError:
        # processes that share no process group (several runs on one output_dir) may write the same (seeded) cohort
        # at once; the first one to finish wins
        if existing.is_file():
            return str(existing.resolve())
        raise
    return str(Path(path).resolve())


def load_splits(
    datalist: str | os.PathLike,
    labels: Sequence[str],
    holdout_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    check_files: bool = True,
) -> dict[str, list[dict]]:
    """Validated, patient-level ``train`` / ``val`` / ``holdout`` splits of a datalist.

    The datalist is checked against the bundle's labels before anything else happens, so a label the bundle does not
    know stops the run with one message naming every offending row. The split is a pure function of the datalist and
    the seed, so every stage of a bundle (autoencoder, latent cache, DiT, calibration of the safeguard on the
    holdout) sees the same patients in the same split without passing files around.

    Args:
        datalist: CSV or MONAI JSON datalist.
        labels: the bundle's ordered class names.
        holdout_fraction: fraction of patients kept out of training, used to calibrate the privacy threshold.
        val_fraction: fraction of patients for validation losses (0 for none).
        seed: split seed.
        check_files: check that every image file exists.

    Raises:
        monai_synth.data.datalist.DatalistError: unknown labels, missing files, malformed rows.
        ValueError: a split comes out empty (too few patients for the fractions).
    """
    records = load_datalist(datalist, labels=list(labels), check_files=check_files)
    splits = split_by_patient(records, holdout_fraction=holdout_fraction, val_fraction=val_fraction, seed=seed)
    check_disjoint(splits)
    splits.setdefault("val", [])
    for name in ("train", "holdout") + (("val",) if val_fraction > 0 else ()):
        if not splits.get(name):
            n_patients = len({r["patient_id"] for r in records})
            raise ValueError(
                f"the {name!r} split of {datalist} is empty ({n_patients} patients, holdout_fraction="
                f"{holdout_fraction}, val_fraction={val_fraction}); add patients or change the fractions"
            )
    return splits

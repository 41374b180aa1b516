"""Decode every image of every split once, before any stage trains, and name every file that cannot be used.

The datalist check (:mod:`monai_synth.data.datalist`) looks at paths and a few header bytes; it cannot see a PNG cut
short after its header, a DICOM dose grid or segmentation exported with the study, or a JPEG 2000 stream no
installed decoder reads. Without this step such a file fails deep inside a data loader (a truncated PNG in a
143-line traceback that names no file), or, when it sits in the holdout, only at release after both trainings.
Here each image goes through the very reader training uses (:func:`monai_synth.data.loading.load_image`), and all
problems are raised together as one :class:`~monai_synth.data.datalist.DatalistError`.

A check that passed is remembered by the fingerprint of the splits (paths, labels, sizes and modification times of
the files), so the later stages of a run, and re-runs on unchanged data, do not decode everything again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_synth.atomic import atomic_file
from monai_synth.data.datalist import DatalistError, datalist_fingerprint
from monai_synth.data.loading import ImageLoadError, load_image

__all__ = ["check_image", "check_split_images", "STAMP_NAME"]

logger = logging.getLogger(__name__)

#: File in the run's output folder that remembers the fingerprint of the last splits whose images all decoded.
STAMP_NAME = "image_check.json"


def check_image(path: str | os.PathLike, spatial_dims: int | None = None) -> str | None:
    """What makes one image unusable for training, or ``None`` when it decodes into finite values.

    Args:
        path: image file or DICOM series folder.
        spatial_dims: the number of spatial axes the bundle trains on (2 or 3); ``None`` accepts any.

    Returns:
        A message naming the file, what is wrong and how to fix it; ``None`` for a good image.
    """
    try:
        image = load_image(path)
    except (ImageLoadError, FileNotFoundError) as err:
        return str(err)
    if image.size == 0:
        return f"image {path} holds no pixels; remove its row from the datalist"
    if not np.isfinite(image).all():
        return f"image {path} holds NaN or infinite values; repair the file or remove its row from the datalist"
    if spatial_dims is not None and image.ndim - 1 != int(spatial_dims):
        return (
            f"image {path} has {image.ndim - 1} spatial axes (shape {list(image.shape[1:])}) but the bundle trains on "
            f"{spatial_dims}-D images; extract 2-D slices (`monai-synth datalist --slices`) or use a "
            f"{image.ndim - 1}-D bundle"
        )
    return None


def check_split_images(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    source: str | os.PathLike = "<splits>",
    stamp_dir: str | os.PathLike | None = None,
    spatial_dims: int | None = None,
    rank: int = 0,
) -> Mapping[str, Sequence[Mapping[str, Any]]]:
    """Decode every image of every split (train, val, holdout, ...) and return ``splits`` unchanged if all are good.

    Args:
        splits: split name -> records (``image``, ``patient_id``, ``label``, ...), as from ``load_splits``.
        source: the datalist, named in the error.
        stamp_dir: folder for :data:`STAMP_NAME`; a stamp of the same fingerprint skips the decoding. ``None``
            always decodes and writes nothing.
        spatial_dims: spatial axes every image must have (see :func:`check_image`).
        rank: the process rank; only rank 0 writes the stamp (other ranks of a distributed run write nothing).

    Raises:
        DatalistError: naming every image that cannot be used, with its split and patient.
    """
    records = [(name, rec) for name, recs in splits.items() for rec in recs]
    fingerprint = f"{datalist_fingerprint([rec for _, rec in records])}:{spatial_dims}"
    stamp = Path(stamp_dir) / STAMP_NAME if stamp_dir is not None else None
    if stamp is not None and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
                return splits
        except (OSError, ValueError):
            pass  # an unreadable stamp only costs a new check
    start = time.time()
    problems: list[tuple[int | None, str]] = []
    for name, rec in records:
        problem = check_image(rec["image"], spatial_dims=spatial_dims)
        if problem:
            problems.append((None, f"{name} split, patient {rec.get('patient_id')}: {problem}"))
    if problems:
        raise DatalistError(str(source), problems)
    logger.info(f"decoded all {len(records)} images of the splits {list(splits)} in {time.time() - start:.1f} s")
    if stamp is not None and int(rank) == 0:
        with atomic_file(stamp) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "images": len(records)}))
    return splits

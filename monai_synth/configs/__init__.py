"""The bundle configs every monai_synth bundle shares, and the order in which a stage merges them with a bundle's own.

A bundle folder (``bundles/<name>/configs``) holds what its modality decides: ``common.yaml`` (modality, labels,
``spatial_dims``, image and network sizes) and one small file per stage with that stage's hyper-parameters. The
wiring they plug into (data split and loading chain, networks, trainers, handlers, checkpoints, sampler, safeguard,
MLflow) is the same for every bundle and lives once, in the YAML files of this package folder, so a fix lands in
every bundle. MONAI merges ``--config_file`` lists left to right, later files winning, so a stage is::

    <bundle>/common.yaml  <package>/common.yaml  <package>/<stage>.yaml  <bundle>/<stage>.yaml  [multi_gpu.yaml x2]

The bundle's ``common.yaml`` comes first so that MONAI finds the bundle's ``metadata.json`` and ``logging.conf`` next
to it; the shared ``common.yaml`` therefore defines none of the ids a bundle's ``common.yaml`` sets.

``python -m monai_synth.configs <bundle_root> <stage>`` prints that list for ``python -m monai.bundle run``.
"""

from __future__ import annotations

import os
from pathlib import Path

from monai.utils import look_up_option

__all__ = ["CONFIG_DIR", "STAGE_FILES", "MULTI_GPU_OVERLAY", "MULTI_GPU_SAMPLE_OVERLAY", "config_files"]

#: this folder: the shared YAML files
CONFIG_DIR = Path(__file__).resolve().parent

#: the stage file of each stage (the same name in this folder and in a bundle's ``configs`` folder)
STAGE_FILES: dict[str, str] = {
    "autoencoder": "train_autoencoder.yaml",
    "diffusion": "train_diffusion.yaml",
    "sample": "sample.yaml",
    "evaluate": "evaluate.yaml",
}

#: the overlay layered last on a training stage for DistributedDataParallel (``torchrun``)
MULTI_GPU_OVERLAY = "multi_gpu.yaml"
#: the overlay layered last on the release for a sharded guarded release (``torchrun``); a bundle needs no file of
#: its own for it (it has nothing to choose there)
MULTI_GPU_SAMPLE_OVERLAY = "multi_gpu_sample.yaml"


def common_files(bundle_root: str | os.PathLike) -> list[str]:
    """The bundle's ``common.yaml`` and the shared one: what defines the networks, the data and the paths."""
    return config_files(bundle_root, "evaluate")[:2]


def config_files(bundle_root: str | os.PathLike, stage: str, multi_gpu: bool = False) -> list[str]:
    """The files of one stage of a bundle, in MONAI's merge order: shared, then the bundle's, for each layer.

    Args:
        bundle_root: the bundle folder (holding ``configs/common.yaml``).
        stage: ``"autoencoder"``, ``"diffusion"``, ``"sample"`` or ``"evaluate"``.
        multi_gpu: add the multi-GPU overlay: DistributedDataParallel for the training stages, a sharded guarded
            release for ``sample``.

    Raises:
        ValueError: an unknown stage, or ``multi_gpu`` for the evaluation (it runs on one device).
        FileNotFoundError: the bundle lacks one of its config files.
    """
    stage_file = look_up_option(stage, STAGE_FILES)
    layers = ["common.yaml", stage_file]
    if multi_gpu:
        if stage == "evaluate":
            raise ValueError("the evaluate stage runs on one device; multi_gpu applies to training and the release")
        layers.append(MULTI_GPU_SAMPLE_OVERLAY if stage == "sample" else MULTI_GPU_OVERLAY)
    own = Path(bundle_root) / "configs"
    files = []
    for name in layers:
        if name == MULTI_GPU_SAMPLE_OVERLAY:
            files += [str(CONFIG_DIR / name)] + ([str(own / name)] if (own / name).is_file() else [])
            continue
        if not (own / name).is_file():
            raise FileNotFoundError(
                f"{own / name} does not exist; every bundle has its own {name} (copy one from bundles/ct_ldit/configs)"
            )
        pair = (
            [str(own / name), str(CONFIG_DIR / name)]
            if name == "common.yaml"
            else [str(CONFIG_DIR / name), str(own / name)]
        )
        files += pair
    return files

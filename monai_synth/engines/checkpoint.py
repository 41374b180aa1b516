"""Checkpoints that can be trusted: written atomically, tagged with what they were trained on, found for resuming.

:class:`CheckpointMetadata` travels inside every checkpoint so that a checkpoint from another bundle, modality, label
set or image size is refused with a message instead of silently producing garbage; :func:`checkpoint_fingerprint`
ties derived artefacts (latent caches, releases) to the exact file they came from. The Ignite handlers that write
checkpoints during training (:class:`~monai_synth.handlers.AtomicCheckpointSaver`) and make the resume exact
(:class:`~monai_synth.handlers.IterationSeedHandler`) live in :mod:`monai_synth.handlers`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_synth.atomic import atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointMetadata",
    "CheckpointMismatchError",
    "LegacyCheckpointError",
    "legacy_flag",
    "checkpoint_fingerprint",
    "latest_checkpoint",
    "load_checkpoint",
    "atomic_torch_save",
]


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but was trained for something else (bundle, modality, labels, image size, stage)."""


class LegacyCheckpointError(CheckpointMismatchError):
    """A checkpoint written by an earlier monai_synth lacks what this run checks (e.g. its training split)."""


#: How to go on with a checkpoint written before this version recorded what the run checks.
LEGACY_HINT = (
    "Either retrain this stage (move the checkpoint folder away), or, if you are sure the checkpoint was trained on "
    "this datalist with these settings, pass `--legacy_checkpoints accept`: it is then used with a warning, unchecked "
    "on what it lacks, and the checkpoints this run writes record it."
)


def legacy_flag(value: Any) -> bool:
    """``accept`` -> True, ``refuse`` -> False (also booleans and their command-line spellings).

    Raises:
        ValueError: any other value.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("accept", "true", "yes", "1"):
        return True
    if text in ("refuse", "false", "no", "0"):
        return False
    raise ValueError(f"--legacy_checkpoints must be 'refuse' or 'accept', got {value!r}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary sibling file, then ``os.replace`` it onto ``path``.

    A reader therefore sees either the previous complete file or the new complete file, never a partial one.

    Returns:
        The destination path.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return path


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file's bytes, used to tie derived artefacts (latent caches, releases) to it.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; train or point to the right stage first")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    return value


class CheckpointMetadata:
    """What a checkpoint was trained for; put it in ``save_dict`` (and ``load_dict``) under ``"metadata"``.

    Loading it (``load_state_dict``, called by MONAI's ``CheckpointLoader`` at ``Events.STARTED``, i.e. before any
    iteration) does not overwrite anything: it compares the stored values with this object's and raises
    :class:`CheckpointMismatchError` listing every difference. Only fields set on *both* sides are compared, so a
    stage-2 run can check just ``bundle``/``modality``/``labels``/``spatial_size`` of an autoencoder checkpoint.

    Args:
        bundle: bundle name, e.g. ``"breast_us_ldit"``.
        modality: modality key from :mod:`monai_synth.data.modalities`.
        labels: ordered class names the network was conditioned on (order defines the class ids).
        spatial_size: image spatial size in model space.
        stage: ``"autoencoder"`` or ``"diffusion"``; compared only when both sides set it.
        extra: further JSON-like values to store and compare (e.g. ``{"latent_channels": 3}``). A checkpoint that
            lacks one of them was written by an earlier version that did not record it (e.g. ``training_split``):
            it is refused with :class:`LegacyCheckpointError`, saying how to go on, unless ``legacy`` accepts it.
        legacy: ``"refuse"`` (default) or ``"accept"``: use such a checkpoint with a warning.
    """

    FIELDS = ("bundle", "modality", "labels", "spatial_size", "stage")

    def __init__(
        self,
        bundle: str | None = None,
        modality: str | None = None,
        labels: Sequence[str] | None = None,
        spatial_size: int | Sequence[int] | None = None,
        stage: str | None = None,
        extra: Mapping[str, Any] | None = None,
        legacy: bool | str = "refuse",
    ) -> None:
        self.accept_legacy = legacy_flag(legacy)
        self.extra_fields = [str(k) for k in (extra or {})]
        if isinstance(spatial_size, int):
            spatial_size = [spatial_size]
        self.values: dict[str, Any] = {
            "bundle": bundle,
            "modality": None if modality is None else str(modality).lower(),
            "labels": None if labels is None else [str(v) for v in labels],
            "spatial_size": None if spatial_size is None else [int(s) for s in spatial_size],
            "stage": stage,
        }
        for k, v in (extra or {}).items():
            self.values[str(k)] = _normalise(v)

    def state_dict(self) -> dict[str, Any]:
        """Plain python values only, so MONAI's ``torch.load(weights_only=True)`` can read them back."""
        return {k: v for k, v in self.values.items() if v is not None}

    def check(self, stored: Mapping[str, Any], source: str = "checkpoint", ignore: Sequence[str] = ()) -> None:
        """Raise :class:`CheckpointMismatchError` if ``stored`` disagrees with this object's values.

        Args:
            stored: metadata read from a checkpoint.
            source: how to name the checkpoint in the message (usually its path).
            ignore: fields not to compare (e.g. ``("stage",)`` when reading an autoencoder for stage 2).
        """
        problems = []
        for key, expected in self.values.items():
            if key in ignore or expected is None or stored.get(key) is None:
                continue
            found = _normalise(stored[key])
            if key == "spatial_size" and len(found) != len(expected) and 1 in (len(found), len(expected)):
                # an int spatial size means the same size along every axis
                n = max(len(found), len(expected))
                found, expected = found * (n // len(found)), expected * (n // len(expected))
            if found != expected:
                problems.append(f"{key}: checkpoint has {found!r}, this run expects {expected!r}")
        missing = [k for k in self.extra_fields if k not in ignore and self.values.get(k) is not None]
        missing = [k for k in missing if stored.get(k) is None]
        if missing and not problems:
            if not self.accept_legacy:
                raise LegacyCheckpointError(
                    f"{source} was written by an earlier version of monai_synth that did not record {missing}, so "
                    f"this run cannot check it against them. {LEGACY_HINT}"
                )
            logger.warning(f"{source} records no {missing}: used unchecked on them (--legacy_checkpoints accept)")
        if problems:
            data = ""
            if any(p.startswith("training_split:") for p in problems):
                data = (
                    " The training split differs (another datalist, split seed or fractions, or changed image files): "
                    "resume, continue or release only on the data the models were trained on."
                )
            raise CheckpointMismatchError(
                f"{source} was trained for something else ({'; '.join(problems)}). Point the config at a checkpoint "
                f"of this bundle/modality or retrain this stage.{data}"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Compare (never overwrite): see :meth:`check`."""
        self.check(state_dict)


def load_checkpoint(
    path: str | os.PathLike,
    load_dict: Mapping[str, Any] | None = None,
    metadata: CheckpointMetadata | None = None,
    ignore: Sequence[str] = ("stage",),
    map_location: str | torch.device | None = "cpu",
    strict: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint eagerly (e.g. at config instantiation, before any training) and check it.

    Args:
        path: checkpoint written by :class:`~monai_synth.handlers.AtomicCheckpointSaver` / MONAI ``CheckpointSaver``.
        load_dict: objects with ``load_state_dict`` to fill, keyed as in the checkpoint (e.g.
            ``{"autoencoder": net, "scale_factor": sf}``). Missing keys raise ``KeyError`` naming what is there.
        metadata: expected metadata, compared with the checkpoint's ``"metadata"`` entry.
        ignore: metadata fields not to compare.
        map_location: passed to ``torch.load``.
        strict: passed to ``nn.Module.load_state_dict``.

    Returns:
        The raw checkpoint dict.

    Raises:
        FileNotFoundError: the checkpoint is missing (e.g. stage 2 started before stage 1 finished).
        CheckpointMismatchError: the checkpoint's metadata disagrees with ``metadata``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist. If this is the autoencoder checkpoint, run the autoencoder "
            "stage (train_autoencoder.yaml) first or set the config's checkpoint path to where it was saved."
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if metadata is not None:
        if "metadata" not in ckpt:
            raise CheckpointMismatchError(
                f"{str(path)!r} carries no 'metadata' entry, so it cannot be checked against this bundle; "
                "it was not written by a monai_synth bundle"
            )
        metadata.check(ckpt["metadata"], source=repr(str(path)), ignore=ignore)
    for key, obj in (load_dict or {}).items():
        if key not in ckpt:
            raise KeyError(f"{str(path)!r} has no {key!r} entry; it holds {sorted(ckpt)}")
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(ckpt[key], strict=strict)
        else:
            obj.load_state_dict(ckpt[key])
    return ckpt


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "") -> str:
    """Newest checkpoint in ``directory`` whose name starts with ``prefix``, or ``""`` when there is none.

    Used by the bundle's ``CheckpointLoader`` to resume: ``_disabled_`` when this returns ``""``. "Newest" is the
    highest iteration/epoch number in the file name (MONAI's ``CheckpointSaver`` names files
    ``<prefix>_checkpoint_epoch=N.pt`` / ``..._final_iteration=N.pt``), with the modification time as tie-breaker, so
    a file copied later does not win over a later training state.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return ""
    candidates = [Path(p) for p in glob.glob(str(directory / f"{glob.escape(prefix)}*.pt"))]
    candidates = [p for p in candidates if not p.name.startswith(".")]
    if not candidates:
        return ""

    def key(p: Path) -> tuple[int, float]:
        numbers = re.findall(r"(?:iteration|epoch)=(\d+)", p.name)
        return (int(numbers[-1]) if numbers else -1, p.stat().st_mtime)

    return str(max(candidates, key=key))

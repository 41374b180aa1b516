"""A grid of samples per class every N epochs: the quickest way to see what the diffusion model has learnt."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from monai_synth.atomic import atomic_file

if TYPE_CHECKING:
    from monai_synth.engines.sampler import Generator

__all__ = ["SampleGridHandler", "make_sample_grid", "save_grid_png"]


def _to_2d(image: torch.Tensor) -> np.ndarray:
    """(C, *spatial) -> (H, W) float: first channel, middle slice of the last axis for 3D."""
    image = image.detach().float().cpu()[0]
    if image.ndim == 3:
        image = image[..., image.shape[-1] // 2]
    return image.numpy()


def make_sample_grid(
    images_per_class: Sequence[torch.Tensor], value_range: Sequence[float] = (-1.0, 1.0)
) -> np.ndarray:
    """Tile per-class image batches into a uint8 grid: one row per class, one column per sample.

    Args:
        images_per_class: per class a (N, C, *spatial) tensor in model space (3D volumes show their middle slice).
        value_range: model-space range mapped to 0..255 (values outside are clipped).

    Returns:
        (rows * H, cols * W) uint8 array.
    """
    low, high = float(value_range[0]), float(value_range[1])
    rows = []
    for images in images_per_class:
        tiles = [_to_2d(img) for img in images]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = np.clip((grid - low) / (high - low), 0.0, 1.0)
    return (grid * 255.0 + 0.5).astype(np.uint8)


def save_grid_png(grid: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 grid as an 8-bit greyscale PNG (atomically: temporary file, then rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(grid, mode="L").save(tmp, format="PNG")
    return path


class SampleGridHandler:
    """Every ``interval`` epochs, sample ``n_per_class`` images of every class and save them as one PNG grid.

    Use the EMA network inside ``generate`` (e.g. a :class:`~monai_synth.engines.sampler.LatentSampler` built on the
    EMA copy), since that is what will be released. The same ``seed`` is used every time so successive grids show
    the same noise evolving into better images. If an MLflow run is active (a fluent ``mlflow.start_run`` run, or
    the run of the ``mlflow_handler`` given), the PNG is logged as an artifact under ``artifact_path``.

    Args:
        generate: the :class:`~monai_synth.engines.sampler.Generator` (e.g. ``LatentSampler``).
        labels: the class names (conditions) to show, one grid row each.
        output_dir: where the PNGs go.
        n_per_class: samples per class (grid columns).
        interval: epochs between grids; a grid is also made at the end of training.
        seed: sampling seed.
        filename: file name pattern formatted with ``epoch``.
        mlflow_handler: optional MONAI ``MLFlowHandler`` whose run should receive the artifact.
        artifact_path: MLflow artifact folder.
        value_range: model-space range mapped to black..white.
    """

    def __init__(
        self,
        generate: Generator,
        labels: Sequence[Any],
        output_dir: str | os.PathLike,
        n_per_class: int = 4,
        interval: int = 1,
        seed: int = 0,
        filename: str = "samples_epoch{epoch:04d}.png",
        mlflow_handler: Any = None,
        artifact_path: str = "sample_grids",
        value_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        if int(n_per_class) < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not labels:
            raise ValueError("SampleGridHandler needs at least one label to sample")
        self.generate = generate
        self.labels = list(labels)
        self.output_dir = Path(output_dir)
        self.n_per_class = int(n_per_class)
        self.interval = int(interval)
        self.seed = int(seed)
        self.filename = filename
        self.mlflow_handler = mlflow_handler
        self.artifact_path = artifact_path
        self.value_range = tuple(value_range)
        self.saved: list[Path] = []
        self.logger = logging.getLogger(__name__)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or (engine.state.max_epochs is not None and epoch >= engine.state.max_epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)

    def _log_artifact(self, path: Path) -> None:
        run = getattr(self.mlflow_handler, "cur_run", None) if self.mlflow_handler is not None else None
        if run is not None:
            self.mlflow_handler.client.log_artifact(run.info.run_id, str(path), self.artifact_path)
            return
        try:
            import mlflow
        except ImportError:  # pragma: no cover - mlflow is a dependency
            return
        if mlflow.active_run() is not None:
            mlflow.log_artifact(str(path), artifact_path=self.artifact_path)

    def __call__(self, engine: Engine | None = None) -> Path:
        epoch = int(engine.state.epoch) if engine is not None else 0
        rows = [self.generate(self.n_per_class, self.seed, label) for label in self.labels]
        grid = make_sample_grid(rows, self.value_range)
        path = save_grid_png(grid, self.output_dir / self.filename.format(epoch=epoch))
        self.saved.append(path)
        self._log_artifact(path)
        self.logger.info(f"sample grid ({len(self.labels)} classes x {self.n_per_class}) saved to {path}")
        return path

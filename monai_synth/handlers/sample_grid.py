"""A grid of samples per class every N epochs: the quickest way to see what the diffusion model has learnt."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
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


def make_side_by_side(
    real_per_class: Sequence[np.ndarray],
    released_per_class: Sequence[np.ndarray],
    labels: Sequence[str],
    zoom: int = 3,
) -> np.ndarray:
    """One row per class: real images on the left, released images on the right, each row named by its class.

    The question a newcomer asks of a release is "does it look like the data, class by class?"; this puts the two
    next to each other so that it is answered at a glance.

    Args:
        real_per_class: per class a sequence of 2D uint8 images (training images of that class).
        released_per_class: per class a sequence of 2D uint8 images of the same size (released images).
        labels: class names, one per row.
        zoom: integer upscaling (nearest neighbour) so that small images stay visible.

    Returns:
        (H, W) uint8 picture.

    Raises:
        ValueError: the three sequences differ in length, or a class has no image on either side.
    """
    from PIL import ImageDraw

    if not len(real_per_class) == len(released_per_class) == len(labels):
        raise ValueError(
            f"need one entry per class on both sides: {len(real_per_class)} real, {len(released_per_class)} released, "
            f"{len(labels)} labels"
        )
    empty = [str(lb) for lb, a, b in zip(labels, real_per_class, released_per_class) if len(a) == 0 or len(b) == 0]
    if empty:
        raise ValueError(f"classes {empty} have no real or no released image to show")
    h, w = np.asarray(real_per_class[0][0]).shape
    n = max(max(len(a), len(b)) for a, b in zip(real_per_class, released_per_class))
    margin, gap, header = 4 * w // 8 + 24, w // 2, 14
    canvas = np.full((header + len(labels) * (h + 2), margin + 2 * n * w + gap), 255, np.uint8)
    for row, (real, released) in enumerate(zip(real_per_class, released_per_class)):
        y = header + row * (h + 2)
        for side, images in ((0, real), (1, released)):
            for col, img in enumerate(images):
                x = margin + side * (n * w + gap) + col * w
                canvas[y : y + h, x : x + w] = np.asarray(img, np.uint8)
    picture = Image.fromarray(canvas, mode="L").resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    draw.text((margin * zoom, 2), "real (training) images", fill=0)
    draw.text(((margin + n * w + gap) * zoom, 2), "released synthetic images", fill=0)
    for row, label in enumerate(labels):
        draw.text((4, (header + row * (h + 2) + h // 2) * zoom - 6), str(label), fill=0)
    return np.asarray(picture)


def write_release_side_by_side(
    datalist_file: str | os.PathLike,
    release_dir: str | os.PathLike,
    labels: Sequence[str],
    path: str | os.PathLike,
    n_per_class: int = 8,
    zoom: int = 3,
    to_model: Callable[[Any], Any] | None = None,
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Path:
    """Write :func:`make_side_by_side` for a release: training images of the datalist next to released images.

    Real images go through ``preprocessing`` when given (the bundle's loading chain, so they are cropped, padded or
    resized exactly as the model saw them); otherwise they are read with MONAI's ``LoadImage`` and resized to the
    released size. Released ones are listed by
    the release's ``certificate.csv`` (``file``, ``condition``). Both are shown through the same display mapping:
    ``to_model`` (the bundle's intensity transform, physical units -> [-1, 1]) then 0..255, so CT in Hounsfield units
    and PET in SUV are shown as the model sees them; volumes show their middle slice of the last axis.

    Args:
        to_model: physical units -> model space; ``None`` shows stored values as 8-bit grey levels (ultrasound PNG).
        preprocessing: datalist record -> record whose ``image`` is in model space [-1, 1] at the model's size.

    Raises:
        FileNotFoundError: the release has no ``certificate.csv``.
    """
    import csv

    from monai.transforms import LoadImage, Resize

    from monai_synth.data.datalist import load_datalist

    certificate = Path(release_dir) / "certificate.csv"
    if not certificate.is_file():
        raise FileNotFoundError(f"{certificate} does not exist; run the sample stage (it writes the release) first")
    load = LoadImage(image_only=True, ensure_channel_first=True)

    def display(image: Any, in_model_space: bool = False) -> np.ndarray:
        # MONAI readers return (x, y[, z]); the picture shows rows as the file does, hence the transpose
        if in_model_space:
            grey = (np.asarray(image, dtype=np.float64) + 1.0) * 127.5
        elif to_model is None:
            grey = np.asarray(image, dtype=np.float64)
        else:
            grey = (np.asarray(to_model(image), dtype=np.float64) + 1.0) * 127.5
        grey = grey[0] if grey.ndim == 3 else grey[0][..., grey.shape[-1] // 2]
        return np.clip(np.round(grey), 0, 255).astype(np.uint8).T

    released: dict[str, list[np.ndarray]] = {str(lb): [] for lb in labels}
    shape = None
    with open(certificate, newline="") as f:
        for row in csv.DictReader(f):
            cond = str(row["condition"])
            if cond in released and len(released[cond]) < n_per_class:
                image = load(str(Path(release_dir) / row["file"]))
                shape = tuple(image.shape[1:]) if shape is None else shape
                released[cond].append(display(image))
    if shape is None:
        raise ValueError(f"the release in {release_dir} holds no image of the classes {list(labels)}")
    resize = Resize(shape, mode="area")
    real: dict[str, list[np.ndarray]] = {str(lb): [] for lb in labels}
    for record in load_datalist(datalist_file):
        cond = str(record["label"])
        if cond in real and len(real[cond]) < n_per_class:
            if preprocessing is not None:
                real[cond].append(display(preprocessing(dict(record))["image"], in_model_space=True))
                continue
            image = load(record["image"])
            if tuple(image.shape[1:]) != shape:
                image = resize(image)
            real[cond].append(display(image))
    shown = [str(lb) for lb in labels if real[str(lb)] and released[str(lb)]]
    grid = make_side_by_side([real[lb] for lb in shown], [released[lb] for lb in shown], shown, zoom=zoom)
    save_grid_png(grid, path)
    return Path(path)

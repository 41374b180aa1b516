"""Small glue that the bundle configs call: data preparation, argument checks, MLflow set-up and the quickstart.

Everything a bundle does is in its YAML files and the package's engines; what lives here is the handful of steps
that a config expression would make unreadable: building a phantom cohort when no dataset is given, checking that
the image size suits the autoencoder and the DiT *before* any training starts, finding the checkpoint to resume
from, and running the bundle's stages one after the other for the quickstart. The stages themselves are plain
``monai.bundle`` runs and can be started one by one with ``python -m monai.bundle run``.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "check_spatial_size",
    "prepare_datalist",
    "load_splits",
    "latest_checkpoint",
    "ensure_latent_cache",
    "guarded_release",
    "tracking_uri",
    "run_name",
    "flatten_params",
    "stage_config_files",
    "run_stage",
    "run_quickstart",
]

logger = logging.getLogger(__name__)

#: Stages of a monai_synth bundle and the config files each one layers, in order (MONAI merges them left to right).
STAGES: dict[str, tuple[str, ...]] = {
    "autoencoder": ("common.yaml", "train_autoencoder.yaml"),
    "diffusion": ("common.yaml", "train_autoencoder.yaml", "train_diffusion.yaml"),
    "sample": ("common.yaml", "train_autoencoder.yaml", "train_diffusion.yaml", "sample.yaml"),
}


def check_spatial_size(
    spatial_size: int | Sequence[int],
    autoencoder_channels: Sequence[int],
    patch_size: int | None = None,
    spatial_dims: int = 2,
) -> tuple[int, ...]:
    """Latent spatial shape for ``spatial_size``, or a ``ValueError`` saying which size would work.

    MONAI's ``AutoencoderKL`` halves the image once between consecutive levels of ``channels``, so every axis must be
    divisible by ``2 ** (len(channels) - 1)``; otherwise the decoder's output does not match its input and training
    fails deep inside the loss with a shape error. The DiT then cuts the latent into ``patch_size`` patches, so the
    latent axes must be divisible by the patch size too.

    Args:
        spatial_size: image size in model space, one int (same on every axis) or one per axis.
        autoencoder_channels: the autoencoder's ``channels`` argument (one entry per level).
        patch_size: the DiT patch size; ``None`` skips that check.
        spatial_dims: 2 or 3.

    Returns:
        The latent spatial shape, one int per axis.

    Raises:
        ValueError: naming the offending axis and the nearest sizes that would work.
    """
    size = (int(spatial_size),) * spatial_dims if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
    if len(size) != spatial_dims:
        raise ValueError(f"spatial_size {list(size)} has {len(size)} axes but spatial_dims is {spatial_dims}")
    levels = len(autoencoder_channels)
    if levels < 1:
        raise ValueError("autoencoder channels must list at least one level")
    factor = 2 ** (levels - 1)
    step = factor * (int(patch_size) if patch_size else 1)
    latent = []
    for axis, s in enumerate(size):
        if s < step or s % step:
            lower, upper = max(step, s // step * step), (s // step + 1) * step
            why = f"the autoencoder ({levels} levels) downsamples by {factor}"
            if patch_size:
                why += f" and the DiT cuts the latent into patches of {patch_size}"
            raise ValueError(
                f"spatial_size {list(size)} cannot be used: axis {axis} ({s}) must be a multiple of {step} because "
                f"{why}. Use e.g. {lower} or {upper}, or change the autoencoder channels / patch size."
            )
        latent.append(s // factor)
    return tuple(latent)


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
    from monai_synth.data.phantoms import write_cohort

    cohort_dir = Path(output_dir) / "phantom_cohort"
    existing = cohort_dir / "datalist.csv"
    if existing.is_file():
        return str(existing.resolve())
    logger.info(
        f"no dataset_dir given: writing a {modality} phantom cohort of {phantom_patients} patients to {cohort_dir}"
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
        # the processes of a distributed run all write the same (seeded) cohort; the first one to finish wins
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
    from monai_synth.data.datalist import load_datalist
    from monai_synth.data.splits import check_disjoint, split_by_patient

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


def ensure_latent_cache(
    path: str | os.PathLike,
    autoencoder: Any,
    dataset: Any,
    autoencoder_checkpoint: str | os.PathLike,
    labels: Sequence[str],
    scale_factor: Any,
    device: Any = "cpu",
    batch_size: int = 32,
) -> str:
    """Encode ``dataset`` into a latent cache at ``path`` unless a cache of the same autoencoder checkpoint is there.

    The cache records the SHA-256 of the checkpoint it was encoded with; a cache from an earlier (or another)
    autoencoder is re-encoded rather than silently reused, and an up-to-date one is kept so re-running stage 2
    (e.g. to resume it) does not pay for encoding again. In a ``torch.distributed`` run, rank 0 writes the cache
    and the other ranks wait for it at a barrier.

    Returns:
        The cache path.
    """
    import torch

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 is writing the cache
        return str(path)
    try:
        return _ensure_latent_cache(
            path, autoencoder, dataset, autoencoder_checkpoint, labels, scale_factor, device, batch_size
        )
    finally:
        if distributed:
            torch.distributed.barrier()


def _ensure_latent_cache(
    path: str | os.PathLike,
    autoencoder: Any,
    dataset: Any,
    autoencoder_checkpoint: str | os.PathLike,
    labels: Sequence[str],
    scale_factor: Any,
    device: Any,
    batch_size: int,
) -> str:
    import torch
    from monai.data import DataLoader

    from monai_synth.engines.checkpoint import checkpoint_fingerprint
    from monai_synth.engines.latents import cache_latents

    path = Path(path)
    expected = checkpoint_fingerprint(autoencoder_checkpoint)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is rebuilt below
            cached = {}
        if cached.get("autoencoder_fingerprint") == expected and list(cached.get("label_names", [])) == list(labels):
            logger.info(f"latent cache {path} is up to date with {autoencoder_checkpoint}; reusing it")
            return str(path)
        logger.info(f"latent cache {path} was made with another autoencoder checkpoint; encoding again")
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=0)
    # plain tensors: MONAI's MetaTensor would pickle its metadata classes into the cache, which torch's safe
    # (weights_only) loader refuses
    batches = ({**b, "image": torch.as_tensor(b["image"]).as_subclass(torch.Tensor)} for b in loader)
    cache_latents(
        autoencoder,
        batches,
        path,
        device=device,
        autoencoder_checkpoint=autoencoder_checkpoint,
        labels=list(labels),
        scale_factor=scale_factor,
    )
    logger.info(f"encoded {len(dataset)} images into the latent cache {path}")
    return str(path)


class _ImageBatches:
    """Re-iterable batches of a MONAI dataset's images as plain float tensors ``(B, C, *spatial)``, in order."""

    def __init__(self, dataset: Any, batch_size: int = 64) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)

    def __iter__(self):
        import torch

        for start in range(0, len(self.dataset), self.batch_size):
            stop = min(start + self.batch_size, len(self.dataset))
            yield torch.stack(
                [
                    torch.as_tensor(self.dataset[i]["image"]).as_subclass(torch.Tensor).float()
                    for i in range(start, stop)
                ]
            )


def _train_split_embedding(
    train: _ImageBatches,
    train_records: Sequence[Mapping[str, Any]],
    spatial_dims: int,
    data_fingerprint: str,
    epochs: int,
    seed: int,
    out: str | os.PathLike | None,
) -> Any:
    """Train the re-identification embedding on the bundle's own train split, so it has seen every training patient."""
    import torch

    from monai_synth.privacy.embedding import train_embedding

    logger.info(f"training the re-identification embedding on {len(train_records)} training images ({epochs} epochs)")
    space = train_embedding(
        torch.cat(list(train)),
        [r["patient_id"] for r in train_records],
        spatial_dims=spatial_dims,
        epochs=int(epochs),
        seed=int(seed),
        data_fingerprint=data_fingerprint,
    )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        space.save(out)
    return space


def guarded_release(
    sampler: Any,
    train_images: Any,
    holdout_images: Any,
    train_records: Sequence[Mapping[str, Any]],
    holdout_records: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    modality: str,
    num_per_class: int,
    release_dir: str | os.PathLike,
    release_format: str,
    to_physical: Any,
    spaces: Sequence[str] = ("pixel", "parts", "crops", "tiles"),
    embedding_weights: str | None = None,
    embedding_out: str | os.PathLike | None = None,
    embedding_epochs: int = 20,
    quantile: float = 0.01,
    floor: float = 0.0,
    max_retries: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    checkpoints: Mapping[str, str | os.PathLike] | None = None,
    sample_grid: str | os.PathLike | None = None,
    grid_per_class: int = 8,
    private_audit: str | os.PathLike | None = None,
    mlflow: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    to_model: Any = None,
    spacing: Sequence[float] | None = None,
) -> dict:
    """Sample every class through the privacy safeguard and write the release, its certificate and a sample grid.

    The safeguard indexes every training image in each privacy space, calibrates each threshold on the holdout
    patients (images of people the model never saw), and :func:`~monai_synth.privacy.sampling.guarded_sample`
    regenerates any candidate closer than the threshold to a training image. Each candidate is judged as the file
    will hold it (physical units, the format's storage, see :mod:`monai_synth.privacy.release`) and exactly that array
    is written, atomically with ``certificate.json`` / ``.csv``; the private audit, which names training patients, is
    written outside the release, before the release is committed.

    Args:
        sampler: ``generate(n, seed, condition, guidance_scale=...)`` (a :class:`LatentSampler` on the EMA weights).
        train_images: dataset of the training images in model space (dicts with ``"image"``), in record order.
        holdout_images: dataset of the holdout images in model space, in record order.
        train_records: datalist records of ``train_images`` (patient ids; fingerprint of the training data).
        holdout_records: datalist records of ``holdout_images``.
        labels: classes to release, ``num_per_class`` images each.
        modality: modality key.
        num_per_class: released images per class.
        release_dir: release folder (must not exist or be empty unless ``overwrite``).
        release_format: ``png``, ``dicom`` or ``nifti``.
        to_physical: model space -> physical units.
        spaces: privacy spaces (``pixel``, ``embedding``; see :func:`monai_synth.privacy.guard.make_space`).
        embedding_weights: weights of the embedding space, trained on exactly ``train_records`` (checked by their
            data fingerprint: weights that never saw some training patient are refused). ``None`` with an
            ``embedding`` space trains the embedding here, on the training images, and saves it to ``embedding_out``.
        embedding_out: where to save an embedding trained here (``None``: not saved).
        embedding_epochs: training epochs of an embedding trained here.
        quantile: holdout quantile that sets each threshold.
        floor: absolute minimum threshold.
        max_retries: resampling rounds for rejected candidates.
        seed: first sampling seed.
        guidance_scale: classifier-free guidance weight.
        checkpoints: name -> checkpoint path, fingerprinted into the certificate.
        sample_grid: PNG path for a grid of released images (one row per class).
        grid_per_class: columns of the grid.
        private_audit: path of the private audit CSV (outside the release; default next to it).
        mlflow: ``{"tracking_uri", "experiment_name", "run_name", "params"}`` to record the release in MLflow,
            or ``None``.
        overwrite: replace an existing release.
        to_model: physical units -> model space, the training images' intensity transform (default: the modality's).
        spacing: voxel size in mm of the released NIfTI / DICOM images, the training images' model-space spacing
            (:func:`monai_synth.data.geometry.model_spacing`); ``None`` writes 1 mm.

    Returns:
        The certificate summary plus ``release_dir``, ``thresholds``, ``sample_grid`` and ``private_audit``.
    """
    import torch

    from monai_synth.data.datalist import datalist_fingerprint
    from monai_synth.engines.checkpoint import checkpoint_fingerprint
    from monai_synth.handlers.sample_grid import make_sample_grid, save_grid_png
    from monai_synth.privacy.guard import make_space, space_name
    from monai_synth.privacy.release import GuardedRelease, ReleaseEncoder
    from monai_synth.privacy.safeguard import build_safeguard
    from monai_synth.privacy.sampling import guarded_sample

    if int(num_per_class) < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    if len(train_images) != len(train_records) or len(holdout_images) != len(holdout_records):
        raise ValueError("the image datasets and their records differ in length; build both from the same split")
    # every output path is checked before calibration and sampling start
    release = GuardedRelease(release_dir, release_format, modality, audit=private_audit, overwrite=overwrite)
    encoder = ReleaseEncoder(release_format, modality, to_model=to_model, to_physical=lambda x: to_physical(x))
    # batches of plain tensors, so the training set never has to sit in memory as one array
    train = _ImageBatches(train_images)
    holdout = _ImageBatches(holdout_images)
    spatial_size = tuple(torch.as_tensor(train_images[0]["image"]).shape[1:])
    data_fp = datalist_fingerprint(train_records)
    trained = None
    if not embedding_weights and any(space_name(spec) == "embedding" for spec in spaces):
        trained = _train_split_embedding(
            train, train_records, len(spatial_size), data_fp, embedding_epochs, seed, embedding_out
        )
    built = [
        trained
        if trained is not None and space_name(spec) == "embedding"
        else make_space(spec, len(spatial_size), spatial_size, embedding_weights, data_fingerprint=data_fp)
        for spec in spaces
    ]
    safeguard = build_safeguard(
        built,
        train,
        [r["patient_id"] for r in train_records],
        holdout,
        [r["patient_id"] for r in holdout_records],
        data_fp,
        quantile=quantile,
        floor=floor,
        batch_size=16,
        views=encoder.model_views,
    )
    logger.info(f"privacy thresholds calibrated on {len(holdout_images)} holdout images: {safeguard.thresholds}")
    result = guarded_sample(
        sampler,
        safeguard,
        [(label, int(num_per_class)) for label in labels],
        max_retries=int(max_retries),
        seed=int(seed),
        guidance_scale=guidance_scale,
        encoder=encoder,
    )
    fingerprints = {name: checkpoint_fingerprint(path) for name, path in (checkpoints or {}).items()}
    fingerprints["datalist"] = data_fp
    released = iter(result.images)
    with release:
        for rec in result.records:
            release.add(rec, next(released) if rec.passed else None, spacing)
        release.requested = result.requested
        release.finish(
            safeguard,
            fingerprints=fingerprints,
            extra={"modality": modality, "format": release_format, "guidance_scale": guidance_scale},
        )
    audit = release.audit
    # the grid shows the released images as written, back in model space
    written = [encoder.views(img)[0] for img in result.images]
    grid_path = None
    if sample_grid:
        rows = []
        for label in labels:
            picked = [img for img, rec in zip(written, result.released_records) if str(rec.condition) == str(label)]
            if picked:
                rows.append(torch.stack([torch.as_tensor(i) for i in picked[: int(grid_per_class)]]))
        if rows:
            width = max(len(r) for r in rows)
            rows = [
                torch.cat([r, torch.full((width - len(r), *r.shape[1:]), -1.0)]) if len(r) < width else r for r in rows
            ]
            grid_path = str(save_grid_png(make_sample_grid(rows), sample_grid))
    summary = dict(result.summary())
    summary.update(
        {
            "release_dir": str(Path(release_dir).absolute()),
            "thresholds": dict(safeguard.thresholds),
            "sample_grid": grid_path,
            "private_audit": None if audit is None else str(audit),
        }
    )
    logger.info(
        f"released {summary.get('released')} of {summary.get('generated')} generated images "
        f"({summary.get('rejected')} rejected as too close to a training image) into {release_dir}"
    )
    if mlflow:
        _log_release_to_mlflow(mlflow, summary, release_dir, grid_path)
    return summary


def _log_release_to_mlflow(
    settings: Mapping[str, Any], summary: Mapping[str, Any], release_dir: Any, grid: Any
) -> None:
    """Record a release as an MLflow run: parameters, the certificate summary as metrics, certificate + grid files."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or settings["tracking_uri"])
    experiment = client.get_experiment_by_name(settings["experiment_name"])
    if experiment is None:
        uri = str(settings["tracking_uri"])
        location = None
        if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
            from monai.utils import path_to_uri

            location = path_to_uri(Path(uri[len("sqlite:///") :]).parent / "mlruns")
        experiment_id = client.create_experiment(settings["experiment_name"], artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=settings.get("run_name"))
    run_id = run.info.run_id
    try:
        params = [mlflow.entities.Param(k, v) for k, v in dict(settings.get("params") or {}).items()]
        metrics = [
            mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        metrics += [
            mlflow.entities.Metric(f"threshold_{k}", float(v), int(time.time() * 1000), 0)
            for k, v in summary["thresholds"].items()
        ]
        client.log_batch(run_id, metrics=metrics, params=params)
        for name in ("certificate.json", "certificate.csv"):
            path = Path(release_dir) / name
            if path.is_file():
                client.log_artifact(run_id, str(path), "certificate")
        if grid:
            client.log_artifact(run_id, str(grid), "sample_grids")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def as_bool(value: Any, name: str) -> bool:
    """A boolean config value, also when it comes from the command line as a string (``--mlflow false``).

    ``python -m monai.bundle run --mlflow false`` passes the string ``'false'``, which Python takes for true; a flag
    must mean what it says, so the usual spellings are parsed and anything else is refused.

    Raises:
        ValueError: a value that is not a recognisable boolean, naming the config id.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", "none", "null", ""):
        return False
    raise ValueError(f"--{name} must be true or false, got {value!r}")


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, Databricks, a shared database), else an
    embedded SQLite store ``<output_dir>/mlflow.db`` that needs no server (``mlflow ui --backend-store-uri <uri>``).

    MLflow 3 refuses the old file store, hence SQLite rather than a ``mlruns`` folder.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    from monai.utils import path_to_sqlite_uri

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(os.path.join(os.path.abspath(output_dir), "mlflow.db"))


def run_name(stage: str, modality_code: str, bundle: str | None = None) -> str:
    """Run name saying what ran: ``"<stage>-<modality>-<timestamp>"``, e.g. ``"train_autoencoder-US-20250101-120000"``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [stage, str(modality_code).upper()] + ([bundle] if bundle else []) + [stamp]
    return "-".join(parts)


def flatten_params(params: Mapping[str, Any], prefix: str = "", max_len: int = 500) -> dict[str, str]:
    """Flatten a nested dict of resolved config values into MLflow params (``a.b.c`` -> string, cut to ``max_len``).

    Objects that are not plain values (networks, datasets) are recorded by their class name, not their repr.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}.", max_len=max_len))
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            text = str(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            text = json.dumps(list(value))
        elif isinstance(value, os.PathLike):
            text = os.fspath(value)
        else:
            text = type(value).__name__
        out[name] = text[:max_len]
    return out


def stage_config_files(bundle_root: str | os.PathLike, stage: str, multi_gpu: bool = False) -> list[str]:
    """Config files of one stage, in merge order (optionally with the multi-GPU overlay)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    names = list(STAGES[stage])
    if multi_gpu and stage in ("autoencoder", "diffusion"):
        names.append(f"multi_gpu_train_{stage}.yaml")
    return [str(Path(bundle_root) / "configs" / n) for n in names]


def run_stage(
    bundle_root: str | os.PathLike,
    stage: str,
    overrides: Mapping[str, Any] | None = None,
    workflow_type: str | None = "train",
) -> Any:
    """Run one stage of a bundle as ``python -m monai.bundle run`` would, and return the workflow.

    The required bundle properties are checked before anything runs, so a config that ``--tracking mlflow`` or
    other MONAI tools could not drive fails here rather than later.

    Args:
        bundle_root: the bundle folder.
        stage: ``"autoencoder"``, ``"diffusion"`` or ``"sample"``.
        overrides: config id -> value pairs, as on the ``monai.bundle run`` command line.
        workflow_type: ``"train"`` for the training stages (checks MONAI's training properties), ``None`` for
            sampling (only metadata properties).

    Raises:
        ValueError: the stage's config lacks required bundle properties.
    """
    from monai.bundle import ConfigWorkflow

    files = stage_config_files(bundle_root, stage)
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(Path(bundle_root) / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **dict(overrides or {}),
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"stage {stage!r} of {bundle_root} lacks required bundle properties {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


def run_quickstart(
    bundle_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, str]:
    """Train the tiny autoencoder and DiT and release a guarded synthetic set, one bundle stage after the other.

    Each stage is a separate ``ConfigWorkflow`` over the same files a user would pass to ``monai.bundle run``, with
    the quickstart's small-model overrides, so the quickstart exercises exactly the configs a GPU run uses.

    Args:
        bundle_root: the bundle folder.
        output_dir: where everything goes (phantom cohort, checkpoints, latent cache, release, MLflow store).
        dataset_dir: a folder with the user's datalist; ``None`` makes a phantom cohort.
        overrides: config id -> plain value pairs applied to every stage (the quickstart's small sizes).
        threads: torch CPU threads (``None`` leaves torch's default); networks this small run fastest on one.

    Returns:
        Where each output went.
    """
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    start = time.time()
    output_dir = os.path.abspath(output_dir)
    common = {"output_dir": output_dir, "dataset_dir": None if not dataset_dir else os.path.abspath(dataset_dir)}
    common.update(dict(overrides or {}))
    for stage, workflow_type in (("autoencoder", "train"), ("diffusion", "train"), ("sample", None)):
        t0 = time.time()
        print(f"[quickstart] stage {stage} ...", flush=True)
        run_stage(bundle_root, stage, overrides=common, workflow_type=workflow_type)
        print(f"[quickstart] stage {stage} done in {time.time() - t0:.0f} s", flush=True)
    outputs = quickstart_outputs(output_dir)
    print(
        f"\n[quickstart] finished in {time.time() - start:.0f} s. This was a DEMO: tiny networks trained for seconds on"
    )
    print("[quickstart] a phantom cohort; the images are not realistic. The bundle's real configs are sized for GPUs.")
    for what, where in outputs.items():
        print(f"[quickstart]   {what:<22} {where}")
    print(f"[quickstart] browse the run: mlflow ui --backend-store-uri {tracking_uri(output_dir)}")
    return outputs


def quickstart_outputs(output_dir: str | os.PathLike) -> dict[str, str]:
    """The documented layout of a quickstart (or any bundle run) output folder."""
    out = Path(output_dir)
    return {
        "phantom cohort": str(out / "phantom_cohort"),
        "checkpoints": str(out / "models"),
        "latent cache": str(out / "latents" / "train_latents.pt"),
        "sample grid": str(out / "samples" / "sample_grid.png"),
        "synthetic release": str(out / "release"),
        "certificate": str(out / "release" / "certificate.json"),
        "MLflow store": tracking_uri(out),
    }

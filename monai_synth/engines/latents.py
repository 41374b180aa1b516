"""The autoencoder's latent space as stage 2 sees it: the scale factor and the cache of encoded training images.

Two mistakes of the public latent-diffusion bundles are avoided here. The scale factor (which makes the latents
roughly unit-variance, as the diffusion schedule assumes; Rombach et al. 2022) is estimated over the
*whole* training set, not one batch, and lives in a module buffer so it is saved with the autoencoder weights. The
cache stores the posterior mean ``z_mu`` (deterministic) rather than a sampled latent, so two runs over the same
data give the same cache, and it records the fingerprint of the autoencoder checkpoint that produced it so stage 2
cannot silently train on latents of another autoencoder.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from monai.data import DataLoader
from monai.networks.utils import eval_mode
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from monai_synth.engines.checkpoint import atomic_torch_save, checkpoint_fingerprint
from monai_synth.engines.utils import unwrap_model

__all__ = [
    "ScaleFactor",
    "compute_scale_factor",
    "latent_channel_stats",
    "standardise_latent_channels",
    "encode_labels",
    "cache_latents",
    "ensure_latent_cache",
    "LatentDataset",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


class ScaleFactor(torch.nn.Module):
    """Holder of the latent scale factor, a buffer so ``CheckpointSaver`` stores it next to the weights.

    Put it in the autoencoder stage's ``save_dict`` as ``"scale_factor"``. It starts as NaN ("not computed yet") so
    a checkpoint of an autoencoder whose training stopped before the scale factor was estimated is recognisable and
    refused by :meth:`value` instead of silently scaling latents by 1.

    Args:
        value: initial value; leave ``None`` to mark it not computed.
    """

    def __init__(self, value: float | None = None) -> None:
        super().__init__()
        self.register_buffer("scale_factor", torch.tensor(float("nan") if value is None else float(value)))

    @property
    def computed(self) -> bool:
        """Whether a finite value has been set."""
        return bool(torch.isfinite(self.scale_factor))

    def set(self, value: float) -> None:
        """Store a new positive finite value."""
        value = float(value)
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"scale factor must be positive and finite, got {value}")
        self.scale_factor.fill_(value)

    def value(self) -> float:
        """The scale factor; raises ``RuntimeError`` if it was never computed."""
        if not self.computed:
            raise RuntimeError(
                "the latent scale factor was never computed: the autoencoder stage did not finish (the "
                "ScaleFactorHandler runs at its last iteration). Finish or resume the autoencoder training first."
            )
        return float(self.scale_factor)

    def __float__(self) -> float:
        return self.value()

    def extra_repr(self) -> str:
        return f"scale_factor={float(self.scale_factor):.6g}"


def scale_factor_value(scale_factor: float | ScaleFactor) -> float:
    """The scale factor as a float, from a number or a :class:`ScaleFactor` (read at call time, so after training)."""
    return scale_factor.value() if isinstance(scale_factor, ScaleFactor) else float(scale_factor)


def _images_of(batch: Any, image_key: str) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise KeyError(f"batch has no {image_key!r} key; it has {sorted(batch)}. Set image_key.")
        return batch[image_key]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def _merge(count: int, mean: Any, m2: Any, n_b: int, mean_b: Any, m2_b: Any) -> tuple[int, Any, Any]:
    """Chan et al.'s pairwise update of (count, mean, sum of squared deviations): floats, or per-channel tensors."""
    total = count + n_b
    if total == 0:
        return 0, 0.0, 0.0
    delta = mean_b - mean
    return total, mean + delta * n_b / total, m2 + m2_b + delta**2 * count * n_b / total


@torch.no_grad()
def compute_scale_factor(
    autoencoder: torch.nn.Module,
    data_loader: Iterable,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    progress: bool = False,
) -> float:
    """``1 / std(z_mu)`` over every element of every training image's posterior mean.

    Uses a streaming (Chan et al.) mean/variance merge in float64 so the estimate is exact for the whole set without
    holding all latents in memory. Under ``torch.distributed`` each rank encodes its shard of the data and the
    per-rank statistics are merged, so every rank gets the value for the whole training set.

    Args:
        autoencoder: a MONAI ``AutoencoderKL`` (anything with ``encode(x) -> (z_mu, z_sigma)``).
        data_loader: iterable of batches (dicts with ``image_key`` or tensors), normally the *training* loader
            without random augmentation.
        device: where to run the encoder.
        image_key: key of the image in dict batches.
        progress: show a tqdm bar over the batches.

    Returns:
        The scale factor as a python float.
    """
    autoencoder = unwrap_model(autoencoder)
    count, mean, m2 = 0, 0.0, 0.0
    with eval_mode(autoencoder):
        for batch in tqdm(data_loader, desc="scale factor", disable=not progress):
            images = _images_of(batch, image_key).to(device)
            z_mu = autoencoder.encode(images)[0].double()
            count, mean, m2 = _merge(
                count, mean, m2, z_mu.numel(), float(z_mu.mean()), float(((z_mu - z_mu.mean()) ** 2).sum())
            )
    if idist.get_world_size() > 1:
        stats = idist.all_gather(torch.tensor([count, mean, m2], dtype=torch.float64, device=idist.device()))
        count, mean, m2 = 0, 0.0, 0.0
        for n_r, mean_r, m2_r in stats.reshape(-1, 3).tolist():
            count, mean, m2 = _merge(count, mean, m2, int(n_r), mean_r, m2_r)
    if count < 2:
        raise ValueError("compute_scale_factor needs at least two latent elements; the data loader was empty")
    std = (m2 / (count - 1)) ** 0.5
    if std == 0:
        raise ValueError("all latents are identical (std 0); the autoencoder has collapsed, retrain it")
    return 1.0 / std


@torch.no_grad()
def latent_channel_stats(
    autoencoder: torch.nn.Module,
    data_loader: Iterable,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of ``z_mu`` over every training image (float64, merged over ranks under
    ``torch.distributed`` as :func:`compute_scale_factor` does)."""
    autoencoder = unwrap_model(autoencoder)
    count, mean, m2 = 0, 0.0, 0.0
    with eval_mode(autoencoder):
        for batch in tqdm(data_loader, desc="latent channels", disable=not progress):
            z_mu = autoencoder.encode(_images_of(batch, image_key).to(device))[0].double().transpose(0, 1)
            z_mu = z_mu.reshape(z_mu.shape[0], -1).cpu()  # (channels, elements)
            mean_b = z_mu.mean(dim=1)
            count, mean, m2 = _merge(count, mean, m2, z_mu.shape[1], mean_b, ((z_mu - mean_b[:, None]) ** 2).sum(dim=1))
    if not torch.is_tensor(mean):
        raise ValueError("latent_channel_stats needs at least one batch; the data loader was empty")
    if idist.get_world_size() > 1:
        c = len(mean)
        stats = idist.all_gather(
            torch.cat([torch.tensor([float(count)], dtype=torch.float64), mean, m2]).to(idist.device())
        )
        count, mean, m2 = 0, 0.0, 0.0
        for row in stats.reshape(-1, 1 + 2 * c).cpu():
            count, mean, m2 = _merge(count, mean, m2, int(row[0]), row[1 : 1 + c], row[1 + c :])
    if count < 2:
        raise ValueError("latent_channel_stats needs at least two latent elements per channel")
    std = (m2 / (count - 1)).sqrt()
    if bool((std == 0).any()):
        raise ValueError(
            f"latent channels {torch.nonzero(std == 0).flatten().tolist()} are constant; retrain the autoencoder"
        )
    return mean, std


@torch.no_grad()
def standardise_latent_channels(autoencoder: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold ``z' = (z - mean) / std`` per latent channel into an ``AutoencoderKL``'s 1x1 convolutions, in place.

    The encoder's ``quant_conv_mu`` then returns standardised latents (and ``quant_conv_log_sigma`` their scale), and
    ``post_quant_conv`` undoes the standardisation before the decoder, so reconstructions are unchanged (to float
    rounding) and every consumer of the latents (the cache, the diffusion model, the sampler, the evaluation) needs no
    shift of its own. Why: the channels' means lie far apart (-2.6 to +4.5 with SDs of 2.3-2.5 on the quickstart),
    so one global scale leaves the diffusion model latents whose structure has an SD of 0.7 under per-channel offsets
    of up to 1.3; per-channel standardisation, as in Stable Diffusion 3's latent shift and scale, gave more realistic
    releases on three quickstart seeds (``docs/benchmarks.md``).
    """
    ae = unwrap_model(autoencoder)
    convs = [getattr(ae, name, None) for name in ("quant_conv_mu", "quant_conv_log_sigma", "post_quant_conv")]
    convs = [getattr(c, "conv", c) for c in convs]
    if not all(isinstance(c, torch.nn.modules.conv._ConvNd) and c.bias is not None for c in convs):
        raise TypeError(
            f"standardise_latent_channels needs MONAI's AutoencoderKL (1x1 quant_conv_mu, quant_conv_log_sigma and "
            f"post_quant_conv with biases), got {type(ae).__name__}"
        )
    mu, log_sigma, post = convs
    mean, std = mean.double().to(mu.weight.device), std.double().to(mu.weight.device)
    if mean.shape != (mu.out_channels,) or std.shape != mean.shape or not bool((std > 0).all()):
        raise ValueError(
            f"mean and std must be {mu.out_channels} values (std > 0), got {tuple(mean.shape)}, {tuple(std.shape)}"
        )
    view = (-1,) + (1,) * (mu.weight.ndim - 1)
    mu.weight.copy_(mu.weight.double() / std.view(view))
    mu.bias.copy_((mu.bias.double() - mean) / std)
    log_sigma.bias.copy_(log_sigma.bias.double() - std.log())
    w = post.weight.double()
    post.bias.copy_(post.bias.double() + w.reshape(w.shape[0], w.shape[1]) @ mean)
    post.weight.copy_(w * std.view((1, -1) + (1,) * (w.ndim - 2)))


def encode_labels(values: Any, labels: Sequence[str]) -> torch.Tensor:
    """Class ids (``LongTensor``) for a batch of labels given as names or ids.

    Args:
        values: a sequence of label names (``"4a"``), ints, or an integer tensor.
        labels: the ordered class names the model knows.

    Raises:
        ValueError: naming labels the model does not know, and the known ones.
    """
    names = [str(v) for v in labels]
    if isinstance(values, torch.Tensor) and not values.is_floating_point():
        ids = values.reshape(-1).long()
    else:
        if isinstance(values, (str, numbers.Integral)):
            values = [values]
        out, unknown = [], []
        for v in values:
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, str) and v in names:
                out.append(names.index(v))
            elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
                v = int(v)
                out.append(v)
            else:
                unknown.append(v)
        if unknown:
            raise ValueError(f"labels {sorted(set(map(str, unknown)))} are not known to this model; it knows {names}")
        ids = torch.tensor(out, dtype=torch.long)
    bad = ids[(ids < 0) | (ids >= len(names))]
    if bad.numel():
        raise ValueError(f"class ids {bad.tolist()} out of range for the {len(names)} labels {names}")
    return ids


@torch.no_grad()
def cache_latents(
    autoencoder: torch.nn.Module,
    data_loader: Iterable,
    out_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    autoencoder_checkpoint: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    scale_factor: float | ScaleFactor | None = None,
    image_key: str = "image",
    label_key: str = "label",
    context_keys: Sequence[str] = (),
    id_keys: Sequence[str] = ("patient_id",),
    progress: bool = False,
) -> Path:
    """Encode the training set once and store ``z_mu`` with each item's label and extra conditions.

    The file is a ``torch.save`` dict written atomically (temporary file + rename): ``latents`` (N, C, *spatial)
    float32, ``labels`` (N,) long, ``context`` (N, K) float32 or ``None``, ``context_keys``, ``label_names``,
    ``ids`` (dict of lists, e.g. patient ids, for auditing), ``scale_factor`` (float or ``None``), and
    ``autoencoder_fingerprint`` (SHA-256 of the checkpoint file).

    Args:
        autoencoder: trained ``AutoencoderKL``; run in eval mode.
        data_loader: training batches (dicts) *without* random augmentation, in any order.
        out_path: destination ``.pt`` file.
        device: where to run the encoder.
        autoencoder_checkpoint: checkpoint the weights came from; its fingerprint is stored and checked by
            :class:`LatentDataset`. ``None`` stores no fingerprint (only sensible in tests).
        labels: ordered class names; label values in the batches are mapped to ids with :func:`encode_labels`.
        scale_factor: stored for convenience so stage 2 can read it from the cache.
        image_key: image key in the batches.
        label_key: label key in the batches.
        context_keys: keys of extra continuous conditions (one float per item each).
        id_keys: string keys to keep per item (not used for training).
        progress: show a tqdm bar over the batches.

    Returns:
        The written path.
    """
    if labels is None:
        raise ValueError("cache_latents needs the ordered class names (labels=...) to map batch labels to ids")
    fingerprint = None if autoencoder_checkpoint is None else checkpoint_fingerprint(autoencoder_checkpoint)
    autoencoder = unwrap_model(autoencoder)
    latents, ids_all, context = [], [], []
    kept: dict[str, list] = {k: [] for k in id_keys}
    with eval_mode(autoencoder):
        for batch in tqdm(data_loader, desc="caching latents", disable=not progress):
            if not isinstance(batch, Mapping):
                raise TypeError("cache_latents needs dict batches with image, label and condition keys")
            images = _images_of(batch, image_key).to(device)
            # plain tensors (not MetaTensor) so the cache loads with torch.load(weights_only=True)
            latents.append(autoencoder.encode(images)[0].float().cpu().as_subclass(torch.Tensor))
            if label_key not in batch:
                raise KeyError(f"batch has no {label_key!r} key; it has {sorted(batch)}")
            ids_all.append(encode_labels(batch[label_key], labels).as_subclass(torch.Tensor))
            if context_keys:
                cols = [
                    torch.as_tensor(batch[k], dtype=torch.float32).reshape(-1).as_subclass(torch.Tensor)
                    for k in context_keys
                ]
                context.append(torch.stack(cols, dim=1))
            for k in id_keys:
                if k in batch:
                    kept[k].extend(str(v) for v in batch[k])
    if not latents:
        raise ValueError("cache_latents got an empty data loader")
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "latents": torch.cat(latents),
        "labels": torch.cat(ids_all),
        "context": torch.cat(context) if context else None,
        "context_keys": list(context_keys),
        "label_names": [str(v) for v in labels],
        "ids": {k: v for k, v in kept.items() if v},
        "scale_factor": None if scale_factor is None else scale_factor_value(scale_factor),
        "autoencoder_fingerprint": fingerprint,
    }
    if payload["labels"].shape[0] != payload["latents"].shape[0]:
        raise ValueError("label count differs from image count in the data loader batches")
    from monai_synth.engines.resume import remove_leftovers

    remove_leftovers(Path(out_path).parent)  # half-written caches of killed runs (gigabytes each at real sizes)
    return atomic_torch_save(payload, out_path)


def ensure_latent_cache(
    path: str | os.PathLike,
    autoencoder: torch.nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    autoencoder_checkpoint: str | os.PathLike,
    labels: Sequence[str],
    scale_factor: float | ScaleFactor,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    context_keys: Sequence[str] = (),
) -> str:
    """Encode ``dataset`` into a latent cache at ``path`` unless a cache of the same autoencoder checkpoint is there.

    The cache records the SHA-256 of the checkpoint it was encoded with; a cache from an earlier (or another)
    autoencoder is re-encoded rather than silently reused, and an up-to-date one is kept so re-running stage 2
    (e.g. to resume it) does not pay for encoding again. In a ``torch.distributed`` run, rank 0 writes the cache
    and the other ranks wait for it at a barrier.

    ``context_keys`` (numeric datalist columns, e.g. ``lesion_size_mm``) are stored raw with each latent; a cache
    with other keys is encoded again.

    Returns:
        The cache path.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 is writing the cache
        return str(path)
    try:
        if _cache_is_current(path, autoencoder_checkpoint, labels, context_keys):
            logger.info(f"latent cache {path} is up to date with {autoencoder_checkpoint}; reusing it")
            return str(path)
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
            context_keys=list(context_keys),
        )
        logger.info(f"encoded {len(dataset)} images into the latent cache {path}")
        return str(path)
    finally:
        if distributed:
            torch.distributed.barrier()


def _cache_is_current(
    path: str | os.PathLike,
    autoencoder_checkpoint: str | os.PathLike,
    labels: Sequence[str],
    context_keys: Sequence[str] = (),
) -> bool:
    """Whether ``path`` holds a readable cache of this autoencoder checkpoint and label list (a damaged one is not)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is rebuilt
        return False
    current = cached.get("autoencoder_fingerprint") == checkpoint_fingerprint(autoencoder_checkpoint)
    same_keys = list(cached.get("context_keys") or []) == list(context_keys)
    if not (current and list(cached.get("label_names", [])) == list(labels) and same_keys):
        logger.info(
            f"latent cache {path} was made with another autoencoder checkpoint, labels or conditions; encoding again"
        )
        return False
    return True


class LatentDataset(Dataset):
    """Stage-2 dataset over a cache written by :func:`cache_latents`.

    Items are dicts ``{"latent": (C, *spatial) float32, "label": long scalar}`` plus ``"context"`` ((K,) float32)
    when the cache has extra conditions.

    Args:
        path: the cache file.
        autoencoder_checkpoint: the autoencoder checkpoint stage 2 will decode with; the cache is refused if it was
            made from a different file. ``None`` skips the check (tests only).
        labels: expected ordered class names; refused if the cache's differ.
        transform: optional callable applied to each item dict (e.g. flips in latent space).

    Raises:
        FileNotFoundError: the cache does not exist.
        ValueError: the cache was made from another autoencoder checkpoint or for other labels.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        autoencoder_checkpoint: str | os.PathLike | None = None,
        labels: Sequence[str] | None = None,
        transform: Any = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {str(path)!r} does not exist; run the latent caching step first")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if autoencoder_checkpoint is not None:
            expected = checkpoint_fingerprint(autoencoder_checkpoint)
            if data.get("autoencoder_fingerprint") != expected:
                raise ValueError(
                    f"latent cache {str(path)!r} was not made with autoencoder checkpoint {str(autoencoder_checkpoint)!r}"
                    " (fingerprints differ): the autoencoder was retrained or another one is configured. Delete the "
                    "cache and re-run the latent caching step."
                )
        if labels is not None and list(data["label_names"]) != [str(v) for v in labels]:
            raise ValueError(f"latent cache {str(path)!r} has labels {data['label_names']}, expected {list(labels)}")
        self.path = path
        self.latents: torch.Tensor = data["latents"]
        self.labels: torch.Tensor = data["labels"]
        self.context: torch.Tensor | None = data.get("context")
        self.context_keys: list[str] = list(data.get("context_keys") or [])
        self.label_names: list[str] = list(data["label_names"])
        self.scale_factor: float | None = data.get("scale_factor")
        self.autoencoder_fingerprint: str | None = data.get("autoencoder_fingerprint")
        self.transform = transform

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, *spatial) of one latent."""
        return tuple(self.latents.shape[1:])

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"latent": self.latents[index], "label": self.labels[index]}
        if self.context is not None:
            item["context"] = self.context[index]
        return self.transform(item) if self.transform is not None else item

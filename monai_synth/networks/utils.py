"""Checks of network geometry that must hold before anything is built or trained."""

from __future__ import annotations

from collections.abc import Sequence

from monai.utils import ensure_tuple_rep

__all__ = ["check_spatial_size"]


def check_spatial_size(
    spatial_size: int | Sequence[int],
    autoencoder_channels: Sequence[int] | int,
    patch_size: int | None = None,
    spatial_dims: int | None = None,
) -> tuple[int, ...]:
    """Latent spatial shape for ``spatial_size``, or a ``ValueError`` saying which size would work.

    MONAI's ``AutoencoderKL`` halves the image once between consecutive levels of ``channels``, so every axis must be
    divisible by ``2 ** (len(channels) - 1)``; otherwise the decoder's output does not match its input and training
    fails deep inside the loss with a shape error. The DiT then cuts the latent into ``patch_size`` patches, so the
    latent axes must be divisible by the patch size too.

    Args:
        spatial_size: image size in model space, one int (same on every axis) or one per axis.
        autoencoder_channels: the autoencoder's ``channels`` argument (one entry per level), or the number of levels.
        patch_size: the DiT patch size; ``None`` skips that check.
        spatial_dims: number of spatial axes; ``None`` takes them from ``spatial_size`` (one for a single int).

    Returns:
        The latent spatial shape, one int per axis.

    Raises:
        ValueError: naming the offending axis and the nearest sizes that would work.
    """
    if spatial_dims is None:
        spatial_dims = 1 if isinstance(spatial_size, int) else len(spatial_size)
    try:
        size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, spatial_dims))
    except ValueError:
        raise ValueError(
            f"spatial_size {list(spatial_size)} has {len(spatial_size)} axes but spatial_dims is {spatial_dims}"
        ) from None
    levels = autoencoder_channels if isinstance(autoencoder_channels, int) else len(autoencoder_channels)
    if levels < 1:
        raise ValueError("autoencoder channels must list at least one level")
    factor = 2 ** (levels - 1)
    step = factor * (int(patch_size) if patch_size else 1)
    for axis, s in enumerate(size):
        if s < step or s % step:
            lower, upper = max(step, s // step * step), (s // step + 1) * step
            why = f"the autoencoder has {levels} levels (every axis divisible by 2**{levels - 1} = {factor})"
            if patch_size:
                why += f" and the DiT cuts the latent into patches of {patch_size}"
            raise ValueError(
                f"spatial_size {list(size)} cannot be used: axis {axis} ({s}) must be a multiple of {step} because "
                f"{why}. Use e.g. {lower} or {upper}, or change the autoencoder channels / patch size."
            )
    return tuple(s // factor for s in size)

"""MONAI's AutoencoderKL with a decoder that models the pixels' noise, so sampled images carry the modality's texture."""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL

__all__ = ["LaplaceAutoencoderKL"]

#: log-scale bounds: below, the NLL's gradient explodes on near-constant pixels; above, the scale exceeds the range
LOG_SCALE_RANGE = (-7.0, 1.0)


class LaplaceAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose decoder predicts, per pixel, the location and scale of a Laplace distribution p(x | z).

    Why: in a noisy modality (ultrasound speckle at small image sizes, low-dose CT, low-count PET) the noise carries
    no information the latent could keep, so an L1-trained decoder returns its median: a denoised image that no
    reader (and no classifier) takes for a real one. Trained with the Laplace negative log-likelihood
    (:func:`laplace_nll`, which is the L1 loss with a learned per-pixel scale), the decoder also says how much noise
    each pixel has, and sampling draws it:

    - :meth:`decode` and :meth:`reconstruct` return the location (the median): reconstructions, their metrics and
      anything that compares images stay deterministic;
    - :meth:`decode_stage_2_outputs`, what MONAI's latent diffusion inferers call when they sample, draws from the
      distribution with the global torch RNG (which the sampler seeds), so a released image is reproducible from its
      seed.

    The noise is drawn independently per pixel: it suits noise that is (nearly) white at the model's image size. Where
    the noise is correlated over several pixels (e.g. speckle grains at 256 x 256), the patch-adversarial loss of
    stage 1 is the tool, not this class.

    Args and attributes: as :class:`monai.networks.nets.AutoencoderKL`; ``out_channels`` is the number of image
    channels (the decoder itself outputs twice as many: locations, then log-scales).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 1, **kwargs) -> None:
        super().__init__(spatial_dims, in_channels=in_channels, out_channels=2 * out_channels, **kwargs)
        self.image_channels = int(out_channels)

    def decode_distribution(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(location, log_scale)`` of p(x | z), each with the image's channels."""
        out = super().decode(z)
        loc, log_scale = out[:, : self.image_channels], out[:, self.image_channels :]
        return loc, log_scale.clamp(*LOG_SCALE_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The location (median) of p(x | z): the deterministic decoding."""
        return self.decode_distribution(z)[0]

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """A draw from p(x | z): location plus Laplace noise of the predicted scale (global torch RNG)."""
        loc, log_scale = self.decode_distribution(z)
        return torch.distributions.Laplace(loc, log_scale.exp()).sample()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, return_log_scale: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """``(location, z_mu, z_sigma)`` as AutoencoderKL, with ``log_scale`` appended when ``return_log_scale``."""
        z_mu, z_sigma = self.encode(x)
        loc, log_scale = self.decode_distribution(self.sampling(z_mu, z_sigma))
        return (loc, z_mu, z_sigma, log_scale) if return_log_scale else (loc, z_mu, z_sigma)


def laplace_nll(loc: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` under Laplace(loc, exp(log_scale)), without the constant log 2."""
    return ((target - loc).abs() * torch.exp(-log_scale) + log_scale).mean()

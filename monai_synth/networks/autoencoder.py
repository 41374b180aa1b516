"""MONAI's AutoencoderKL with a decoder that models the pixels' noise, so sampled images carry the modality's texture."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL
from monai.utils import look_up_option

__all__ = ["LaplaceAutoencoderKL"]

#: log-scale bounds: below, the NLL's gradient explodes on near-constant pixels; above, the scale exceeds the range
LOG_SCALE_RANGE = (-7.0, 1.0)
#: the decoder's noise: ``white`` (independent Laplace per pixel) or ``fitted`` (the training residuals' correlation
#: and marginal, fitted by :meth:`LaplaceAutoencoderKL.fit_noise`)
NOISE_MODES = ("white", "fitted")
#: the state-dict entries of the fitted noise model; absent from checkpoints written before it existed
_NOISE_BUFFERS = ("noise_kernel", "noise_quantiles", "noise_fitted", "noise_score_range")
_MAX_QUANTILE_VALUES = 2**24
#: the quantile table's entries sit at evenly spaced Gaussian scores in [-r, r], r at most this (a tail probability
#: of 3e-5) and at least ...
_MAX_SCORE = 4.0
#: ... such that every tail beyond the table holds this many of the fitted values (an extreme quantile of a few
#: values is noise): where the table ends, draws are clamped to its end values
_TAIL_VALUES = 20


class LaplaceAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose decoder predicts, per pixel, the location and scale of a Laplace distribution p(x | z).

    Why: in a noisy modality (ultrasound speckle at small image sizes, low-dose CT, low-count PET) the noise carries
    no information the latent could keep, so an L1-trained decoder returns its median: a denoised image that no
    reader (and no classifier) takes for a real one. Trained with the Laplace negative log-likelihood
    (:func:`laplace_nll`, which is the L1 loss with a learned per-pixel scale), the decoder also says how much noise
    each pixel has, and sampling draws it:

    - :meth:`decode` and :meth:`reconstruct` return the location (the median): reconstructions, their metrics and
      anything that compares images stay deterministic;
    - :meth:`decode_stage_2_outputs`, what MONAI's latent diffusion inferers call when they sample, draws
      ``location + scale * noise`` with the global torch RNG (which the sampler seeds), so a released image is
      reproducible from its seed.

    The noise is, with ``noise="white"``, standard Laplace drawn independently per pixel. That gives drawn images the
    wrong texture whenever the location keeps part of the noise (a blurred copy of the speckle: the residual left to
    draw is then anti-correlated between neighbours, not white). With ``noise="fitted"``, :meth:`fit_noise` measures
    once, after training, the standardised residuals ``(x - location) / scale`` of the training images: their mean
    power spectrum, kept as a small zero-phase colouring kernel, and their marginal, kept as a quantile table at
    evenly spaced Gaussian scores (so the tails, where the marginal is heavy, get as many entries as its body: a table
    at evenly spaced probabilities spreads its last 1/256 of draws evenly up to the sample's extreme value, and drawn
    images got a few black and white pixels each that real ones do not have). A draw
    is then Gaussian noise filtered by the kernel and mapped through the quantiles, so ``location + scale * noise``
    has the training images' second-order statistics and grey-level distribution. Both are cohort-level statistics
    (a kernel and a quantile table, no image's pixels); they are buffers, saved and loaded with the weights.

    Args:
        spatial_dims, in_channels, **kwargs: as :class:`monai.networks.nets.AutoencoderKL`.
        out_channels: the number of image channels (the decoder itself outputs twice as many: locations, then
            log-scales).
        noise: ``"white"`` or ``"fitted"`` (see above; ``"fitted"`` needs :meth:`fit_noise` before sampling).
        noise_kernel_size: odd side of the colouring kernel, in pixels: the longest correlation it reproduces.
        noise_quantiles: entries of the quantile table of the marginal.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        noise: str = "white",
        noise_kernel_size: int = 7,
        noise_quantiles: int = 257,
        **kwargs,
    ) -> None:
        super().__init__(spatial_dims, in_channels=in_channels, out_channels=2 * out_channels, **kwargs)
        try:
            self.noise = look_up_option(noise, NOISE_MODES)
        except ValueError as e:
            raise ValueError(f"noise: {e}") from None
        k = int(noise_kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"noise_kernel_size must be a positive odd number of pixels, got {noise_kernel_size}")
        if int(noise_quantiles) < 2:
            raise ValueError(f"noise_quantiles must be >= 2, got {noise_quantiles}")
        self.image_channels = int(out_channels)
        self.spatial_dims = int(spatial_dims)
        delta = torch.zeros((self.image_channels, 1) + (k,) * self.spatial_dims)
        delta[(slice(None), 0) + (k // 2,) * self.spatial_dims] = 1.0
        self.register_buffer("noise_kernel", delta)
        self.register_buffer("noise_quantiles", torch.zeros(self.image_channels, int(noise_quantiles)))
        self.register_buffer("noise_fitted", torch.tensor(False))
        self.register_buffer("noise_score_range", torch.tensor(_MAX_SCORE))

    def decode_distribution(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(location, log_scale)`` of p(x | z), each with the image's channels."""
        out = super().decode(z)
        loc, log_scale = out[:, : self.image_channels], out[:, self.image_channels :]
        return loc, log_scale.clamp(*LOG_SCALE_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The location (median) of p(x | z): the deterministic decoding."""
        return self.decode_distribution(z)[0]

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """A draw from p(x | z): location plus the predicted scale times the noise (global torch RNG)."""
        loc, log_scale = self.decode_distribution(z)
        return loc + log_scale.exp() * self.draw_noise(loc.shape, device=loc.device, dtype=loc.dtype)

    def draw_noise(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standardised noise of ``shape`` (batch, channels, *spatial), white Laplace or fitted (global torch RNG)."""
        if self.noise == "white":
            zero = torch.zeros((), device=device, dtype=dtype)
            return torch.distributions.Laplace(zero, zero + 1.0).sample(shape)
        if not bool(self.noise_fitted):
            raise RuntimeError(
                "noise='fitted' but this autoencoder's noise model was never fitted: its checkpoint predates it or "
                "stage 1 did not finish. Fit it on the training images (LaplaceAutoencoderKL.fit_noise, which the "
                "bundle's DecoderNoiseHandler runs at the end of stage 1), or set decoder_noise: white."
            )
        kernel = self.noise_kernel.to(device=device, dtype=torch.float32)
        pad = kernel.shape[-1] // 2
        # Gaussian noise over the image plus a border, filtered without padding: stationary up to the edges
        g = torch.randn(tuple(shape[:2]) + tuple(s + 2 * pad for s in shape[2:]), device=device)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        g = conv(g, kernel, groups=self.image_channels)
        # the filtered Gaussian's scores through the quantile table: the training marginal, the correlation kept (a
        # Gaussian copula)
        r = float(self.noise_score_range)
        table = self.noise_quantiles.to(device=device, dtype=torch.float32)
        return _interpolate_table((g + r) / (2 * r), table).to(dtype)

    @torch.no_grad()
    def fit_noise(self, images: Iterable[torch.Tensor], max_values_per_batch: int = 8192, seed: int = 0) -> None:
        """Fit the ``fitted`` noise model to the standardised residuals of ``images`` (batches of training images).

        The residual ``(x - location) / scale`` of each image, decoded from its ``z_mu``, is what the noise must add
        back to the location to give the real image. Its mean power spectrum (each image's mean removed) becomes the
        zero-phase colouring kernel (the inverse Fourier transform of its square root, centred, cropped to
        ``noise_kernel_size`` and normalised to unit energy, so the filtered Gaussian keeps unit variance); a seeded
        subsample of its values (``max_values_per_batch`` per batch and channel) gives the quantile table, at evenly
        spaced Gaussian scores up to +-4 (fewer where the subsample is too small to estimate the extreme quantiles).

        Raises:
            ValueError: no image, images of different sizes, or images smaller than the kernel.
        """
        was_training = self.training
        self.eval()
        gen = torch.Generator().manual_seed(int(seed))
        power, size, count, values = None, None, 0, []
        dims = tuple(range(2, 2 + self.spatial_dims))
        device = self.noise_kernel.device
        for x in images:
            x = torch.as_tensor(x).to(device=device, dtype=torch.float32)
            loc, log_scale = self.decode_distribution(self.encode(x)[0])
            r = ((x - loc) * torch.exp(-log_scale)).float().cpu()
            if size is not None and tuple(r.shape[2:]) != size:
                raise ValueError(f"fit_noise needs images of one size; got {tuple(r.shape[2:])} after {size}")
            size = tuple(r.shape[2:])
            # zero-padded to twice the size, the power spectrum is that of the linear (not circular) autocorrelation
            centred = r - r.mean(dim=dims, keepdim=True)
            p = torch.fft.fftn(centred, s=tuple(2 * n for n in size), dim=dims).abs().pow(2).sum(0)
            power = p if power is None else power + p
            count += r.shape[0]
            flat = r.transpose(0, 1).reshape(r.shape[1], -1)
            pick = torch.randperm(flat.shape[1], generator=gen)[: int(max_values_per_batch)]
            values.append(flat[:, pick])
        if power is None:
            raise ValueError("fit_noise got no image: pass the training images' batches")
        k = self.noise_kernel.shape[-1]
        if min(size) < k:
            raise ValueError(f"images of {size} px are smaller than noise_kernel_size {k}; choose a smaller kernel")
        kernel = _colouring_kernel(power, size, count, k)
        values = torch.cat(values, dim=1)
        if values.shape[1] > _MAX_QUANTILE_VALUES:  # torch.quantile's input limit
            values = values[:, torch.randperm(values.shape[1], generator=gen)[:_MAX_QUANTILE_VALUES]]
        normal = torch.distributions.Normal(0.0, 1.0)
        tail = min(0.25, _TAIL_VALUES / values.shape[1])
        score_range = min(_MAX_SCORE, float(-normal.icdf(torch.tensor(tail))))
        probs = normal.cdf(torch.linspace(-score_range, score_range, self.noise_quantiles.shape[1]))
        quantiles = torch.stack([torch.quantile(v, probs) for v in values])
        self.noise_kernel.copy_(kernel.unsqueeze(1))
        self.noise_quantiles.copy_(quantiles)
        self.noise_score_range.fill_(score_range)
        self.noise_fitted.fill_(True)
        self.train(was_training)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, return_log_scale: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """``(location, z_mu, z_sigma)`` as AutoencoderKL, with ``log_scale`` appended when ``return_log_scale``."""
        z_mu, z_sigma = self.encode(x)
        loc, log_scale = self.decode_distribution(self.sampling(z_mu, z_sigma))
        return (loc, z_mu, z_sigma, log_scale) if return_log_scale else (loc, z_mu, z_sigma)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        """Checkpoints written before the noise model existed load as unfitted (white noise draws as they did).

        A fitted table of an earlier version (at evenly spaced probabilities, no ``noise_score_range``) is resampled
        at this version's Gaussian scores on loading.
        """
        table, score_range = prefix + "noise_quantiles", prefix + "noise_score_range"
        if table in state_dict and score_range not in state_dict:
            old = state_dict[table].float()
            scores = torch.linspace(-_MAX_SCORE, _MAX_SCORE, old.shape[1])
            probs = torch.distributions.Normal(0.0, 1.0).cdf(scores)
            state_dict[table] = _interpolate_table(probs.expand(1, old.shape[0], -1), old)[0]
            state_dict[score_range] = torch.tensor(_MAX_SCORE)
        absent = [name for name in _NOISE_BUFFERS if prefix + name not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if len(absent) == len(_NOISE_BUFFERS):
            for name in absent:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)


def _colouring_kernel(power: torch.Tensor, size: tuple[int, ...], count: int, k: int) -> torch.Tensor:
    """Zero-phase kernel of side ``k`` whose filtered unit white noise has the measured autocorrelation.

    ``power`` (channels, *2 x size) sums the zero-padded power spectra of ``count`` mean-free residual images of
    ``size``. Its inverse transform, divided by the number of pixel pairs at each lag, is the autocovariance; the lags
    a kernel of side ``k`` can reproduce (up to ``k - 1`` per axis) are kept, and the square root of their spectrum
    (negative parts clipped), transformed back, centred and cropped, is the kernel, normalised to unit energy.
    """
    per_channel = tuple(range(1, power.ndim))
    padded = power.shape[1:]
    pairs = torch.fft.ifftn(torch.fft.fftn(torch.ones(size), s=padded).abs().pow(2)).real.round().clamp_min(1)
    acov = torch.fft.ifftn(power, dim=per_channel).real / (count * pairs)
    grid_size = 4 * k
    lags = torch.arange(-(k - 1), k)
    grid = torch.zeros((power.shape[0],) + (grid_size,) * len(size))
    src, dst = [slice(None)], [slice(None)]
    for axis, n in enumerate(padded):
        shape = [1] * len(size)
        shape[axis] = -1
        src.append((lags % n).reshape(shape))
        dst.append((lags % grid_size).reshape(shape))
    grid[tuple(dst)] = acov[tuple(src)]
    spectrum = torch.fft.fftn(grid, dim=per_channel).real.clamp_min(0)
    amplitude = torch.fft.fftshift(torch.fft.ifftn(spectrum.sqrt(), dim=per_channel).real, dim=per_channel)
    centre = grid_size // 2
    kernel = amplitude[(slice(None),) + (slice(centre - k // 2, centre - k // 2 + k),) * len(size)]
    return kernel / kernel.flatten(1).norm(dim=1).clamp_min(1e-12).reshape((-1,) + (1,) * len(size))


def _interpolate_table(u: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Map ``u`` (batch, channels, ...) through each channel's table of evenly spaced knots on [0, 1], by linear
    interpolation; ``u`` outside [0, 1] takes the end values."""
    n = quantiles.shape[1]
    pos = u.clamp(0.0, 1.0) * (n - 1)
    lo = pos.floor().clamp(max=n - 2).long()
    w = pos - lo
    table = quantiles.reshape((1, quantiles.shape[0]) + (1,) * (u.ndim - 2) + (n,)).expand(u.shape + (n,))
    lo_v = torch.gather(table, -1, lo.unsqueeze(-1)).squeeze(-1)
    hi_v = torch.gather(table, -1, (lo + 1).unsqueeze(-1)).squeeze(-1)
    return lo_v + w * (hi_v - lo_v)


def laplace_nll(loc: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` under Laplace(loc, exp(log_scale)), without the constant log 2."""
    return ((target - loc).abs() * torch.exp(-log_scale) + log_scale).mean()

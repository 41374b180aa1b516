"""Diffusion transformer (DiT) backbone for 2D and 3D latent diffusion.

A whole transformer backbone in one file, in the layout of the reference DiT implementation: patch embedding,
timestep / class / context embedders, adaLN-Zero transformer blocks and a final layer that unpatchifies the
tokens back to an image. The network follows

- W. Peebles and S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (DiT), and
- Xu et al., "Medical Synthesis with Conditional Latent Diffusion Transformers" (CoLDiT), Research 2024,
  DOI 10.34133/research.0532, which conditions a latent DiT on BI-RADS categories of breast ultrasound.

It is written to drop into MONAI's :class:`~monai.inferers.DiffusionInferer` and
:class:`~monai.inferers.LatentDiffusionInferer`: they call ``model(x, timesteps=..., context=...)``, pass
timesteps of shape ``(1,)`` while sampling, and build the unconditional branch of classifier-free guidance by
filling ``context`` with ``-1``. Such a context row selects a learned "null" condition embedding here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DiffusionTransformer", "DIT_PRESETS"]

#: Depth / width / heads of the DiT paper's model sizes (Table 1 of Peebles & Xie), plus a tiny one for tests.
_SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"{size}/{patch}": {**cfg, "patch_size": patch} for size, cfg in _SIZES.items() for patch in (2, 4, 8)
}
DIT_PRESETS["tiny"] = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 2}

_VALID_PATCHES = (1, 2, 4, 8)


def _ensure_tuple(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ``dims`` positive ints, or raise a ValueError naming ``name``."""
    try:
        out = tuple(int(v) for v in ensure_tuple_rep(int(value) if isinstance(value, np.integer) else value, dims))
    except ValueError:
        out = ()
    if len(out) != dims or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a positive int or a sequence of {dims} positive ints, got {value}.")
    return out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine modulation of token features: ``x * (1 + scale) + shift`` in one fused kernel."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def sincos_position_embedding(grid_size: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed sine-cosine position embedding for a 2D or 3D token grid.

    Each axis gets an equal, even share of the channels (MAE / DiT style frequencies); channels left over when
    ``dim`` does not split evenly are zero. Tokens are in the row-major order of the flattened grid, which is the
    order in which :class:`PatchEmbed` emits them.

    Args:
        grid_size: number of tokens along each spatial axis.
        dim: embedding width (the transformer's hidden size).

    Returns:
        float32 tensor of shape ``(prod(grid_size), dim)``.
    """
    per_axis = 2 * (dim // (2 * len(grid_size)))
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid_size], indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(per_axis // 2, 1))
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


class PatchEmbed(nn.Module):
    """Cut the latent into non-overlapping patches with a strided convolution and project each to a token."""

    def __init__(self, spatial_dims: int, in_channels: int, hidden_size: int, patch_size: tuple[int, ...]) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, *grid) -> (B, N, D): tokens in row-major grid order. The copy to a contiguous token layout matters:
        # elementwise ops keep their input's strides, so a transposed view here would leave the whole residual stream
        # transposed and make every LayerNorm and Linear copy its input.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of (integer or continuous) diffusion time followed by a two-layer MLP.

    Continuous times from rectified flow (floats in ``[0, num_train_timesteps]``) use the same frequencies as the
    integer steps of DDPM/DDIM, so one network serves both objectives.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = frequency_embedding_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float().unsqueeze(1) * self.freqs.unsqueeze(0)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class LabelEmbedder(nn.Module):
    """Learned embedding of integer class labels, with one extra row used as the null ("unconditional") class.

    The label range is checked without a host synchronisation where that would cost one per step: on an accelerator
    (or under ``torch.compile``) as an asynchronous device assertion, on the CPU as an immediate ``ValueError``.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def _check(self, labels: torch.Tensor, batch: int) -> None:
        if labels.dtype.is_floating_point or labels.shape != (batch,):
            raise ValueError(
                f"class_labels must be an integer tensor of shape ({batch},), got dtype {labels.dtype} "
                f"and shape {tuple(labels.shape)}."
            )
        valid = ((labels >= -1) & (labels < self.num_classes)).all()
        message = f"class_labels must be in [0, {self.num_classes}) (or -1 for the null class)"
        if labels.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(valid, message)
        elif not bool(valid):
            raise ValueError(f"{message}, got values {labels.unique().tolist()}.")

    def forward(self, labels: torch.Tensor | None, drop: torch.Tensor | None, batch: int) -> torch.Tensor:
        if labels is None:
            return self.embedding_table.weight[self.num_classes].unsqueeze(0).expand(batch, -1)  # (B, D)
        self._check(labels, batch)
        null = labels < 0 if drop is None else (labels < 0) | drop
        return self.embedding_table(torch.where(null, self.num_classes, labels))  # (B, D)


class ContextEmbedder(nn.Module):
    """Two-layer MLP for a float condition vector (one-hot labels and/or continuous values such as age).

    A row filled with ``-1`` (how MONAI builds the unconditional half of classifier-free guidance) is replaced
    by a learned null embedding, so "no condition" is a point the network learns, not whatever the MLP happens to
    output for ``-1``.
    """

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.mlp = nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.null_embedding = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, context: torch.Tensor | None, drop: torch.Tensor | None, batch: int) -> torch.Tensor:
        if context is None:
            return self.null_embedding.unsqueeze(0).expand(batch, -1)  # (B, D)
        if context.ndim == 3 and context.shape[1] == 1:
            context = context.squeeze(1)  # MONAI's cross-attention form (B, 1, K) -> (B, K)
        if not context.is_floating_point():
            context = context.float()  # e.g. an integer one-hot vector
        if context.ndim != 2 or context.shape[0] != batch or context.shape[1] != self.context_dim:
            raise ValueError(
                f"context must have shape ({batch}, {self.context_dim}) or ({batch}, 1, {self.context_dim}) "
                f"(context_dim={self.context_dim}), got {tuple(context.shape)}."
            )
        null = (context == -1).all(dim=1)  # (B,)
        if drop is not None:
            null = null | drop
        emb = self.mlp(context)  # (B, D)
        return torch.where(null.unsqueeze(1), self.null_embedding.to(emb.dtype), emb)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused attention kernel."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # qkv features are laid out (3, heads, head_dim) per token, as in the reference DiT/timm attention. Splitting
        # q, k, v off the token axis and transposing each (rather than permuting the stacked tensor first) lets the
        # backward pass stack their gradients straight into the (B, N, 3 * D) layout of the qkv output: one copy of
        # that gradient per block fewer.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Transformer feed-forward layer with the tanh approximation of GELU, as in DiT."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning.

    adaLN-Zero: the condition vector ``c`` regresses, per block, a shift and a scale applied after each
    (affine-free) LayerNorm and a gate multiplying each residual branch; the regressing layer starts at zero, so
    every gate is zero at initialisation, every block is the identity, and the network starts as a function that
    ignores its input (Peebles & Xie found this the best of their conditioning schemes).

    ``adaLN_modulation`` is a single linear layer that receives ``SiLU(c)`` from the caller: the SiLU of the
    reference implementation is computed once for all blocks rather than once per block.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D) tokens; c: (B, D) SiLU of the condition -> six (B, D) modulations
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then each token's output pixels.

    The DiT head is a linear map from each token to its own patch, so neighbouring patches need not agree at their
    border. With ``overlap``, a transposed convolution writes each token into a window that reaches half a patch into
    its neighbours on every side (stride one patch, kernel twice that), and overlapping windows add up: every pixel
    near a border is written by the tokens on both sides, so no seam follows the patch grid.
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: tuple[int, ...],
        out_channels: int,
        grid_size: tuple[int, ...],
        overlap: bool = False,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear, self.overlap = None, None
        if overlap:
            pad = tuple((p + 1) // 2 for p in patch_size)
            kernel = tuple(p + 2 * q for p, q in zip(patch_size, pad))
            tconv = nn.ConvTranspose2d if len(patch_size) == 2 else nn.ConvTranspose3d
            self.overlap = tconv(hidden_size, out_channels, kernel, stride=patch_size, padding=pad)
        else:  # registered before adaLN_modulation, as it always was: optimizer states saved by index still match
            self.linear = nn.Linear(hidden_size, math.prod(patch_size) * out_channels)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` tokens -> ``(B, T, prod(patch) * C)`` patches (linear head) or the ``(B, C, *size)`` image."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        x = modulate(self.norm_final(x), shift, scale)  # (B, T, D)
        if self.overlap is None:
            return self.linear(x)
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid_size)  # tokens are row-major
        return self.overlap(grid)


class DiffusionTransformer(nn.Module):
    """Conditional diffusion transformer (DiT) for 2D or 3D latents.

    Implements DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023) with the
    class-conditional latent set-up of CoLDiT (Xu et al., Research 2024), extended to 3D by patchifying with a
    3D strided convolution and a 3D sine-cosine position embedding. The conditioning vector of every adaLN-Zero
    block is the sum of the timestep embedding and, when configured, a class-label embedding and a float-context
    embedding; either condition can be "null" (see ``forward``), which is what classifier-free guidance needs.

    Args:
        spatial_dims: number of spatial dimensions of the latent, 2 or 3.
        in_channels: channels of the (noisy) input latent.
        out_channels: channels of the prediction (noise, velocity or sample). Doubled when ``learn_sigma``.
        input_size: spatial size of the input, an int for every axis or one int per axis. The position
            embedding is built for this grid; other sizes are refused.
        patch_size: patch edge per axis, each one of 1, 2, 4, 8, and dividing ``input_size``.
        hidden_size: transformer width.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: feed-forward width as a multiple of ``hidden_size``.
        num_classes: number of integer class labels (e.g. BI-RADS categories); ``None`` for no label input.
            An extra learned row is the null class.
        context_dim: length of the float condition vector ``context``; ``None`` for no context input.
        class_dropout_prob: probability, in training mode only, of replacing a sample's whole condition (label
            and context together) by the null condition, which trains the unconditional model used by
            classifier-free guidance. This is for standalone use; a trainer may instead drop conditions itself
            (e.g. fill the context with ``-1``) and keep this at 0 so the drop rate is not applied twice.
        learn_sigma: also predict a per-pixel variance (DiT's learned-range variance), doubling the output
            channels: the first ``out_channels`` are the prediction, the rest the variance interpolation.
        use_checkpointing: recompute each block's activations in the backward pass (``torch.utils.checkpoint``)
            instead of storing them, trading ~30% more compute for much less memory on 3D latents.
        overlap_head: write each token into a window that overlaps its neighbours' by half a patch
            (:class:`FinalLayer`) instead of into its own patch. With few tokens the DiT's own head leaves the patch
            grid visible as seams in the samples: on the breast-ultrasound quickstart (4 x 4 patches of a 16 x 16
            latent), 12-31% more gradient across the token borders of generated latents than elsewhere, against 2%
            in the training latents, and 8-px tiles in the released images.

    Raises:
        ValueError: for ``spatial_dims`` other than 2 or 3, non-positive channels/sizes/depth, a ``patch_size``
            not in {1, 2, 4, 8} or not dividing ``input_size``, ``hidden_size`` not divisible by ``num_heads``,
            ``class_dropout_prob`` outside [0, 1), or non-positive ``num_classes`` / ``context_dim``.

    Example::

        net = DiffusionTransformer.from_preset(
            "S/2", spatial_dims=2, in_channels=4, out_channels=4, input_size=32, context_dim=5
        )
        eps = net(latents, timesteps, context=one_hot_labels)
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        input_size: int | Sequence[int],
        patch_size: int | Sequence[int] = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        class_dropout_prob: float = 0.0,
        learn_sigma: bool = False,
        use_checkpointing: bool = False,
        overlap_head: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("depth", depth)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        self.input_size = _ensure_tuple(input_size, spatial_dims, "input_size")
        self.patch_size = _ensure_tuple(patch_size, spatial_dims, "patch_size")
        if any(p not in _VALID_PATCHES for p in self.patch_size):
            raise ValueError(f"patch_size must be one of {_VALID_PATCHES} per axis, got {patch_size}.")
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise ValueError(
                f"patch_size {self.patch_size} must divide input_size {self.input_size} on every axis; "
                "choose a smaller patch or pad the latent."
            )
        if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads}).")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or a positive integer, got {num_classes}.")
        if context_dim is not None and context_dim < 1:
            raise ValueError(f"context_dim must be None or a positive integer, got {context_dim}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}.")

        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels) * (2 if learn_sigma else 1)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.class_dropout_prob = float(class_dropout_prob)
        self.learn_sigma = learn_sigma
        self.use_checkpointing = use_checkpointing
        self.grid_size = tuple(s // p for s, p in zip(self.input_size, self.patch_size))

        self.x_embedder = PatchEmbed(spatial_dims, self.in_channels, hidden_size, self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes is not None else None
        self.c_embedder = ContextEmbedder(context_dim, hidden_size) if context_dim is not None else None
        # Fixed (not learned) position embedding; not saved in checkpoints since it follows from the grid size.
        self.register_buffer(
            "pos_embed", sincos_position_embedding(self.grid_size, hidden_size).unsqueeze(0), persistent=False
        )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels, self.grid_size, overlap_head)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> DiffusionTransformer:
        """Build a network with the depth, width, heads and patch of a named DiT size.

        Args:
            name: one of ``"S/2"``, ``"B/2"``, ``"L/2"``, ``"XL/2"`` (also ``/4`` and ``/8``) or ``"tiny"``
                (depth 2, width 32, 2 heads, patch 2; for tests).
            kwargs: the remaining constructor arguments (``spatial_dims``, ``in_channels``, ``out_channels``,
                ``input_size``, conditioning options). Keys given here override the preset's values.

        Raises:
            ValueError: for an unknown preset name.
        """
        if name not in DIT_PRESETS:
            raise ValueError(f"Unknown DiT preset name {name!r}; choose one of {sorted(DIT_PRESETS)}.")
        return cls(**{**DIT_PRESETS[name], **kwargs})

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, and zeros where adaLN-Zero needs them."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.c_embedder is not None:
            nn.init.normal_(self.c_embedder.null_embedding, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        head = self.final_layer.linear if self.final_layer.overlap is None else self.final_layer.overlap
        for layer in (self.final_layer.adaLN_modulation, head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"x has {x.ndim} dimensions but the network was built with spatial_dims={self.spatial_dims}; "
                f"expected (B, C, {', '.join('*' * self.spatial_dims)})."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but in_channels={self.in_channels}.")
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"x has spatial size {tuple(x.shape[2:])} but the network was built with input_size="
                f"{self.input_size}; build it for this size (the position embedding is fixed per grid)."
            )

    def _timesteps(self, timesteps: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        """Return timesteps as a ``(batch,)`` tensor, broadcasting a scalar or a ``(1,)`` tensor."""
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            return t.reshape(1).expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"timesteps must have shape ({batch},), (1,) or (), got {tuple(t.shape)}.")
        return t

    def _condition(
        self, batch: int, device: torch.device, context: torch.Tensor | None, class_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Sum of the label and context embeddings, ``(B, D)`` (zeros when the network has neither)."""
        if class_labels is not None and self.y_embedder is None:
            raise ValueError("class_labels were given but the network was built with num_classes=None.")
        if context is not None and self.c_embedder is None:
            raise ValueError("context was given but the network was built with context_dim=None.")
        drop = None  # (B,) rows trained with the null condition, for classifier-free guidance
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(batch, device=device) < self.class_dropout_prob
        cond = torch.zeros(1, self.hidden_size, device=device)
        if self.y_embedder is not None:
            cond = cond + self.y_embedder(class_labels, drop, batch)
        if self.c_embedder is not None:
            cond = cond + self.c_embedder(context, drop, batch)
        return cond

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, prod(patch) * C) tokens -> (B, C, *input_size) image."""
        b, c = x.shape[0], self.out_channels
        g, p = self.grid_size, self.patch_size
        x = x.reshape(b, *g, *p, c)
        if self.spatial_dims == 2:
            x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, ph, gw, pw)
        else:
            x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gd, pd, gh, ph, gw, pw)
        return x.reshape(b, c, *self.input_size)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target for a batch of noisy latents.

        Args:
            x: noisy latents ``(B, in_channels, *input_size)``.
            timesteps: diffusion time per sample, shape ``(B,)``, or ``(1,)`` / scalar for the whole batch; integer
                (DDPM/DDIM) or float (rectified flow).
            context: float conditions ``(B, context_dim)`` or ``(B, 1, context_dim)``. A row that is all ``-1``, or
                ``None`` for the whole batch, selects the learned null condition.
            class_labels: integer labels ``(B,)`` in ``[0, num_classes)``; ``-1``, or ``None`` for the whole batch,
                selects the null class.

        Returns:
            ``(B, out_channels, *input_size)`` (``2 * out_channels`` when ``learn_sigma``).

        Raises:
            ValueError: for an input whose rank, channels or size do not match ``spatial_dims``, ``in_channels``
                and ``input_size``; timesteps, context or class labels of the wrong shape; class labels out of
                range; or a condition the network was not built for.
        """
        self._check_input(x)
        batch = x.shape[0]
        t = self._timesteps(timesteps, batch, x.device)  # (B,)
        c = self.t_embedder(t) + self._condition(batch, x.device, context, class_labels)  # (B, D)
        c = F.silu(c)  # the SiLU that starts every adaLN_modulation, computed once
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = prod(input_size / patch_size)
        for block in self.blocks:
            if self.use_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)  # (B, T, D)
            else:
                h = block(h, c)  # (B, T, D)
        out = self.final_layer(h, c)  # (B, T, prod(patch_size) * out_channels), or the image with the overlap head
        return self.unpatchify(out) if self.final_layer.overlap is None else out  # (B, out_channels, *input_size)

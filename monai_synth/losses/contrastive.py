"""Supervised contrastive loss: several positives per anchor (a patient's repeat studies and their altered copies)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["SupervisedContrastiveLoss"]


class SupervisedContrastiveLoss(_Loss):
    """Supervised contrastive loss ("SupCon", L_out form) of Khosla et al., NeurIPS 2020.

    For every anchor ``i`` with at least one positive (another item with the same label in the batch)::

        loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )

    Why not :class:`monai.losses.ContrastiveLoss`: MONAI's loss is SimCLR's NT-Xent over exactly two views of
    each item (one positive per anchor). A patient has several repeat studies, and all of them (and their
    augmented copies) should pull together, which needs any number of positives per anchor; that is SupCon.
    It is a dozen lines, written here with a log-sum-exp for numerical stability.

    Args:
        temperature: softmax temperature ``T`` (> 0); 0.1 is the paper's default.

    Raises:
        ValueError: for a non-positive temperature, or inputs that are not ``(B, d)`` features with ``(B,)``
            labels.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args:
            features: ``(B, d)`` embeddings; they are L2-normalised here (a no-op when already unit length).
            labels: ``(B,)`` integer identities; items with equal labels are positives of each other.

        Returns:
            scalar mean loss over anchors that have a positive (0 when none has).
        """
        if features.ndim != 2:
            raise ValueError(f"features must have shape (B, d), got {tuple(features.shape)}.")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}.")
        z = F.normalize(features, dim=1)
        logits = z @ z.T / self.temperature
        self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = pos.sum(dim=1)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            return features.sum() * 0.0
        pos_log_prob = log_prob.masked_fill(~pos, 0.0).sum(dim=1)
        return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()

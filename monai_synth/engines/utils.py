"""Small helpers shared by the engines."""

from __future__ import annotations

import torch

__all__ = ["unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers.

    Methods such as ``AutoencoderKL.encode`` and the parameter names in ``state_dict`` belong to the inner network,
    so every engine that calls them or copies weights goes through this.
    """
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model

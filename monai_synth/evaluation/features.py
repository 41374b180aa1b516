"""Feature spaces for fidelity metrics: what FID, KID, precision/recall and MMD are measured in.

Nothing may be downloaded and torchvision does not import with the CPU torch this package supports, so there is no
Inception network by default. Three spaces are offered instead, and every report names the space it used and the
hash of its weights, because numbers from different spaces are not comparable:

* ``random``: a fixed, randomly initialised MONAI ``ResNet`` with a stated seed (random embeddings are an accepted
  choice outside natural images: Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models",
  ICML 2020, section 4);
* ``trained``: the same architecture trained to predict the diagnostic label on the training split;
* ``weights``: a user's local file, either a TorchScript module (any architecture mapping ``(N, 1, *spatial)`` to
  ``(N, D)``) or a :meth:`FeatureSpace.save` file. A 2D network applied to 3D volumes runs tri-planar (2.5D): the
  three central orthogonal slices, features concatenated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from torch import nn
from tqdm.auto import tqdm

__all__ = ["FeatureSpace", "feature_network", "random_feature_space", "trained_feature_space", "weights_hash"]

_RESNET_KW = {"block": "basic", "layers": (1, 1, 1, 1), "block_inplanes": (16, 32, 64, 128)}


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes and values), so a report can say exactly which weights it used."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def feature_network(spatial_dims: int, num_classes: int | None = None) -> nn.Module:
    """The small MONAI ``ResNet`` of the ``random`` and ``trained`` spaces: 128 pooled features per image.

    With ``num_classes`` it ends in a linear classifier (for training the ``trained`` space); without, it returns
    the pooled features.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return ResNet(
        spatial_dims=spatial_dims,
        n_input_channels=1,
        conv1_t_size=3,
        conv1_t_stride=2,
        no_max_pool=True,
        feed_forward=num_classes is not None,
        num_classes=num_classes or 400,
        **_RESNET_KW,
    )


class FeatureSpace:
    """A frozen network that maps model-space images ``(N, 1, *spatial)`` to feature vectors ``(N, D)``.

    Args:
        name: what the report calls the space (``random(seed=0)``, ``trained(...)``, ``weights(file)``).
        network: the feature network; put in eval mode and never trained further here.
        spatial_dims: spatial dimensionality of the network's input.
        batch_size: images per forward pass.
    """

    def __init__(self, name: str, network: nn.Module, spatial_dims: int, batch_size: int = 64):
        self.name = str(name)
        self.network = network.eval()
        self.spatial_dims = int(spatial_dims)
        self.batch_size = max(1, int(batch_size))
        self.weights_hash = weights_hash(network)

    def describe(self) -> dict:
        """Name and weights hash, for the report."""
        return {"name": self.name, "weights_sha256": self.weights_hash, "spatial_dims": self.spatial_dims}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim - 2 == self.spatial_dims:
            return self.network(x)
        if self.spatial_dims == 2 and x.ndim == 5:  # 2.5D: central axial, coronal and sagittal slices
            c = [s // 2 for s in x.shape[2:]]
            views = (x[:, :, c[0]], x[:, :, :, c[1]], x[:, :, :, :, c[2]])
            return torch.cat([self.network(v.contiguous()) for v in views], dim=1)
        raise ValueError(
            f"a {self.spatial_dims}D feature network cannot embed images of shape {tuple(x.shape[1:])}; "
            "use a network of the images' dimensionality (or a 2D one for 3D volumes, run tri-planar)"
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """Features of ``images`` as float64 ``(N, D)`` (float64: FID takes square roots of their covariances)."""
        if images.ndim < 4:
            raise ValueError(f"expected images of shape (N, 1, *spatial), got {tuple(images.shape)}")
        out = []
        starts = range(0, images.shape[0], self.batch_size)
        for s in tqdm(starts, desc=desc or f"features ({self.name})", disable=desc is None, leave=False):
            batch = images[s : s + self.batch_size].float()
            out.append(self._forward(batch).reshape(batch.shape[0], -1))
        if not out:
            return torch.zeros((0, 0), dtype=torch.float64)
        return torch.cat(out).double()

    def save(self, path: str | os.PathLike) -> Path:
        """Save the network as TorchScript, loadable by :meth:`from_weights` without this package's classes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        example = torch.zeros((1, 1) + (32,) * self.spatial_dims)
        torch.jit.trace(self.network, example).save(os.fspath(path))
        return path

    @classmethod
    def from_weights(cls, path: str | os.PathLike, spatial_dims: int, batch_size: int = 64) -> FeatureSpace:
        """A user's local feature network: a TorchScript file mapping ``(N, 1, *spatial)`` to ``(N, D)``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a TorchScript module.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature weights not found: {path}")
        try:
            network = torch.jit.load(os.fspath(path), map_location="cpu")
        except Exception as err:
            raise ValueError(
                f"{path} is not a TorchScript module; save the feature network with torch.jit.trace(net, example)"
                f".save(path) (it must map (N, 1, *spatial) images to (N, D) features)"
            ) from err
        return cls(f"weights({path.name})", network, spatial_dims, batch_size)


def random_feature_space(spatial_dims: int, seed: int = 0, batch_size: int = 64) -> FeatureSpace:
    """The fixed random-init ResNet space; the same seed gives the same weights (and the same hash) everywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        network = feature_network(spatial_dims)
    return FeatureSpace(f"random(resnet, seed={int(seed)})", network, spatial_dims, batch_size)


def trained_feature_space(
    images: torch.Tensor,
    labels: Sequence[int],
    spatial_dims: int,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> FeatureSpace:
    """The ResNet space trained to predict the label on the training split (its classifier head is dropped).

    A label objective makes the features sensitive to what distinguishes the classes, which random features may
    miss; the price is that the space depends on the training data, so its hash changes with it.

    Raises:
        ValueError: fewer than two classes or mismatched lengths.
    """
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(y) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(y)} labels")
    num_classes = int(y.max()) + 1 if len(y) else 0
    if len(set(y.tolist())) < 2:
        raise ValueError("the trained feature space needs images of at least two classes; use the random space")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        network = feature_network(spatial_dims, num_classes=num_classes)
        opt = torch.optim.Adam(network.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(int(seed))
        network.train()
        for _ in tqdm(range(int(epochs)), desc="training feature network", leave=False):
            order = torch.randperm(len(y), generator=gen)
            for s in range(0, len(y), batch_size):
                idx = order[s : s + batch_size]
                if len(idx) < 2:
                    continue
                opt.zero_grad()
                loss = nn.functional.cross_entropy(network(images[idx].float()), y[idx])
                loss.backward()
                opt.step()
    network.fc = nn.Identity()  # pooled features, as in the random space
    return FeatureSpace(
        f"trained(resnet, label objective, seed={int(seed)}, epochs={int(epochs)})", network, spatial_dims, batch_size
    )

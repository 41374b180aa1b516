"""Does a quickstart's release look like its modality and class? Two independent measures, printed side by side.

- class: a small CNN trained on real phantoms of new patients classifies real held-out phantoms (other new patients)
  and the released images; the release passes at >= 0.8 x the real accuracy.
- realism: a CNN trained to tell released images from real phantoms of new patients, cross-validated on a balanced
  set (as many real as synthetic images, per class); 0.5 is indistinguishable, the release passes at <= 0.9. The same
  test between two real cohorts is the floor.

    python benchmarks/quickstart_quality.py --release quickstart_output/release            # breast ultrasound
    python benchmarks/quickstart_quality.py --modality ct --release ct_output/release     # CT, MRI (mri), PET (pet)

"Real" here always means 2D phantoms of the modality that the generator never saw (other patient indices and seeds
than the quickstart's cohort), stored as the release stores them (ultrasound: 8-bit grey levels like the cohort's
PNGs; CT / MRI / PET: float physical units like the NIfTI release). Real and released images are both brought to
model space [-1, 1] by the modality's intensity transform, as the bundle's loading chain does. The functions are also imported by
``benchmarks/diffusion_recipe.py``, which scores unguarded samples the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monai_synth.data.modalities import get_modality
from monai_synth.data.phantoms import generate_cohort
from monai_synth.transforms.presets import intensity_transform

#: the modality measured (``--modality``; :func:`set_modality`) and its class names, in class-id order
MODALITY = "us"
LABELS = list(get_modality(MODALITY).labels)
#: size the real phantoms are rendered at before a centre crop to the release's size (``--phantom-size``; ``None``:
#: rendered at the release's size), for a quickstart that crops its phantoms (``resize_mode: pad_crop``)
PHANTOM_SIZE: int | None = None


def set_modality(modality: str) -> None:
    """Measure releases of ``modality``: its phantoms, labels and intensity transform (``LABELS`` changes in place)."""
    global MODALITY
    MODALITY = get_modality(modality).name
    LABELS[:] = list(get_modality(MODALITY).labels)


def to_model(image: np.ndarray) -> np.ndarray:
    """A physical image as the bundle's loading chain maps it to model space (ultrasound: 8-bit storage first)."""
    if MODALITY == "us":
        image = np.clip(np.round(image), 0, 255)
    return np.asarray(intensity_transform(MODALITY)(np.asarray(image, dtype=np.float32)), dtype=np.float32)


#: patient index ranges of the real cohorts: far from the quickstart's patients 0..N so none is a training patient
FIRST_PATIENT = {"classifier_train": 100_000, "classifier_test": 200_000, "realism": 300_000, "realism_b": 400_000}


def real_cohort(n_per_class: int, size: int, role: str, images_per_patient: int = 1, seed: int = 7):
    """``(images in [-1, 1], class ids)`` of 2D phantoms of new patients, stored as the release stores them."""
    n_patients = int(np.ceil(n_per_class * len(LABELS) / images_per_patient))
    rendered = PHANTOM_SIZE or size
    if rendered < size:
        raise ValueError(f"--phantom-size {rendered} is smaller than the release's {size} px; it must be at least that")
    recs = generate_cohort(
        MODALITY, n_patients, images_per_patient, 2, rendered, seed=seed, first_patient=FIRST_PATIENT[role]
    )
    lo = (rendered - size) // 2  # the centre crop of MONAI's pad_crop resize mode
    x = np.stack([to_model(r["image"][..., lo : lo + size, lo : lo + size]) for r in recs]).astype(np.float32)
    y = np.asarray([LABELS.index(r["label"]) for r in recs])
    return torch.from_numpy(x), torch.from_numpy(y)


def load_release(release_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Released images (in [-1, 1], the model's intensity mapping) and their class ids, read back from their files."""
    from monai.transforms import LoadImage

    release_dir = Path(release_dir)
    load = LoadImage(image_only=True, ensure_channel_first=True, reader="PILReader" if MODALITY == "us" else None)
    images, labels = [], []
    with open(release_dir / "certificate.csv", newline="") as f:
        for row in csv.DictReader(f):
            images.append(to_model(np.asarray(load(str(release_dir / row["file"])), dtype=np.float32)[:1]))
            labels.append(LABELS.index(str(row["condition"])))
    if not images:
        raise ValueError(f"{release_dir} released no image")
    return torch.from_numpy(np.stack(images)).float(), torch.as_tensor(labels)


class SmallCNN(torch.nn.Sequential):
    """Three conv blocks and a linear head: enough to read lesion shape and shadowing at 32-64 px, quick on a CPU."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        layers: list[torch.nn.Module] = []
        c_in = 1
        for c in (width, 2 * width, 4 * width):
            layers += [
                torch.nn.Conv2d(c_in, c, 3, padding=1),
                torch.nn.BatchNorm2d(c),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
            c_in = c
        layers += [
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(c_in, num_classes),
        ]
        super().__init__(*layers)


def train_cnn(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 20, seed: int = 0) -> SmallCNN:
    """Train :class:`SmallCNN` with lateral flips (axis 0 of the (lateral, depth) image) as the only augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x) / 32))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(2), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


_CLASSIFIERS: dict[tuple[int, ...], tuple[list[torch.nn.Module], float]] = {}


def real_classifiers(
    size: int, seeds: int = 3, per_class: int = 80, epochs: int = 20
) -> tuple[list[torch.nn.Module], float]:
    """Classifiers trained on real phantoms of new patients and their mean accuracy on real held-out phantoms.

    ``per_class`` training images of each class (two studies per patient), half as many test images of other
    patients. Trained once per setting and process, so that several sample sets are scored by the same classifiers.
    """
    key = (MODALITY, size, PHANTOM_SIZE, seeds, per_class, epochs)
    if key not in _CLASSIFIERS:
        x_tr, y_tr = real_cohort(per_class, size, "classifier_train", images_per_patient=2)
        x_te, y_te = real_cohort(max(1, per_class // 2), size, "classifier_test")
        nets = [train_cnn(x_tr, y_tr, len(LABELS), epochs=epochs, seed=s) for s in range(seeds)]
        _CLASSIFIERS[key] = nets, float(np.mean([accuracy(n, x_te, y_te) for n in nets]))
    return _CLASSIFIERS[key]


def class_scores(
    samples: torch.Tensor, labels: torch.Tensor, size: int, seeds: int = 3, per_class: int = 80, epochs: int = 20
) -> dict[str, float]:
    """Accuracy of real-trained classifiers on real held-out phantoms and on ``samples`` (mean over ``seeds``)."""
    nets, r = real_classifiers(size, seeds, per_class, epochs)
    f = float(np.mean([accuracy(n, samples, labels) for n in nets]))
    return {"real_accuracy": r, "synthetic_accuracy": f, "ratio": f / max(r, 1e-8)}


def realism_accuracy(
    a: torch.Tensor, ya: torch.Tensor, b: torch.Tensor, yb: torch.Tensor, folds: int = 5, epochs: int = 20
) -> float:
    """Cross-validated accuracy of telling set ``a`` from set ``b``, balanced per class (0.5: indistinguishable)."""
    g = torch.Generator().manual_seed(0)
    keep_a, keep_b = [], []
    for c in range(len(LABELS)):
        ia, ib = torch.nonzero(ya == c).flatten(), torch.nonzero(yb == c).flatten()
        n = min(len(ia), len(ib))
        keep_a.append(ia[torch.randperm(len(ia), generator=g)[:n]])
        keep_b.append(ib[torch.randperm(len(ib), generator=g)[:n]])
    xa, xb = a[torch.cat(keep_a)], b[torch.cat(keep_b)]
    if len(xa) < folds:
        raise ValueError(f"only {len(xa)} images per side after balancing per class; need at least {folds}")
    x = torch.cat([xa, xb])
    y = torch.cat([torch.zeros(len(xa), dtype=torch.long), torch.ones(len(xb), dtype=torch.long)])
    fold = torch.randperm(len(x), generator=g) % folds
    correct = 0
    for k in range(folds):
        net = train_cnn(x[fold != k], y[fold != k], 2, epochs=epochs, seed=k)
        correct += int((net(x[fold == k]).argmax(1) == y[fold == k]).sum())
    return correct / len(x)


def realism_scores(samples: torch.Tensor, labels: torch.Tensor, size: int, epochs: int = 20) -> dict[str, float]:
    """Real-vs-synthetic accuracy of ``samples`` and, as the floor, of two real cohorts of new patients."""
    n = int(np.bincount(labels.numpy(), minlength=len(LABELS)).max())
    x_r, y_r = real_cohort(n, size, "realism")
    x_b, y_b = real_cohort(n, size, "realism_b")
    return {
        "realism_accuracy": realism_accuracy(samples, labels, x_r, y_r, epochs=epochs),
        "real_vs_real_accuracy": realism_accuracy(x_b, y_b, x_r, y_r, epochs=epochs),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="a release folder (certificate.csv + images)")
    parser.add_argument("--modality", default="us", help="modality of the release: us (default), ct, mri or pet")
    parser.add_argument("--seeds", type=int, default=3, help="classifier seeds averaged for the class measure")
    parser.add_argument("--train-per-class", type=int, default=80, help="real training images per class")
    parser.add_argument("--epochs", type=int, default=20, help="classifier training epochs")
    parser.add_argument(
        "--phantom-size",
        type=int,
        default=None,
        help="render the real phantoms at this size and centre-crop them to the release's (a pad_crop quickstart)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    set_modality(args.modality)
    global PHANTOM_SIZE
    PHANTOM_SIZE = args.phantom_size
    t0 = time.time()
    x, y = load_release(args.release)
    size = x.shape[-1]
    counts = np.bincount(y.numpy(), minlength=len(LABELS))
    print(
        f"{MODALITY} release: {len(x)} images of {size} x {x.shape[-2]} px, per class {dict(zip(LABELS, counts.tolist()))}"
    )
    scores = {
        "n_released": len(x),
        "per_class": dict(zip(LABELS, counts.tolist())),
        **class_scores(x, y, size, seeds=args.seeds, per_class=args.train_per_class, epochs=args.epochs),
        **realism_scores(x, y, size, epochs=args.epochs),
    }
    scores["class_pass"] = bool(scores["ratio"] >= 0.8)
    scores["realism_pass"] = bool(scores["realism_accuracy"] <= 0.9)
    print(f"{'measure':<44}{'value':>8}  goal")
    print(f"{'class accuracy, real held-out phantoms':<44}{scores['real_accuracy']:>8.2f}")
    print(f"{'class accuracy, released images':<44}{scores['synthetic_accuracy']:>8.2f}")
    print(f"{'  ratio released / real':<44}{scores['ratio']:>8.2f}  >= 0.80")
    print(f"{'real-vs-synthetic accuracy (5-fold, balanced)':<44}{scores['realism_accuracy']:>8.2f}  <= 0.90")
    print(f"{'real-vs-real accuracy (floor)':<44}{scores['real_vs_real_accuracy']:>8.2f}")
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()

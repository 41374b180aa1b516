"""One evaluation report per release: fidelity, utility and the privacy audit, as ``report.json`` and ``report.html``.

:func:`run_evaluation` loads the training and holdout datalists (as ``monai-synth guard`` takes them) and the
synthetic images (a release folder, whose ``certificate.csv`` gives each image's condition, or a datalist CSV with
``image`` and ``label`` columns) into model space through the modality presets, runs the three sections and writes:

* ``report.json``: machine-readable; :data:`GATE_KEYS` are always present so a pipeline can gate on them;
* ``report.html``: self-contained (figures embedded as base64 PNG), public: no training pixel and no patient id;
  the real images in its grids are holdout images, and ``show_real=False`` leaves them out too;
* a PRIVATE report (default ``<out>.private_report.html``, next to, never inside, ``out``) with the closest
  synthetic/training pairs and the training patients they belong to: keep it with the training data.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_synth.data.modalities import get_modality

logger = logging.getLogger(__name__)

__all__ = [
    "GATE_KEYS",
    "load_synthetic",
    "run_evaluation",
    "flat_metrics",
    "write_reports",
    "evaluate_release",
    "log_report_to_mlflow",
]

GATE_KEYS = (
    "fidelity.fid",
    "fidelity.fid_real_floor",
    "utility.auc_synthetic",
    "utility.auc_real",
    "privacy.memorisation_rate",
    "privacy.reid_map_at_r_real",
    "privacy.reid_chance",
    "privacy.reid_match_rate",
    "privacy.reid_match_rate_holdout",
)
"""Keys of ``report.json`` (section.name) a pipeline can gate on; a section not run reports them as null."""

OPTIONAL_KEYS = (
    "privacy.mia_auc",
    "privacy.mia_auc_loss",
    "privacy.mia_auc_pia",
    "privacy.mia_auc_secmi",
    "privacy.mia_auc_control",
) + tuple(
    f"restoration.{task}_{key}"
    for task in ("denoise", "superres")
    for key in ("psnr_synthetic", "psnr_real", "ssim_synthetic", "ssim_real", "tost_p_psnr", "tost_p_ssim")
)
"""Gate keys present only when their part ran (membership inference needs the model's checkpoints; restoration is
asked for by task)."""

NOT_DONE: tuple[str, ...] = ()


def _class_index(value: Any, labels: Sequence[str], where: str) -> int:
    text = str(value).strip()
    if text in labels:
        return list(labels).index(text)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number.is_integer() and 0 <= int(number) < len(labels):
        return int(number)
    raise ValueError(f"{where}: condition {value!r} is not a label of this modality ({list(labels)}) nor a class id")


def load_synthetic(path: str | os.PathLike, labels: Sequence[str]) -> list[dict]:
    """Synthetic images and their class ids, from a release folder or a datalist CSV.

    Args:
        path: a release folder (``certificate.csv`` with ``file`` and ``condition`` columns) or a CSV file with
            ``image`` and ``label`` columns (relative paths are resolved against the CSV's folder).
        labels: the modality's labels; conditions may be a label or a class id.

    Returns:
        ``[{"image": absolute path, "label": class id}, ...]``.

    Raises:
        FileNotFoundError: no such folder / file, or a listed image is missing.
        ValueError: no certificate, missing columns, unknown conditions.
    """
    path = Path(path)
    if path.is_dir():
        table, image_key, label_key = path / "certificate.csv", "file", "condition"
        if not table.is_file():
            raise ValueError(
                f"{path} has no certificate.csv; pass a release folder written by the guard or the bundle, or a "
                "datalist CSV with image and label columns"
            )
    elif path.is_file() and path.suffix.lower() == ".csv":
        table, image_key, label_key = path, "image", "label"
    else:
        raise FileNotFoundError(f"synthetic images not found: {path} (expected a release folder or a .csv datalist)")
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{table} lists no image")
    missing = [k for k in (image_key, label_key) if k not in rows[0]]
    if missing:
        raise ValueError(f"{table} lacks the column(s) {missing}; it needs {image_key!r} and {label_key!r}")
    out, absent = [], []
    for i, row in enumerate(rows, start=1):
        image = (table.parent / row[image_key]).resolve()
        if not image.exists():
            absent.append(f"row {i}: {row[image_key]}")
        out.append({"image": str(image), "label": _class_index(row[label_key], labels, f"{table} row {i}")})
    if absent:
        raise FileNotFoundError(f"{len(absent)} synthetic image(s) missing, e.g. {absent[:5]}")
    return out


def _records(source: Any, labels: Sequence[str]) -> list[dict]:
    """Validated records from a datalist file or from records already in memory (a bundle's splits)."""
    from monai_synth.data.datalist import load_datalist, validate_records

    if isinstance(source, (str, os.PathLike)):
        return load_datalist(source, labels=labels)
    return validate_records([dict(r) for r in source], labels=labels, source="<records>")


def _spatial_dims(modality: str, first_image: str, spatial_size: Sequence[int]) -> int:
    if len(spatial_size) > 1:
        return len(spatial_size)
    if get_modality(modality).spatial_dims == (2,):
        return 2
    from monai_synth.data.loading import load_image

    shape = list(load_image(first_image).shape[1:])
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return len(shape)


def _strip(obj: Any, drop: tuple[str, ...]) -> Any:
    """A copy without the long per-image lists (kept for the figures, not for the JSON)."""
    if isinstance(obj, Mapping):
        return {k: _strip(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, (list, tuple)):
        return [_strip(v, drop) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _strip(obj.item(), drop)
    return obj


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``{"fidelity.fid": ..., ...}``: every :data:`GATE_KEYS` (and :data:`OPTIONAL_KEYS`) entry that has a number
    (for MLflow and gates)."""
    out = {}
    for key in GATE_KEYS + OPTIONAL_KEYS:
        section, name = key.split(".")
        value = (report.get(section) or {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def run_evaluation(
    train: str | os.PathLike,
    holdout: str | os.PathLike,
    synthetic: str | os.PathLike,
    modality: str,
    out: str | os.PathLike,
    spatial_size: int | Sequence[int] = 64,
    feature_space: str = "random",
    feature_weights: str | os.PathLike | None = None,
    sections: Sequence[str] = ("fidelity", "utility", "privacy"),
    utility_steps: int = 300,
    reid_steps: int = 300,
    n_boot: int = 200,
    permutations: int = 200,
    seed: int = 0,
    show_real: bool = True,
    private_report: str | os.PathLike | None = None,
    overwrite: bool = False,
    membership: Any = None,
    mia_attacks: Sequence[str] = ("loss", "pia", "secmi"),
    mia_max_patients: int | None = 250,
    restoration: Sequence[str] = (),
    restoration_steps: int = 200,
) -> dict[str, Any]:
    """Evaluate a synthetic dataset against the training and holdout data it came from, and write the reports.

    Args:
        train: training datalist (CSV or MONAI JSON) of the images the generator was trained on, or its records
            (as a bundle's ``splits['train']``).
        holdout: datalist (or records) of other patients (never trained on).
        synthetic: release folder or datalist CSV (see :func:`load_synthetic`).
        modality: ``ct``, ``mri``, ``pet`` or ``us``.
        out: folder for ``report.json`` and ``report.html`` (created; must be empty unless ``overwrite``).
        spatial_size: model-space size every image is resampled to (whole field of view).
        feature_space: ``random`` (fixed random-init ResNet, seeded by ``seed``), ``trained`` (trained on the
            training labels) or ``weights`` (``feature_weights``, a TorchScript file).
        sections: which of ``fidelity``, ``utility``, ``privacy`` to run.
        utility_steps: optimisation steps of each utility classifier (same for every arm).
        reid_steps: optimisation steps of the audit's re-identification network.
        n_boot: bootstrap resamples of every interval.
        permutations: permutations of the MMD test.
        seed: seed of the feature space, classifiers and resampling (the audit network has its own seed).
        show_real: show holdout images next to the synthetic ones in the public report.
        private_report: path of the PRIVATE report (default ``<out>.private_report.html``); refused inside ``out``.
        overwrite: replace reports in a non-empty ``out``.
        membership: the generator's model for the white-box membership attacks: a
            :class:`~monai_synth.evaluation.membership.DiffusionTarget`, or keyword arguments of
            :func:`~monai_synth.evaluation.membership.target_from_bundle` (bundle folder, both checkpoints, the
            overrides it was trained with); ``None`` skips them (``privacy.mia_auc`` is then absent).
        mia_attacks: which of ``loss``, ``pia``, ``secmi`` to run.
        mia_max_patients: attack at most this many training and as many holdout patients (``None``: all).
        restoration: restoration tasks to run (``denoise``, ``superres``): networks trained on synthetic vs real
            images, tested on the degraded holdout, compared with a paired equivalence test (TOST).
        restoration_steps: optimisation steps of each restoration network (same for both arms).

    Returns:
        the report dict written to ``report.json``.
    """
    from monai_synth.data.datalist import datalist_fingerprint
    from monai_synth.evaluation import features, fidelity, privacy, utility
    from monai_synth.privacy.guard import load_model_space

    unknown = sorted(set(sections) - {"fidelity", "utility", "privacy"})
    if unknown:
        raise ValueError(f"unknown report section(s) {unknown}; choose from fidelity, utility, privacy")
    unknown = sorted(set(restoration) - {"denoise", "superres"})
    if unknown:
        raise ValueError(f"unknown restoration task(s) {unknown}; choose from denoise, superres")
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"report folder {out} is not empty; choose a new --out or pass --overwrite")
    private_path = Path(private_report or f"{out}.private_report.html").absolute()
    if private_path == out or out in private_path.parents:
        raise ValueError(f"the private report {private_path} must not be written inside the public report folder {out}")
    mod = get_modality(modality)
    labels = list(mod.labels)
    timing: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds (user + sys): on a shared machine, what an idle one would take
    start, cpu_start = time.perf_counter(), time.process_time()
    train_records = _records(train, labels)
    holdout_records = _records(holdout, labels)
    shared = sorted({r["patient_id"] for r in train_records} & {r["patient_id"] for r in holdout_records})
    if shared:
        raise ValueError(f"{len(shared)} patient(s) in both --train and --holdout; the holdout must be unseen patients")
    syn_records = load_synthetic(synthetic, labels)
    size = (spatial_size,) if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
    dims = _spatial_dims(mod.name, train_records[0]["image"], size)
    size = size * dims if len(size) == 1 else size
    logger.info(f"loading {len(train_records)} training, {len(holdout_records)} holdout, {len(syn_records)} synthetic")
    x_tr = load_model_space([r["image"] for r in train_records], mod.name, size, dims)
    x_ho = load_model_space([r["image"] for r in holdout_records], mod.name, size, dims)
    x_sy = load_model_space([r["image"] for r in syn_records], mod.name, size, dims)
    y_tr = [mod.label_index(r["label"]) for r in train_records]
    y_ho = [mod.label_index(r["label"]) for r in holdout_records]
    y_sy = [r["label"] for r in syn_records]
    p_tr = [r["patient_id"] for r in train_records]
    p_ho = [r["patient_id"] for r in holdout_records]
    timing["loading"], cpu["loading"] = time.perf_counter() - start, time.process_time() - cpu_start

    report: dict[str, Any] = {
        "modality": mod.name,
        "labels": labels,
        "spatial_size": list(size),
        "counts": {
            "train": len(x_tr),
            "holdout": len(x_ho),
            "synthetic": len(x_sy),
            "synthetic_per_class": {labels[c]: int(sum(1 for y in y_sy if y == c)) for c in range(len(labels))},
        },
        "fingerprints": {"train_datalist": datalist_fingerprint(train_records)},
        "seed": int(seed),
        "not_done": list(NOT_DONE),
        "fidelity": None,
        "utility": None,
        "privacy": None,
        "restoration": None,
    }
    figures: dict[str, Any] = {"images": _class_samples(x_sy, y_sy, x_ho, y_ho, labels, show_real, seed)}
    private: dict[str, Any] = {}
    if "fidelity" in sections:
        t, c = time.perf_counter(), time.process_time()
        if feature_space == "random":
            space = features.random_feature_space(dims, seed=seed)
        elif feature_space == "trained":
            space = features.trained_feature_space(x_tr, y_tr, dims, seed=seed)
        elif feature_space == "weights":
            if not feature_weights:
                raise ValueError("feature_space='weights' needs --feature-weights (a TorchScript feature network)")
            net_dims = 2 if dims == 3 and _is_2d(feature_weights) else dims  # a 2D network runs tri-planar on volumes
            space = features.FeatureSpace.from_weights(feature_weights, spatial_dims=net_dims)
        else:
            raise ValueError(f"unknown feature space {feature_space!r}; use random, trained or weights")
        report["fidelity"] = fidelity.evaluate_fidelity(
            space, x_tr, y_tr, x_ho, y_ho, x_sy, y_sy, labels, n_boot=n_boot, permutations=permutations, seed=seed,
            train_patients=p_tr, holdout_patients=p_ho,
        )  # fmt: skip
        timing["fidelity"], cpu["fidelity"] = time.perf_counter() - t, time.process_time() - c
    if "utility" in sections:
        t, c = time.perf_counter(), time.process_time()
        report["utility"] = utility.evaluate_utility(
            x_tr, y_tr, p_tr, x_ho, y_ho, p_ho, x_sy, y_sy, len(labels), steps=utility_steps, n_boot=n_boot, seed=seed
        )
        figures["roc"] = report["utility"].get("roc")
        timing["utility"], cpu["utility"] = time.perf_counter() - t, time.process_time() - c
    if "privacy" in sections:
        t, c = time.perf_counter(), time.process_time()
        public, private = privacy.audit_privacy(x_tr, p_tr, x_ho, p_ho, x_sy, steps=reid_steps)
        report["privacy"] = public
        figures["distances"] = {
            name: (s["synthetic_d1"], s["holdout_d1"], s["holdout_q01"], s["holdout_q05"])
            for name, s in public["spaces"].items()
        }
        private["pairs"] = {
            name: [(x_sy[p["synthetic"]], x_tr[p["train"]], p_tr[p["train"]], p["distance"]) for p in pairs]
            for name, pairs in private["closest_pairs"].items()
        }
        timing["privacy"], cpu["privacy"] = time.perf_counter() - t, time.process_time() - c
    if restoration:
        from monai_synth.evaluation.restoration import evaluate_restoration

        t, c = time.perf_counter(), time.process_time()
        report["restoration"] = {}
        for task in restoration:
            res = evaluate_restoration(task, mod.name, x_tr, x_ho, p_ho, x_sy, steps=restoration_steps, seed=seed)
            report["restoration"][task] = res
            report["restoration"].update({f"{task}_{k}": res[k] for k in ("psnr_synthetic", "psnr_real",
                                          "ssim_synthetic", "ssim_real")})  # fmt: skip
            for metric in ("psnr", "ssim"):
                report["restoration"][f"{task}_tost_p_{metric}"] = res["tost"][metric]["p_value"]
        timing["restoration"], cpu["restoration"] = time.perf_counter() - t, time.process_time() - c
    if membership is not None:
        t, c = time.perf_counter(), time.process_time()
        mia = _membership(membership, mod.name, size, dims, train_records, holdout_records, y_tr, y_ho, p_tr, p_ho,
                          x_tr, x_ho, mia_attacks, mia_max_patients, n_boot, seed)  # fmt: skip
        report["privacy"] = dict(report["privacy"] or {}) | {k: v for k, v in mia.items() if k.startswith("mia_")}
        report["privacy"]["membership_inference"] = mia
        timing["membership"], cpu["membership"] = time.perf_counter() - t, time.process_time() - c
    timing["total"], cpu["total"] = time.perf_counter() - start, time.process_time() - cpu_start
    report["timing_seconds"] = {k: round(v, 2) for k, v in timing.items()}
    report["cpu_seconds"] = {k: round(v, 2) for k, v in cpu.items()}
    report["torch_threads"] = torch.get_num_threads()
    if report["privacy"] and isinstance(report["privacy"].get("membership_inference"), Mapping):
        figures["mia"] = {k: v["scores"] for k, v in report["privacy"]["membership_inference"]["attacks"].items()}
    report = _strip(report, ("synthetic_d1", "holdout_d1", "roc", "scores"))
    report["gate"] = flat_metrics(report)
    write_reports(report, figures, out, private_path, private, train_patients=set(p_tr))
    report["files"] = {"json": str(out / "report.json"), "html": str(out / "report.html"), "private": str(private_path)}
    return report


def _membership(target, modality, size, dims, train_records, holdout_records, y_tr, y_ho, p_tr, p_ho, x_tr, x_ho,
                attacks, max_patients, n_boot, seed) -> dict[str, Any]:  # fmt: skip
    """Membership inference on the model's checkpoints, the images loaded at the size the model was trained at."""
    from monai_synth.evaluation import membership
    from monai_synth.privacy.guard import load_model_space

    if isinstance(target, Mapping):
        target = membership.target_from_bundle(**dict(target))
    model_size = tuple(int(s) for s in (target.spatial_size or size))
    if model_size != tuple(size):
        logger.info(f"loading the real images again at the model's size {list(model_size)} for membership inference")
        x_tr = load_model_space([r["image"] for r in train_records], modality, model_size, dims)
        x_ho = load_model_space([r["image"] for r in holdout_records], modality, model_size, dims)
    return membership.membership_inference(
        target, x_tr, y_tr, p_tr, x_ho, y_ho, p_ho, attacks=attacks, max_patients=max_patients, n_boot=n_boot,
        seed=seed,
    )  # fmt: skip


def _is_2d(path: Any) -> bool:
    """Whether a TorchScript feature network takes 2D images (tried on a small input)."""
    try:
        torch.jit.load(os.fspath(path), map_location="cpu")(torch.zeros(1, 1, 32, 32))
        return True
    except Exception:
        return False


def _class_samples(x_sy, y_sy, x_ho, y_ho, labels, show_real: bool, seed: int, per_class: int = 8) -> dict:
    """Up to ``per_class`` synthetic (and holdout) images of every class, 2D (central slice of volumes)."""
    rng = np.random.default_rng(int(seed))

    def pick(x, y, c):
        idx = np.flatnonzero(np.asarray(y) == c)
        idx = rng.permutation(idx)[:per_class]
        imgs = [x[i, 0] for i in idx]
        return [img[..., img.shape[-1] // 2] if img.ndim == 3 else img for img in imgs]

    return {
        name: {"synthetic": pick(x_sy, y_sy, c), "real": pick(x_ho, y_ho, c) if show_real else []}
        for c, name in enumerate(labels)
    }


# ---------------------------------------------------------------------------------------------------- rendering


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"/>'


def _grid_figure(samples: Mapping[str, Mapping[str, list]]) -> str | None:
    import matplotlib.pyplot as plt

    rows = [
        r
        for name, s in samples.items()
        for r in ((f"{name} synthetic", s["synthetic"]), (f"{name} real", s["real"]))
        if r[1]
    ]
    if not rows:
        return None
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols, 1.25 * len(rows)), squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(np.asarray(imgs[c]).T, cmap="gray", vmin=-1, vmax=1)
        axes[r][0].set_title(title, fontsize=8, loc="left")
    return _png(fig)


def _distance_figure(distances: Mapping[str, tuple]) -> str | None:
    import matplotlib.pyplot as plt

    if not distances:
        return None
    fig, axes = plt.subplots(1, len(distances), figsize=(4.5 * len(distances), 3), squeeze=False)
    for ax, (name, (syn, hold, q01, q05)) in zip(axes[0], distances.items()):
        bins = np.linspace(0, max(max(syn, default=1), max(hold, default=1)), 40)
        ax.hist(hold, bins=bins, alpha=0.6, density=True, label="holdout -> train")
        ax.hist(syn, bins=bins, alpha=0.6, density=True, label="synthetic -> train")
        ax.axvline(q01, color="k", ls="--", lw=1, label="holdout 1%")
        ax.axvline(q05, color="k", ls=":", lw=1, label="holdout 5%")
        ax.set_title(f"nearest training image ({name})", fontsize=9)
        ax.set_xlabel("distance (1 - cosine)")
        ax.legend(fontsize=7)
    return _png(fig)


def _roc_figure(roc: Mapping[str, Mapping[str, list]] | None, util: Mapping[str, Any] | None) -> str | None:
    import matplotlib.pyplot as plt

    if not roc or not util:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for arm, curve in roc.items():
        a1.plot(curve["fpr"], curve["tpr"], label=f"{arm} (macro AUC {util.get(f'auc_{arm}', float('nan')):.3f})")
    a1.plot([0, 1], [0, 1], "k:", lw=1)
    a1.set_xlabel("false positive rate")
    a1.set_ylabel("true positive rate")
    a1.set_title("holdout ROC (one-vs-rest, pooled)", fontsize=9)
    a1.legend(fontsize=7)
    arms = list(roc)
    aucs = [util.get(f"auc_{a}") or float("nan") for a in arms]
    ci = [util.get("ci", {}).get(a, [v, v]) for a, v in zip(arms, aucs)]
    err = np.array(
        [
            [max(v - (lo if lo is not None else v), 0), max((hi if hi is not None else v) - v, 0)]
            for v, (lo, hi) in zip(aucs, ci)
        ]
    ).T
    a2.bar(arms, aucs, yerr=err, capsize=5, color=["#4c72b0", "#55a868", "#c44e52"][: len(arms)])
    a2.axhline(0.5, color="k", ls=":", lw=1)
    a2.set_ylim(0, 1)
    a2.set_ylabel("ROC-AUC (95% patient bootstrap)")
    a2.set_title("utility: classifier trained on ...", fontsize=9)
    return _png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) or x is None for x in v):
        return "[" + ", ".join("-" if x is None else f"{x:.4g}" for x in v) + "]"
    return html.escape(str(v))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_FID_COLS = ("fid", "fid_ci", "kid", "precision", "recall", "density", "coverage", "mmd2", "mmd_p_value", "n")


def _fidelity_html(fid: Mapping[str, Any]) -> str:
    rows = []
    for scope, pair in [("overall", fid["overall"])] + list(fid["per_class"].items()):
        for kind in ("synthetic", "real_floor"):
            m = pair[kind]
            rows.append([scope, "synthetic vs holdout" if kind == "synthetic" else "train vs holdout (floor)"]
                        + [m.get(c) for c in _FID_COLS])  # fmt: skip
    ssim = [[name, v["synthetic"], v["real"]] for name, v in fid["ms_ssim"].items()]
    space = fid["space"]
    return (
        f"<p>Feature space: <b>{html.escape(space['name'])}</b>, weights SHA-256 <code>{space['weights_sha256']}</code>. "
        "Numbers from different spaces are not comparable. Both comparisons use as many images (the larger set is "
        "subsampled); intervals: 95% bias-shifted bootstrap, resampling "
        f"{html.escape(str(fid['overall']['synthetic'].get('fid_ci_resamples', 'images')))}.</p>"
        + _table(rows, ["scope", "comparison", *_FID_COLS])
        + "<h3>MS-SSIM within each class (lower = more diverse)</h3>"
        + _table(ssim, ["class", "synthetic", "real (holdout)"])
    )


def _utility_html(util: Mapping[str, Any]) -> str:
    arms = [[a, util.get(f"auc_{a}"), util["ci"].get(a), util["sizes"].get(a)] for a in ("synthetic", "real", "half")]
    paired = [[k.replace("_vs_", " vs "), v["difference"], v["ci"], v["p_value"]] for k, v in util["paired"].items()]
    return (
        f"<p>Classifier: {html.escape(util['classifier'])}; budget {html.escape(json.dumps(util['budget']))}; tested on "
        f"{util['sizes']['holdout']} holdout images. Intervals resample holdout patients ({util['n_boot']} resamples).</p>"
        + _table(arms, ["trained on", "ROC-AUC", "95% interval", "training images"])
        + "<h3>Paired bootstrap between arms</h3>"
        + _table(paired, ["arms", "AUC difference", "95% interval", "two-sided p"])
    )


def _privacy_html(priv: Mapping[str, Any]) -> str:
    keys = ("share_below_q01", "share_below_q05", "memorisation_rate", "memorisation_rate_holdout",
            "median_synthetic", "median_holdout", "closer_than_holdout_p_value")  # fmt: skip
    rows = [[name] + [s.get(k) for k in keys] for name, s in priv["spaces"].items()]
    reid = [
        ["mAP@R, holdout -> holdout", priv["reid_map_at_r_real"], priv["reid_chance"]],
        ["precision@1, holdout -> holdout", priv["reid_precision_at_1_real"], priv["reid_precision_at_1_chance"]],
        ["matched to a training patient: synthetic", priv["reid_match_rate"], None],
        ["matched to a training patient: holdout", priv["reid_match_rate_holdout"], None],
    ]
    return (
        f"<p>Headline memorisation rate (largest over spaces): <b>{_fmt(priv['memorisation_rate'])}</b> "
        f"(holdout under the same definition: {_fmt(priv['memorisation_rate_holdout'])}).</p>"
        + _table(rows, ["space", *keys])
        + f"<h3>Re-identification</h3><p>{html.escape(priv['reid_network'])}; match threshold "
        f"{_fmt(priv['reid_match_threshold'])} (holdout 1% quantile).</p>"
        + _table(reid, ["", "value", "chance"])
        + f"<h3>Definitions</h3><pre>{html.escape(priv['definitions'])}</pre>"
    )


def _restoration_html(rest: Mapping[str, Any]) -> str:
    parts = []
    for task, r in rest.items():
        if not isinstance(r, Mapping):
            continue
        rows = [[arm, r[f"psnr_{arm}"], r[f"ssim_{arm}"]] for arm in ("degraded", "synthetic", "real")]
        tost = [[m, t["difference"], f"+/- {t['margin']:g}", t["p_value"], "yes" if t["equivalent"] else "not shown"]
                for m, t in r["tost"].items()]  # fmt: skip
        parts.append(
            f"<h3>{html.escape(task)}</h3><p>{html.escape(r['degradation'])}; {html.escape(r['network'])}; budget "
            f"{html.escape(json.dumps(r['budget']))}; {r['holdout_images']} holdout images of {r['patients']} "
            "patients (patient means).</p>"
            + _table(rows, ["trained on", "PSNR (dB)", "SSIM"])
            + "<p>Equivalence of synthetic- and real-trained networks (paired TOST over holdout patients, "
            "synthetic - real; equivalent when p &lt; 0.05):</p>"
            + _table(tost, ["metric", "mean difference", "margin", "TOST p", "equivalent"])
        )
    return "".join(parts)


def _mia_figure(scores: Mapping[str, Mapping[str, list]] | None) -> str | None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    if not scores:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, s in scores.items():
        y = np.r_[np.ones(len(s["members"])), np.zeros(len(s["nonmembers"]))]
        fpr, tpr, _ = roc_curve(y, np.r_[s["members"], s["nonmembers"]])
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set_xlabel("false positive rate (holdout patients)")
    ax.set_ylabel("true positive rate (training patients)")
    ax.set_title("membership inference, patient level", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def _membership_html(mia: Any, scores: Any) -> str:
    if not isinstance(mia, Mapping):
        return f"<h3>Membership inference</h3><p>{html.escape(str(mia))}</p>"
    rows = []
    for name, r in mia["attacks"].items():
        c = r["control"]
        rows.append([name, r["auc"], r["auc_ci"], r["tpr_at_fpr_0.01"]["tpr"], r["tpr_at_fpr_0.01"]["ci"],
                     r["tpr_at_fpr_0.05"]["tpr"], r["tpr_at_fpr_0.05"]["ci"], r["mann_whitney_p_value"],
                     c.get("auc"), c.get("auc_ci")])  # fmt: skip
    first = next(iter(mia["attacks"].values()))
    fig = _mia_figure(scores)
    return (
        f"<h3>Membership inference (white-box, latent space, {html.escape(mia['objective'])})</h3>"
        f"<p>Largest AUC over attacks: <b>{_fmt(mia['mia_auc'])}</b> ({html.escape(mia['mia_attack'])}); "
        f"{first['member_patients']} training vs {first['nonmember_patients']} holdout patients. Model: "
        f"{html.escape(json.dumps(mia.get('target', {})))}.</p>"
        + _table(
            rows,
            [
                "attack",
                "AUC",
                "95% patient bootstrap",
                "TPR @ 1% FPR",
                "exact 95%",
                "TPR @ 5% FPR",
                "exact 95%",
                "Mann-Whitney p",
                "control AUC",
                "control 95%",
            ],
        )  # fmt: skip
        + (_img_tag(fig, "membership ROC") if fig else "")
        + f"<pre>{html.escape(mia['definitions'])}</pre>"
    )


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
    "font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:.5em}"
)


def write_reports(
    report: Mapping[str, Any],
    figures: Mapping[str, Any],
    out: Path,
    private_path: Path,
    private: Mapping[str, Any],
    train_patients: set[str] | None = None,
) -> None:
    """Write ``report.json``, the public ``report.html`` and the private report.

    Raises:
        ValueError: if a training patient id would appear in the public report (e.g. as a label value).
    """
    from monai_synth.atomic import atomic_file

    out.mkdir(parents=True, exist_ok=True)
    text_json = json.dumps(report, indent=2, sort_keys=False)
    parts = [f"<h1>monai_synth evaluation: {html.escape(report['modality'])}</h1>"]
    parts.append(
        "<p>" + html.escape(json.dumps(report["counts"])) + "</p>"
        + "<h2>Gate metrics</h2>" + _table([[k, v] for k, v in report["gate"].items()], ["metric", "value"])
    )  # fmt: skip
    grid = _grid_figure(figures.get("images") or {})
    if grid:
        parts.append(
            "<h2>Samples per class (real = holdout patients, never training images)</h2>" + _img_tag(grid, "grid")
        )
    if report.get("fidelity"):
        parts.append("<h2>Fidelity</h2>" + _fidelity_html(report["fidelity"]))
    if report.get("utility"):
        roc = _roc_figure(figures.get("roc"), report["utility"])
        parts.append("<h2>Utility</h2>" + _utility_html(report["utility"]) + (_img_tag(roc, "roc") if roc else ""))
    if report.get("restoration"):
        parts.append("<h2>Restoration utility</h2>" + _restoration_html(report["restoration"]))
    if report.get("privacy"):
        priv = report["privacy"]
        dist = _distance_figure(figures.get("distances") or {})
        parts.append(
            "<h2>Privacy audit</h2>"
            + (_img_tag(dist, "distances") if dist else "")
            + (_privacy_html(priv) if "spaces" in priv else "")
            + _membership_html(priv.get("membership_inference"), figures.get("mia"))
        )
    parts.append(
        f"<h2>Time per section (s, {report.get('torch_threads')} torch threads)</h2>"
        + _table(
            [[k, v, report.get("cpu_seconds", {}).get(k)] for k, v in report["timing_seconds"].items()],
            ["section", "wall seconds", "process CPU seconds"],
        )
    )
    parts.append("<h2>Not done</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["not_done"]) + "</ul>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>evaluation</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    ids = set(train_patients or ()) - set(map(str, report.get("labels", ())))  # ids equal to a label are not leaks
    leaked = sorted(p for p in ids if p and (f'"{p}"' in text_json or f">{p}<" in page))
    if leaked:
        raise ValueError(f"the public report would name {len(leaked)} training patient id(s); refusing to write it")
    with atomic_file(out / "report.json") as tmp:
        Path(tmp).write_text(text_json, encoding="utf-8")
    with atomic_file(out / "report.html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    pairs = private.get("pairs") or {}
    if pairs:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(private_path) as tmp:
            Path(tmp).write_text(_private_page(pairs), encoding="utf-8")


def _private_page(pairs: Mapping[str, list]) -> str:
    import matplotlib.pyplot as plt

    parts = ["<h1>PRIVATE: closest synthetic / training pairs</h1><p>Shows training images and patient ids: keep this "
             "file with the training data, never with the release.</p>"]  # fmt: skip
    for name, items in pairs.items():
        if not items:
            continue
        fig, axes = plt.subplots(2, len(items), figsize=(1.4 * len(items), 3.2), squeeze=False)
        for c, (syn, tr, pid, dist) in enumerate(items):
            for r, img in enumerate((syn, tr)):
                img = np.asarray(img[0])
                img = img[..., img.shape[-1] // 2] if img.ndim == 3 else img
                axes[r][c].imshow(img.T, cmap="gray", vmin=-1, vmax=1)
                axes[r][c].axis("off")
            axes[0][c].set_title(f"{dist:.3f}", fontsize=7)
            axes[1][c].set_title(str(pid), fontsize=7)
        axes[0][0].set_ylabel("synthetic")
        rows = [[i, pid, dist] for i, (_, _, pid, dist) in enumerate(items)]
        parts.append(f"<h2>space: {html.escape(name)} (top: synthetic, bottom: nearest training image)</h2>"
                     + _img_tag(_png(fig), name) + _table(rows, ["rank", "training patient", "distance"]))  # fmt: skip
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"


def evaluate_release(mlflow: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_evaluation`, then (with ``mlflow`` = ``{"tracking_uri", "experiment_name", "run_name", "params"}``)
    :func:`log_report_to_mlflow`; the bundle's ``evaluate.yaml`` runs this."""
    report = run_evaluation(**kwargs)
    if mlflow:
        report["mlflow_run_id"] = log_report_to_mlflow(report, **dict(mlflow))
    return report


def log_report_to_mlflow(
    report: Mapping[str, Any],
    tracking_uri: str,
    experiment_name: str,
    run_name: str | None = None,
    run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Log the gate metrics and both public report files to MLflow: into ``run_id`` (e.g. the release's run) or a new
    run of ``experiment_name``. Returns the run id. The private report is never logged."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri)
    if run_id is None:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = None
            uri = str(tracking_uri)
            if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
                from monai.utils import path_to_uri

                location = path_to_uri(Path(uri[len("sqlite:///") :]).parent / "mlruns")
            experiment_id = client.create_experiment(experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        finish = True
    else:
        finish = False
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(k, v, now, 0) for k, v in flat_metrics(report).items()]
    metrics += [mlflow.entities.Metric(f"time.{k}", float(v), now, 0) for k, v in report["timing_seconds"].items()]
    ps = [mlflow.entities.Param(k, str(v)) for k, v in dict(params or {}).items()]
    client.log_batch(run_id, metrics=metrics, params=ps)
    for key in ("json", "html"):
        client.log_artifact(run_id, report["files"][key], "evaluation")
    if finish:
        client.set_terminated(run_id, "FINISHED")
    return run_id

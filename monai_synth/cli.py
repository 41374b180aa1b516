"""``monai-synth``: the small command for what is not a bundle run.

Subcommands:
    phantoms          write a labelled phantom cohort (images + datalist) in native formats
    datalist          scan a folder of DICOM / NIfTI / 2D images, join a labels CSV, write the bundles' datalist
    train-embedding   train the copy/re-identification embedding used as a privacy space
    guard             apply the privacy safeguard to a folder of images made by any generator
    evaluate          fidelity, utility and an independent privacy audit of a synthetic dataset, as one report

Training and sampling are bundle runs: ``python -m monai.bundle run --config_file ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from monai_synth.data.modalities import MODALITIES

__all__ = ["main", "build_parser"]

#: ``--modality`` choices: the modality table's keys, so a new modality is offered without editing this file
MODALITY_KEYS = sorted(MODALITIES)


def _add_phantoms(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantoms", help="write a labelled phantom cohort and its datalist")
    p.add_argument("--modality", required=True, choices=MODALITY_KEYS)
    p.add_argument("--patients", type=int, default=50, help="number of patients (default 50)")
    p.add_argument("--images-per-patient", type=int, default=3, help="repeat studies per patient (default 3)")
    p.add_argument("--spatial-dims", type=int, default=2, choices=[2, 3])
    p.add_argument("--size", type=int, nargs="+", default=[64], help="spatial size, one value or one per axis")
    p.add_argument("--format", dest="fmt", default=None, help="file format (default: the modality's native one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--first-patient",
        type=int,
        default=0,
        help="index of the first patient: a cohort starting past another one's patients holds new, unseen people",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(func=_run_phantoms)


def _run_phantoms(args: argparse.Namespace) -> int:
    from monai_synth.data.phantoms import write_cohort

    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    datalist = write_cohort(
        args.out,
        modality=args.modality,
        n_patients=args.patients,
        images_per_patient=args.images_per_patient,
        spatial_dims=args.spatial_dims,
        spatial_size=size,
        seed=args.seed,
        fmt=args.fmt,
        first_patient=args.first_patient,
    )
    print(f"wrote {args.modality} phantom cohort of {args.patients} patients; datalist: {datalist}")
    return 0


def _add_datalist(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datalist", help="scan an image folder, join a labels CSV and write a validated datalist")
    p.add_argument("--images", required=True, help="folder of DICOM files (any nesting), NIfTI volumes or 2D images")
    p.add_argument(
        "--labels",
        required=True,
        help="CSV with columns patient_id (or image, relative to --images) and label; other columns are numeric "
        "extra conditions",
    )
    p.add_argument("--out", required=True, help="folder for datalist.csv (use it as the bundle's dataset_dir)")
    p.add_argument(
        "--modality",
        default=None,
        choices=["ct", "mri", "pet", "us"],
        help="check the labels against this modality's classes",
    )
    p.add_argument("--slices", action="store_true", help="cut volumes into 2D slices (for the 2D bundles)")
    p.add_argument("--slice-step", type=int, default=1, help="keep every N-th slice (default 1)")
    p.add_argument("--spatial-dims", type=int, default=None, choices=[2, 3], help="spatial axes every image must have")
    p.set_defaults(func=_run_datalist)


def _run_datalist(args: argparse.Namespace) -> int:
    from monai_synth.data.modalities import get_modality
    from monai_synth.data.scan import scan_folder

    summary = scan_folder(
        args.images,
        args.labels,
        args.out,
        labels=list(get_modality(args.modality).labels) if args.modality else None,
        slices=args.slices,
        slice_step=args.slice_step,
        spatial_dims=args.spatial_dims,
    )
    print(
        f"wrote {summary['datalist']}: {summary['images']} images of {summary['patients']} patients, "
        f"per label {summary['per_label']}"
    )
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} non-image DICOM files, e.g. {summary['skipped'][0]}")
    return 0


def _add_train_embedding(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-embedding", help="train the re-identification embedding privacy space")
    p.add_argument("--train", required=True, help="training datalist (CSV or MONAI JSON)")
    p.add_argument("--modality", required=True, choices=MODALITY_KEYS)
    p.add_argument("--spatial-size", type=int, nargs="+", default=[64])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.set_defaults(func=_run_train_embedding)


def _run_train_embedding(args: argparse.Namespace) -> int:
    from monai_synth.privacy.guard import train_embedding_from_datalist

    size = args.spatial_size[0] if len(args.spatial_size) == 1 else tuple(args.spatial_size)
    path = train_embedding_from_datalist(
        args.train, modality=args.modality, spatial_size=size, epochs=args.epochs, seed=args.seed, out=args.out
    )
    print(f"embedding weights written to {path}")
    return 0


def _add_guard(sub: argparse._SubParsersAction) -> None:
    from monai_synth.privacy.factory import DEFAULT_SPACES

    p = sub.add_parser("guard", help="release only the candidate images that are not near-copies of training images")
    p.add_argument("--train", required=True, help="training datalist (CSV or MONAI JSON)")
    p.add_argument("--holdout", required=True, help="holdout datalist of patients not in --train, for calibration")
    p.add_argument("--candidates", required=True, help="folder of candidate images (NIfTI, DICOM, PNG)")
    p.add_argument("--out", required=True, help="release folder (written atomically)")
    p.add_argument("--modality", required=True, choices=MODALITY_KEYS)
    p.add_argument("--spatial-size", type=int, nargs="+", default=[64])
    p.add_argument(
        "--spaces",
        nargs="+",
        default=list(DEFAULT_SPACES),
        help="privacy spaces a candidate must all pass (default: %(default)s): pixel (whole image under flips, rot90, "
        "shifts, zooms, inversion, 2D gamma, 3D rotations; pixel:none for plain correlation), ranks (the same on intensity ranks: any "
        "monotone intensity curve), parts (aligned regions), "
        "crops (crops of training images), tiles (windows at every position), inset (2D: windows of 0.8 of the side, "
        "a training image shrunk into another), halves (a half, quadrant or, in 3D, "
        "octant of a training image resized to the whole, or a slab of one axis stretched back), texture (fine texture: copies under "
        "strong noise; texture:box=3 keeps the finer grain), deblur (the candidate sharpened: blurred or pixelated copies), disc (2D: central disc under "
        "fine rotations, zooms and moves), ball (3D: central ball under fine rotations and moves about each axis), "
        "coarse (3D: deblur on an 8-cell grid, volumes pixelated to an eighth of their side), embedding "
        "(copy-detection network, trained on --train unless --embedding-weights); a space of the other "
        "dimensionality is left out",
    )
    p.add_argument(
        "--embedding-weights",
        default=None,
        help="weights from `monai-synth train-embedding` on the same --train datalist (default: trained here)",
    )
    p.add_argument("--embedding-epochs", type=int, default=None, help="epochs of an embedding trained here")
    p.add_argument("--batch-size", type=int, default=16, help="candidates judged at once (bounds memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing release once the new one is complete")
    p.add_argument(
        "--no-duplicate-check",
        dest="duplicate_check",
        action="store_false",
        help="accept a holdout with images that look like near-duplicates of training images (they lower the "
        "thresholds; use only for a holdout known to hold new patients)",
    )
    p.add_argument("--quantile", type=float, default=0.01, help="holdout quantile that sets the threshold")
    p.add_argument(
        "--cross-patient-images",
        type=lambda v: None if v == "auto" else int(v),
        default=None,
        help="training images measured against the other training patients that join the holdout as calibration "
        "samples, or 'auto' (the default): enough for spaces / quantile samples in all; 0: the holdout alone (with a "
        "small holdout each threshold sits at its smallest distance and more new patients' images are refused)",
    )
    p.add_argument(
        "--specificity",
        type=float,
        default=None,
        help="also refuse an image much closer to one training patient than to any other, when a new patient's "
        "image is that specific with a chance below this (default 0.003 with the duplicate check; 0: off)",
    )
    p.add_argument(
        "--consensus",
        type=int,
        default=None,
        help="also refuse an image whose nearest training patient is the same in at least this many spaces (default: "
        "the least count that at most 0.5%% of the calibration images reach, with 4 spaces or more; 0: off)",
    )
    p.add_argument("--floor", type=float, default=0.0, help="absolute minimum threshold")
    p.add_argument("--format", dest="fmt", default=None, help="release format (default: the modality's native one)")
    p.add_argument(
        "--audit",
        default=None,
        help="PRIVATE audit CSV naming the nearest training patient of each image (default: <out>.private_audit.csv); "
        "keep it with the training data, never with the release",
    )
    p.set_defaults(func=_run_guard)


def _run_guard(args: argparse.Namespace) -> int:
    from monai_synth.privacy.guard import run_guard

    size = args.spatial_size[0] if len(args.spatial_size) == 1 else tuple(args.spatial_size)
    summary = run_guard(
        train=args.train,
        holdout=args.holdout,
        candidates=args.candidates,
        out=args.out,
        modality=args.modality,
        spatial_size=size,
        spaces=args.spaces,
        embedding_weights=args.embedding_weights,
        quantile=args.quantile,
        floor=args.floor,
        fmt=args.fmt,
        audit=args.audit,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        embedding_epochs=args.embedding_epochs,
        duplicate_check=args.duplicate_check,
        cross_patient_images=args.cross_patient_images,
        specificity=args.specificity,
        consensus=args.consensus,
    )
    print(
        f"released {summary['released']} of {summary['generated']} candidates "
        f"({summary['rejected']} rejected) into {args.out}"
    )
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="fidelity, utility and privacy audit of a synthetic dataset: report.json + report.html"
    )
    p.add_argument("--train", required=True, help="training datalist the generator saw (CSV or MONAI JSON)")
    p.add_argument("--holdout", required=True, help="holdout datalist of patients not in --train")
    p.add_argument(
        "--synthetic",
        required=True,
        help="release folder (its certificate.csv gives each image's condition) or a CSV with image and label columns",
    )
    p.add_argument("--modality", required=True, choices=["ct", "mri", "pet", "us"])
    p.add_argument("--out", required=True, help="report folder (report.json, report.html)")
    p.add_argument("--spatial-size", type=int, nargs="+", default=[64])
    p.add_argument(
        "--sections", nargs="+", default=["fidelity", "utility", "privacy"], choices=["fidelity", "utility", "privacy"]
    )
    p.add_argument(
        "--feature-space",
        default="random",
        choices=["random", "trained", "weights"],
        help="fidelity feature space: fixed random-init ResNet (seeded), ResNet trained on the training labels, or "
        "--feature-weights (default: %(default)s)",
    )
    p.add_argument("--feature-weights", default=None, help="TorchScript feature network for --feature-space weights")
    p.add_argument("--utility-steps", type=int, default=300, help="training steps of every utility classifier")
    p.add_argument("--reid-steps", type=int, default=300, help="training steps of the audit's re-identification net")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per interval")
    p.add_argument("--permutations", type=int, default=200, help="permutations of the MMD test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-real-images", dest="show_real", action="store_false", help="no holdout images in report.html")
    p.add_argument(
        "--private-report",
        default=None,
        help="PRIVATE report with the closest synthetic/training pairs (default: <out>.private_report.html); keep it "
        "with the training data",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the reports in an existing --out")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: the evaluation's networks are small, and on a busy CPU more threads "
        "mostly wait; 0 leaves torch's choice)",
    )
    p.add_argument(
        "--restoration",
        nargs="*",
        default=[],
        choices=["denoise", "superres"],
        help="restoration utility: denoising and/or x2 super-resolution networks trained on synthetic vs real images, "
        "PSNR/SSIM on the degraded holdout, equivalence test (TOST)",
    )
    p.add_argument("--restoration-steps", type=int, default=200, help="training steps of each restoration network")
    mia = p.add_argument_group(
        "membership inference", "white-box attacks on the generator's checkpoints (a bundle's networks and scheduler)"
    )
    mia.add_argument("--bundle", default=None, help="bundle folder whose configs/common.yaml defines the networks")
    mia.add_argument(
        "--bundle-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value the checkpoints were trained with (YAML value), e.g. spatial_size=[32,32]; repeatable",
    )
    mia.add_argument("--autoencoder-ckpt", default=None, help="the bundle's stage-1 checkpoint (autoencoder.pt)")
    mia.add_argument(
        "--diffusion-ckpt", default=None, help="the bundle's stage-2 checkpoint (diffusion.pt, EMA weights)"
    )
    mia.add_argument("--mia-attacks", nargs="+", default=["loss", "pia", "secmi"], choices=["loss", "pia", "secmi"])
    mia.add_argument(
        "--mia-max-patients", type=int, default=250, help="attack at most this many training and holdout patients"
    )
    p.set_defaults(func=_run_evaluate)


def _membership_target(args: argparse.Namespace) -> dict | None:
    """Keyword arguments of ``target_from_bundle`` from the command line, or ``None`` without checkpoints."""
    import yaml

    given = [args.autoencoder_ckpt, args.diffusion_ckpt]
    if not any(given) and not args.bundle:
        return None
    if not all(given) or not args.bundle:
        raise ValueError("membership inference needs --bundle, --autoencoder-ckpt and --diffusion-ckpt together")
    overrides = {}
    for item in args.bundle_override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--bundle-override {item!r} is not KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return {
        "bundle_root": args.bundle,
        "autoencoder_ckpt": args.autoencoder_ckpt,
        "diffusion_ckpt": args.diffusion_ckpt,
        "overrides": overrides,
    }


def _run_evaluate(args: argparse.Namespace) -> int:
    from monai_synth.evaluation.report import run_evaluation

    if args.threads:
        import torch

        torch.set_num_threads(int(args.threads))
    report = run_evaluation(
        train=args.train,
        holdout=args.holdout,
        synthetic=args.synthetic,
        modality=args.modality,
        out=args.out,
        spatial_size=args.spatial_size,
        feature_space=args.feature_space,
        feature_weights=args.feature_weights,
        sections=args.sections,
        utility_steps=args.utility_steps,
        reid_steps=args.reid_steps,
        n_boot=args.bootstrap,
        permutations=args.permutations,
        seed=args.seed,
        show_real=args.show_real,
        private_report=args.private_report,
        overwrite=args.overwrite,
        membership=_membership_target(args),
        mia_attacks=args.mia_attacks,
        mia_max_patients=args.mia_max_patients,
        restoration=args.restoration,
        restoration_steps=args.restoration_steps,
    )
    for key, value in report["gate"].items():
        print(f"{key} = {value:.4g}")
    print(f"report: {report['files']['html']} ({report['timing_seconds']['total']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-synth", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_phantoms(sub)
    _add_datalist(sub)
    _add_train_embedding(sub)
    _add_guard(sub)
    _add_evaluate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # long steps (embedding training, calibration) report progress through logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"monai-synth {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

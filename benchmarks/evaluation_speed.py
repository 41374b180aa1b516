"""How long the evaluation suite takes: ``monai-synth evaluate`` on phantom cohorts, time per section.

Writes three breast-ultrasound phantom cohorts as PNG files with their datalists (``monai_synth.data.phantoms``): a
training cohort, a holdout cohort of other patients, and a "synthetic" cohort of yet other patients (a generator of
unseen patients; its datalist CSV gives the labels). Then runs the whole evaluation (fidelity, utility, privacy
audit, reports) with the defaults of ``monai-synth evaluate`` and prints the time of each section, wall and CPU.
With ``--restoration`` the restoration utility runs too, and with ``--membership`` the membership attacks run against
checkpoints of the breast-ultrasound bundle's quickstart networks (AutoencoderKL [16, 32], 4-block DiT) at the
benchmark's image size. Their weights are *untrained* (seeded random init): this measures the attacks' time, and the
AUCs it prints mean nothing.

Run: ``python benchmarks/evaluation_speed.py --all`` (every section; 1,000 synthetic vs 1,000 real 64x64 images:
500 training and 500 holdout images; the target is under 10 minutes on 2 idle CPU cores). It prints wall and process
CPU seconds (user + sys) per section and the load average before and after: on a machine shared with other jobs the
CPU seconds of a one-thread run are what it takes on an idle core. Results are recorded in ``docs/benchmarks.md``
(section "Evaluation speed").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=int, default=1000, help="real images (half training, half holdout)")
    parser.add_argument("--synthetic", type=int, default=1000, help="synthetic images")
    parser.add_argument("--images-per-patient", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no thread spins on a busy machine)")
    parser.add_argument("--utility-steps", type=int, default=300)
    parser.add_argument("--reid-steps", type=int, default=300)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument(
        "--sections", nargs="*", default=["fidelity", "utility", "privacy"], choices=["fidelity", "utility", "privacy"]
    )
    parser.add_argument("--restoration", nargs="*", default=[], choices=["denoise", "superres"])
    parser.add_argument("--restoration-steps", type=int, default=200)
    parser.add_argument("--membership", action="store_true", help="time the membership attacks (untrained networks)")
    parser.add_argument(
        "--all", action="store_true", help="every section: also both restoration tasks and --membership"
    )
    parser.add_argument("--workdir", default=None, help="folder for cohorts and report (default: a temporary one)")
    args = parser.parse_args()

    from monai_synth.data.phantoms import write_cohort
    from monai_synth.evaluation.report import run_evaluation

    if args.all:
        args.restoration, args.membership = ["denoise", "superres"], True
    torch.set_num_threads(args.threads)
    per = args.images_per_patient
    n_train = max(2, args.real // 2 // per)
    n_hold = max(2, (args.real - n_train * per) // per)
    n_syn = max(2, args.synthetic // per)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        kw = dict(modality="us", images_per_patient=per, spatial_size=args.size, seed=0)
        t = time.perf_counter()
        train = write_cohort(root / "train", n_patients=n_train, **kw)
        holdout = write_cohort(root / "holdout", n_patients=n_hold, first_patient=n_train, **kw)
        synthetic = write_cohort(root / "synthetic", n_patients=n_syn, first_patient=10 * (n_train + n_hold), **kw)
        print(f"cohorts written in {time.perf_counter() - t:.0f} s (not part of the evaluation time)")
        membership = _untrained_bundle_checkpoints(root / "models", args.size) if args.membership else None
        load_before = os.getloadavg()
        wall, cpu = time.perf_counter(), time.process_time()
        report = run_evaluation(
            train,
            holdout,
            synthetic,
            "us",
            root / "report",
            spatial_size=args.size,
            sections=args.sections,
            utility_steps=args.utility_steps,
            reid_steps=args.reid_steps,
            n_boot=args.bootstrap,
            permutations=args.permutations,
            private_report=root / "private_report.html",
            restoration=args.restoration,
            restoration_steps=args.restoration_steps,
            membership=membership,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        load_after = os.getloadavg()
    counts = report["counts"]
    print(f"\n{counts['synthetic']} synthetic vs {counts['train']} training + {counts['holdout']} holdout images, "
          f"{args.size}x{args.size}, {args.threads} threads")  # fmt: skip
    print(f"{'section':<12} {'wall s':>8} {'CPU s':>8}")
    for section, seconds in report["timing_seconds"].items():
        print(f"{section:<12} {seconds:>8.1f} {report['cpu_seconds'][section]:>8.1f}")
    print(
        f"wall {wall:.0f} s ({wall / 60:.1f} min), process CPU (user + sys) {cpu:.0f} s ({cpu / 60:.1f} min), "
        "reports included"
    )
    print("load average (1, 5, 15 min) before " + ", ".join(f"{v:.1f}" for v in load_before)
          + "; after " + ", ".join(f"{v:.1f}" for v in load_after))  # fmt: skip
    print(json.dumps(report["gate"], indent=1))


def _untrained_bundle_checkpoints(folder: Path, size: int) -> dict:
    """Checkpoints of the quickstart's networks at ``size`` with seeded random weights, as the bundle writes them."""
    from monai.bundle import ConfigParser

    from monai_synth.configs import common_files

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "breast_us_ldit"
    overrides = dict(ConfigParser.load_config_file(str(bundle / "configs" / "quickstart.yaml"))["overrides"])
    overrides["spatial_size"] = [size, size]
    parser = ConfigParser()
    parser.read_config(common_files(bundle))
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    ae, dit = parser.get_parsed_content("autoencoder_def"), parser.get_parsed_content("network_def")
    torch.save({"autoencoder": ae.state_dict(), "scale_factor": {"scale_factor": torch.tensor(1.0)}}, folder / "ae.pt")
    torch.save({"ema_network": dit.state_dict()}, folder / "dit.pt")
    return {"bundle_root": bundle, "autoencoder_ckpt": folder / "ae.pt", "diffusion_ckpt": folder / "dit.pt",
            "overrides": overrides}  # fmt: skip


if __name__ == "__main__":
    main()

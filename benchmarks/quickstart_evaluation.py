"""The evaluation report of the quickstart's release: what the README and the bundle docs may claim, and how to redo it.

Runs the breast-ultrasound bundle's evaluation stage (its ``configs/evaluate.yaml`` on the shared configs) on a finished quickstart
folder, with the quickstart's own settings (``configs/quickstart.yaml``'s overrides: image size, network sizes, split),
so the evaluation uses the same train / holdout patients and attacks the quickstart's own checkpoints. Prints the gate
metrics of ``report.json`` and the key figures of every section.

Run after the quickstart:

    python -m monai.bundle run --config_file bundles/breast_us_ldit/configs/quickstart.yaml \\
        --bundle_root bundles/breast_us_ldit --output_dir quickstart_output
    python benchmarks/quickstart_evaluation.py --output-dir quickstart_output

Results are recorded in ``docs/benchmarks.md`` (section "Quickstart release: evaluation report").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "breast_us_ldit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="the quickstart's output folder (holds models/, release/)")
    parser.add_argument("--restoration", nargs="*", default=["denoise", "superres"], choices=["denoise", "superres"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (networks this small run best on one)")
    parser.add_argument("--mlflow", action="store_true", help="log the report to the quickstart's MLflow store")
    budgets = parser.add_argument_group("budgets (default: the bundle's configs/evaluate.yaml)")
    for flag in ("utility-steps", "reid-steps", "bootstrap", "permutations", "restoration-steps"):
        budgets.add_argument(f"--{flag}", type=int, default=None)
    args = parser.parse_args()

    import torch
    from monai.bundle import ConfigParser, ConfigWorkflow

    from monai_synth.configs import config_files

    torch.set_num_threads(args.threads)
    overrides = dict(ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))["overrides"])
    overrides.update(
        output_dir=str(Path(args.output_dir).absolute()),
        dataset_dir=None,
        restoration=list(args.restoration),
        mlflow=bool(args.mlflow),
        eval_threads=args.threads,
    )
    for key in ("utility_steps", "reid_steps", "bootstrap", "permutations", "restoration_steps"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    workflow = ConfigWorkflow(
        config_file=config_files(BUNDLE, "evaluate"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    start, cpu = time.perf_counter(), time.process_time()
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    report_path = Path(args.output_dir) / "evaluation" / "report.json"
    report = json.loads(report_path.read_text())
    print(f"report: {report_path} ({time.perf_counter() - start:.0f} s, process CPU {time.process_time() - cpu:.0f} s, "
          f"{args.threads} threads)")  # fmt: skip
    print(json.dumps(report["counts"]))
    print(json.dumps(report["gate"], indent=1))
    util = report.get("utility") or {}
    for arm in ("synthetic", "real", "half"):
        print(f"utility auc_{arm} {util.get(f'auc_{arm}')} {util.get('ci', {}).get(arm)}")
    for name, p in (util.get("paired") or {}).items():
        print(f"utility {name}: difference {_f(p['difference'], '.3f')} {p['ci']} p={_f(p['p_value'], '.3f')}")
    for task, r in (report.get("restoration") or {}).items():
        if isinstance(r, dict):
            print(f"restoration {task}: " + json.dumps({k: v for k, v in r.items() if k.startswith(("psnr", "ssim"))}))
            print(f"restoration {task} TOST: " + json.dumps(r["tost"]))
    mia = (report.get("privacy") or {}).get("membership_inference")
    if isinstance(mia, dict):
        for name, r in mia["attacks"].items():
            print(f"membership {name}: AUC {_f(r['auc'], '.3f')} {r['auc_ci']} TPR@1%FPR "
                  f"{_f(r['tpr_at_fpr_0.01']['tpr'], '.3f')} {r['tpr_at_fpr_0.01']['ci']} MW p="
                  f"{_f(r['mann_whitney_p_value'], '.3g')} control AUC {r['control'].get('auc')}")  # fmt: skip
    print("wall s " + json.dumps(report["timing_seconds"]))
    print("CPU s " + json.dumps(report.get("cpu_seconds")))


def _f(value, spec: str) -> str:
    """A number of the report in ``spec``; the report writes an undefined value (e.g. an interval no bootstrap
    resample could estimate) as null."""
    return "undefined" if value is None else format(value, spec)


if __name__ == "__main__":
    main()

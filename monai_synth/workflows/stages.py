"""Running a bundle's stages: the config files of each stage, one stage as ``monai.bundle run`` runs it, the quickstart.

The stages themselves are plain ``monai.bundle`` runs and can be started one by one with
``python -m monai.bundle run``; :func:`run_quickstart` runs them one after the other with the quickstart's small
sizes, each as a separate ``ConfigWorkflow`` over the same files a user would pass.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from monai_synth.configs import MULTI_GPU_OVERLAY, MULTI_GPU_SAMPLE_OVERLAY, config_files
from monai_synth.tracking import tracking_uri

__all__ = [
    "STAGES",
    "MULTI_GPU_OVERLAY",
    "MULTI_GPU_SAMPLE_OVERLAY",
    "STAGE_WORKFLOW_TYPES",
    "as_bool",
    "stage_config_files",
    "run_stage",
    "run_quickstart",
    "quickstart_outputs",
]

#: Stages a bundle run goes through, in order; each merges the shared and the bundle's config files
#: (:func:`monai_synth.configs.config_files`), so a stage's settings (e.g. ``val_interval``) are its own.
STAGES: tuple[str, ...] = ("autoencoder", "diffusion", "sample")

#: MONAI workflow type of each stage: the training stages must have MONAI's training properties (``train#trainer``,
#: ...), which ``--tracking mlflow`` and other MONAI tools drive; the release has only metadata properties.
STAGE_WORKFLOW_TYPES: dict[str, str | None] = {
    "autoencoder": "train",
    "diffusion": "train",
    "sample": None,
    "evaluate": None,
}


def as_bool(value: Any, name: str) -> bool:
    """A boolean config value, also when it comes from the command line as a string (``--mlflow false``).

    ``python -m monai.bundle run --mlflow false`` passes the string ``'false'``, which Python takes for true; a flag
    must mean what it says, so the usual spellings are parsed and anything else is refused.

    Raises:
        ValueError: a value that is not a recognisable boolean, naming the config id.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", "none", "null", ""):
        return False
    raise ValueError(f"--{name} must be true or false, got {value!r}")


def stage_config_files(bundle_root: str | os.PathLike, stage: str, multi_gpu: bool = False) -> list[str]:
    """Config files of one stage, in merge order (see :func:`monai_synth.configs.config_files`)."""
    return config_files(bundle_root, stage, multi_gpu=multi_gpu)


def run_stage(
    bundle_root: str | os.PathLike,
    stage: str,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """Run one stage of a bundle as ``python -m monai.bundle run`` would, and return the workflow.

    The required bundle properties are checked before anything runs, so a config that ``--tracking mlflow`` or
    other MONAI tools could not drive fails here rather than later.

    Args:
        bundle_root: the bundle folder.
        stage: ``"autoencoder"``, ``"diffusion"``, ``"sample"`` or ``"evaluate"``.
        overrides: config id -> value pairs, as on the ``monai.bundle run`` command line.

    Raises:
        ValueError: the stage's config lacks required bundle properties.
    """
    files = stage_config_files(bundle_root, stage)
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(Path(bundle_root) / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=STAGE_WORKFLOW_TYPES[stage],
        bundle_root=str(bundle_root),
        **dict(overrides or {}),
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"stage {stage!r} of {bundle_root} lacks required bundle properties {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


def run_quickstart(
    bundle_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Train the small autoencoder and DiT, release a guarded synthetic set and evaluate it, one stage after the other.

    Each stage is a separate ``ConfigWorkflow`` over the same files a user would pass to ``monai.bundle run``, with
    the quickstart's small-model overrides, so the quickstart exercises exactly the configs a GPU run uses.

    Args:
        bundle_root: the bundle folder.
        output_dir: where everything goes (phantom cohort, checkpoints, latent cache, release, MLflow store).
        dataset_dir: a folder with the user's datalist; ``None`` makes a phantom cohort.
        overrides: config id -> plain value pairs applied to every stage (the quickstart's small sizes).
        threads: torch CPU threads (``None`` leaves torch's default); networks this small run fastest on one.
        evaluation: config id -> value pairs of the bundle's ``evaluate`` stage, layered on ``overrides``: the
            report's settings, sized to the quickstart's time budget. ``None`` or ``False`` skips the report (``False``
            is what a command line can pass: ``monai.bundle run`` drops overrides that are ``None``).

    Returns:
        Where each output went.
    """
    if threads:
        torch.set_num_threads(int(threads))
    start = time.time()
    output_dir = os.path.abspath(output_dir)
    common = {"output_dir": output_dir, "dataset_dir": None if not dataset_dir else os.path.abspath(dataset_dir)}
    common.update(dict(overrides or {}))
    # wall and CPU seconds per stage: on a machine shared with other jobs the CPU time is what the stage would take
    # on an idle core (the quickstart runs one thread)
    times: dict[str, float] = {}
    cpu0 = time.process_time()
    for stage in STAGES:
        t0, c0 = time.time(), time.process_time()
        print(f"[quickstart] stage {stage} ...", flush=True)
        workflow = run_stage(bundle_root, stage, overrides=common)
        times[stage] = time.time() - t0
        print(
            f"[quickstart] stage {stage} done in {times[stage]:.0f} s (CPU {time.process_time() - c0:.0f} s)",
            flush=True,
        )
        if stage == "autoencoder":
            _print_autoencoder_quality(workflow)
    outputs = quickstart_outputs(output_dir)
    t0 = time.time()
    labels = workflow.parser.get_parsed_content("labels")
    datalist_file = workflow.parser.get_parsed_content("datalist_file")
    from monai_synth.handlers.sample_grid import write_release_side_by_side

    to_model = workflow.parser.get_parsed_content("intensity_transform")
    write_release_side_by_side(
        datalist_file,
        outputs["synthetic release"],
        labels,
        outputs["side by side"],
        to_model=to_model,
        preprocessing=workflow.parser.get_parsed_content("preprocessing"),
    )
    times["side-by-side picture"] = time.time() - t0
    if evaluation is not None and evaluation is not False:
        t0, c0 = time.time(), time.process_time()
        print("[quickstart] stage evaluation report ...", flush=True)
        workflow = run_stage(bundle_root, "evaluate", overrides={**common, **dict(evaluation)})
        times["evaluation report"] = time.time() - t0
        print(
            f"[quickstart] stage evaluation report done in {times['evaluation report']:.0f} s "
            f"(CPU {time.process_time() - c0:.0f} s)",
            flush=True,
        )
        report_dir = Path(workflow.parser.get_parsed_content("evaluation_dir"))
        outputs["evaluation report"] = str(report_dir / "report.html")
        outputs["evaluation json"] = str(report_dir / "report.json")
    print(
        f"\n[quickstart] finished in {time.time() - start:.0f} s (CPU {time.process_time() - cpu0:.0f} s): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    print(f"[quickstart] real images next to released images, per class: {outputs['side by side']}")
    for what, where in outputs.items():
        print(f"[quickstart]   {what:<22} {where}")
    print(f"[quickstart] browse the run: mlflow ui --backend-store-uri {tracking_uri(output_dir)}")
    if "evaluation report" in outputs:
        _print_report_summary(outputs["evaluation json"], evaluation or {}, output_dir)
        print(f"[quickstart] evaluation report: {outputs['evaluation report']} (numbers: {outputs['evaluation json']})")
    return outputs


def _print_autoencoder_quality(workflow: Any) -> None:
    """Print the stage-1 validation metrics (held-out patients): a poor autoencoder caps every later stage."""
    try:
        metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    except Exception:  # a config without a validator
        return
    shown = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(metrics.items()) if k.startswith("val_"))
    if shown:
        print(f"[quickstart] autoencoder on held-out patients: {shown}", flush=True)


def _print_report_summary(report_json: str, settings: Mapping[str, Any], output_dir: str) -> None:
    """The report's headline numbers, what its quick settings left out (read from the report itself), and how to run
    the full evaluation."""
    from monai_synth.evaluation.membership import ATTACKS
    from monai_synth.evaluation.restoration import TASKS

    report = json.loads(Path(report_json).read_text())
    shown = ", ".join(f"{k} {v:.3g}" for k, v in report.get("gate", {}).items())
    print(f"[quickstart] evaluation of the release against held-out real phantoms: {shown}")
    left_out = [f"restoration ({task})" for task in TASKS if task not in (report.get("restoration") or {})]
    mia = (report.get("privacy") or {}).get("membership_inference")
    if isinstance(mia, Mapping):
        left_out += [f"the {name} membership attack" for name in ATTACKS if name not in mia.get("attacks", {})]
    else:
        left_out.append("membership inference")
    budget = ", ".join(f"{k} {settings[k]}" for k in ("utility_steps", "reid_steps", "bootstrap") if k in settings)
    if left_out or budget:
        print(
            "[quickstart] quick settings"
            + (f" ({budget})" if budget else "")
            + (f"; left out: {', '.join(left_out)}" if left_out else "")
            + f". The full evaluation of this release: python benchmarks/quickstart_evaluation.py --output-dir {output_dir}"
        )


def quickstart_outputs(output_dir: str | os.PathLike) -> dict[str, str]:
    """The documented layout of a quickstart (or any bundle run) output folder."""
    out = Path(output_dir)
    return {
        "phantom cohort": str(out / "phantom_cohort"),
        "checkpoints": str(out / "models"),
        "latent cache": str(out / "latents" / "train_latents.pt"),
        "sample grid": str(out / "samples" / "sample_grid.png"),
        "synthetic release": str(out / "release"),
        "certificate": str(out / "release" / "certificate.json"),
        "side by side": str(out / "real_vs_released.png"),
        "MLflow store": tracking_uri(out),
    }

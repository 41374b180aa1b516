"""Bundle workflows: running a bundle's stages (and the quickstart) and its guarded release."""

from __future__ import annotations

from monai_synth.workflows.release import calibrated_safeguard, guarded_release, release_grid, release_requests
from monai_synth.workflows.stages import (
    STAGES,
    as_bool,
    quickstart_outputs,
    run_quickstart,
    run_stage,
    stage_config_files,
)

__all__ = [
    "STAGES",
    "as_bool",
    "calibrated_safeguard",
    "guarded_release",
    "quickstart_outputs",
    "release_grid",
    "release_requests",
    "run_quickstart",
    "run_stage",
    "stage_config_files",
]

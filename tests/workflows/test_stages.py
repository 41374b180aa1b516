"""Running bundle stages: command-line values mean what they say."""

from __future__ import annotations

import pytest

from monai_synth.privacy.release import GuardedRelease
from monai_synth.workflows import as_bool, stage_config_files


@pytest.mark.parametrize(
    "value, expected", [(True, True), ("false", False), ("False", False), ("true", True), (0, False)]
)
def test_command_line_booleans_are_parsed(value, expected):
    assert as_bool(value, "mlflow") is expected


def test_an_unrecognisable_boolean_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--release_overwrite must be true or false"):
        as_bool("maybe", "release_overwrite")


def test_a_string_overwrite_never_replaces_a_release(tmp_path):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "image.png").write_bytes(b"x")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        GuardedRelease(tmp_path / "release", "png", "us", overwrite="false")
    with pytest.raises(FileExistsError):
        GuardedRelease(tmp_path / "release", "png", "us", overwrite=as_bool("false", "release_overwrite"))
    assert (tmp_path / "release" / "image.png").read_bytes() == b"x"


def test_mlflow_false_on_the_command_line_switches_tracking_off():
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(stage_config_files(Path(__file__).parents[2] / "bundles/breast_us_ldit", "sample"))
    parser["mlflow"] = "false"  # what `python -m monai.bundle run --mlflow false` sets
    assert parser.get_parsed_content("use_mlflow") is False

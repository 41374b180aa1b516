"""The processes of a distributed run that write the same phantom cohort at once all end up using it."""

from __future__ import annotations

import errno

import pytest

import monai_synth.data.phantoms as phantoms
import monai_synth.data.preparation as preparation
from monai_synth.data.preparation import prepare_datalist


def test_a_cohort_written_by_another_rank_meanwhile_is_used(tmp_path, monkeypatch):
    real = phantoms.write_cohort

    def other_rank_won(out_dir, **kwargs):
        real(out_dir, **kwargs)  # the other process renamed its finished cohort into place first
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(out_dir))

    monkeypatch.setattr(preparation, "write_cohort", other_rank_won)
    path = prepare_datalist(None, tmp_path, "us", phantom_patients=4, phantom_images_per_patient=1, phantom_size=16)
    assert path == str((tmp_path / "phantom_cohort" / "datalist.csv").resolve())


def test_a_failure_without_a_cohort_is_not_hidden(tmp_path, monkeypatch):
    def disk_full(out_dir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preparation, "write_cohort", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_datalist(None, tmp_path, "us", phantom_patients=4, phantom_size=16)

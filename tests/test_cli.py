"""The `monai-synth` command parses its subcommands and reports bad input as a clear error, not a traceback."""

from __future__ import annotations

import pytest

from monai_synth.cli import build_parser, main


def test_every_subcommand_is_registered():
    parser = build_parser()
    for command in ("phantoms", "train-embedding", "guard"):
        args = parser.parse_args([command, *_required(command)])
        assert args.command == command


def _required(command: str) -> list[str]:
    if command == "phantoms":
        return ["--modality", "us", "--out", "x"]
    if command == "train-embedding":
        return ["--train", "t.csv", "--modality", "us", "--out", "w.pt"]
    return ["--train", "t.csv", "--holdout", "h.csv", "--candidates", "c", "--out", "o", "--modality", "us"]


def test_unknown_modality_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["phantoms", "--modality", "xray", "--out", "x"])
    assert excinfo.value.code == 2
    assert "invalid choice: 'xray'" in capsys.readouterr().err


def test_missing_datalist_is_a_one_line_error(tmp_path, capsys):
    code = main(
        [
            "guard",
            "--train",
            str(tmp_path / "missing.csv"),
            "--holdout",
            str(tmp_path / "missing.csv"),
            "--candidates",
            str(tmp_path),
            "--out",
            str(tmp_path / "release"),
            "--modality",
            "us",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("monai-synth guard: error:")
    assert "missing.csv" in err
    assert not (tmp_path / "release").exists()


def test_phantoms_first_patient_gives_new_patient_ids(tmp_path):
    out = tmp_path / "cohort"
    code = main(
        ["phantoms", "--modality", "us", "--patients", "2", "--images-per-patient", "1", "--size", "16"]
        + ["--first-patient", "1000", "--out", str(out)]
    )
    assert code == 0
    rows = (out / "datalist.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["P1000", "P1001"]

"""Sample-grid handler: one row per class, saved every N epochs as PNG and logged to an active MLflow run."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from monai_synth.handlers import SampleGridHandler, make_sample_grid

LABELS = ("3", "4a", "5")


def _generate(n, seed, condition):
    """Each class is a flat image at a known model-space level, so the grid rows can be checked pixel by pixel."""
    level = {"3": -1.0, "4a": 0.0, "5": 1.0}[condition]
    return torch.full((n, 1, 6, 5), level)


def test_grid_layout_and_intensity_mapping():
    grid = make_sample_grid([_generate(2, 0, c) for c in LABELS])
    assert grid.shape == (3 * 6, 2 * 5) and grid.dtype == np.uint8
    assert (grid[:6] == 0).all() and (grid[6:12] == 128).all() and (grid[12:] == 255).all()
    volume = torch.zeros(1, 1, 4, 4, 3)
    volume[..., 1] = 1.0  # the middle slice is what is shown
    assert (make_sample_grid([volume]) == 255).all()


def test_saved_every_interval_and_at_the_end(tmp_path):
    calls = []

    def generate(n, seed, condition):
        calls.append((n, seed, condition))
        return _generate(n, seed, condition)

    engine = Engine(lambda e, b: None)
    handler = SampleGridHandler(generate, LABELS, tmp_path, n_per_class=3, interval=2, seed=11)
    handler.attach(engine)
    engine.run(range(2), max_epochs=5)
    assert [p.name for p in handler.saved] == [f"samples_epoch{e:04d}.png" for e in (2, 4, 5)]
    assert calls[:3] == [(3, 11, c) for c in LABELS]
    image = np.asarray(Image.open(handler.saved[-1]))
    assert image.shape == (3 * 6, 3 * 5)
    assert image[0, 0] == 0 and image[-1, -1] == 255
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_logged_as_mlflow_artifact_when_a_run_is_active(tmp_path):
    handler = SampleGridHandler(_generate, LABELS, tmp_path / "grids", n_per_class=1)
    client = mlflow.MlflowClient()
    # artifacts inside the test's folder, not MLflow's default ./mlruns in the working directory
    experiment_id = client.create_experiment("sample-grid-test", artifact_location=(tmp_path / "artifacts").as_uri())
    experiment = client.get_experiment(experiment_id)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        handler(None)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "sample_grids")] == [
        "sample_grids/samples_epoch0000.png"
    ]
    # MONAI's MLFlowHandler keeps its run on a client, not as the fluent active run: use that run when given
    monai_like = SimpleNamespace(client=client, cur_run=client.create_run(experiment.experiment_id))
    SampleGridHandler(_generate, LABELS, tmp_path / "grids2", mlflow_handler=monai_like)(None)
    assert [a.path for a in client.list_artifacts(monai_like.cur_run.info.run_id, "sample_grids")] == [
        "sample_grids/samples_epoch0000.png"
    ]


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="n_per_class"):
        SampleGridHandler(_generate, LABELS, tmp_path, n_per_class=0)
    with pytest.raises(ValueError, match="label"):
        SampleGridHandler(_generate, [], tmp_path)


def test_side_by_side_puts_real_left_and_released_right_per_class(tmp_path):
    from monai_synth.handlers.sample_grid import make_side_by_side, write_release_side_by_side

    real = [[np.full((8, 8), 10, np.uint8)] * 2, [np.full((8, 8), 20, np.uint8)]]
    released = [[np.full((8, 8), 200, np.uint8)], [np.full((8, 8), 220, np.uint8)] * 2]
    picture = make_side_by_side(real, released, ["3", "5"], zoom=1)
    # each row holds its class's real values on the left half of the image area and released values on the right
    rows = [picture[14 + r * 10 : 14 + r * 10 + 8] for r in range(2)]
    # image area: two real columns of 8 px, a 4-px gap, two released columns of 8 px (the class name is left of it)
    start, middle = picture.shape[1] - 4 * 8 - 4, picture.shape[1] - 2 * 8 - 2
    for row, (lo, hi) in zip(rows, ((10, 200), (20, 220))):
        assert (row[:, start:middle] == lo).any() and not (row[:, start:middle] == hi).any()
        assert (row[:, middle:] == hi).any() and not (row[:, middle:] == lo).any()
    with pytest.raises(ValueError, match="no real or no released"):
        make_side_by_side([[], real[1]], released, ["3", "5"])
    with pytest.raises(FileNotFoundError, match="certificate.csv"):
        write_release_side_by_side(tmp_path / "datalist.csv", tmp_path / "release", ["3"], tmp_path / "x.png")


def test_side_by_side_shows_real_images_through_the_bundles_loading_chain(tmp_path):
    """A bundle that centre-crops (pad_crop) must show the crop the model saw, not the whole field squeezed."""
    from PIL import Image

    from monai_synth.handlers.sample_grid import write_release_side_by_side
    from monai_synth.transforms.presets import modality_transforms

    real = np.zeros((16, 16), np.uint8)
    real[4:12, 4:12] = 255  # the centre 8 x 8 is white, the surround black
    Image.fromarray(real).save(tmp_path / "real.png")
    (tmp_path / "datalist.csv").write_text(f"image,label,patient_id\n{tmp_path / 'real.png'},3,P1\n")
    (tmp_path / "release").mkdir()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "release" / "s0.png")
    (tmp_path / "release" / "certificate.csv").write_text("file,condition\ns0.png,3\n")
    chain = modality_transforms("us", 8, resize="pad_crop")

    def real_side(**kwargs):
        out = write_release_side_by_side(
            tmp_path / "datalist.csv", tmp_path / "release", ["3"], tmp_path / "x.png", zoom=1, **kwargs
        )
        picture = np.asarray(Image.open(out))
        released_cols = np.where((picture == 128).any(axis=0))[0]
        return picture[14:22, released_cols[0] - 4 - 8 : released_cols[0] - 4]

    assert (real_side(preprocessing=chain) == 255).all()  # the crop: all white
    resized = real_side()
    assert (resized < 255).any() and (resized > 0).any()  # the whole field resized: white centre, black surround

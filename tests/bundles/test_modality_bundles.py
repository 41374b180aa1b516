"""Every bundle stands on the shared configs the same way; the CT bundle's 3D variant runs the whole chain.

The 3D chain (phantom volumes -> 3D AutoencoderKL -> 3D latent cache -> 3D DiT -> guarded 3D release) runs once at
16^3 with tiny networks; the released NIfTI volumes and a DICOM-series release of the same candidates are read back
and compared with each other and with the training volumes' model-space geometry.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage

from monai_synth import workflows
from monai_synth.configs import CONFIG_DIR, STAGE_FILES, config_files

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
CT = ROOT / "bundles" / "ct_ldit"
TEMPLATE_FILES = [
    "configs/common.yaml",
    "configs/train_autoencoder.yaml",
    "configs/train_diffusion.yaml",
    "configs/sample.yaml",
    "configs/evaluate.yaml",
    "configs/multi_gpu.yaml",
    "configs/quickstart.yaml",
    "configs/metadata.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
]


def _ids(path: Path) -> set[str]:
    return set(ConfigParser.load_config_file(str(path)))


def test_the_four_modalities_have_bundles():
    assert {p.name for p in BUNDLES} >= {"breast_us_ldit", "ct_ldit", "mri_ldit", "pet_ldit"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_every_bundle_has_the_template_files(bundle):
    missing = [name for name in TEMPLATE_FILES if not (bundle / name).is_file()]
    assert not missing, f"{bundle.name} lacks {missing}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_a_bundle_sets_no_id_the_shared_configs_define(bundle):
    # the bundle's common.yaml is read first (MONAI finds metadata.json and logging.conf next to it), so an id the
    # shared common.yaml also defines would silently replace the bundle's value; a bundle stage file is read last,
    # so an id it shares with the shared stage file would replace the wiring
    own, shared = bundle / "configs", CONFIG_DIR
    assert not _ids(own / "common.yaml") & _ids(shared / "common.yaml")
    for name in [*STAGE_FILES.values(), "multi_gpu.yaml"]:
        assert not _ids(own / name) & _ids(shared / name), name


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_quickstart_overrides_only_ids_the_stages_define(bundle):
    parser = ConfigParser.load_config_file(str(bundle / "configs" / "quickstart.yaml"))
    stage_ids = set()
    for stage in workflows.STAGES:
        for path in config_files(bundle, stage):
            stage_ids |= _ids(Path(path))
    unknown = sorted(set(parser["overrides"]) - stage_ids)
    assert not unknown, f"quickstart overrides ids no stage config defines: {unknown}"
    assert all(not str(v).startswith(("$", "@", "%")) for v in parser["overrides"].values())


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_config_files_put_the_bundles_common_first_and_its_stage_file_last(bundle):
    files = config_files(bundle, "autoencoder", multi_gpu=True)
    assert files[0] == str(bundle / "configs" / "common.yaml")  # MONAI's config root: metadata.json, logging.conf
    assert files[-1] == str(bundle / "configs" / "multi_gpu.yaml")
    assert files.index(str(bundle / "configs" / "train_autoencoder.yaml")) > files.index(
        str(CONFIG_DIR / "train_autoencoder.yaml")
    )
    assert config_files(bundle, "sample", multi_gpu=True)[-1] == str(CONFIG_DIR / "multi_gpu_sample.yaml")
    with pytest.raises(ValueError, match="one device"):
        config_files(bundle, "evaluate", multi_gpu=True)


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b.name != "breast_us_ldit"], ids=lambda p: p.name)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_spatial_dims_switches_every_network_and_the_loading_chain(bundle, spatial_dims):
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "autoencoder"))
    parser.update({"bundle_root": str(bundle), "device": "cpu", "spatial_dims": spatial_dims})
    get = parser.get_parsed_content
    assert len(get("spatial_size")) == spatial_dims == len(get("latent_size"))
    levels = len(get("autoencoder_channels"))  # narrow networks of the bundle's depth: only their kind is checked
    parser.update({"autoencoder_channels": [4] * levels, "autoencoder_norm_groups": 4, "disc_channels": 4,
                   "dit_hidden_size": 8, "dit_depth": 1, "dit_num_heads": 2})  # fmt: skip
    assert get("rflow_schedule")["spatial_dim"] == spatial_dims
    assert parser["autoencoder_def"]["spatial_dims"] == "@spatial_dims"
    for name in ("autoencoder_def", "network_def", "discriminator_def"):
        convs = [m for m in get(name).modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        assert convs and all(isinstance(m, torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d) for m in convs)
    # off on a CPU whatever the bundle's switches say
    assert get("use_bf16") is False and get("use_checkpointing") is False


# ---------------------------------------------------------------- the 3D chain end to end (CT, 16^3, tiny networks)

TINY_3D = {
    "spatial_dims": 3,
    "spatial_size": [16, 16, 16],
    "phantom_size": [16, 16, 16],  # the 2D quickstart renders larger phantoms and crops them; the whole volume here
    "resize_mode": "resize",
    "phantom_patients": 16,
    "phantom_images_per_patient": 2,
    "autoencoder_channels": [4, 8],
    "autoencoder_norm_groups": 4,
    "latent_channels": 2,
    "patch_size": 2,
    "dit_hidden_size": 16,
    "dit_depth": 1,
    "dit_num_heads": 2,
    "ae_max_epochs": 1,
    "ae_batch_size": 4,
    "dit_max_epochs": 1,
    "dit_batch_size": 8,
    "cache_batch_size": 8,
    "val_interval": 1,
    "ckpt_interval": 1,
    "grid_interval": 1,
    "grid_per_class": 1,
    "num_inference_steps": 2,
    "num_per_class": 1,
    "sample_batch_size": 2,
    "calibration_quantile": 0.25,
    "privacy_spaces": ["pixel"],
    "release_format": "nifti",
    "mlflow": False,
}


@pytest.fixture(scope="module")
def chain3d(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct3d")
    parser = ConfigParser.load_config_file(str(CT / "configs" / "quickstart.yaml"))
    overrides = {**parser["overrides"], **TINY_3D}
    outputs = workflows.run_quickstart(CT, out, overrides=overrides, threads=1)
    return {"out": out, "outputs": outputs, "overrides": overrides}


def _released(release: Path) -> list[dict]:
    with open(release / "certificate.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_3d_chain_releases_volumes_of_every_class(chain3d):
    out = chain3d["out"]
    latents = torch.load(out / "latents" / "train_latents.pt", weights_only=True)
    assert tuple(latents["latents"].shape[1:]) == (2, 8, 8, 8)  # 3D latent cache: (C, 16^3 / 2)
    rows = _released(out / "release")
    assert sorted(r["condition"] for r in rows) == ["nodule", "normal"]
    for row in rows:
        image = nib.load(out / "release" / row["file"])
        assert image.shape == (16, 16, 16)
        values = np.asarray(image.dataobj)
        assert -1000.0 <= values.min() and values.max() <= 1000.0  # Hounsfield units, the CT window's range
    assert (out / "real_vs_released.png").is_file()


@pytest.mark.slow
def test_3d_release_carries_the_training_volumes_spacing_and_orientation(chain3d):
    out = chain3d["out"]
    parser = ConfigParser()
    parser.read_config(config_files(CT, "sample"))
    parser.update({**chain3d["overrides"], "bundle_root": str(CT), "output_dir": str(out), "dataset_dir": None})
    train = parser.get_parsed_content("train_images")[0]["image"]  # a training volume as the model saw it
    expected_spacing = affine_to_spacing(np.asarray(train.affine), r=3)
    for row in _released(out / "release"):
        image = nib.load(out / "release" / row["file"])
        assert np.allclose(nib.affines.voxel_sizes(image.affine), expected_spacing)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")  # the loading chain's orientation
        assert np.allclose(image.affine[:3, :3], np.asarray(train.affine)[:3, :3], atol=1e-4)


@pytest.mark.slow
def test_3d_dicom_series_release_reads_back_as_the_nifti_release(chain3d, tmp_path):
    # the same seeds and checkpoints give the same candidates: one release as NIfTI, one as DICOM series
    out = tmp_path / "run"
    shutil.copytree(chain3d["out"], out)
    overrides = {**chain3d["overrides"], "output_dir": str(out), "dataset_dir": None, "release_format": "dicom"}
    overrides["release_dir"] = str(out / "release_dicom")
    workflows.run_stage(CT, "sample", overrides=overrides)
    nifti_rows, dicom_rows = _released(out / "release"), _released(out / "release_dicom")
    assert [r["condition"] for r in dicom_rows] == [r["condition"] for r in nifti_rows]
    load = LoadImage(image_only=True, ensure_channel_first=True)
    for n_row, d_row in zip(nifti_rows, dicom_rows):
        series = out / "release_dicom" / d_row["file"]
        assert series.is_dir() and len(list(series.glob("*.dcm"))) == 16  # one file per slice
        from_nifti, from_dicom = load(str(out / "release" / n_row["file"])), load(str(series))
        assert from_dicom.shape == from_nifti.shape == (1, 16, 16, 16)
        # same voxel size and axis directions on both readers' RAS grids
        assert np.allclose(np.abs(np.asarray(from_dicom.affine)[:3, :3]), np.abs(np.asarray(from_nifti.affine)[:3, :3]))
        # same Hounsfield units up to DICOM's integer storage (rescale slope 1: half a unit)
        assert torch.allclose(torch.as_tensor(from_dicom).float(), torch.as_tensor(from_nifti).float(), atol=0.51)


# ---------------------------------------------------------------- MRI and PET: the 2D quickstart chain at toy size


@pytest.mark.slow
@pytest.mark.parametrize("name, low, high", [("mri_ldit", None, None), ("pet_ldit", 0.0, 15.0)])
def test_2d_quickstart_releases_images_in_physical_units(name, low, high, tmp_path):
    bundle = ROOT / "bundles" / name
    parser = ConfigParser.load_config_file(str(bundle / "configs" / "quickstart.yaml"))
    small = {k: v for k, v in TINY_3D.items() if k not in ("spatial_dims", "spatial_size", "release_format")}
    overrides = {**parser["overrides"], **small, "spatial_size": [16, 16], "phantom_size": [16, 16]}
    workflows.run_quickstart(bundle, tmp_path, overrides=overrides, threads=1)
    rows = _released(tmp_path / "release")
    assert sorted(r["condition"] for r in rows) == ["lesion", "normal"]
    sample = ConfigParser()
    sample.read_config(config_files(bundle, "sample"))
    sample.update({**overrides, "bundle_root": str(bundle), "output_dir": str(tmp_path), "dataset_dir": None})
    train = [np.asarray(LoadImage(image_only=True)(r["image"])) for r in sample.get_parsed_content("splits")["train"]]
    for row in rows:
        image = nib.load(tmp_path / "release" / row["file"])
        values = np.asarray(image.dataobj, dtype=np.float64)
        assert image.shape == (16, 16) and np.isfinite(values).all()
        if low is not None:  # SUV: the PET transform's fixed range
            assert low <= values.min() and values.max() <= high
        else:  # MRI: inverted with the training images' median percentiles, so in the training images' range
            assert min(t.min() for t in train) - 1e-3 <= values.min() and values.max() <= max(t.max() for t in train)


@pytest.mark.slow
def test_2d_ct_quickstart_crops_its_phantoms_keeping_the_pixel_size(tmp_path):
    # the CT quickstart renders phantoms at twice its size and models their centre (the lungs) at the rendered pixels
    parser = ConfigParser.load_config_file(str(CT / "configs" / "quickstart.yaml"))
    assert parser["overrides"]["resize_mode"] == "pad_crop"
    small = {
        k: v for k, v in TINY_3D.items() if k not in ("spatial_dims", "spatial_size", "phantom_size", "resize_mode")
    }
    overrides = {**parser["overrides"], **small, "spatial_size": [16, 16], "phantom_size": [32, 32]}
    workflows.run_quickstart(CT, tmp_path, overrides=overrides, threads=1)
    rows = _released(tmp_path / "release")
    assert sorted(r["condition"] for r in rows) == ["nodule", "normal"]
    for row in rows:
        image = nib.load(tmp_path / "release" / row["file"])
        # 16 x 16 pixels of the 400 mm field of view rendered at 32 x 32: 12.5 mm each (a resize would give 25 mm)
        assert image.shape == (16, 16) and np.allclose(nib.affines.voxel_sizes(image.affine)[:2], 12.5)


# ---------------------------------------------------------------- conditions beyond the class


@pytest.mark.slow
def test_numeric_conditions_train_normalised_and_are_requested_per_image(tmp_path):
    bundle = CT
    parser = ConfigParser.load_config_file(str(bundle / "configs" / "quickstart.yaml"))
    small = {k: v for k, v in TINY_3D.items() if k not in ("spatial_dims", "spatial_size")}
    overrides = {**parser["overrides"], **small, "spatial_size": [16, 16], "phantom_size": [16, 16]}
    overrides["condition_keys"] = ["lesion_size_mm"]
    requests = tmp_path / "requests.csv"
    requests.write_text("label,lesion_size_mm,count\nnormal,0,1\nnodule,14.5,2\n")
    workflows.run_quickstart(bundle, tmp_path / "run", overrides={**overrides, "conditions_csv": str(requests)})
    out = tmp_path / "run"
    cache = torch.load(out / "latents" / "train_latents.pt", weights_only=True)
    assert cache["context_keys"] == ["lesion_size_mm"] and cache["context"].shape == (len(cache["labels"]), 1)
    ckpt = torch.load(out / "models" / "diffusion" / "diffusion.pt", weights_only=True)
    assert ckpt["ema_network"]["c_embedder.mlp.0.weight"].shape[1] == 3  # one-hot of 2 classes + 1 condition
    rows = _released(out / "release")
    assert [(r["condition"], float(r["condition_lesion_size_mm"])) for r in rows] == [
        ("normal", 0.0),
        ("nodule", 14.5),
        ("nodule", 14.5),
    ]
    import json

    recorded = json.loads((out / "release" / "certificate.json").read_text())["conditions"]
    sample = ConfigParser()
    sample.read_config(config_files(bundle, "sample"))
    sample.update({**overrides, "bundle_root": str(bundle), "output_dir": str(out), "dataset_dir": None})
    train_sizes = [float(r["lesion_size_mm"]) for r in sample.get_parsed_content("splits")["train"]]
    assert recorded["keys"] == ["lesion_size_mm"]
    assert recorded["training_mean"] == pytest.approx([np.mean(train_sizes)], rel=1e-5)
    assert recorded["training_std"] == pytest.approx([np.std(train_sizes)], rel=1e-4)


def test_a_conditions_csv_with_an_unknown_label_or_a_missing_value_is_refused(tmp_path):
    from monai_synth.workflows import release_requests

    bad = tmp_path / "bad.csv"
    bad.write_text("label,lesion_size_mm\nnodule,12\ncyst,3\n")
    with pytest.raises(ValueError, match="line 3: label 'cyst'"):
        release_requests(["normal", "nodule"], 1, ["lesion_size_mm"], {"lesion_size_mm": 5.0}, bad)
    bad.write_text("label,lesion_size_mm\nnodule,big\n")
    with pytest.raises(ValueError, match="line 2: lesion_size_mm must be a number"):
        release_requests(["normal", "nodule"], 1, ["lesion_size_mm"], {"lesion_size_mm": 5.0}, bad)
    plain = release_requests(["normal", "nodule"], 3, ["lesion_size_mm"], {"lesion_size_mm": 5.0})
    assert plain == [({"label": "normal", "lesion_size_mm": 5.0}, 3), ({"label": "nodule", "lesion_size_mm": 5.0}, 3)]

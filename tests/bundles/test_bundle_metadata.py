"""Every bundle's metadata.json describes what its configs build (MONAI's verify_metadata / verify_net_in_out style).

The inputs and outputs of each network are read from the metadata, checked against the config values that define
them, and then fed to the networks the configs build (with narrow widths: the shapes are what is checked), so a
metadata file copied from another bundle, or left behind by a config change, fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_synth.configs import config_files

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())

# narrow networks with the bundle's own depth of downsampling and latent channels: only shapes are under test
NARROW = {
    "dit_hidden_size": 32,
    "dit_depth": 1,
    "dit_num_heads": 2,
    "autoencoder_norm_groups": 4,
    "autoencoder_res_blocks": 1,
    "device": "cpu",
}


def _parser(bundle: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(bundle, "sample"))
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _example(spec: dict, batch: int = 2) -> torch.Tensor:
    """A batch of the input one metadata entry describes."""
    shape = (batch, spec["num_channels"], *spec["spatial_shape"]) if spec["spatial_shape"] else (batch,)
    if spec["format"] == "one-hot":
        return torch.nn.functional.one_hot(torch.arange(batch) % spec["num_channels"], spec["num_channels"]).float()
    low, high = spec["value_range"] or (-1, 1)
    if spec["dtype"] == "long":
        return torch.randint(int(low), int(high) + 1, shape)
    return torch.rand(shape) * (high - low) + low


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_describes_the_configured_networks(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    parser = _parser(bundle)
    get = parser.get_parsed_content
    assert meta["version"] in meta["changelog"]
    assert meta["modality"] == get("modality_info").dicom_code
    labels, latent_size = get("labels"), list(get("latent_size"))

    image = meta["autoencoder_data_format"]["inputs"]["image"]
    assert image["num_channels"] == parser["autoencoder_def"]["in_channels"]
    assert image["modality"] == meta["modality"]
    assert image["spatial_shape"] == list(get("spatial_size"))
    assert len(image["spatial_shape"]) == get("spatial_dims")
    assert meta.get("spatial_dims", 2) == get("spatial_dims")
    assert meta["autoencoder_data_format"]["outputs"]["pred"]["spatial_shape"] == image["spatial_shape"]

    net = meta["network_data_format"]
    assert set(net["inputs"]) == {"x", "timesteps", "context"}, "inputs must be named as the network's arguments"
    assert net["inputs"]["x"]["num_channels"] == get("latent_channels")
    assert net["inputs"]["x"]["spatial_shape"] == latent_size
    assert net["inputs"]["timesteps"]["value_range"] == [0, get("num_train_timesteps") - 1]
    context = net["inputs"]["context"]
    assert context["num_channels"] == get("num_classes")
    assert [context["channel_def"][str(i)].split()[-1] for i in range(len(labels))] == labels
    assert net["outputs"]["pred"]["num_channels"] == get("latent_channels")
    assert net["outputs"]["pred"]["spatial_shape"] == latent_size


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_networks_accept_the_inputs_their_metadata_describes(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    levels = len(_parser(bundle).get_parsed_content("autoencoder_channels"))
    parser = _parser(bundle, autoencoder_channels=[4] * levels, **NARROW)

    net = meta["network_data_format"]
    inputs = {name: _example(spec) for name, spec in net["inputs"].items()}
    with torch.no_grad():
        pred = parser.get_parsed_content("network_def")(**inputs)
    assert pred.shape == (2, net["outputs"]["pred"]["num_channels"], *net["outputs"]["pred"]["spatial_shape"])

    ae = meta["autoencoder_data_format"]
    with torch.no_grad():
        recon = parser.get_parsed_content("autoencoder_def").reconstruct(_example(ae["inputs"]["image"], batch=1))
    assert recon.shape == (1, ae["outputs"]["pred"]["num_channels"], *ae["outputs"]["pred"]["spatial_shape"])


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_units_and_value_range_are_the_intensity_transforms(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    parser = _parser(bundle)
    get = parser.get_parsed_content
    units = meta.get("physical_units")
    if units is None:  # a bundle without the block must say its unit in the image description
        assert get("modality_info").physical_unit.split()[0] in meta["image_classes"]
        return
    assert units["unit"] == get("modality_info").physical_unit
    kwargs = {k: v for k, v in parser["intensity_kwargs"].items() if not str(v).startswith("$")}
    from monai_synth.transforms.presets import intensity_transform

    transform = intensity_transform(get("modality"), **kwargs)
    if units["value_range"]:  # a fixed physical range: model space [-1, 1] is exactly it
        ends = transform.inverse(torch.tensor([[-1.0, 1.0]]))
        assert ends.flatten().tolist() == pytest.approx(units["value_range"])
    else:  # scaled per image (MRI): generated images are inverted with a reference from the training images
        assert any(str(v).startswith("$") for v in parser["intensity_kwargs"].values())

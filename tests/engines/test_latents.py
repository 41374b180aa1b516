"""Scale factor over the whole training set (saved with the weights) and the z_mu latent cache."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import LABELS, make_autoencoder, make_images
from ignite.engine import Events
from monai.data import MetaTensor
from torch.utils.data import DataLoader

from monai_synth.engines import (
    AutoencoderKLTrainer,
    CheckpointMetadata,
    LatentDataset,
    ScaleFactor,
    cache_latents,
    compute_scale_factor,
    encode_labels,
    latent_channel_stats,
    load_checkpoint,
    standardise_latent_channels,
)
from monai_synth.handlers import AtomicCheckpointSaver, ScaleFactorHandler


def _heterogeneous_loader():
    """Two batches with very different intensity, so one batch's statistics are not the set's."""
    data = make_images(8)
    for i, item in enumerate(data):
        item["image"] = item["image"] * (0.1 if i < 4 else 3.0)
    return DataLoader(data, batch_size=4, shuffle=False)


def test_scale_factor_is_over_the_whole_set_not_one_batch():
    ae = make_autoencoder()
    loader = _heterogeneous_loader()
    value = compute_scale_factor(ae, loader)
    with torch.no_grad():
        all_mu = torch.cat([ae.encode(b["image"])[0] for b in loader]).double()
        first_mu = ae.encode(next(iter(loader))["image"])[0].double()
    assert value == pytest.approx(1.0 / float(all_mu.std()), rel=1e-6)
    assert abs(value - 1.0 / float(first_mu.std())) > 0.05 * value
    assert ae.training, "compute_scale_factor must restore the training mode"


def test_scale_factor_module_round_trips_through_a_checkpoint(tmp_path):
    sf = ScaleFactor()
    assert not sf.computed
    with pytest.raises(RuntimeError, match="never computed"):
        float(sf)
    sf.set(0.731)
    path = tmp_path / "ckpt.pt"
    torch.save({"scale_factor": sf.state_dict()}, path)
    restored = ScaleFactor()
    load_checkpoint(path, {"scale_factor": restored})
    assert float(restored) == pytest.approx(0.731)
    with pytest.raises(ValueError, match="positive"):
        sf.set(0.0)


def test_handler_stores_scale_factor_in_the_final_checkpoint_whatever_the_handler_order(tmp_path):
    ae, sf = make_autoencoder(), ScaleFactor()
    loader = _heterogeneous_loader()
    # the saver is attached *before* the scale factor handler: the checkpoint must still carry the new value
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"autoencoder": ae, "scale_factor": sf},
        save_final=True,
        final_filename="ae.pt",
    )
    trainer = AutoencoderKLTrainer(
        "cpu",
        2,
        loader,
        ae,
        torch.optim.Adam(ae.parameters(), 1e-3),
        train_handlers=[saver, ScaleFactorHandler(ae, loader, sf)],
    )
    trainer.run()
    assert sf.computed
    assert float(sf) == pytest.approx(compute_scale_factor(ae, loader), rel=1e-6)
    restored = ScaleFactor()
    load_checkpoint(tmp_path / "ae.pt", {"scale_factor": restored})
    assert float(restored) == pytest.approx(float(sf))


def test_handler_also_runs_when_training_stops_early(tmp_path):
    ae, sf = make_autoencoder(), ScaleFactor()
    loader = _heterogeneous_loader()
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"scale_factor": sf, "ae": ae}, save_final=True, final_filename="ae.pt"
    )
    trainer = AutoencoderKLTrainer(
        "cpu",
        5,
        loader,
        ae,
        torch.optim.Adam(ae.parameters()),
        train_handlers=[saver, ScaleFactorHandler(ae, loader, sf)],
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: e.terminate())
    trainer.run()
    restored = ScaleFactor()
    load_checkpoint(tmp_path / "ae.pt", {"scale_factor": restored})
    assert restored.computed and float(restored) == pytest.approx(compute_scale_factor(ae, loader), rel=1e-6)


def _channel_moments(ae, loader) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = torch.cat([ae.encode(b["image"])[0] for b in loader]).double().transpose(0, 1).flatten(1)
    return z.mean(dim=1), z.std(dim=1)


def test_standardising_latent_channels_keeps_reconstructions_and_centres_every_channel():
    ae = make_autoencoder().eval()
    loader = _heterogeneous_loader()
    with torch.no_grad():
        for conv in (ae.quant_conv_mu.conv, ae.post_quant_conv.conv):  # channels far apart, as trained ones lie
            conv.bias.copy_(torch.linspace(-3.0, 4.0, conv.bias.numel()))
        before = torch.cat([ae.decode(ae.encode(b["image"])[0]) for b in loader])
    mean, std = latent_channel_stats(ae, loader)
    assert torch.allclose(mean, _channel_moments(ae, loader)[0]) and torch.allclose(
        std, _channel_moments(ae, loader)[1]
    )
    assert float(mean.abs().max()) > 1.0  # the test starts from channels that need it
    standardise_latent_channels(ae, mean, std)
    with torch.no_grad():
        after = torch.cat([ae.decode(ae.encode(b["image"])[0]) for b in loader])
    new_mean, new_std = _channel_moments(ae, loader)
    assert float(new_mean.abs().max()) < 1e-5 and float((new_std - 1).abs().max()) < 1e-5
    assert torch.allclose(before, after, atol=1e-5)
    assert compute_scale_factor(ae, loader) == pytest.approx(1.0, rel=1e-2)  # n / (n - 1) apart
    with pytest.raises(TypeError, match="AutoencoderKL"):
        standardise_latent_channels(torch.nn.Linear(2, 2), mean, std)


def test_handler_standardises_the_channels_once_at_the_end_into_the_final_checkpoint(tmp_path):
    ae, sf = make_autoencoder(), ScaleFactor()
    loader = _heterogeneous_loader()
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"autoencoder": ae, "scale_factor": sf}, save_final=True, final_filename="ae.pt"
    )
    handler = ScaleFactorHandler(ae, loader, sf, interval=1, per_channel=True)
    folds = []
    trainer = AutoencoderKLTrainer(
        "cpu", 3, loader, ae, torch.optim.Adam(ae.parameters(), 1e-3), train_handlers=[saver, handler]
    )
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: folds.append(float(_channel_moments(ae, loader)[0].abs().max()))
    )
    trainer.run()
    assert folds[-1] < 1e-5 and max(folds[:-1]) > 1e-3  # standardised at the end only, not at the interval refreshes
    assert float(sf) == pytest.approx(1.0, rel=1e-2)
    restored, restored_sf = make_autoencoder(), ScaleFactor()
    load_checkpoint(tmp_path / "ae.pt", {"autoencoder": restored, "scale_factor": restored_sf})
    assert float(_channel_moments(restored.eval(), loader)[0].abs().max()) < 1e-5
    assert float(restored_sf) == pytest.approx(float(sf))


def _write_ae_checkpoint(ae, path, sf=1.0):
    torch.save({"autoencoder": ae.state_dict(), "scale_factor": ScaleFactor(sf).state_dict()}, path)
    return path


def test_cache_stores_z_mu_deterministically(tmp_path):
    ae = make_autoencoder()
    ckpt = _write_ae_checkpoint(ae, tmp_path / "ae.pt")
    data = make_images(6)
    loader = DataLoader(data, batch_size=4)
    a = cache_latents(ae, loader, tmp_path / "a.pt", autoencoder_checkpoint=ckpt, labels=LABELS, context_keys=("age",))
    b = cache_latents(ae, loader, tmp_path / "b.pt", autoencoder_checkpoint=ckpt, labels=LABELS, context_keys=("age",))
    ds_a, ds_b = (
        LatentDataset(a, autoencoder_checkpoint=ckpt, labels=LABELS),
        LatentDataset(b, autoencoder_checkpoint=ckpt),
    )
    assert torch.equal(ds_a.latents, ds_b.latents), "sampled latents would differ between runs; z_mu does not"
    with torch.no_grad():
        z_mu = ae.encode(torch.stack([d["image"] for d in data]))[0]
    torch.testing.assert_close(ds_a.latents, z_mu)
    assert len(ds_a) == 6 and ds_a.latent_shape == (3, 8, 8)
    item = ds_a[4]
    assert set(item) == {"latent", "label", "context"}
    assert int(item["label"]) == LABELS.index(data[4]["label"])
    assert float(item["context"][0]) == pytest.approx(data[4]["age"])
    assert not list(tmp_path.glob("*.partial")), "atomic write left a temporary file"


def test_cache_of_monai_metatensors_loads_safely(tmp_path):
    """MONAI pipelines yield MetaTensors; the cache holds plain tensors (no per-item metadata, any torch can read it)."""
    data = make_images(3)
    for item in data:
        item["image"] = MetaTensor(item["image"], meta={"filename_or_obj": "x.png"})
    path = cache_latents(make_autoencoder(), DataLoader(data, batch_size=3), tmp_path / "c.pt", labels=LABELS)
    dataset = LatentDataset(path)
    assert type(dataset.latents) is torch.Tensor and len(dataset) == 3


def test_cache_refuses_another_autoencoder_checkpoint(tmp_path):
    ae = make_autoencoder()
    ckpt = _write_ae_checkpoint(ae, tmp_path / "ae.pt")
    cache = cache_latents(
        ae, DataLoader(make_images(3), batch_size=3), tmp_path / "c.pt", autoencoder_checkpoint=ckpt, labels=LABELS
    )
    other = _write_ae_checkpoint(make_autoencoder(seed=1), tmp_path / "ae_retrained.pt")
    with pytest.raises(ValueError, match="fingerprints differ"):
        LatentDataset(cache, autoencoder_checkpoint=other)
    with pytest.raises(ValueError, match="labels"):
        LatentDataset(cache, autoencoder_checkpoint=ckpt, labels=("normal", "nodule"))
    with pytest.raises(FileNotFoundError, match="latent caching"):
        LatentDataset(tmp_path / "nope.pt")


def test_unknown_labels_are_named():
    assert encode_labels(["4a", "3", 2], LABELS).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="'4c'.*not known"):
        encode_labels(["3", "4c"], LABELS)
    with pytest.raises(ValueError, match="out of range"):
        encode_labels(torch.tensor([0, 3]), LABELS)
    with pytest.raises(ValueError, match="not known"):
        cache_latents(make_autoencoder(), DataLoader(make_images(3), batch_size=3), "unused.pt", labels=("3", "4a"))


def test_metadata_is_checked_when_loading_a_stage_one_checkpoint(tmp_path):
    path = tmp_path / "ae.pt"
    meta = CheckpointMetadata(
        bundle="breast_us_ldit", modality="us", labels=LABELS, spatial_size=16, stage="autoencoder"
    )
    torch.save({"metadata": meta.state_dict(), "scale_factor": ScaleFactor(1.0).state_dict()}, path)
    load_checkpoint(
        path, metadata=CheckpointMetadata(modality="us", labels=LABELS, spatial_size=(16, 16), stage="diffusion")
    )
    with pytest.raises(ValueError, match="modality: checkpoint has 'us', this run expects 'ct'"):
        load_checkpoint(path, metadata=CheckpointMetadata(modality="ct", labels=LABELS))


def test_encoding_a_cache_removes_half_written_caches_of_killed_runs(tmp_path):
    import os
    import time

    ae = make_autoencoder()
    ckpt = _write_ae_checkpoint(ae, tmp_path / "ae.pt")
    stale = tmp_path / ".train_latents.pt.0a1b2c3d.partial"  # what a kill -9 during the atomic write leaves
    stale.write_bytes(b"half a cache")
    os.utime(stale, (time.time() - 3600,) * 2)
    cache_latents(
        ae,
        DataLoader(make_images(2), batch_size=2),
        tmp_path / "train_latents.pt",
        autoencoder_checkpoint=ckpt,
        labels=LABELS,
    )
    assert not stale.exists() and (tmp_path / "train_latents.pt").is_file()

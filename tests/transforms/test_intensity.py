"""Modality intensity transforms: physical -> model space -> physical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_synth.transforms import (
    CTWindow,
    CTWindowd,
    MRIPercentileScale,
    MRIPercentileScaled,
    PETSUVScale,
    PETSUVScaled,
    UltrasoundGreyScale,
    UltrasoundGreyScaled,
)

RNG = np.random.default_rng(0)

# (transform, physical range that round-trips exactly, value that must map to -1, value that must map to +1)
CASES = [
    (CTWindow(), (-1000.0, 1000.0), -1000.0, 1000.0),
    (CTWindow(window_min=-160, window_max=240), (-160.0, 240.0), -160.0, 240.0),
    (PETSUVScale(suv_max=15), (0.0, 15.0), 0.0, 15.0),
    (PETSUVScale(suv_max=10, log=True), (0.0, 10.0), 0.0, 10.0),
    (UltrasoundGreyScale(), (0.0, 255.0), 0.0, 255.0),
]


@pytest.mark.parametrize("xform,rng,lo,hi", CASES, ids=lambda c: type(c).__name__ if callable(c) else None)
def test_round_trip_and_endpoints(xform, rng, lo, hi):
    physical = RNG.uniform(*rng, size=(1, 12, 10)).astype(np.float32)
    physical[0, 0, 0], physical[0, 0, 1] = lo, hi
    model = xform(physical)
    assert isinstance(model, np.ndarray) and model.dtype == np.float32  # numpy in, numpy out
    assert model.min() >= -1.0 and model.max() <= 1.0
    assert model[0, 0, 0] == pytest.approx(-1.0) and model[0, 0, 1] == pytest.approx(1.0)
    back = xform.inverse(model)
    np.testing.assert_allclose(back, physical, atol=1e-3 * (rng[1] - rng[0]))
    as_torch = xform(torch.from_numpy(physical))
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), model, atol=1e-6)


def test_ct_window_clips_outside_the_window():
    hu = np.array([[[-3000.0, -1000.0, 0.0, 1000.0, 2500.0]]], np.float32)
    model = CTWindow()(hu)
    np.testing.assert_allclose(model, [[[-1.0, -1.0, 0.0, 1.0, 1.0]]])
    np.testing.assert_allclose(CTWindow().inverse(np.array([[[-1.5, 0.5, 1.2]]])), [[[-1000.0, 500.0, 1000.0]]])


def test_ct_window_rejects_empty_window():
    with pytest.raises(ValueError, match="greater than window_min"):
        CTWindow(window_min=100, window_max=100)


def test_pet_log_gives_background_more_range():
    suv = np.array([[[1.0]]], np.float32)
    assert PETSUVScale(log=True)(suv)[0, 0, 0] > PETSUVScale(log=False)(suv)[0, 0, 0] + 0.3


def test_mri_percentiles_recorded_and_inverted():
    image = MetaTensor(torch.from_numpy(RNG.gamma(2.0, 100.0, size=(1, 16, 16)).astype(np.float32)))
    xform = MRIPercentileScale(lower=1, upper=99)
    lo, hi = np.percentile(image.numpy(), [1, 99])
    model = xform(image)
    info = model.applied_operations[-1]["extra_info"]
    assert info["lower_value"] == pytest.approx(lo, rel=1e-4) and info["upper_value"] == pytest.approx(hi, rel=1e-4)
    inside = (image.numpy() >= lo) & (image.numpy() <= hi)
    assert np.all(np.abs(model.numpy()[inside]) <= 1.0 + 1e-5)
    assert model.numpy().max() > 1.0  # tails are kept (no clipping by default) ...
    back = xform.inverse(model)
    np.testing.assert_allclose(back.numpy(), image.numpy(), rtol=1e-4, atol=1e-2)  # ... so the inverse is exact
    assert back.applied_operations == []


def test_mri_generated_images_need_a_reference():
    generated = torch.linspace(-1, 1, 9).reshape(1, 3, 3)
    with pytest.raises(ValueError, match="reference"):
        MRIPercentileScale().inverse(generated)
    explicit = MRIPercentileScale().inverse(generated, lower_value=100.0, upper_value=500.0)
    np.testing.assert_allclose(explicit.numpy().ravel()[[0, 4, 8]], [100.0, 300.0, 500.0], rtol=1e-6)
    train = [RNG.uniform(0, s, size=(1, 8, 8)).astype(np.float32) for s in (100.0, 200.0, 300.0)]
    ref = MRIPercentileScale().reference_from(train)
    assert ref[1] == pytest.approx(np.percentile(train[1], 99), rel=1e-4)  # median image's upper percentile
    with_ref = MRIPercentileScale(reference=ref).inverse(generated)
    np.testing.assert_allclose(with_ref.numpy().ravel()[[0, 8]], ref, rtol=1e-5)


def test_mri_explicit_values_and_clip():
    image = np.array([[[0.0, 50.0, 100.0, 200.0]]], np.float32)
    xform = MRIPercentileScale(clip=True)
    np.testing.assert_allclose(xform(image, lower_value=0.0, upper_value=100.0), [[[-1.0, 0.0, 1.0, 1.0]]])
    with pytest.raises(ValueError, match="both"):
        xform(image, lower_value=0.0)


def test_mri_constant_image_does_not_divide_by_zero():
    out = MRIPercentileScale()(np.full((1, 4, 4), 7.0, np.float32))
    assert np.all(np.isfinite(out)) and np.allclose(out, -1.0)


@pytest.mark.parametrize(
    "dict_xform,physical",
    [
        (CTWindowd(["image", "ref"]), RNG.uniform(-1000, 1000, (1, 6, 6))),
        (MRIPercentileScaled(["image", "ref"]), RNG.uniform(0, 800, (1, 6, 6))),
        (PETSUVScaled(["image", "ref"], log=True), RNG.uniform(0, 15, (1, 6, 6))),
        (UltrasoundGreyScaled(["image", "ref"]), RNG.uniform(0, 255, (1, 6, 6))),
    ],
)
def test_dictionary_versions_invert_through_compose(dict_xform, physical):
    physical = torch.from_numpy(physical.astype(np.float32))
    chain = Compose([dict_xform])
    data = {"image": MetaTensor(physical.clone()), "ref": MetaTensor(physical.clone() * 0.5), "label": "3"}
    out = chain(data)
    assert out["label"] == "3" and out["image"].abs().max() <= 1.1  # MRI keeps tails slightly beyond +-1
    assert out["image"].applied_operations and out["ref"].applied_operations
    back = chain.inverse(out)
    np.testing.assert_allclose(back["image"].numpy(), physical.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(back["ref"].numpy(), physical.numpy() * 0.5, rtol=1e-4, atol=1e-3)

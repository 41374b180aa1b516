from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_synth.data.phantoms import generate_cohort
from monai_synth.data.samplers import PatientBatchSampler
from monai_synth.losses import SupervisedContrastiveLoss
from monai_synth.privacy.embedding import (
    VARIANTS,
    EmbeddingSpace,
    EmbeddingWeightsError,
    RandMosaic,
    RandPartialComposite,
    RandSpeckleNoise,
    _augment_batch,
    _hash_tensor_data,
    copy_augmentations,
    train_embedding,
)
from monai_synth.privacy.spaces import NonFiniteImageError, PrivacySpace, embed_variants, space_distance
from monai_synth.transforms.presets import intensity_transform

SIZE = 32
N_PATIENTS = 20
TRAIN_STUDIES = 2  # studies 0..1 train the embedding; study 2 is a new repeat study of the same patients


def _model_space(records, modality="us"):
    scale = intensity_transform(modality)
    images = torch.stack([torch.as_tensor(np.asarray(scale(r["image"]))) for r in records]).float()
    return images, [r["patient_id"] for r in records]


@pytest.fixture(scope="module")
def cohort():
    records = generate_cohort("us", N_PATIENTS, images_per_patient=TRAIN_STUDIES + 1, spatial_size=SIZE, seed=0)
    train = [r for r in records if r["study"] < TRAIN_STUDIES]
    repeat = [r for r in records if r["study"] >= TRAIN_STUDIES]
    unseen = generate_cohort("us", 40, images_per_patient=1, spatial_size=SIZE, seed=0, first_patient=1000)
    return {"train": _model_space(train), "repeat": _model_space(repeat), "unseen": _model_space(unseen)}


@pytest.fixture(scope="module")
def trained(cohort):
    """The default recipe, narrowed and shortened to ~10 s: enough to learn the invariances the tests check."""
    images, ids = cohort["train"]
    space = train_embedding(
        images, ids, spatial_dims=2, epochs=20, channels=(8, 16, 32, 64), seed=0, data_fingerprint="d1"
    )
    return space, space.embed(images), np.asarray(ids)


def _shift(x, dy, dx):
    """Move the image content by (dy, dx) pixels, edges replicated (no wrap-around)."""
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    h, w = x.shape[-2:]
    oy, ox = max(-dy, 0), max(-dx, 0)
    return padded[..., oy : oy + h, ox : ox + w]


def _rotate(x, degrees):
    """Rotate about the centre, the freed corners filled with the background (-1)."""
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def _crop_resize(x, fraction):
    h, w = x.shape[-2:]
    ch, cw = round(h * fraction), round(w * fraction)
    y0, x0 = (h - ch) // 3, (w - cw) // 2  # off-centre on purpose
    return F.interpolate(x[..., y0 : y0 + ch, x0 : x0 + cw], size=(h, w), mode="bilinear", align_corners=False)


def _blur(x, sigma):
    r = int(3 * sigma)
    k = torch.exp(-(torch.arange(-r, r + 1).float() ** 2) / (2 * sigma**2))
    k = k / k.sum()
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _noise(x, sd):
    return x + sd * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


# Copies that only training teaches: (alteration, top-1 re-identification each must reach among the 40 training
# images). Measured 0.15-0.2 above each bound. The same recipe without augmentations (augmentation_strength=0,
# max_shift=0) reaches 0.68 (shift), 0.33, 0.23, 0.40 and 0.25, and but for the shift its copies lie farther from
# their source than unseen patients' images lie from the training set.
LEARNED = {
    "shift 4 px": (lambda x: _shift(x, 2, 4), 0.7),
    "rotation 15 deg": (lambda x: _rotate(x, 15), 0.55),
    "crop 80% + resize": (lambda x: _crop_resize(x, 0.8), 0.5),
    "blur sigma 1 px": (lambda x: _blur(x, 1.0), 0.6),
    "noise sd 0.3": (lambda x: _noise(x, 0.3), 0.45),
}


def _nearest(space, train_vec, queries):
    """Row of the nearest training image and its distance, minimum over the query variants (as the index does)."""
    vec = embed_variants(space, queries)
    d = (1.0 - np.einsum("qvd,nd->qvn", vec, train_vec)).min(axis=1)
    return d.argmin(axis=1), d.min(axis=1), d


def test_is_a_privacy_space(trained):
    space, train_vec, _ = trained
    assert isinstance(space, PrivacySpace) and space.name == "embedding"
    assert train_vec.dtype == np.float32 and train_vec.shape[1] == space.dim == 128
    np.testing.assert_allclose(np.linalg.norm(train_vec, axis=1), 1.0, atol=1e-5)
    assert space.variants == VARIANTS and space.n_variants == 1 + 15 + 8 + 4  # plain, D4 x sign, shifts, tiles
    assert space.spatial_size == (SIZE, SIZE) and space.config["input_norm"] == "rank"


@pytest.mark.parametrize("kind", list(LEARNED))
def test_learned_copies_are_reidentified_and_nearer_than_unseen_patients(trained, cohort, kind):
    space, train_vec, _ = trained
    images, _ = cohort["train"]
    make, min_top1 = LEARNED[kind]
    nearest, _, d = _nearest(space, train_vec, make(images))
    top1 = float(np.mean(nearest == np.arange(len(images))))
    own = np.median(d[np.arange(len(images)), np.arange(len(images))])
    unseen = np.median(_nearest(space, train_vec, cohort["unseen"][0])[1])
    print(f"{kind}: top-1 {top1:.3f}, median distance to source {own:.4f}, unseen patients' median {unseen:.4f}")
    assert top1 >= min_top1, f"{kind}: top-1 {top1:.3f}"
    assert own < unseen, f"{kind}: copies at {own:.4f} from their source, unseen patients at {unseen:.4f}"


@pytest.mark.parametrize(
    "kind, make",
    [
        ("transpose", lambda x: x.transpose(-1, -2)),
        ("rot90", lambda x: torch.rot90(x, 1, (-2, -1))),
        ("mirror", lambda x: torch.flip(x, dims=[-1])),
        ("inversion", lambda x: -x),
        ("inverted rot270", lambda x: -torch.rot90(x, 3, (-2, -1))),
        ("gamma 2", lambda x: ((x + 1) / 2) ** 2 * 2 - 1),
        ("gamma 0.5", lambda x: ((x + 1) / 2).sqrt() * 2 - 1),
    ],
)
def test_symmetric_inverted_and_contrast_copies_are_exact_matches(trained, cohort, kind, make):
    """Quarter turns, mirrors and inversion are undone by query variants, monotone contrast by the input ranking."""
    space, train_vec, _ = trained
    images, _ = cohort["train"]
    nearest, dist, _ = _nearest(space, train_vec, make(images))
    np.testing.assert_array_equal(nearest, np.arange(len(images)))
    assert dist.max() < 5e-3, dist.max()


def test_mosaic_tile_is_matched_by_the_tile_variants(trained, cohort):
    space, train_vec, _ = trained
    images, _ = cohort["train"]
    fillers = F.interpolate(cohort["unseen"][0][: len(images)], size=(SIZE // 2, SIZE // 2), mode="area")
    tile = F.interpolate(images, size=(SIZE // 2, SIZE // 2), mode="area")
    mosaic = torch.cat([torch.cat([fillers, tile], -1), torch.cat([fillers.flip(0), fillers], -1)], -2)
    nearest, dist, _ = _nearest(space, train_vec, mosaic)
    plain = space_distance(space.embed(mosaic), train_vec)[np.arange(len(images)), np.arange(len(images))]
    print(f"mosaic tiles: top-1 {np.mean(nearest == np.arange(len(images))):.3f}, median {np.median(dist):.4f}")
    assert np.mean(nearest == np.arange(len(images))) >= 0.75
    assert np.median(dist) < 0.25 * np.median(plain)


def test_reidentifies_new_studies_of_training_patients(trained, cohort):
    space, train_vec, train_ids = trained
    images, ids = cohort["repeat"]
    nearest = space_distance(space.embed(images), train_vec).argmin(axis=1)
    top1 = float(np.mean(train_ids[nearest] == np.asarray(ids)))
    print(f"re-identification of new studies: top-1 {top1:.3f}")
    assert top1 >= 0.8  # chance is 1/20: a new scan (other pose, noise, calibration) of a training patient


def test_embed_is_deterministic_batch_independent_and_resamples(trained, cohort):
    space, train_vec, _ = trained
    images, _ = cohort["train"]
    np.testing.assert_allclose(space.embed(images[3:4]), train_vec[3:4], atol=1e-5)
    np.testing.assert_array_equal(space.embed(images.numpy()[:5]), space.embed(images[:5]))
    big = F.interpolate(images[:6], scale_factor=2, mode="bilinear", align_corners=False)
    d = np.diag(space_distance(space.embed(big), train_vec[:6]))
    assert d.max() < 0.05, d
    assert space.embed(images[:0]).shape == (0, 128)


def test_variants_are_batch_independent_and_start_with_the_plain_query(trained, cohort):
    space, _, _ = trained
    images, _ = cohort["train"]
    together = space.embed_variants(images[:5])
    assert together.shape == (5, space.n_variants, space.dim)
    np.testing.assert_array_equal(together[:, 0], space.embed(images[:5]))
    np.testing.assert_allclose(space.embed_variants(images[2:3]), together[2:3], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=2), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def quick():
    """A briefly trained space on a tiny cohort: enough for tests of the plumbing, not of re-identification."""
    images, ids = _tiny_cohort()
    space = train_embedding(
        images,
        ids,
        spatial_dims=2,
        epochs=1,
        batch_size=8,
        views_per_patient=2,
        views_per_image=2,
        channels=(8, 16),
        out_dim=8,
        data_fingerprint="d1",
    )
    return space, images


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_raise(quick, bad):
    space, images = quick
    images = images[:3].clone()
    images[1, 0, 5, 5] = bad
    with pytest.raises(NonFiniteImageError, match=r"\[1\]"):
        space.embed(images)
    assert issubclass(NonFiniteImageError, ValueError)


def test_embed_rejects_wrong_shapes(quick):
    space, _ = quick
    with pytest.raises(ValueError, match="spatial_dims=2"):
        space.embed(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="channel"):
        space.embed(torch.zeros(1, 2, 8, 8))


def test_save_load_round_trip(quick, tmp_path):
    space, images = quick
    path = space.save(tmp_path / "sub" / "embedding.pt")
    assert os.listdir(path.parent) == ["embedding.pt"]  # no temporary file left behind
    loaded = EmbeddingSpace.from_weights(path, expected_data_fingerprint="d1")
    assert loaded.fingerprint() == space.fingerprint()
    assert loaded.spatial_size == (16, 16) and loaded.training["n_patients"] == 6
    assert loaded.variants == space.variants == VARIANTS and loaded.variant_shift == space.variant_shift
    np.testing.assert_array_equal(loaded.embed_variants(images), space.embed_variants(images))


def test_variants_are_configured_persisted_and_fingerprinted(quick, tmp_path):
    space, images = quick
    plain = EmbeddingSpace(space.network, space.spatial_size, "d1", space.config)
    assert plain.variants == () and plain.n_variants == 1
    np.testing.assert_array_equal(plain.embed_variants(images), plain.embed(images)[:, None])
    flips = EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, variants=["invert", "flip"])
    assert flips.variants == ("flip", "invert") and flips.n_variants == 8  # 4 flip combinations x 2 signs
    fingerprints = {s.fingerprint() for s in (plain, flips, space)}
    assert len(fingerprints) == 3
    shifted = EmbeddingSpace(
        space.network, space.spatial_size, "d1", space.config, variants=VARIANTS, variant_shift=0.2
    )
    assert shifted.fingerprint() != space.fingerprint()
    loaded = EmbeddingSpace.from_weights(flips.save(tmp_path / "flips.pt"), variants=())
    assert loaded.variants == () and loaded.fingerprint() == plain.fingerprint()
    with pytest.raises(ValueError, match="unknown query variants"):
        EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, variants=["rotate"])
    with pytest.raises(ValueError, match="variant_shift"):
        EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, variants=["shift"], variant_shift=0.0)


def test_shift_and_tile_variants_undo_their_alteration(quick):
    """Variant k of an altered image is the plain query of the original, up to the edges the alteration lost."""
    space, images = quick
    x = images[:4]
    flat = EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, variants=["shift", "tile"])
    variants = flat._variants(x)  # (B, V - 1, C, H, W): 8 shifts, then 4 tiles
    step = round(0.1 * 16)
    moved = _shift(x, step, -step)  # content down and to the left: the variant moving it back is (-s, +s)
    back = flat._variants(moved)[:, flat._shifts().index((-step, step))]
    torch.testing.assert_close(back[..., step:-step, step:-step], x[..., step:-step, step:-step])
    tiles = flat._variants(F.interpolate(x, scale_factor=0.5, mode="nearest").repeat(1, 1, 2, 2))[:, 8:]
    torch.testing.assert_close(
        tiles[:, 3],
        F.interpolate(
            F.interpolate(x, scale_factor=0.5, mode="nearest"), size=(16, 16), mode="bilinear", align_corners=False
        ),
    )
    assert variants.shape == (4, 12, 1, 16, 16)


def test_zoom_variants_are_configured_persisted_and_fingerprinted(quick, tmp_path):
    space, images = quick
    plain = EmbeddingSpace(space.network, space.spatial_size, "d1", space.config)
    zoomed = EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, zooms=(0.95, 1.0, 0.9, 0.9))
    assert zoomed.zooms == (1.0, 0.9, 0.95)  # identity first, duplicates dropped
    vec = zoomed.embed_variants(images)
    assert vec.shape == (len(images), 3, 8)
    np.testing.assert_array_equal(vec[:, 0], plain.embed(images))
    assert np.abs(vec[:, 1] - vec[:, 0]).max() > 1e-3  # the zoomed queries are other images
    assert zoomed.fingerprint() != plain.fingerprint()
    loaded = EmbeddingSpace.from_weights(zoomed.save(tmp_path / "zoomed.pt"), expected_data_fingerprint="d1")
    assert loaded.zooms == zoomed.zooms and loaded.fingerprint() == zoomed.fingerprint()
    np.testing.assert_array_equal(loaded.embed_variants(images), vec)
    assert EmbeddingSpace.from_weights(tmp_path / "zoomed.pt", zooms=(1.0,)).fingerprint() == plain.fingerprint()
    with pytest.raises(ValueError, match="zooms"):
        EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, zooms=(0.1,))


def test_version_1_weights_still_load_with_their_fingerprint(quick, tmp_path):
    """Weights written before query variants and input ranking existed: no variants, the old config, version 1."""
    from monai_synth.networks.embedding import PatientEmbeddingNet

    _, images = quick
    config = {"spatial_dims": 2, "in_channels": 1, "channels": [8, 16], "out_dim": 8, "num_res_units": 2}
    old = EmbeddingSpace(PatientEmbeddingNet(**config), (16, 16), "d1", config)
    old._format_version = 1
    payload = torch.load(old.save(tmp_path / "v1.pt"), weights_only=True)
    assert payload["version"] == 1
    for key in ("variants", "variant_shift", "zooms"):  # keys version 1 did not write
        del payload[key]
    torch.save(payload, tmp_path / "v1.pt")
    loaded = EmbeddingSpace.from_weights(tmp_path / "v1.pt", expected_data_fingerprint="d1")
    assert loaded.fingerprint() == payload["fingerprint"] and loaded.variants == () and loaded.zooms == (1.0,)
    np.testing.assert_array_equal(loaded.embed(images), old.embed(images))


def test_fingerprint_tracks_data_and_weights(quick):
    space, _ = quick
    same = EmbeddingSpace(space.network, space.spatial_size, "d1", space.config, variants=space.variants)
    other_data = EmbeddingSpace(space.network, space.spatial_size, "d2", space.config, variants=space.variants)
    assert same.fingerprint() == space.fingerprint()
    assert other_data.fingerprint() != space.fingerprint()
    net = copy.deepcopy(space.network)
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    changed = EmbeddingSpace(net, space.spatial_size, "d1", space.config, variants=space.variants)
    assert changed.fingerprint() != space.fingerprint()


def test_refuses_mismatched_missing_corrupt_modified_or_future_weights(quick, tmp_path):
    space, _ = quick
    path = space.save(tmp_path / "embedding.pt")
    with pytest.raises(EmbeddingWeightsError, match="Leave the weights out.*train-embedding --train"):
        EmbeddingSpace.from_weights(path, expected_data_fingerprint="another-datalist")
    with pytest.raises(FileNotFoundError, match="train-embedding"):
        EmbeddingSpace.from_weights(tmp_path / "missing.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EmbeddingWeightsError, match="corrupt"):
        EmbeddingSpace.from_weights(truncated)

    payload = torch.load(path, weights_only=True)
    tampered = dict(
        payload, state_dict={k: v + 1e-3 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    )
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(EmbeddingWeightsError, match="stored fingerprint"):
        EmbeddingSpace.from_weights(tmp_path / "tampered.pt")

    torch.save(dict(payload, variants=["flip"]), tmp_path / "relabelled.pt")  # same weights, other variants
    with pytest.raises(EmbeddingWeightsError, match="stored fingerprint"):
        EmbeddingSpace.from_weights(tmp_path / "relabelled.pt")

    torch.save(dict(payload, version=99), tmp_path / "future.pt")
    with pytest.raises(EmbeddingWeightsError, match=r"version 99; this version of monai_synth reads versions 1, 2"):
        EmbeddingSpace.from_weights(tmp_path / "future.pt")

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(EmbeddingWeightsError, match="not a monai_synth embedding"):
        EmbeddingSpace.from_weights(foreign)


def _tiny_cohort(n_patients=6, per_patient=2, size=16, spatial_dims=2):
    modality = "us" if spatial_dims == 2 else "ct"
    records = generate_cohort(modality, n_patients, per_patient, spatial_dims=spatial_dims, spatial_size=size, seed=3)
    return _model_space(records, modality)


TINY = {"spatial_dims": 2, "epochs": 1, "batch_size": 8, "views_per_patient": 2, "views_per_image": 2}


def test_training_is_deterministic_from_seed():
    images, ids = _tiny_cohort()
    kw = {**TINY, "channels": (8, 16), "out_dim": 8}
    a = train_embedding(images, ids, seed=5, **kw)
    b = train_embedding(images, ids, seed=5, **kw)
    c = train_embedding(images, ids, seed=6, **kw)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    # the default data fingerprint is a hash of the images and ids the weights saw
    assert a.data_fingerprint == c.data_fingerprint == _hash_tensor_data(images, ids)
    assert _hash_tensor_data(images, ids[::-1]) != a.data_fingerprint
    assert _hash_tensor_data(images + 1e-3, ids) != a.data_fingerprint
    assert len(a.training["loss_history"]) == 1 and np.isfinite(a.training["loss_history"]).all()


def test_training_logs_every_epoch(caplog):
    images, ids = _tiny_cohort()
    with caplog.at_level(logging.INFO, logger="monai_synth.privacy.embedding"):
        space = train_embedding(images, ids, **{**TINY, "epochs": 3}, channels=(8, 16), out_dim=8)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedding epoch")]
    assert [m.split(":")[0] for m in epochs] == [f"embedding epoch {e}/3" for e in (1, 2, 3)]
    assert space.training["steps"] == 3 * math.ceil(2 * len(images) / 8)


def test_training_resamples_to_the_working_size():
    images, ids = _tiny_cohort(size=32)
    space = train_embedding(images, ids, **TINY, channels=(8, 16), out_dim=8, working_size=16)
    assert space.spatial_size == (16, 16) and space.training["input_size"] == [32, 32]
    assert space.embed(images).shape == (len(images), 8)


def test_trains_and_embeds_3d():
    images, ids = _tiny_cohort(n_patients=3, per_patient=2, size=8, spatial_dims=3)
    space = train_embedding(images, ids, **{**TINY, "spatial_dims": 3, "batch_size": 6}, channels=(4, 8), out_dim=8)
    vec = space.embed_variants(images)
    # 48 axis permutations x flips, each with both signs, 26 shifts and 8 octant tiles
    assert space.n_variants == 1 + 95 + 26 + 8 and vec.shape == (6, space.n_variants, 8)
    assert space.spatial_size == (8, 8, 8)
    # volumes train with milder alterations by default: at full strength the network collapses in a CPU budget
    assert space.training["augmentation_strength"] == 0.3 and space.training["max_shift"] == 0.05
    np.testing.assert_allclose(np.linalg.norm(vec, axis=2), 1.0, atol=1e-5)
    # a copy turned a quarter about any axis and inverted is matched exactly by one of the variants
    turned = -torch.rot90(images, 1, (2, 4))
    d = 1.0 - np.einsum("qvd,qd->qv", space.embed_variants(turned), space.embed(images))
    assert d.min(axis=1).max() < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patient_ids": ["a"] * 5}, "one id per image"),
        ({"patient_ids": ["a"] * 6}, "at least 2 different patients"),
        ({"spatial_dims": 3}, "spatial_dims=3"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 3}, "batch_size"),
        ({"views_per_image": 0}, "views_per_image"),
        ({"channels": (4, 8, 16, 32, 64)}, "too small"),
        ({"working_size": 2, "channels": (4, 8, 16)}, "too small"),
        ({"working_size": (8,)}, "working_size"),
        ({"variants": ["shift", "rotate"]}, "unknown query variants"),
        ({"patient_weight": -1.0}, "patient_weight"),
        ({"augment_group": 0}, "augment_group"),
    ],
)
def test_training_argument_errors(kwargs, match):
    images = torch.zeros(6, 1, 8, 8)
    args = {"patient_ids": ["a", "a", "b", "b", "c", "c"], "spatial_dims": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_embedding(images, **args)


def test_training_refuses_non_finite_images():
    images = torch.zeros(4, 1, 8, 8)
    images[2, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteImageError):
        train_embedding(images, ["a", "a", "b", "b"], spatial_dims=2)


@pytest.mark.parametrize("size", [(16, 16), (8, 8, 8)])
def test_copy_augmentations_keep_the_shape_and_follow_the_seed(size):
    pool = torch.rand(5, 1, *size) * 2 - 1
    augment = copy_augmentations(size, pool=pool)
    outs = []
    for _ in range(2):
        augment.set_random_state(seed=3)
        outs.append(torch.stack([torch.as_tensor(augment(pool[i % 5])) for i in range(20)]))
    assert outs[0].shape == (20, 1, *size) and torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])
    assert (outs[0] != pool[torch.arange(20) % 5]).any(dim=tuple(range(1, 2 + len(size)))).sum() >= 15


def test_copy_augmentations_skip_what_the_variants_undo():
    names = lambda c: {type(t).__name__ for t in c.transforms}  # noqa: E731
    full = names(copy_augmentations((16, 16), pool=torch.zeros(2, 1, 16, 16)))
    assert {"RandFlip", "RandRotate90", "RandInvertIntensity", "RandPartialComposite", "RandMosaic"} <= full
    skipped = names(copy_augmentations((16, 16), skip=("flip", "transpose", "invert")))  # and no pool: no composites
    assert not skipped & {"RandFlip", "RandRotate90", "RandInvertIntensity", "RandPartialComposite", "RandMosaic"}
    with pytest.raises(ValueError, match="skip"):
        copy_augmentations((16, 16), skip=("shift",))


def test_partial_composite_keeps_one_side_of_the_image():
    image, other = torch.full((1, 8, 8), 0.5), torch.full((1, 1, 8, 8), -0.5)
    composite = RandPartialComposite(other, prob=1.0, min_keep=0.5, max_keep=0.5)
    composite.set_random_state(seed=0)
    for _ in range(10):
        out = composite(image)
        assert (out == 0.5).sum() == 32 and (out == -0.5).sum() == 32
        kept = (out == 0.5)[0]
        assert kept.all(dim=0).sum() == 4 or kept.all(dim=1).sum() == 4  # a whole side, not a patch


def test_mosaic_shrinks_the_image_into_one_tile():
    image = torch.arange(64.0).reshape(1, 8, 8) / 64
    mosaic = RandMosaic(torch.full((3, 1, 8, 8), -0.5), prob=1.0)
    mosaic.set_random_state(seed=1)
    out = mosaic(image)
    small = F.avg_pool2d(image[None], 2)[0]
    tiles = [out[:, a : a + 4, b : b + 4] for a in (0, 4) for b in (0, 4)]
    assert sum(torch.equal(t, small) for t in tiles) == 1
    assert sum(bool((t == -0.5).all()) for t in tiles) == 3


def test_speckle_scales_with_the_signal_and_spares_the_background():
    image = torch.full((1, 8, 8), -1.0)
    image[0, 2:6, 2:6] = 0.0
    image[0, 0, 0] = 1.0  # the bright end of the range, which the noise is clipped to
    speckle = RandSpeckleNoise(prob=1.0, std=0.5)
    speckle.set_random_state(seed=0)
    out = speckle(image)
    assert torch.equal(out[image == -1.0], image[image == -1.0])
    assert (out[image == 0.0] != 0.0).all()


def test_speckle_is_clipped_to_the_image_range_as_a_stored_copy_is():
    image = torch.linspace(-1.0, 1.0, 256).reshape(1, 16, 16)
    speckle = RandSpeckleNoise(prob=1.0, std=0.7)
    speckle.set_random_state(seed=0)
    out = speckle(image)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert int((out == 1.0).sum()) > 5  # bright echoes saturate, as in an 8-bit copy


def test_copy_augmentations_reach_the_speckle_a_person_still_calls_the_same_image():
    # a copy with speckle of sd 0.5 passed the gate 14 times out of 20: the training views must reach that strength
    from monai_synth.privacy.embedding import copy_augmentations

    found = [t for t in copy_augmentations((32, 32)).transforms if isinstance(t, RandSpeckleNoise)]
    assert len(found) == 1 and found[0].std >= 0.6 and found[0].prob >= 0.2


def test_augment_batch_groups_views_of_different_patients():
    """A group shares one draw of the geometry: with a flip-only pipeline, a group's members flip together."""
    from monai.transforms import Compose, RandFlip

    images = torch.arange(8 * 16.0).reshape(8, 1, 4, 4)
    augment = Compose([RandFlip(prob=0.5, spatial_axis=0)])
    augment.set_random_state(seed=0)
    out = _augment_batch(augment, images, list(range(8)), group=4)
    flipped = [bool(torch.equal(out[i], images[i].flip(1))) for i in range(8)]
    assert all(torch.equal(out[i], images[i]) or flipped[i] for i in range(8))
    assert flipped[0::2] == [flipped[0]] * 4 and flipped[1::2] == [flipped[1]] * 4  # groups take every 2nd index


def test_supcon_matches_its_definition():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(7, 5), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # patients 2 and 3 have no positive: not anchors
    t = 0.2
    expected = []
    for i in range(7):
        pos = [j for j in range(7) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / t) for a in range(7) if a != i)
        expected.append(-sum(torch.log(torch.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos))
    torch.testing.assert_close(SupervisedContrastiveLoss(t)(z, labels), torch.stack(expected).mean())


def test_supcon_prefers_clustered_identities():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clustered = F.one_hot(labels, 4).float()
    mixed = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 4).float()
    loss = SupervisedContrastiveLoss(0.1)
    assert loss(clustered, labels) < loss(mixed, labels)
    assert loss(clustered, torch.arange(6)) == 0  # no positives at all: nothing to learn
    with pytest.raises(ValueError, match="temperature"):
        SupervisedContrastiveLoss(0.0)


def test_patient_batch_sampler_groups_views_of_each_patient():
    ids = [f"P{p}" for p in range(5) for _ in range(3)] + ["P5"]  # P5 has a single image
    sampler = PatientBatchSampler(ids, patients_per_batch=2, views_per_patient=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    seen = set()
    for batch in batches:
        assert len(batch) == 8
        groups = [batch[i : i + 4] for i in range(0, 8, 4)]
        patients = [{ids[i] for i in g} for g in groups]
        assert all(len(p) == 1 for p in patients) and patients[0] != patients[1]
        for g in groups:
            seen |= {ids[i] for i in g}
            if ids[g[0]] != "P5":
                assert len(set(g)) == 3  # every repeat study of the patient is used
    assert seen == set(ids)
    assert batches == list(sampler)
    sampler.set_epoch(1)
    assert batches != list(sampler)
    with pytest.raises(ValueError, match="at least 2 patients"):
        PatientBatchSampler(["a", "a"], 2)

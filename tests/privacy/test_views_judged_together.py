"""A release's intensity views of one image are judged together, as the calibration measures them.

A release judges every image in two views (the model's intensity range and the image's own robust range). The
calibration searched both views' variants as one image's, but the safeguard judged each view as an image of its own
and refused the image when either view failed: for the thresholds that is the same thing (the least distance over the
views), for the specificity and consensus tests it is not. Judged one by one, an image has two chances to look
specific or to name one patient in many spaces, so those tests refused more new patients' images than their
calibrated share, and calibrated per view instead they lose power (PET slices warped by 4 px, consensus per view 10 of
13 spaces: 6 of 10 released; over both views 9 of 13: 4 of 10).
"""

from __future__ import annotations

import numpy as np
import torch

from monai_synth.privacy import safeguard as safeguard_module
from monai_synth.privacy.partial import PartSpace
from monai_synth.privacy.ranks import RankSpace
from monai_synth.privacy.release import ReleaseEncoder
from monai_synth.privacy.safeguard import PrivacySafeguard, agreeing_spaces, build_safeguard
from monai_synth.privacy.spaces import PixelSpace, embed_variants
from tests.privacy.test_cross_patient import _us_split

SPACES = [PixelSpace(grid=16), RankSpace(grid=16), PartSpace(grid=16, kind="crops"), PartSpace(grid=16)]


def _views(image: torch.Tensor) -> list[torch.Tensor]:
    """Two views that differ as a release's do: the image, and its own robust range stretched onto the model's."""
    low, high = torch.quantile(image, 0.05), torch.quantile(image, 0.95)
    return [image, ((image - low) / (high - low + 1e-6) * 2 - 1).clamp(-1, 1)]


def _captured(monkeypatch, names):
    seen = {}
    for name in names:
        fn = getattr(safeguard_module, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            seen[_name] = _fn(*args, **kwargs)
            return seen[_name]

        monkeypatch.setattr(safeguard_module, name, wrapped)
    return seen


def test_the_judge_measures_each_image_over_its_views_as_the_calibration_does(monkeypatch):
    train, ids, holdout, holdout_ids, _ = _us_split(40, 34, 1, 1, seed=6)
    seen = _captured(monkeypatch, ["_calibration_chances", "_calibration_patients_per_space"])
    gate = build_safeguard(SPACES, train, ids, holdout, holdout_ids, "dl", views=_views, batch_size=32)
    n, names = len(holdout), list(gate.indexes)
    chances, patients = seen["_calibration_chances"][:n], seen["_calibration_patients_per_space"][:n]
    judged = gate.check([_views(image) for image in holdout])
    assert len(judged) == n
    for i, result in enumerate(judged):
        assert [result.nearest_patients[name] for name in names] == list(patients[i])  # the nearest view's patient
        for s, name in enumerate(names):
            exact = gate._exact_chance(name, _views(holdout[i]))
            np.testing.assert_allclose(exact, chances[i, s], rtol=1e-4, atol=1e-9)
        specific = "much closer to one training patient" in (result.reason or "")
        assert specific == any(
            chances[i, s] < gate.specificity and result.distances[name] >= gate.thresholds[name] + gate.margin
            for s, name in enumerate(names)
        )
    # the views one by one: some image's more specific view, or its view naming one patient in more spaces, differs
    # from what the calibration measured for it
    alone = [gate.check(torch.stack([_views(image)[w] for image in holdout])) for w in range(2)]
    agree_alone = np.array([[agreeing_spaces(r.nearest_patients.values()) for r in view] for view in alone]).max(0)
    agree_together = np.array([agreeing_spaces(r.nearest_patients.values()) for r in judged])
    assert (agree_alone >= agree_together).all() and (agree_alone > agree_together).any()


def test_the_bound_clears_an_image_only_where_the_exact_test_over_its_views_would(monkeypatch):
    # the nearest view's second-patient bound clears most images; those it clears must pass the exact test too
    train, ids, holdout, holdout_ids, new = _us_split(30, 40, 40, 1, seed=1)
    gate = build_safeguard(SPACES[:2], train, ids, holdout, holdout_ids, "dl", views=_views, batch_size=32)
    checks = [(gate.indexes[n], gate.calibrations[n]) for n in gate.indexes]
    strict = PrivacySafeguard(checks, batch_size=32, specificity=0.2)  # a high level: many images to search exactly
    exact_calls = []
    original = strict._exact_chance

    def counted(name, views):
        exact_calls.append(name)
        return original(name, views)

    monkeypatch.setattr(strict, "_exact_chance", counted)
    copies = train[:20] + 0.3 * torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images = torch.cat([new, copies])
    judged = strict.check([_views(image) for image in images])
    assert 0 < len(exact_calls) < len(images) * len(gate.indexes)
    for image, result in zip(images, judged):
        for name in gate.indexes:
            if result.distances[name] < strict.thresholds[name] + strict.margin:
                continue
            refused = f"much closer to one training patient than to any other in {name} space" in (result.reason or "")
            assert refused == (original(name, _views(image)) < strict.specificity)
    assert any("much closer" in (r.reason or "") for r in judged[len(new) :])


def test_a_release_judges_each_image_once_over_its_views():
    train, ids, holdout, holdout_ids, _ = _us_split(30, 40, 1, 1, seed=2)
    encoder = ReleaseEncoder("png", "us")
    gate = build_safeguard(SPACES[:2], train, ids, holdout, holdout_ids, "dl", views=encoder.model_views, batch_size=32)
    stored = [encoder.store_generated(image) for image in torch.cat([holdout[:6], train[:2]])]
    results = encoder.judge(gate, stored)
    assert len(results) == len(stored)
    assert [r.passed for r in results[-2:]] == [False, False]  # the training images themselves
    for array, result in zip(stored, results):
        views = encoder.views(array)
        for name, index in gate.indexes.items():
            least = min(index.nearest(embed_variants(index.space, v[None]))[0][0, 0] for v in views)
            assert result.distances[name] == least
    bad = np.full_like(stored[0], np.nan)
    refused = gate.check([[torch.as_tensor(stored[0]), torch.as_tensor(bad)]])[0]
    assert not refused.passed and "NaN" in refused.reason  # one bad view refuses the image
    assert not gate.check([[]])[0].passed

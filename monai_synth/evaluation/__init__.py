"""Evaluation of a synthetic dataset, one concern per module, all written into one report per release.

* :mod:`~monai_synth.evaluation.features`: the stated feature spaces fidelity is measured in;
* :mod:`~monai_synth.evaluation.fidelity`: FID, KID, precision/recall/density/coverage, MMD, MS-SSIM diversity,
  each next to the train-vs-holdout floor;
* :mod:`~monai_synth.evaluation.utility`: classifiers trained on synthetic / real / half-replaced data, tested on
  the holdout, with patient-level intervals and paired tests;
* :mod:`~monai_synth.evaluation.restoration`: denoising / super-resolution networks trained on synthetic vs real
  images, with a paired equivalence test;
* :mod:`~monai_synth.evaluation.privacy`: a privacy audit independent of the safeguard (its own networks and spaces);
* :mod:`~monai_synth.evaluation.membership`: membership inference against the diffusion checkpoints (loss, PIA,
  SecMI), at patient level;
* :mod:`~monai_synth.evaluation.report`: ``report.json`` + ``report.html`` (and a private report), ``monai-synth
  evaluate`` and the bundle's ``evaluate.yaml``.

Modules are imported where used: they pull in torchmetrics, prdc, scikit-learn and pytorch-metric-learning (the
``eval`` extra, with statsmodels for the equivalence test).
"""

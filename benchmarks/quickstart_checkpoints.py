"""How real and class-faithful a finished quickstart's checkpoints are, more precisely than one release shows.

One release is 100 images, and its realism score (``benchmarks/quickstart_quality.py``) moves by about 0.03 from one
set of samples to the next, the size of the differences between recipes. This script samples ``--sets`` disjoint sets
of 20 images per class from the quickstart's checkpoints (unguarded, with the release's sampling settings), scores
each set exactly as a release is scored (real-vs-synthetic, 5-fold, balanced, against the same real phantoms of new
patients) and prints the mean and its standard error, with the class ratio of all of them together. Ranking recipes
still needs several training seeds: the spread between seeds is larger than this error.

    python benchmarks/quickstart_checkpoints.py --output-dir quickstart_output [--sets 4] \
        [--set seed=1 --set decoder_noise=fitted]     # the --overrides#... the quickstart ran with, if any
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import quickstart_quality as quality
import torch
import yaml

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "breast_us_ldit"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="a finished quickstart's folder (models/, latents/)")
    parser.add_argument("--sets", type=int, default=4, help="disjoint sets of samples")
    parser.add_argument("--per-set", type=int, default=20, help="samples per class in a set (a release: 20)")
    parser.add_argument("--classifier-per-class", type=int, default=80, help="real images per class the class CNNs see")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an override the quickstart ran with"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.sets < 1 or args.per_set < 1:
        parser.error("--sets and --per-set must be at least 1")
    torch.set_num_threads(args.threads)

    from monai.bundle import ConfigParser, ConfigWorkflow

    from monai_synth.workflows.stages import stage_config_files

    overrides = dict(ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))["overrides"])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    overrides.update(output_dir=str(Path(args.output_dir).absolute()), dataset_dir=None)
    t0 = time.time()
    workflow = ConfigWorkflow(
        config_file=stage_config_files(BUNDLE, "sample"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="inference",
        bundle_root=str(BUNDLE),
        **overrides,
    )
    workflow.initialize()  # runs the stage's setup: both checkpoints loaded, checked against this run's split
    sampler = workflow.parser.get_parsed_content("sampler")  # the release's own sampler and settings, unguarded
    per_set = args.per_set
    n = per_set * args.sets
    images = torch.cat([sampler(n, seed=1000 + c, condition=c) for c in range(len(quality.LABELS))])
    images = torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # stored as 8-bit grey levels, as released
    labels = torch.arange(len(quality.LABELS)).repeat_interleave(n)
    size = images.shape[-1]
    x_real, y_real = quality.real_cohort(per_set, size, "realism")
    scores = []
    for k in range(args.sets):
        pick = torch.cat(
            [torch.arange(c * n + k * per_set, c * n + (k + 1) * per_set) for c in range(len(quality.LABELS))]
        )
        scores.append(quality.realism_accuracy(images[pick], labels[pick], x_real, y_real))
    ratio = quality.class_scores(images, labels, size, per_class=args.classifier_per_class)["ratio"]
    mean, error = (
        float(np.mean(scores)),
        float(np.std(scores, ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0,
    )
    print(
        f"{args.output_dir}: realism {mean:.3f} +- {error:.3f} over {args.sets} sets of {per_set} per class "
        f"({', '.join(f'{s:.3f}' for s in scores)}); class ratio {ratio:.3f} ({time.time() - t0:.0f} s)"
    )
    result = {"realism_accuracy": mean, "realism_error": error, "realism_sets": scores, "class_ratio": ratio}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

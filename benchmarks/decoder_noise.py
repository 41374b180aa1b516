"""What the Laplace decoder's drawn noise alone is worth: drawn reconstructions of new patients vs real phantoms.

Real phantoms of new patients are encoded (``z_mu``) and decoded by a finished quickstart's autoencoder with noise
drawn, then told from other real phantoms by the realism measure of ``benchmarks/quickstart_quality.py`` (stored as
8-bit grey levels, 5-fold, balanced). Generated images follow this floor within about 0.02 (``docs/benchmarks.md``),
so it ranks decoder noise models without training a DiT. Each noise model is measured on the same weights:

- ``white``: independent standard Laplace per pixel (``decoder_noise: white``);
- ``fitted``: the training residuals' correlation and marginal (``decoder_noise: fitted``), fitted here on the
  quickstart's training split (or read from the checkpoint when stage 1 fitted it; ``--refit`` fits again).

    python benchmarks/decoder_noise.py --output-dir quickstart_output [--kernel-sizes 3 7 15] [--quickstart-seed 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import quickstart_quality as quality
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "breast_us_ldit"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="a finished quickstart's folder (models/, phantom_cohort/)")
    parser.add_argument("--per-class", type=int, default=20, help="new patients' images per class (both sides)")
    parser.add_argument("--kernel-sizes", type=int, nargs="*", default=[7], help="colouring kernels to measure")
    parser.add_argument("--refit", action="store_true", help="fit the noise model again even if the checkpoint has one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn noise")
    parser.add_argument("--quickstart-seed", type=int, default=None, help="the quickstart's --overrides#seed, if set")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from monai.bundle import ConfigParser

    from monai_synth.configs import config_files

    overrides = dict(ConfigParser.load_config_file(str(BUNDLE / "configs" / "quickstart.yaml"))["overrides"])
    overrides.update(output_dir=str(Path(args.output_dir).absolute()), dataset_dir=None)
    if args.quickstart_seed is not None:  # the split depends on it: the checkpoint is checked against it
        overrides["seed"] = args.quickstart_seed
    config = ConfigParser()
    config.read_config(config_files(BUNDLE, "sample"))
    config.update({"bundle_root": str(BUNDLE), **overrides})
    size = int(config.get_parsed_content("spatial_size")[0])
    x_new, y_new = quality.real_cohort(args.per_class, size, "classifier_test")
    real = quality.real_cohort(args.per_class, size, "realism")

    config.get_parsed_content("load_autoencoder", lazy=False)  # the quickstart's weights (and fitted noise, if any)
    trained = config.get_parsed_content("autoencoder").eval()

    def autoencoder(noise: str, kernel_size: int):
        ae = copy.deepcopy(trained)
        ae.noise = noise
        if kernel_size != ae.noise_kernel.shape[-1]:  # another colouring kernel: to be fitted on the same weights
            shape = ae.noise_kernel.shape[:2] + (kernel_size,) * (ae.noise_kernel.ndim - 2)
            ae.register_buffer("noise_kernel", torch.zeros(shape))
            ae.noise_fitted.fill_(False)
        return ae

    results: dict[str, float] = {}
    runs = [("white", 7)] + [("fitted", k) for k in args.kernel_sizes]
    for noise, k in runs:
        t0 = time.time()
        ae = autoencoder(noise, k)
        name = noise if noise == "white" else f"fitted, kernel {k}"
        if noise == "fitted" and (args.refit or not bool(ae.noise_fitted) or ae.noise_kernel.shape[-1] != k):
            images = config.get_parsed_content("train_images", lazy=False)
            ae.fit_noise(torch.stack([item["image"] for item in images]).split(16))
            name += " (fitted here)"
        torch.manual_seed(args.seed)
        with torch.no_grad():
            drawn = ae.decode_stage_2_outputs(ae.encode(x_new)[0]).clamp(-1, 1)
        drawn = torch.round((drawn + 1) * 127.5).clamp(0, 255) / 127.5 - 1  # stored as the release stores them
        results[name] = quality.realism_accuracy(drawn, y_new, *real)
        print(f"{name:<40}drawn reconstructions vs real: {results[name]:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

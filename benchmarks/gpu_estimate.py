"""What a bundle's real (GPU) configs cost per training step, counted without a GPU.

The networks are built from the bundle's configs on PyTorch's ``meta`` device (no memory, no data), and one
training step at the configured batch size is traced: FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` and
activation memory as the bytes of every tensor autograd saves for the backward pass (``saved_tensors_hooks``).
Weights, gradients and Adam state add 16 bytes per parameter (fp32 master weights). Step time is the FLOP count
over an assumed sustained throughput (``--tflops``, default 200 TFLOP/s: about a quarter of an H100/H200's dense
bf16 peak, typical of 3D convolutions and small transformers); it is an estimate, not a measurement.

    python benchmarks/gpu_estimate.py --bundle bundles/ct_ldit                    # 3D, 128^3
    python benchmarks/gpu_estimate.py --bundle bundles/ct_ldit --spatial_dims 2   # 2D, 256^2
"""

from __future__ import annotations

import argparse
import json

import torch
from monai.bundle import ConfigParser
from torch.utils.flop_counter import FlopCounterMode

from monai_synth.configs import config_files


def _trace_step(fn) -> tuple[float, float]:
    """(FLOPs, bytes saved for backward) of ``fn()`` (forward, loss and backward on meta tensors)."""
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return float(counter.get_total_flops()), float(saved)


def _stage(bundle: str, stage: str, spatial_dims: int | None, checkpointing: bool) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(bundle, stage))
    # the bundle's GPU switch, taken as on a GPU (on a CPU it is off whatever the bundle says)
    parser.update({"bundle_root": bundle, "device": "cpu", "use_checkpointing": checkpointing})
    if spatial_dims is not None:
        parser["spatial_dims"] = spatial_dims
    return parser


def estimate(
    bundle: str, spatial_dims: int | None = None, checkpointing: bool = False, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Parameters, GFLOPs and memory of one training step of each network of ``bundle``'s configs."""
    ae_cfg = _stage(bundle, "autoencoder", spatial_dims, checkpointing)
    dit_cfg = _stage(bundle, "diffusion", spatial_dims, checkpointing)
    size, latent = list(ae_cfg.get_parsed_content("spatial_size")), list(dit_cfg.get_parsed_content("latent_shape"))
    ae_batch, dit_batch = (
        int(ae_cfg.get_parsed_content("ae_batch_size")),
        int(dit_cfg.get_parsed_content("dit_batch_size")),
    )
    num_classes = int(dit_cfg.get_parsed_content("num_classes"))
    out = {"bundle": bundle, "spatial_size": size, "latent_shape": latent, "dtype": str(dtype).split(".")[-1]}
    out["activation_checkpointing"] = checkpointing
    with torch.device("meta"):
        ae = ae_cfg.get_parsed_content("autoencoder_def").to(dtype)
        dit = dit_cfg.get_parsed_content("network_def").to(dtype)
        x = torch.randn(ae_batch, 1, *size, dtype=dtype)
        z = torch.randn(dit_batch, *latent, dtype=dtype)
        t = torch.rand(dit_batch, dtype=dtype)
        c = torch.zeros(dit_batch, num_classes, dtype=dtype)

        def ae_step():
            recon, mu, _ = ae(x)
            ((recon - x).abs().mean() + (mu**2).mean()).backward()

        def dit_step():
            ((dit(z, t, context=c) - z) ** 2).mean().backward()

        for name, net, step, batch in (("autoencoder", ae, ae_step, ae_batch), ("dit", dit, dit_step, dit_batch)):
            params = sum(p.numel() for p in net.parameters())
            flops, act = _trace_step(step)
            out[name] = {
                "batch": batch,
                "params_M": round(params / 1e6, 1),
                "gflops_per_step": round(flops / 1e9, 1),
                "activation_GB": round(act / 2**30, 2),
                "weights_grads_adam_GB": round(16 * params / 2**30, 2),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--spatial_dims", type=int, default=None, help="2 or 3 (default: the bundle's)")
    parser.add_argument("--checkpointing", action="store_true", help="with activation checkpointing of both networks")
    parser.add_argument("--tflops", type=float, default=200.0, help="assumed sustained TFLOP/s of the GPU")
    args = parser.parse_args(argv)
    result = estimate(args.bundle, args.spatial_dims, args.checkpointing)
    for name in ("autoencoder", "dit"):
        r = result[name]
        r["est_step_s"] = round(r["gflops_per_step"] / (args.tflops * 1e3), 3)
    result["assumed_tflops"] = args.tflops
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

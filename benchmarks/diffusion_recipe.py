"""What makes a small latent diffusion transformer learn the phantom breast-ultrasound classes on a CPU in minutes.

Trains the bundle's pieces (MONAI's AutoencoderKL, the DiffusionTransformer, the prepare-batch classes, the EMA
handler's decay rule and the LatentSampler) in plain loops, without the privacy safeguard, and scores unguarded
samples with the two measures of ``benchmarks/quickstart_quality.py``. Each option changes one thing of the recipe:

    python benchmarks/diffusion_recipe.py                                   # the quickstart recipe
    python benchmarks/diffusion_recipe.py --objective epsilon --sampler ddim --sample-steps 50
    python benchmarks/diffusion_recipe.py --sampling-speed                  # DDPM-1000 vs DDIM-50 vs RFlow-N

Autoencoders are cached under ``--cache`` by their options, so ablations of stage 2 reuse one stage 1.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from monai_synth.data.phantoms import generate_cohort
from monai_synth.engines.autoencoder import kl_divergence
from monai_synth.engines.diffusion import LatentDiffusionPrepareBatch, RectifiedFlowPrepareBatch
from monai_synth.engines.latents import compute_scale_factor
from monai_synth.engines.sampler import LatentSampler
from monai_synth.handlers.ema import EMAWeightsHandler
from monai_synth.networks import DiffusionTransformer, LaplaceAutoencoderKL
from monai_synth.networks.autoencoder import laplace_nll

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quickstart_quality as quality  # noqa: E402

LABELS = quality.LABELS


def cohort(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training cohort (the quickstart's: seed 0, patients 0..N) and 20 held-out images of other patients."""
    recs = generate_cohort("us", args.patients, args.images_per_patient, 2, args.size, seed=0)
    x = np.stack([np.clip(np.round(r["image"]), 0, 255) for r in recs]).astype(np.float32) / 127.5 - 1.0
    y = np.asarray([LABELS.index(r["label"]) for r in recs])
    held, _ = quality.real_cohort(4, args.size, "classifier_test")
    return torch.from_numpy(x), torch.from_numpy(y), held


def build_autoencoder(args) -> AutoencoderKL:
    cls = LaplaceAutoencoderKL if args.likelihood == "laplace" else AutoencoderKL
    return cls(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=args.ae_channels,
        latent_channels=args.latent_channels,
        num_res_blocks=1,
        norm_num_groups=min(8, args.ae_channels[0]),
        attention_levels=[False] * len(args.ae_channels),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def train_autoencoder(args, x: torch.Tensor, held: torch.Tensor) -> tuple[AutoencoderKL, dict]:
    key = [args.size, args.patients, args.images_per_patient, args.ae_channels, args.latent_channels,
           args.ae_epochs, args.ae_lr, args.kl_weight, args.ae_batch, args.likelihood]  # fmt: skip
    key = json.dumps(key + ([args.ae_schedule] if args.ae_schedule != "onecycle" else []))
    path = Path(args.cache) / f"ae_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    ae = build_autoencoder(args)
    if path.is_file():
        saved = torch.load(path)
        ae.load_state_dict(saved["weights"])
        return ae.eval(), saved["stats"]
    t0 = time.time()
    torch.manual_seed(0)
    opt = torch.optim.Adam(ae.parameters(), lr=args.ae_lr)
    steps = args.ae_epochs * math.ceil(len(x) / args.ae_batch)
    if args.ae_schedule == "onecycle":  # 10% warm-up, then a cosine to ~0
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.ae_lr, total_steps=steps, pct_start=0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    ae.train()
    for _ in range(args.ae_epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), args.ae_batch):
            xb = x[order[i : i + args.ae_batch]]
            if args.likelihood == "laplace":
                recon, z_mu, z_sigma, log_scale = ae(xb, return_log_scale=True)
                recon_loss = laplace_nll(recon, log_scale, xb)
            else:
                recon, z_mu, z_sigma = ae(xb)
                recon_loss = (recon - xb).abs().mean()
            loss = recon_loss + args.kl_weight * kl_divergence(z_mu, z_sigma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    ae.eval()
    with torch.no_grad():
        recon = ae.decode(ae.encode(held)[0]).clamp(-1, 1)
    psnr = float(PSNRMetric(max_val=2.0)(recon, held).mean())
    ssim = float(SSIMMetric(spatial_dims=2, data_range=2.0, win_size=7)(recon, held).mean())
    stats = {"ae_seconds": time.time() - t0, "psnr": psnr, "ssim": ssim}
    if args.likelihood == "laplace":  # what the decoder's drawn noise alone is worth: drawn reconstructions vs real
        x_new, y_new = quality.real_cohort(args.n_per_class, args.size, "classifier_test")
        torch.manual_seed(0)
        with torch.no_grad():
            drawn = ae.decode_stage_2_outputs(ae.encode(x_new)[0]).clamp(-1, 1)
        drawn = torch.round((drawn + 1) * 127.5).clamp(0, 255) / 127.5 - 1
        real = quality.real_cohort(args.n_per_class, args.size, "realism")
        stats["recon_drawn_realism"] = quality.realism_accuracy(drawn, y_new, *real)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    torch.save({"weights": ae.state_dict(), "stats": stats}, path)
    return ae, stats


def schedulers(args):
    """(training scheduler, prepare-batch, sampling scheduler) of the chosen objective."""
    n_cls = len(LABELS)
    if args.objective == "rflow":
        train = RFlowScheduler(
            num_train_timesteps=1000, use_discrete_timesteps=False, sample_method=args.timesteps, spatial_dim=2
        )
        prep = RectifiedFlowPrepareBatch(train, num_classes=n_cls, cond_drop_prob=args.cond_drop)
        return train, prep, copy.deepcopy(train)
    sched = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    sched["prediction_type"] = args.objective
    train = DDPMScheduler(**sched)
    prep = LatentDiffusionPrepareBatch(1000, n_cls, cond_drop_prob=args.cond_drop, prediction_type=args.objective,
                                       scheduler=train)  # fmt: skip
    sampling = DDPMScheduler(**sched) if args.sampler == "ddpm" else DDIMScheduler(clip_sample=False, **sched)
    return train, prep, sampling


def train_dit(args, latents: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    net = DiffusionTransformer(
        spatial_dims=2,
        in_channels=latents.shape[1],
        out_channels=latents.shape[1],
        input_size=tuple(latents.shape[2:]),
        patch_size=args.patch_size,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        context_dim=len(LABELS),
    )
    ema_net = copy.deepcopy(net)
    ema = EMAWeightsHandler(net, ema_net, decay=args.ema_decay, warmup=True)
    train_sched, prep, sampling = schedulers(args)
    inferer = DiffusionInferer(train_sched)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    warm = int(args.warmup * args.steps)

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        if args.decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0, losses = time.time(), []
    net.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(latents), (args.batch,))
        inputs, target, _, kw = prep({"latent": latents[idx], "label": y[idx]})
        pred = inferer(inputs, net, noise=kw["noise"], timesteps=kw["timesteps"], condition=kw["condition"])
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(ema.current_decay(step + 1))
        losses.append(float(loss.detach()))
    return ema_net, sampling, {"dit_seconds": time.time() - t0, "final_loss": float(np.mean(losses[-100:]))}


def sample(args, ema_net, ae, sampling, scale, latent_shape, n_per_class: int, steps: int):
    sampler = LatentSampler(ema_net, ae, sampling, scale, LABELS, latent_shape, num_inference_steps=steps,
                            guidance_scale=args.guidance, batch_size=n_per_class, clip=(-1.0, 1.0))  # fmt: skip
    t0 = time.time()
    xs = [sampler(n_per_class, seed=c, condition=lb) for c, lb in enumerate(LABELS)]
    seconds = time.time() - t0
    x = torch.cat(xs)
    x = torch.round((x + 1) * 127.5).clamp(0, 255) / 127.5 - 1  # 8-bit, as the PNG release stores it
    y = torch.arange(len(LABELS)).repeat_interleave(n_per_class)
    return x, y, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--images-per-patient", type=int, default=2)
    p.add_argument("--ae-channels", type=int, nargs="+", default=[8, 16])
    p.add_argument("--latent-channels", type=int, default=2)
    p.add_argument("--ae-epochs", type=int, default=30)
    p.add_argument("--ae-lr", type=float, default=2e-3)
    p.add_argument("--ae-batch", type=int, default=8)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument(
        "--ae-schedule",
        choices=["onecycle", "constant"],
        default="onecycle",
        help="stage-1 LR: 10%% warm-up then a cosine to ~0 (onecycle), or constant (as the quickstart had)",
    )
    p.add_argument(
        "--likelihood",
        choices=["none", "laplace"],
        default="none",
        help="laplace: the decoder predicts a per-pixel scale (NLL loss) and samples draw the noise",
    )
    p.add_argument("--scale", choices=["std", "none"], default="std", help="latent scale factor 1/std or 1")
    p.add_argument("--objective", choices=["rflow", "epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--timesteps", choices=["uniform", "logit-normal"], default="uniform", help="rflow only")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="DiT training steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of steps of linear LR warm-up")
    p.add_argument("--decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--cond-drop", type=float, default=0.1)
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0], help="each is scored")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="epsilon / v_prediction only")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--n-per-class", type=int, default=20)
    p.add_argument("--no-realism", action="store_true", help="skip the realism measure (saves a minute)")
    p.add_argument("--ae-only", action="store_true", help="stop after stage 1 (its PSNR / SSIM)")
    p.add_argument("--sampling-speed", action="store_true", help="also time DDPM-1000, DDIM-50, RFlow-N samplers")
    p.add_argument("--cache", default="/tmp/monai_synth_recipe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--save", help="write a PNG of the samples (one row per class) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, held = cohort(args)
    ae, result = train_autoencoder(args, x, held)
    if args.ae_only:
        print(json.dumps({"options": {k: v for k, v in vars(args).items() if k.startswith(("ae", "latent", "size",
              "patients", "kl"))}, **result}))  # fmt: skip
        return result
    with torch.no_grad():
        z = torch.cat([ae.encode(x[i : i + 64])[0] for i in range(0, len(x), 64)])
    scale = compute_scale_factor(ae, [x[i : i + 64] for i in range(0, len(x), 64)]) if args.scale == "std" else 1.0
    skip = ("json", "save", "cache", "threads", "guidance", "sampler", "sample_steps", "n_per_class", "no_realism",
            "sampling_speed", "ae_only")  # fmt: skip
    key = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in skip})
    dit_path = Path(args.cache) / f"dit_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if dit_path.is_file():
        ema_net, sampling, stats = torch.load(dit_path, weights_only=False)
    else:
        ema_net, sampling, stats = train_dit(args, z * scale, y)
        try:
            torch.save((ema_net, sampling, stats), dit_path)
        except (AttributeError, TypeError):  # a logit-normal RFlowScheduler holds a lambda: keep the weights only
            torch.save((ema_net, None, stats), dit_path)
    if sampling is None:
        sampling = schedulers(args)[2]
    result.update(stats, scale_factor=scale)
    guidances, result["by_guidance"] = args.guidance, {}
    for g in guidances:
        args.guidance = g
        samples, labels, secs = sample(args, ema_net, ae, sampling, scale, tuple(z.shape[1:]), args.n_per_class,
                                       args.sample_steps)  # fmt: skip
        scores = {"images_per_s": len(samples) / secs, **quality.class_scores(samples, labels, args.size, seeds=2)}
        if not args.no_realism:
            scores["realism_accuracy"] = quality.realism_accuracy(
                samples, labels, *quality.real_cohort(args.n_per_class, args.size, "realism")
            )
        result["by_guidance"][g] = scores
        print(f"guidance {g}: {scores}", flush=True)
    args.guidance = guidances[-1]
    if args.save:
        from monai_synth.handlers.sample_grid import make_sample_grid, save_grid_png

        save_grid_png(make_sample_grid([samples[labels == c] for c in range(len(LABELS))]), args.save)
    if args.sampling_speed:
        result["sampling"] = sampling_speed(args, ema_net, ae, scale, tuple(z.shape[1:]))
    options = {k: v for k, v in vars(args).items() if k not in ("json", "save", "cache", "threads")}
    print(json.dumps({"options": options, **result}))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"options": options, **result}) + "\n")
    return result


def sampling_speed(args, ema_net, ae, scale, latent_shape) -> dict:
    """Images/s and class accuracy of the same trained model under several samplers (its own objective's)."""
    out = {}
    if args.objective == "rflow":
        plans = [("rflow", s) for s in (10, 20, 30)]
    else:
        plans = [("ddpm", 1000), ("ddim", 50), ("ddim", 20)]
    for name, steps in plans:
        a = copy.copy(args)
        a.sampler = name
        _, _, sampling = schedulers(a)
        n = 4 if steps >= 500 else args.n_per_class  # 1000 steps per image: a smaller set keeps this in minutes
        xs, ys, secs = sample(a, ema_net, ae, sampling, scale, latent_shape, n, steps)
        scores = quality.class_scores(xs, ys, args.size, seeds=2)
        out[f"{name}-{steps}"] = {"images_per_s": len(xs) / secs, "ratio": scores["ratio"]}
        print(f"{name}-{steps}: {len(xs) / secs:.1f} images/s, class ratio {scores['ratio']:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()

"""Training and sampling throughput of monai_synth's DiffusionTransformer next to its peers, in one run.

Compared at equal settings (same depth / width / heads / patch, latent size, batch, class conditioning, AdamW):

- ``ours``: :class:`monai_synth.networks.DiffusionTransformer`;
- ``diffusers``: ``diffusers.DiTTransformer2DModel`` (install the ``bench`` extra: ``pip install -e ".[bench]"``);
- ``unet``: MONAI's ``DiffusionModelUNet`` at a similar parameter count (a different architecture, for scale).

Printed per model: training step (forward + backward + AdamW step) images/s, peak memory of a training process,
sampling latency per step (one no-grad forward of the batch), achieved model FLOP/s and the model FLOP utilisation
(MFU) against a ceiling measured in the same run: the fp32 GFLOP/s of a large square matmul on the CPU, or the bf16
peak of the GPU (from a table of known devices, or ``--peak-tflops``) together with a measured large bf16 matmul.
Then 3D: tokens/s and peak memory of a training step on a ``32^3`` latent with patch 2, with and without activation
checkpointing.

Timed runs are interleaved (ours, diffusers, unet, ceiling, ours, ...) and medians reported, so that a machine
shared with other jobs slows every model alike. Peak memory is measured in a fresh subprocess per model (peak RSS
above the post-import baseline on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU).

Usage::

    python benchmarks/dit_throughput.py                      # CPU default: S/2, 16x16x4 latent, batch 16 (~5 min)
    python benchmarks/dit_throughput.py --rounds 5 --no-3d   # more repeats, skip the 3D part
    python benchmarks/dit_throughput.py --device cuda        # GPU: bf16 autocast at B/2 and XL/2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten
# The matrix-multiply kernels of a step: linear layers, attention (when not fused), convolutions (patch embedding, UNet).
_GEMMS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.convolution.default)
_GEMMS += (_aten.convolution_backward.default,)

# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) of common GPUs, for MFU.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU figures use 2 cores)")
    p.add_argument("--presets", nargs="+", default=None, help="DiT sizes; default S/2 on CPU, B/2 XL/2 on GPU")
    p.add_argument("--latent", type=int, default=None, help="2D latent edge; default 16 on CPU, 32 on GPU")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    p.add_argument("--num-classes", type=int, default=1000, help="class-conditional, as DiT on ImageNet")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model per round")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for every model")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd ours and diffusers")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--no-unet", action="store_true")
    p.add_argument("--no-3d", action="store_true")
    p.add_argument("--no-2d", action="store_true", help="only the 3D part")
    p.add_argument("--size3d", type=int, default=32, help="3D latent edge (patch 2)")
    p.add_argument("--preset3d", default="S/2")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak, overrides the table")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory probe in a subprocess
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- model factories
def build(kind: str, preset: str, spatial_dims: int, size: int, channels: int, num_classes: int, ckpt: bool = False):
    """Build one model at the given DiT size and a call ``f(x, t, y)`` returning its prediction tensor."""
    from monai_synth.networks import DiffusionTransformer
    from monai_synth.networks.dit import DIT_PRESETS

    cfg = DIT_PRESETS[preset]
    if kind == "ours":
        model = DiffusionTransformer.from_preset(
            preset,
            spatial_dims=spatial_dims,
            in_channels=channels,
            out_channels=channels,
            input_size=size,
            num_classes=num_classes,
            learn_sigma=True,
            use_checkpointing=ckpt,
        )
        return model, lambda x, t, y: model(x, t, class_labels=y)
    if kind == "diffusers":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(
            num_attention_heads=cfg["num_heads"],
            attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
            in_channels=channels,
            out_channels=2 * channels,
            num_layers=cfg["depth"],
            sample_size=size,
            patch_size=cfg["patch_size"],
            num_embeds_ada_norm=num_classes,
        )
        return model, lambda x, t, y: model(x, timestep=t, class_labels=y).sample
    if kind == "unet":
        from monai.networks.nets import DiffusionModelUNet

        # ~30M parameters at 4 latent channels, close to DiT-S/2's 33M; attention at the two coarser levels.
        model = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=channels,
            out_channels=2 * channels,
            channels=(128, 256, 384),
            attention_levels=(False, True, True),
            num_res_blocks=1,
            num_head_channels=64,
            num_class_embeds=num_classes,
        )
        return model, lambda x, t, y: model(x, timesteps=t, class_labels=y)
    raise ValueError(f"unknown model kind {kind!r}")


def make_inputs(batch, channels, spatial_dims, size, num_classes, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *(size,) * spatial_dims, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, t, y


class Runner:
    """A model with its optimizer and a timed training step / sampling step."""

    def __init__(self, kind, preset, args, spatial_dims=2, size=None, batch=None, ckpt=False, compiled=False):
        self.kind = kind
        self.device = torch.device(args.device)
        self.amp = args.device == "cuda"
        self.model, fn = build(kind, preset, spatial_dims, size, args.latent_channels, args.num_classes, ckpt)
        self.model.to(self.device).train()
        if compiled:
            fn = torch.compile(fn)
        self.fn = fn
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=args.fused_adamw or None)
        self.inputs = make_inputs(batch, args.latent_channels, spatial_dims, size, args.num_classes, self.device)
        # Regress a fixed N(0, 1) target, as a noise-prediction step does. (A target of zero would leave a
        # zero-initialised DiT with exactly zero gradients and time a degenerate step.)
        out_channels = 2 * args.latent_channels
        g = torch.Generator().manual_seed(1)
        self.target = torch.randn(batch, out_channels, *(size,) * spatial_dims, generator=g).to(self.device)
        self.batch = batch
        from monai_synth.networks.dit import DIT_PRESETS

        self.tokens_per_image = (size // DIT_PRESETS[preset]["patch_size"]) ** spatial_dims

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def forward_backward(self) -> None:
        """Forward pass, MSE against the target, backward pass: the gradient part of a training step."""
        with self._autocast():
            out = self.fn(*self.inputs)
        F.mse_loss(out.float(), self.target).backward()

    def train_step(self):
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def time_train(self, steps: int) -> tuple[float, float]:
        """Wall seconds and process CPU seconds per training step."""
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.train_step()
        self.sync()
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps

    @torch.no_grad()
    def time_sample(self, steps: int) -> float:
        self.model.eval()
        x, t, y = self.inputs
        t1 = t[:1].float()  # samplers pass one (float) timestep for the whole batch
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            with self._autocast():
                self.fn(x, t1.expand(x.shape[0]) if self.kind == "diffusers" else t1, y)
        self.sync()
        self.model.train()
        return (time.perf_counter() - start) / steps

    def time_optimizer(self, reps: int = 3) -> float:
        """Seconds of one optimizer step alone (best of ``reps``), on random gradients; the model is left as it was."""
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {k: {n: t.clone() for n, t in v.items()} for k, v in self.opt.state.items()}
        for p in self.model.parameters():
            p.grad = torch.randn_like(p)
        self.opt.step()
        best = best_time(self.opt.step, reps, self.sync)
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), params):
                p.copy_(saved)
        self.opt.state.update(state)
        return best

    def record_gemms(self) -> int:
        """Record every matmul/convolution call (forward and backward) of one training step; return their number.

        Each distinct call is kept with its shapes, strides, dtype and other arguments, and with operands of that
        layout, for :meth:`time_gemms`.
        """
        calls: Counter = Counter()

        def spec(a):
            if isinstance(a, torch.Tensor):
                return ("T", tuple(a.shape), tuple(a.stride()), a.dtype)
            return ("L", tuple(spec(x) for x in a)) if isinstance(a, list) else a

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in _GEMMS and not kwargs:
                    calls[(func, tuple(spec(a) for a in args))] += 1
                return func(*args, **(kwargs or {}))

        with Recorder():
            self.forward_backward()
        self.opt.zero_grad(set_to_none=True)

        def operand(a):
            if isinstance(a, tuple) and a and a[0] == "T":
                return torch.empty_strided(a[1], a[2], dtype=a[3], device=self.device).normal_()
            return [operand(x) for x in a[1]] if isinstance(a, tuple) and a and a[0] == "L" else a

        self.gemm_calls = [(func, [operand(a) for a in args], count) for (func, args), count in calls.items()]
        return sum(calls.values())

    def time_gemms(self, reps: int = 3) -> float:
        """Seconds the recorded matmuls/convolutions of one step take when each runs alone (best of ``reps``).

        With the same kernels, no implementation of the model trains faster than this plus its optimizer step.
        """
        total = 0.0
        for func, args, count in self.gemm_calls:
            func(*args)
            total += count * best_time(functools.partial(func, *args), reps, self.sync)
        return total

    def train_flops(self) -> float:
        """Counted matmul/conv FLOPs of one training forward+backward, plus attention (not counted on CPU)."""
        with FlopCounterMode(display=False) as counter:
            self.forward_backward()
        self.opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        counted = {str(k) for k in counter.get_flop_counts().get("Global", {})}
        if not any("attention" in k for k in counted) and self.kind != "unet":
            # QK^T and AV: 4 B N^2 D per block forward, x3 with backward.
            cfg = getattr(self.model, "hidden_size", None) or self.model.inner_dim
            depth = len(self.model.blocks) if hasattr(self.model, "blocks") else len(self.model.transformer_blocks)
            n = self.tokens_per_image
            flops += 3 * depth * 4 * self.batch * n * n * cfg
        return float(flops)


def best_time(fn, reps: int, sync=lambda: None) -> float:
    """Shortest wall time of ``reps`` calls of ``fn``, each bracketed by ``sync`` (a GPU synchronisation)."""
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_ceiling(device: str, n: int | None = None, reps: int = 3) -> float:
    """GFLOP/s of a large square matmul: fp32 on the CPU, bf16 on a GPU (best of ``reps``)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    inner = 20 if device == "cuda" else 1

    def matmuls():
        for _ in range(inner):
            a @ b

    best = best_time(matmuls, reps, torch.cuda.synchronize if device == "cuda" else lambda: None) / inner
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------------ memory probes
def _proc_status_mib(field: str) -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process in MiB.

    ``getrusage``'s ``ru_maxrss`` is not used: Linux carries it over from the parent across fork + exec, so a probe
    launched by a large parent would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def probe(spec: dict, args: argparse.Namespace) -> dict:
    """Run inside a fresh process: build one model, run training steps, report peak memory (and step time)."""
    import monai.networks.nets  # noqa: F401  (imports are not part of a model's memory)

    import monai_synth.networks  # noqa: F401

    if spec["kind"] == "diffusers":
        import diffusers  # noqa: F401

    torch.manual_seed(0)
    base_rss = _proc_status_mib("VmRSS")
    runner = Runner(
        spec["kind"], spec["preset"], args, spec["dims"], spec["size"], spec["batch"], ckpt=spec.get("ckpt", False)
    )
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [runner.time_train(1)[0] for _ in range(spec.get("steps", 2))]
    if runner.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _proc_status_mib("VmHWM") - base_rss
    return {"peak_mib": peak, "step_s": min(times), "params": runner.params}


def run_probe(spec: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(spec), "--device", args.device]
    cmd += ["--threads", str(args.threads), "--num-classes", str(args.num_classes)]
    cmd += ["--latent-channels", str(args.latent_channels)] + (["--fused-adamw"] if args.fused_adamw else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------- main
def fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def bench_2d(args, preset: str, kinds: list[str]) -> None:
    size, batch = args.latent, args.batch
    runners = {k: Runner(k, preset, args, 2, size, batch) for k in kinds}
    if args.compile:
        for k in [k for k in kinds if k != "unet"]:
            runners[f"{k}+compile"] = Runner(k, preset, args, 2, size, batch, compiled=True)
    for r in runners.values():  # warm-up (and compilation)
        r.train_step()
        r.time_sample(1)
    train, cpu, sample = ({k: [] for k in runners} for _ in range(3))
    # Step split for the eager DiTs: a compiled model runs the same matmuls as its eager twin. The UNet is left out:
    # its convolutions timed alone (fresh oneDNN primitives and weight layouts each call) take longer than in its step.
    split = [k for k in runners if "+" not in k and k != "unet"]
    n_gemm = {k: runners[k].record_gemms() for k in split}
    gemm, optim = ({k: [] for k in split} for _ in range(2))
    ceiling = []
    for i in range(args.rounds):
        for k, r in runners.items():
            wall, cpu_s = r.time_train(args.steps)
            train[k].append(wall)
            cpu[k].append(cpu_s)
        for k in split:  # timed in the same round, so that the split compares like with like on a noisy machine
            gemm[k].append(runners[k].time_gemms())
            optim[k].append(runners[k].time_optimizer())
        ceiling.append(matmul_ceiling(args.device))
        for k, r in runners.items():
            sample[k].append(r.time_sample(max(2, args.steps)))
        print(
            f"  round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {batch / train[k][-1]:.1f} img/s" for k in runners),
            flush=True,
        )
    ceil = statistics.median(ceiling)
    peak_ref = None
    if args.device == "cuda":
        peak_ref = args.peak_tflops or next(
            (v for name, v in GPU_BF16_PEAK_TFLOPS.items() if name in torch.cuda.get_device_name()), None
        )
    mem = {k: run_probe({"kind": k, "preset": preset, "dims": 2, "size": size, "batch": batch}, args) for k in kinds}

    print(f"\n2D {preset}, latent {size}x{size}x{args.latent_channels}, batch {batch}, {args.device}")
    if args.device == "cuda":
        print(
            f"bf16 peak {peak_ref or 'unknown'} TFLOP/s (table/flag); measured large bf16 matmul {ceil / 1e3:.0f} TFLOP/s"
        )
    else:
        print(f"fp32 large-matmul ceiling (2048^3, median of {len(ceiling)}): {ceil:.1f} GFLOP/s")
    widths = [16, 7, 11, 8, 10, 9, 10, 10, 8, 9]
    header = ["model", "params", "train img/s", "vs ours", "cpu s/step", "peak MiB", "sample ms", "GFLOP/step"]
    print(fmt_row([*header, "GFLOP/s", "MFU"], widths))
    base = statistics.median(train["ours"]) if "ours" in train else None
    for k, r in runners.items():
        step = statistics.median(train[k])
        flops = r.train_flops()
        achieved = flops / step / 1e9
        ref = (peak_ref * 1e3) if peak_ref else ceil
        mfu = f"{100 * achieved / ref:.0f}%"
        if args.device == "cuda":
            mfu += f" ({100 * achieved / ceil:.0f}% of mm)"
        kind = k.split("+")[0]
        peak = f"{mem[kind]['peak_mib']:.0f}" if kind in mem and "+" not in k else "-"
        print(
            fmt_row(
                [
                    k,
                    f"{r.params / 1e6:.1f}M",
                    f"{batch / step:.1f}",
                    f"{base / step:.2f}x" if base else "-",
                    f"{statistics.median(cpu[k]):.2f}",
                    peak,
                    f"{1e3 * statistics.median(sample[k]):.0f}",
                    f"{flops / 1e9:.0f}",
                    f"{achieved:.0f}",
                    mfu,
                ],
                widths,
            )
        )
    if "ours" in train and "diffusers" in train:
        print(
            f"ours / diffusers training throughput: {statistics.median(train['diffusers']) / base:.2f}x "
            f"(per-round ratios: {', '.join(f'{d / o:.2f}' for o, d in zip(train['ours'], train['diffusers']))})"
        )
    print("\nWhere a training step goes (median over rounds; matmuls/convolutions and optimizer step timed alone):")
    widths = [16, 8, 9, 9, 9, 6, 12]
    print(fmt_row(["model", "step s", "mm+conv s", "optim s", "other s", "calls", "floor img/s"], widths))
    for k in split:
        step, mm, opt = (statistics.median(v[k]) for v in (train, gemm, optim))
        other = statistics.median(t - g - o for t, g, o in zip(train[k], gemm[k], optim[k]))
        row = [k, *(_seconds(x) for x in (step, mm, opt, other)), n_gemm[k], f"{batch / (mm + opt):.1f}"]
        print(fmt_row(row, widths))
    if "ours" in split and "diffusers" in split:
        ratios = [t / (g + o) for g, o, t in zip(gemm["ours"], optim["ours"], train["diffusers"])]
        print(
            f"ours reduced to its matmuls and optimizer step would be {statistics.median(ratios):.2f}x diffusers' "
            f"measured throughput (median of per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}): the most "
            "any implementation with these kernels can reach"
        )
    del runners


def _seconds(x: float) -> str:
    """Seconds with three decimals, or three significant digits below 10 ms, so toy sizes never print 0.000."""
    return f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.2e}"


def bench_3d(args) -> None:
    size, preset = args.size3d, args.preset3d
    tokens = (size // 2) ** 3
    print(f"\n3D {preset}, latent {size}^3x{args.latent_channels}, patch 2 ({tokens} tokens), batch 1, training step")
    widths = [16, 12, 10, 10]
    print(fmt_row(["checkpointing", "tokens/s", "step s", "peak MiB"], widths))
    for ckpt in (False, True):
        spec = {"kind": "ours", "preset": preset, "dims": 3, "size": size, "batch": 1, "ckpt": ckpt, "steps": 2}
        res = run_probe(spec, args)
        row = [
            "on" if ckpt else "off",
            f"{tokens / res['step_s']:.0f}",
            f"{res['step_s']:.2f}",
            f"{res['peak_mib']:.0f}",
        ]
        print(fmt_row(row, widths), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe), args)))
        return
    gpu = args.device == "cuda"
    args.presets = args.presets or (["B/2", "XL/2"] if gpu else ["S/2"])
    args.latent = args.latent or (32 if gpu else 16)
    args.batch = args.batch or (64 if gpu else 16)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.cuda.get_device_name()
    else:
        device = next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {device}, {args.threads} threads, AdamW fused={args.fused_adamw}, "
        f"load average at start {load:.1f}",
        flush=True,
    )
    kinds = ["ours"] + ([] if args.no_diffusers else ["diffusers"]) + ([] if args.no_unet else ["unet"])
    for preset in [] if args.no_2d else args.presets:
        bench_2d(args, preset, kinds)
    if not args.no_3d:
        bench_3d(args)


if __name__ == "__main__":
    main()

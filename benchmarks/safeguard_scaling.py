"""How the privacy safeguard scales: nearest-neighbour search vs training-set size, and its share of sampling time.

Part 1 - search. For N = 1e3 .. 1e6 random unit vectors of the embedding's size (default 128), time FAISS exact
``IndexFlatIP`` (what :class:`monai_synth.privacy.index.TrainingIndex` uses) against an approximate ``IndexIVFFlat``
(``nlist = sqrt(N)``, ``nprobe`` probed lists): build time, index memory, queries per second and recall@1 against the
exact answer, both for random queries and for *near-copy* queries (a training vector plus small noise: the case the
safeguard exists for).

Part 2 - share of sampling time. A tiny DiT sampled with MONAI's ``DiffusionInferer`` (DDIM) next to the safeguard
checking the same batch against a 100k-image training index, for the pixel space (plain, and with the flip/shift
and flip/shift/zoom invariances) and a 128-d embedding-sized space.

Part 3 (``--default-spaces``, run alone) - the safeguard as released. Seconds per candidate of every default privacy
space (judged through a PNG release's intensity views) against indexes of 1e3 and 1e4 training rows, fitted as
``a + b N`` and extrapolated to 1e5 (or measured there with ``--default-sizes ... 100000``), next to the seconds per
image of the breast-ultrasound bundle's default sampler (its networks, steps and guidance, decoding included), and
their ratio. Each space is timed with the index's fast exact search (:mod:`monai_synth.privacy.search`) and with the
dense product (every variant with every row; ``--no-dense`` skips it), whose answers must agree, for two kinds of
training rows (``--rows``): ``phantom`` (ultrasound phantom images of many patients, each drawn once and replicated
with shifts, gamma, speckle and noise, embedded by the space: structure like real images, which is what the fast
search's bounds use) and ``random`` (random unit vectors: no structure, the worst case for the bounds). Candidates
are ultrasound phantoms of unseen patients at the bundle's size, stored as PNG.

Run: ``python benchmarks/safeguard_scaling.py`` (about 3 minutes on 2 idle CPU cores). Results are recorded in
``docs/benchmarks.md`` (section "Safeguard scaling").
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import faiss
import numpy as np
import torch


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


#: process CPU seconds of the last `_timed` call: on a shared machine wall time measures the neighbours too.
LAST_CPU = [0.0]


def _timed(fn, *args, repeat: int = 1, **kwargs):
    """Best wall time of ``fn(*args, **kwargs)`` over ``repeat`` calls, and its result (CPU time in LAST_CPU)."""
    best, out = math.inf, None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        if time.perf_counter() - t < best:
            best, LAST_CPU[0] = time.perf_counter() - t, time.process_time() - c
    return best, out


def search_scaling(sizes, dim: int, queries: int, nprobe: int, seed: int = 0) -> list[dict]:
    """Exact vs IVF at each training-set size."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        train = _unit(rng, n, dim)
        random_q = _unit(rng, queries, dim)
        copies = train[rng.integers(0, n, queries)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32)
        faiss.normalize_L2(copies)

        t_build_exact, exact = _timed(_flat, train)
        t_exact, (_, i_exact) = _timed(exact.search, random_q, 1)
        c_exact = LAST_CPU[0]
        _, (_, i_exact_copy) = _timed(exact.search, copies, 1)

        nlist = max(4, min(int(math.sqrt(n)), n // 40))
        t_build_ivf, ivf = _timed(_ivf, train, nlist, rng)
        ivf.nprobe = nprobe
        t_ivf, (_, i_ivf) = _timed(ivf.search, random_q, 1)
        c_ivf = LAST_CPU[0]
        _, (_, i_ivf_copy) = _timed(ivf.search, copies, 1)
        rows.append(
            {
                "N": n,
                "exact_build_s": t_build_exact,
                "exact_qps": queries / t_exact,
                "exact_qps_cpu": queries / max(c_exact, 1e-9),
                "exact_mb": n * dim * 4 / 2**20,
                "ivf_build_s": t_build_ivf,
                "ivf_qps": queries / t_ivf,
                "ivf_qps_cpu": queries / max(c_ivf, 1e-9),
                "ivf_mb": (n * (dim * 4 + 8) + nlist * dim * 4) / 2**20,
                "ivf_recall_random": float(np.mean(i_ivf[:, 0] == i_exact[:, 0])),
                "ivf_recall_copies": float(np.mean(i_ivf_copy[:, 0] == i_exact_copy[:, 0])),
                "nlist": nlist,
            }
        )
    return rows


def _flat(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _ivf(x: np.ndarray, nlist: int, rng: np.random.Generator) -> faiss.Index:
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    sample = x[rng.choice(len(x), size=min(len(x), 40 * nlist), replace=False)]
    index.train(sample)
    index.add(x)
    return index


class _VectorSpace:
    """A stand-in space of a given vector size whose ``embed`` costs what a small CNN embedding costs."""

    name = "embedding-sized"

    def __init__(self, dim: int, size: int):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, 2, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, 2, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, 2, 1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, dim),
        ).eval()
        self.dim = dim

    def fingerprint(self) -> str:
        return "bench"

    def embed(self, images) -> np.ndarray:
        with torch.no_grad():
            v = self.net(torch.as_tensor(images)).numpy().astype(np.float32)
        faiss.normalize_L2(v)
        return v


def sampling_share(
    n_train: int, batch: int, steps: int, size: int, seed: int = 0, with_zoom: bool = False
) -> list[dict]:
    """Time of one guarded batch: DiT sampling vs the safeguard's check at ``n_train`` training images."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    from monai_synth.networks import DiffusionTransformer
    from monai_synth.privacy.index import TrainingIndex
    from monai_synth.privacy.safeguard import PrivacySafeguard
    from monai_synth.privacy.spaces import PixelSpace

    torch.manual_seed(seed)
    model = DiffusionTransformer.from_preset(
        "tiny", spatial_dims=2, in_channels=1, out_channels=1, input_size=size, context_dim=1
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    inferer = DiffusionInferer(scheduler)
    noise = torch.randn(batch, 1, size, size)
    ctx = torch.ones(batch, 1, 1)
    with torch.no_grad():
        inferer.sample(noise[:2], model, scheduler, conditioning=ctx[:2], mode="crossattn", verbose=False)  # warm-up
        t_sample, images = _timed(
            inferer.sample, noise, model, scheduler, conditioning=ctx, mode="crossattn", cfg=3.0, verbose=False
        )
        c_sample = LAST_CPU[0]
    rng = np.random.default_rng(seed)
    spaces = [
        ("pixel (plain)", PixelSpace(grid=size)),
        ("pixel + flip, shift", PixelSpace(grid=size, invariances=("flip", "shift"))),
        ("128-d embedding", _VectorSpace(128, size)),
    ]
    if with_zoom:  # 5x the flip/shift cost; off by default to keep the run short
        spaces.insert(2, ("pixel + flip, shift, zoom", PixelSpace(grid=size, invariances=("flip", "shift", "zoom"))))
    rows = []
    for label, space in spaces:
        dim = space.dim
        vectors = _unit(rng, n_train, dim)
        index = TrainingIndex(
            [_flat(vectors)],
            np.zeros(n_train, dtype=np.int32),
            ["P0"],
            space.name,
            space.fingerprint(),
            "bench",
            space=space,
        )
        safeguard = PrivacySafeguard([(index, 0.05)], batch_size=batch)
        t_check, _ = _timed(safeguard.check, images, repeat=2)
        c_check = LAST_CPU[0]
        variants = len(getattr(space, "variant_ops", [None]))
        rows.append(
            {
                "space": label,
                "dim": dim,
                "variants": variants,
                "index_mb": n_train * dim * 4 / 2**20,
                "sample_s": t_sample,
                "check_s": t_check,
                "share": t_check / (t_sample + t_check),
                "sample_cpu_s": c_sample,
                "check_cpu_s": c_check,
                "share_cpu": c_check / (c_sample + c_check),
            }
        )
    return rows


def bundle_sampling_time(bundle: str, n_images: int, steps: int | None = None) -> dict:
    """Seconds per image of the bundle's default sampler (its own networks, scheduler, steps and guidance; seeded
    random weights: the cost does not depend on them), decoding included, on this machine's CPU."""
    from monai.bundle import ConfigParser

    from monai_synth.configs import common_files
    from monai_synth.engines.sampler import sample_latent_images

    parser = ConfigParser()
    parser.read_config(common_files(bundle))
    parser["device"] = "cpu"
    torch.manual_seed(0)
    ae, dit = parser.get_parsed_content("autoencoder_def").eval(), parser.get_parsed_content("network_def").eval()
    scheduler, labels = parser.get_parsed_content("sampling_scheduler"), parser.get_parsed_content("labels")
    latent_shape = [int(v) for v in parser.get_parsed_content("latent_shape")]
    steps = int(steps or parser.get_parsed_content("num_inference_steps"))
    guidance = parser.get_parsed_content("guidance_scale")
    kw = dict(num_classes=len(labels), guidance_scale=guidance, num_inference_steps=steps, device="cpu")
    with torch.no_grad():
        t, c = time.perf_counter(), time.process_time()
        images = sample_latent_images(
            dit, ae, scheduler, 1.0, torch.zeros(n_images, dtype=torch.long), latent_shape, **kw
        )
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {
        "bundle": os.path.basename(os.path.normpath(bundle)),
        "spatial_size": list(parser.get_parsed_content("spatial_size")),
        "steps": steps,
        "guidance": guidance,
        "s_per_image": wall / n_images,
        "cpu_s_per_image": cpu / n_images,
        "images": images,
        "modality": parser.get_parsed_content("modality"),
    }


def phantom_bases(n_patients: int, size: int, first_patient: int = 0, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` ultrasound phantom images (grey 0-255), one per patient."""
    from monai_synth.data.phantoms import generate_cohort

    cohort = generate_cohort("us", n_patients, 1, spatial_size=size, seed=seed, first_patient=first_patient)
    return torch.stack([torch.as_tensor(r["image"], dtype=torch.float32) for r in cohort])


def phantom_rows(space, bases: torch.Tensor, n: int, to_model, seed: int = 0, batch: int = 256) -> np.ndarray:
    """``(n, d)`` unit rows of ``space`` for ``n`` training images: phantom ``bases`` (grey levels) drawn in turn, each
    copy shifted (up to 6% of the side), gamma-changed (0.7-1.4), speckled (sd 0.1-0.3) and noised (sd 2 grey levels),
    in model space: many similar images per patient, as a real training set has."""
    from monai_synth.privacy.index import _unit_rows

    gen = torch.Generator().manual_seed(seed)
    out, side = [], bases.shape[-1]
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = bases[torch.arange(start, start + m) % len(bases)].clone() / 255.0
        gamma = 0.7 + 0.7 * torch.rand(m, 1, 1, 1, generator=gen)
        x = x.clamp_min(0) ** gamma
        x = x * (1 + (0.1 + 0.2 * torch.rand(m, 1, 1, 1, generator=gen)) * torch.randn(x.shape, generator=gen))
        x = (255.0 * x + 2.0 * torch.randn(x.shape, generator=gen)).clamp(0, 255)
        shift = torch.randint(-(side // 16), side // 16 + 1, (m, 2), generator=gen)
        x = torch.stack([torch.roll(x[i], tuple(shift[i].tolist()), dims=(1, 2)) for i in range(m)])
        model = torch.as_tensor(to_model(x)).as_subclass(torch.Tensor).float()
        out.append(_unit_rows(np.asarray(space.embed(model)))[0])
    return np.concatenate(out)


def default_spaces_cost(
    images: torch.Tensor, modality: str, sizes, candidates: int, rows_kind: str = "phantom", dense: bool = True,
    bases: int = 400, seed: int = 0, specs: Sequence[str] | None = None, specificity: float = 0.003,
) -> list[dict]:  # fmt: skip
    """Seconds per candidate of each default privacy space against indexes of ``sizes`` training rows, judged as a PNG
    release judges it (every intensity view), with the fast exact search and (``dense``) the dense product; the
    embedding is trained for one epoch on a few images (its cost, not its quality). ``images`` (the sampler's output)
    set the size; the candidates are phantoms of unseen patients. ``specs``: a subset of the default spaces (or other
    factory names) to time instead of all. ``specificity``: judged with the specificity test as the default gate judges
    (a bound on the second patient's distance, the k-nearest search where it cannot clear; 0: the nearest row only)."""
    from monai_synth.privacy.embedding import train_embedding
    from monai_synth.privacy.factory import DEFAULT_SPACES, build_spaces
    from monai_synth.privacy.index import TrainingIndex
    from monai_synth.privacy.release import VIEWS_PER_IMAGE, ReleaseEncoder
    from monai_synth.privacy.safeguard import PrivacySafeguard
    from monai_synth.privacy.spaces import distance_floor, embed_variants

    rng = np.random.default_rng(seed)
    shape = tuple(images.shape[2:])
    encoder = ReleaseEncoder("png", modality)
    unseen = phantom_bases(candidates, shape[0], first_patient=100_000, seed=seed)
    stored = [np.round(u.numpy()) for u in unseen]
    judged = torch.stack([encoder.views(s)[0] for s in stored])
    # training rows are drawn at half the bundle's size (cheaper to draw; every space resamples to a grid of 64 or less)
    base = phantom_bases(bases, max(64, shape[0] // 2), seed=seed) if rows_kind == "phantom" else None
    # the spaces as build_spaces makes them (principal directions fitted on these phantoms, see PRINCIPAL_DIRECTIONS)
    fit_bases = phantom_bases(256, shape[0], first_patient=200_000, seed=seed)
    fit = torch.stack([encoder.views(np.round(f.numpy()))[0] for f in fit_bases])
    fit_ids = [f"P{i}" for i in range(len(fit))]
    out = []
    for spec in specs or DEFAULT_SPACES:
        if spec == "embedding":
            few = judged[:1].repeat(8, 1, *([1] * len(shape))) + 0.1 * torch.randn(8, 1, *shape)
            space = train_embedding(few, [f"P{i // 2}" for i in range(8)], spatial_dims=len(shape), epochs=1)
        else:
            built = build_spaces([spec], len(shape), shape, fit, fit_ids, "bench")
            if not built:  # a space of the other dimensionality, left out as the release leaves it out
                continue
            space = built[0]
        dim = int(space.embed(judged[:1]).shape[1])
        variants = int(embed_variants(space, judged[:1]).shape[1])
        for n in sizes:
            if rows_kind == "phantom":
                vectors = phantom_rows(space, base, int(n), encoder.to_model, seed=seed)
            else:
                vectors = _unit(rng, int(n), dim)
            index = TrainingIndex(
                [_flat(vectors)], np.arange(int(n), dtype=np.int32) % 1000, [f"P{i:03d}" for i in range(1000)],
                space.name, space.fingerprint(), "bench", space=space,
            )  # fmt: skip
            # as a release judges them: both views of every candidate in one batch
            safeguard = PrivacySafeguard([(index, 0.05)], batch_size=VIEWS_PER_IMAGE * candidates)
            if specificity:  # no calibration here: a typical scale of its law (the cost does not depend on it)
                safeguard.specificity, safeguard.median_log_ratio = specificity, {index.space_name: 0.1}
                safeguard.ratio_floor = {index.space_name: distance_floor(space)}
            row = {"space": spec, "dim": dim, "variants": variants, "N": int(n)}
            answers = {}
            encoder.judge(safeguard, stored[:1])  # untimed: the first judgement also learns the batch size
            for mode in ("fast", "dense") if dense else ("fast",):
                index.fast_search = mode == "fast"
                t, c = time.perf_counter(), time.process_time()
                answers[mode] = encoder.judge(safeguard, stored)
                row[f"{mode}_s"] = (time.perf_counter() - t) / candidates
                row[f"{mode}_cpu_s"] = (time.process_time() - c) / candidates
            if dense:
                same = [a.distances == b.distances and a.nearest_rows == b.nearest_rows and a.passed == b.passed
                        for a, b in zip(answers["fast"], answers["dense"])]  # fmt: skip
                row["agree"] = all(same)
            out.append(row)
            print(
                f"  {spec:<10} d={dim:<5} variants={variants:<6} N={int(n):>7} {rows_kind} rows: fast "
                f"{row['fast_s']:.3f} s per candidate ({row['fast_cpu_s']:.3f} CPU-s)"
                + (
                    f", dense {row['dense_s']:.3f} s ({row['dense_cpu_s']:.3f} CPU-s), same answers: {row['agree']}"
                    if dense
                    else ""
                )
                + f"; nearest distance {min(r.distances[spec] for r in answers['fast']):.3f}, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    return out


def extrapolate(rows: list[dict], target: int, key: str = "s_per_candidate") -> dict[str, float]:
    """Per space, ``a + b N`` fitted to the measured sizes (least squares), evaluated at ``target`` (or the
    measurement itself when ``target`` was measured). From one size, ``b N`` alone: proportional to N, an upper bound
    for a larger target (the fixed cost of making the variants is scaled too)."""
    out = {}
    for spec in dict.fromkeys(r["space"] for r in rows):
        pts = [(r["N"], r[key]) for r in rows if r["space"] == spec]
        exact = [t for n, t in pts if n == target]
        if exact:
            out[spec] = exact[0]
            continue
        n, t = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        b, a = np.polyfit(n, t, 1) if len(pts) > 1 else (t[0] / n[0], 0.0)
        out[spec] = float(a + max(b, 0.0) * target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128, help="vector size (the embedding space's)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--sampling-train-size", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=16, help="images per sampling batch")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--size", type=int, default=32, help="image side (pixels)")
    parser.add_argument("--with-zoom", action="store_true", help="also time the flip/shift/zoom pixel space")
    parser.add_argument(
        "--default-spaces",
        action="store_true",
        help="instead of parts 1-2: the default spaces' time per candidate at --default-sizes training images, "
        "extrapolated to --target, next to the sampling time per image of --bundle's default config",
    )
    parser.add_argument("--default-sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--target", type=int, default=100_000, help="training images the ratio is stated for")
    parser.add_argument("--bundle", default=os.path.join(os.path.dirname(__file__), "..", "bundles", "breast_us_ldit"))
    parser.add_argument("--sample-images", type=int, default=2, help="images sampled to time the bundle's sampler")
    parser.add_argument(
        "--candidates",
        type=int,
        default=16,
        help="candidates judged at once per index size (default 16: the bundle's sample_batch_size, a batch the "
        "sampler hands the safeguard)",
    )
    parser.add_argument("--rows", nargs="+", default=["phantom", "random"], choices=["phantom", "random"],
                        help="kinds of training rows the default spaces are timed against")  # fmt: skip
    parser.add_argument("--bases", type=int, default=400, help="phantom patients the phantom rows are drawn from")
    parser.add_argument("--no-dense", action="store_true", help="time only the fast search, not the dense product")
    parser.add_argument("--spaces", nargs="+", default=None, help="time only these spaces (default: every default one)")
    parser.add_argument("--specificity", type=float, default=0.003,
                        help="judge with the specificity test as the default gate does (0: off)")  # fmt: skip
    args = parser.parse_args()
    print(
        f"threads: faiss {faiss.omp_get_max_threads()}, torch {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} (CPU-time columns discount other processes on a shared machine)"
    )
    if args.default_spaces:
        _default_spaces_report(args)
        return

    print(f"\nNearest-neighbour search, {args.dim}-d unit vectors, {args.queries} queries, IVF nprobe={args.nprobe}")
    head = (
        f"{'N':>9} | {'exact q/s':>10} {'q/CPU-s':>8} {'MB':>7} {'build s':>7} | {'IVF q/s':>9} {'q/CPU-s':>8} "
        f"{'MB':>7} {'build s':>7} {'recall@1 rand':>13} {'recall@1 copy':>13} | {'IVF/exact':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for r in search_scaling(args.sizes, args.dim, args.queries, args.nprobe):
        print(
            f"{r['N']:>9} | {r['exact_qps']:>10.0f} {r['exact_qps_cpu']:>8.0f} {r['exact_mb']:>7.1f} "
            f"{r['exact_build_s']:>7.2f} | {r['ivf_qps']:>9.0f} {r['ivf_qps_cpu']:>8.0f} {r['ivf_mb']:>7.1f} "
            f"{r['ivf_build_s']:>7.2f} {r['ivf_recall_random']:>13.3f} "
            f"{r['ivf_recall_copies']:>13.3f} | {r['ivf_qps'] / r['exact_qps']:>8.1f}x",
            flush=True,
        )

    n = args.sampling_train_size
    print(
        f"\nSafeguard share of sampling time: tiny DiT, {args.size}x{args.size}, batch {args.batch}, "
        f"DDIM {args.steps} steps with CFG, index of {n} training images"
    )
    head = (
        f"{'space':<26} {'dim':>5} {'variants':>8} {'index MB':>9} | {'sample s':>8} {'check s':>8} {'share':>7} | "
        f"{'sample CPU-s':>12} {'check CPU-s':>11} {'share':>7}"
    )
    print(head + "\n" + "-" * len(head))
    for r in sampling_share(n, args.batch, args.steps, args.size, with_zoom=args.with_zoom):
        print(
            f"{r['space']:<26} {r['dim']:>5} {r['variants']:>8} {r['index_mb']:>9.0f} | "
            f"{r['sample_s']:>8.2f} {r['check_s']:>8.3f} {r['share']:>7.1%} | "
            f"{r['sample_cpu_s']:>12.2f} {r['check_cpu_s']:>11.3f} {r['share_cpu']:>7.1%}",
            flush=True,
        )


def _default_spaces_report(args) -> None:
    """Part 3: the default safeguard's share of the bundle's sampling time at ``args.target`` training images."""
    samp = bundle_sampling_time(args.bundle, args.sample_images)
    print(
        f"\nSampling, {samp['bundle']} default config ({samp['spatial_size']}, {samp['steps']} steps, guidance "
        f"{samp['guidance']}, decode included): {samp['s_per_image']:.1f} s per image ({samp['cpu_s_per_image']:.1f} "
        f"CPU-s), load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    measured = args.target in args.default_sizes
    sizes = ", ".join(map(str, args.default_sizes))
    one = len(args.default_sizes) == 1
    how = "measured" if measured else f"extrapolated {'in proportion' if one else 'linearly'} from N = {sizes}"
    for kind in args.rows:
        print(f"\nDefault spaces, time per candidate (PNG release: every intensity view), {kind} training rows:")
        rows = default_spaces_cost(
            samp["images"],
            samp["modality"],
            args.default_sizes,
            args.candidates,
            kind,
            not args.no_dense,
            args.bases,
            specs=args.spaces,
            specificity=args.specificity,
        )
        modes = ("fast", "dense") if not args.no_dense else ("fast",)
        at = {m: extrapolate(rows, args.target, f"{m}_s") for m in modes}
        at_cpu = {m: extrapolate(rows, args.target, f"{m}_cpu_s") for m in modes}
        print(
            f"\nAt N = {args.target} training images, {kind} rows ({how}); sampling {samp['s_per_image']:.1f} s per image:"
        )
        print(f"  {'space':<10} " + " ".join(f"{m + ' s':>9} {'CPU-s':>7} {'/ sampling':>10}" for m in modes))
        for spec in at["fast"]:
            print(
                f"  {spec:<10} "
                + " ".join(
                    f"{at[m][spec]:9.2f} {at_cpu[m][spec]:7.2f} {at[m][spec] / samp['s_per_image']:10.1%}"
                    for m in modes
                ),
                flush=True,
            )
        totals = {m: (sum(at[m].values()), sum(at_cpu[m].values())) for m in modes}
        print(
            f"  {'all':<10} "
            + " ".join(f"{w:9.2f} {c:7.2f} {w / samp['s_per_image']:10.1%}" for w, c in totals.values())
        )
        w, c = totals["fast"]
        print(
            f"  safeguard / sampling = {w / samp['s_per_image']:.1%} (CPU time: {c / samp['cpu_s_per_image']:.1%}); "
            "goal <= 10%; answers of fast and dense search identical: "
            + (str(all(r["agree"] for r in rows)) if all("agree" in r for r in rows) else "not compared (--no-dense)"),
            flush=True,
        )


if __name__ == "__main__":
    main()

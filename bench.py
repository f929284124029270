"""
Benchmarks: every timing number in the README comes from one of these commands (random weights:
the speed does not depend on them). Nothing imports this file.

    python bench.py train --model B/2 --precision bf16 --compile   # D+G step: ms, TFLOP/s, memory
    python bench.py train --model B/2 --profile prof/              # + torch.profiler of 2 steps
    python bench.py train --recipe fm-digits                       # one flow-matching step
    python bench.py cafm --model XL/2 --batch-size 32 --precision bf16   # CAFM's steps against FM's
    python bench.py sample --model XL/2 --vae sd-vae-ft-mse.bin --precision bf16      # images/s
    python bench.py inception --batch-size 250                     # Inception images/s
    python bench.py fid --model XL/2 --precision bf16 --compile    # a FID-50K, stage by stage
    python bench.py data                                           # raw images vs latent cache
"""

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

import fid
import train
from afm import (ContinuousAdversarialFlowLoss, FlowDerivative, drop_labels, ema_update,
                 flow_matching_loss, generate)
from dataset import ImageFolder, LatentCache, build_cache
from model import Discriminator, Generator, models
from vae import AutoencoderKL, encode, load_vae, to_images


def where(device, args=None):
    """The device for a printed line; given args, with the precision and --compile:
    'bf16 compile on NVIDIA H200'."""
    name = f"cpu ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    if args is None:
        return name
    return f"{args.precision}{' compile' if args.compile else ''} on {name}"


def peak_memory(device):
    if device.type != "cuda":
        return "- (cpu)"
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, done):
    """(seconds per call of fn, seconds of warm-up): `warmup` untimed calls (compilation, cuDNN
    autotuning, allocator), then timed calls until done(calls, seconds)."""
    t_warm = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    n = 0
    t0 = time.perf_counter()
    while not done(n, time.perf_counter() - t0):
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n, t0 - t_warm


def latent_shape(args):
    """The usual input of --model: the 8x8 digits for T/*, else SD-VAE latents of --image-size
    images. -> (channels, size, classes)"""
    if args.model.startswith("T/"):
        return 1, 8, 10
    return 4, args.image_size // 8, 1000


def bench_train(args, device):
    """Time of train.py's step for --recipe: one discriminator step + one generator step for
    AFM, one step for flow matching and the classifier."""
    flags = ["--recipe", args.recipe, "--model", args.model, "--data", "digits"]
    if args.steps:
        flags += ["--steps", args.steps]
    if args.grad_checkpoint:
        flags.append("--grad-checkpoint")
    if args.precision == "bf16":
        flags += ["--precision", "bf16"]
    s = train.resolve(flags)[0]
    C, H, K = latent_shape(args)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    trainer = train.OBJECTIVES[s.objective](s, C, H, K, device, amp)  # no process group
    B = args.batch_size
    x0 = torch.randn(B, C, H, H, device=device)
    y = torch.randint(0, K, (B,), device=device)
    pair = isinstance(trainer, train.Pair)
    what = "D+G step" if pair else "step"

    def one():  # the AFM pair alternates: step 0 is D's, step 1 is G's
        if pair:
            trainer.d_step(x0, y, 0)
        trainer.g_step(x0, y, 1)

    # eager, before compiling: forward + backward of the timed steps
    with FlopCounterMode(display=False) as counter:
        one()
    flops = counter.get_total_flops()
    if args.compile:  # regional, as train.py: one compiled graph for all blocks (per input shape)
        trainer.G.compile_blocks()
        if pair:
            trainer.D.compile_blocks()
    dt, t_warm = timed(one, device, 3, lambda n, t: n >= args.iters)  # 3 warm-up (and compile)
    mem = peak_memory(device)
    print(f"train {args.recipe} {args.model} batch {B} {where(device, args)}: {what} "
          f"{dt * 1000:.1f} ms, {B / dt:.1f} img/s, {flops / dt / 1e12:.2f} TFLOP/s "
          f"({flops / 1e9:.1f} GFLOP per {what}), warm-up {t_warm:.0f} s, peak mem {mem}",
          flush=True)
    if args.profile:  # where the time goes: operators by total time, and a chrome://tracing trace
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(2):
                one()
            sync(device)
        os.makedirs(args.profile, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.profile, "train_step.json"))
        table = prof.key_averages().table(sort_by=f"{device.type}_time_total", row_limit=25)
        with open(os.path.join(args.profile, "train_step.txt"), "w") as f:
            f.write(table)
        print(table, flush=True)
        print(f"wrote {args.profile}/train_step.json (trace) and train_step.txt", flush=True)


def bench_cafm(args, device):
    """The CAFM step against the flow-matching step (arXiv 2604.11521: CAFM costs about 4.8x
    flow matching's training time per epoch). Networks of --model as CAFM post-trains them: G a
    velocity network with a null label row, D the same size with RMSNorm and a timestep (the
    release's models/cafm/sit, commit 519601d). Each step is afm.py's loss, its backward, the
    clipped AdamW update and, for G, the EMA, as train.py takes them: a D step (one vmap'd JVP
    for the real and the generated velocity, G without gradient), a G step (a JVP of the
    frozen D, backpropagated into G), and a flow-matching step of the same G. Every step reads
    one batch, so the release's schedule after its warm-up, 16 D steps per G step, costs
    (16 D + G) / 17 per batch: its ratio to the flow-matching step is the ratio per epoch."""
    C, H, K = latent_shape(args)
    kw = dict(input_size=H, in_channels=C, num_classes=K + 1)  # K classes and the null label
    G = Generator(**models[args.model], **kw, use_t_src=True).to(device)
    D = Discriminator(**models[args.model], **kw, use_t=True, norm="rms").to(device)
    for net in (G, D):
        net.grad_checkpointing = args.grad_checkpoint
    ema = copy.deepcopy(G).requires_grad_(False)
    D_flow = FlowDerivative(D)
    loss = ContinuousAdversarialFlowLoss(null_class=K)  # the release's n_dis 16, cp, ot
    # the release's optimizers: CAFM's AdamW (0, 0.95), lr 1e-5, clip 1e4; flow matching's
    # AdamW (0.9, 0.999), lr 1e-4, no clipping (train.py's recipes)
    opt_d = train.adamw(D, 1e-5, (0.0, 0.95), 0.0, device)
    opt_g = train.adamw(G, 1e-5, (0.0, 0.95), 0.0, device)
    opt_fm = train.adamw(G, 1e-4, (0.9, 0.999), 0.0, device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    B = args.batch_size
    x0 = torch.randn(B, C, H, H, device=device)
    y = torch.randint(0, K, (B,), device=device)

    def d_step():
        with amp:
            d_loss = loss.d_loss(G, D_flow, x0, y, 0)[0]
        d_loss.backward()
        train.step_optimizer(D, opt_d, 1e4)

    def g_step():
        with amp:
            g_loss = loss.g_loss(G, D_flow, x0, y, 0)[0]
        g_loss.backward()
        train.step_optimizer(G, opt_g, 1e4)
        ema_update(ema, G, 0.99)

    def fm_step():
        labels = drop_labels(y, 0.1, K)  # flow matching's class dropout, as train.py's
        with amp:
            fm_loss = flow_matching_loss(G, x0, labels)[0]
        fm_loss.backward()
        train.step_optimizer(G, opt_fm, None)
        ema_update(ema, G, 0.9999)

    if args.compile:  # regional, as train.py
        for net in (G, D):
            net.compile_blocks()
    ms = {}
    for name, fn in (("D", d_step), ("G", g_step), ("FM", fm_step)):
        ms[name] = 1000 * timed(fn, device, 3, lambda n, t: n >= args.iters)[0]
    n = loss.n_dis
    schedule = (n * ms["D"] + ms["G"]) / (n + 1)
    mem = peak_memory(device)
    print(f"cafm {args.model} batch {B} {where(device, args)}: D step {ms['D']:.1f} ms, "
          f"G step {ms['G']:.1f} ms, schedule step ({n} D + 1 G) / {n + 1} {schedule:.1f} ms; "
          f"flow-matching step {ms['FM']:.1f} ms; CAFM / flow matching {schedule / ms['FM']:.2f}x "
          f"per batch and epoch (the paper: about 4.8x); peak mem {mem}", flush=True)


def bench_sample(args, device):
    """Images/s of sampling --model (+ SD-VAE decoding with --vae), as sample.py does it."""
    B = args.batch_size
    steps = int(args.steps or 1)
    pred = "x" if steps == 1 else "v"  # the release's: x for 1 NFE, v for more
    C, H, K = latent_shape(args)
    G = Generator(**models[args.model], input_size=H, in_channels=C, num_classes=K,
                  use_t_src=steps > 1, repeat=args.repeat)
    G = G.to(device).eval().requires_grad_(False)
    vae = load_vae(args.vae, device) if args.vae and C == 4 else None
    if args.compile:
        G.compile_blocks()
    z = torch.randn(B, C, H, H, device=device)
    y = torch.randint(0, K, (B,), device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def one():
        with amp:
            to_images(generate(G, z, y, steps, pred), vae)
        sync(device)

    # 2 warm-up batches, then at least 3 batches and 5 s
    dt = timed(one, device, 2, lambda n, t: n >= 3 and t >= 5)[0]
    what = f"{args.model}"
    if args.repeat > 1:
        what += f" x{args.repeat}"
    what += f" {C}x{H}x{H}, {steps} NFE"
    if vae is not None:
        what += " + VAE decode"
    print(f"sample {what}, batch {B}, {where(device, args)}: {B / dt:.1f} images/s "
          f"({dt * 1000:.1f} ms per batch)", flush=True)


def bench_inception(args, device):
    """Inception images/s at 256 px (ImageNet samples)."""
    model = fid.InceptionV3().to(device).eval()
    # random weights' vanishing activations: keep them out of slow denormal arithmetic
    torch.set_flush_denormal(True)
    x = torch.randint(0, 256, (args.batch_size, 3, 256, 256), dtype=torch.uint8, device=device)

    def one():
        model(x)
        sync(device)

    # 1 warm-up batch, then 5 batches or 20 s, whichever comes first
    with torch.inference_mode(), fid.exact_fp32():
        dt = timed(one, device, 1, lambda n, t: n >= 5 or (n > 0 and t >= 20))[0]
    print(f"inception fp32 on {where(device)}: {args.batch_size / dt:.1f} images/s "
          f"(batch {args.batch_size}, 256x256 uint8 -> 299)")


@torch.no_grad()
def bench_fid(args, device):
    """A FID-N end to end, timed by stage, with random weights: N class-balanced samples of
    --model (1 NFE, with sample.py's per-index noise) decoded by a full-size SD-VAE (for latent
    models), their Inception features, then the statistics and the Frechet distances (FID and
    sFID) against the first half of the samples."""
    C, H, K = latent_shape(args)
    G = Generator(**models[args.model], input_size=H, in_channels=C, num_classes=K)
    G = G.to(device).eval()
    vae = AutoencoderKL().to(device).eval().requires_grad_(False) if C == 4 else None
    if args.compile:
        G.compile_blocks()
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    N = args.num_samples
    B = args.batch_size
    labels = np.arange(N) // max(N // K, 1) % K
    times = {}

    t0 = time.time()
    images = []
    for i in range(0, N, B):  # as sample.py: each sample's own noise
        z = fid.noise_of(list(range(i, min(i + B, N))), (C, H, H), seed=0).to(device)
        y = torch.tensor(labels[i:i + B], device=device)
        with amp:
            images.append(fid.to_uint8(to_images(generate(G, z, y), vae)))
    images = np.concatenate(images)
    sync(device)
    times["sampling" if vae is None else "sampling + VAE decode"] = time.time() - t0

    t0 = time.time()
    torch.set_flush_denormal(True)
    inception = fid.InceptionV3().to(device).eval()
    feats = fid.compute_features(inception, images, 250, device, progress=False)
    times["Inception features"] = time.time() - t0

    t0 = time.time()
    s = fid.feature_stats(feats)
    r = fid.feature_stats({k: v[:N // 2] for k, v in feats.items()})
    times["statistics"] = time.time() - t0

    t0 = time.time()
    fid.frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"])
    fid.frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"])
    times["FID + sFID (sqrtm)"] = time.time() - t0

    stages = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    print(f"fid {args.model} {N} samples, batch {B}, {where(device, args)}: {stages}; "
          f"total {sum(times.values()) / 60:.2f} min", flush=True)


def synthetic_jpegs(folder, n, seed=0):
    """n smooth noisy JPEGs of ImageNet-like sizes in 3 class folders: decode and crop cost as
    there."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.integers(300, 600, 2)
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.random(3)  # (1, w, 3)
        arr = ramp + rng.normal(0, 20, (h, w, 3))  # (h, w, 3)
        os.makedirs(os.path.join(folder, f"class{i % 3}"), exist_ok=True)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"class{i % 3}", f"{i}.jpg"))


def bench_data(args, device):
    """Training batches per second: raw images (decode, crop, flip, VAE encode) against the
    latent cache."""
    tmp = tempfile.TemporaryDirectory()
    vae_path = args.vae
    if not args.vae:  # a tiny random VAE with SD's /8 latents: compares pipelines, not VAEs
        vae_path = os.path.join(tmp.name, "tiny_vae.pt")
        tiny = AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, norm_num_groups=8)
        torch.save(tiny.state_dict(), vae_path)
    data = args.data
    if not args.data:
        data = os.path.join(tmp.name, "images")
        synthetic_jpegs(data, 2 * args.batch_size)
    vae = load_vae(vae_path, device=device)

    def rate(ds, step):  # samples/s over --iters batches, after one untimed (warm-up) batch
        loader = DataLoader(ds, args.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=True, persistent_workers=args.workers > 0)

        def endless():  # as many epochs as needed
            while True:
                yield from loader
        stream = endless()

        def one():
            x, y = next(stream)
            step(x)
        seconds = timed(one, device, 1, lambda n, t: n >= args.iters)[0]
        return args.batch_size / seconds

    folder = ImageFolder(data, args.image_size)
    n = min(len(folder), args.max_images)
    raw = rate(Subset(folder, range(n)), lambda x: encode(vae, x.to(device)))  # as train.py
    t0 = time.perf_counter()
    cache = os.path.join(tmp.name, "cache")
    build_cache(data, vae_path, cache, args.image_size, args.batch_size, 1024, args.workers, n)
    build = n / (time.perf_counter() - t0)
    cached = rate(LatentCache(cache), lambda x: x.to(device))
    print(f"data on {where(device)}, {args.image_size}px, batch {args.batch_size}, "
          f"{args.workers} workers, VAE {args.vae or 'tiny random (32,32,32,32)'}, {n} images")
    print(f"raw images (decode, crop, flip, VAE encode, sample): {raw:10.1f} samples/s")
    print(f"latent cache (read, flip, posterior sample):         {cached:10.1f} samples/s")
    print(f"cache build (image + mirror encoded once):            {build:10.1f} images/s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("what", choices=["train", "cafm", "sample", "inception", "fid", "data"])
    a("--num-samples", type=int, default=50000,
      help="fid: samples (and a reference of half of them)")
    a("--model", choices=list(models), default="T/2", help="train, cafm, sample: network size")
    a("--recipe", choices=list(train.RECIPES), default="1nfe", help="train: the recipe")
    a("--steps", default=None, help="train, sample: NFE (default: the recipe's; sample: 1)")
    a("--repeat", type=int, default=1, help="sample: deep generator repetitions")
    a("--batch-size", type=int,
      help="per device (default train/data 32, sample/fid 256, inception 250)")
    a("--precision", choices=["fp32", "bf16"], default="fp32")
    a("--compile", action="store_true")
    a("--grad-checkpoint", action="store_true",
      help="train, cafm: recompute activations in backward")
    a("--iters", type=int, default=10, help="train, cafm: timed steps (each); data: timed batches")
    a("--profile", metavar="DIR", help="train: torch.profiler table and trace of 2 steps into DIR")
    a("--image-size", type=int, default=256, help="latent models: image-size / 8 latents")
    a("--vae", help="sample: decode with this SD-VAE; data: encode with it (default: a tiny "
                    "random one)")
    a("--data", help="data: an image folder (default: synthetic JPEGs)")
    a("--workers", type=int, default=2, help="data: DataLoader workers")
    a("--max-images", type=int, default=256, help="data: images read, and cached")
    a("--device", choices=["auto", "cpu"], default="auto")
    args = p.parse_args(argv)
    default_batch = {"train": 32, "cafm": 32, "sample": 256, "inception": 250, "fid": 256,
                     "data": 32}
    if args.batch_size is None:
        args.batch_size = default_batch[args.what]
    return args


def main(args):
    device = torch.device("cpu")
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py and sample.py
        torch.backends.cudnn.allow_tf32 = True
    benches = {"train": bench_train, "cafm": bench_cafm, "sample": bench_sample,
               "inception": bench_inception, "fid": bench_fid, "data": bench_data}
    benches[args.what](args, device)


if __name__ == "__main__":
    main(parse_args())

"""
Benchmarks: every timing number in the README comes from one of these commands (random weights: the speed
does not depend on them). Nothing here is imported by the other scripts.

    python bench.py train --model B/2 --precision bf16 --compile      # one D step + one G step: ms, TFLOP/s, memory
    python bench.py train --model B/2 --profile prof/                 # + torch.profiler table and trace of 2 steps
    python bench.py sample --model XL/2 --batch-size 256 --vae sd-vae-ft-mse.bin --precision bf16   # images/s
    python bench.py inception --batch-size 250                        # Inception images/s
    python bench.py fid --model XL/2 --num-samples 50000 --precision bf16 --compile   # a FID-50K, stage by stage
    python bench.py data                                              # raw images vs latent cache, samples/s
"""

import argparse
import itertools
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
from dataset import ImageFolder, LatentCache, build_cache
from model import Generator, models
from sample import sample_images, sample_indices, to_uint8
from vae import AutoencoderKL, encode, load_vae


def where(device, args=None):
    """The device for a printed line; given args, after the precision and --compile: 'bf16 compile on NVIDIA H200'."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return name if args is None else f"{args.precision}{' compile' if args.compile else ''} on {name}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, done):
    """(seconds per call of fn, seconds of warm-up): `warmup` untimed calls (compilation, cuDNN autotuning,
    allocator), then timed calls until done(calls, seconds)."""
    t_warm = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while not done(n, time.perf_counter() - t0):
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n, t0 - t_warm


def latent_shape(args):
    """The usual input of --model: the 8x8 digits for T/*, else SD-VAE latents of --image-size images."""
    return (1, 8, 10) if args.model.startswith("T/") else (4, args.image_size // 8, 1000)


def bench_train(args, device):
    """Time of one discriminator step + one generator step of --recipe, as train.py runs them."""
    flags = ["--recipe", args.recipe, "--model", args.model, "--data", "digits"] + ["--steps", args.steps] * bool(
        args.steps) + ["--grad-checkpoint"] * args.grad_checkpoint
    s = train.resolve(flags)[0]
    C, H, K = latent_shape(args)
    state = train.build(s, C, H, K, device)
    G, D, afm = state["model"], state["dis"], state["gradnorm"]
    B = args.batch_size
    x0, y = torch.randn(B, C, H, H, device=device), torch.randint(0, K, (B,), device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def pair():
        for d_step, net, opt in ((True, D, state["opt_d"]), (False, G, state["opt_g"])):
            with train.frozen(None if d_step else D):
                with amp:
                    loss = afm.d_loss(G, D, x0, y, 0)[0] if d_step else afm.g_loss(G, D, x0, y, 0)[0]
                loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), s.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # eager, before compiling: forward + backward of both steps
        pair()
    flops = counter.get_total_flops()
    if args.compile:  # regional, as train.py: one compiled graph for all blocks (per input shape)
        G.compile_blocks(), D.compile_blocks()
    dt, t_warm = timed(pair, device, 3, lambda n, t: n >= args.iters)  # 3 warm-up steps (and compilation)
    mem = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if device.type == "cuda" else "- (cpu)"
    print(f"train {args.recipe} {args.model} batch {B} {where(device, args)}: D+G step {dt * 1000:.1f} ms, "
          f"{B / dt:.1f} img/s (one image = one D and one G step), {flops / dt / 1e12:.2f} TFLOP/s "
          f"({flops / 1e9:.1f} GFLOP per D+G step), warm-up {t_warm:.0f} s, peak mem {mem}", flush=True)
    if args.profile:  # where the time goes: operators by total time, and a trace for chrome://tracing
        acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(2):
                pair()
            sync(device)
        os.makedirs(args.profile, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.profile, "train_step.json"))
        table = prof.key_averages().table(sort_by=f"{device.type}_time_total", row_limit=25)  # cuda_ or cpu_
        with open(os.path.join(args.profile, "train_step.txt"), "w") as f:
            f.write(table)
        print(table + f"\nwrote {args.profile}/train_step.json (trace) and train_step.txt", flush=True)


def bench_sample(args, device):
    """Images/s of sampling --model (+ SD-VAE decoding with --vae), as sample.py does it."""
    B, steps = args.batch_size, int(args.steps or 1)
    C, H, K = latent_shape(args)
    G = Generator(**models[args.model], input_size=H, in_channels=C, num_classes=K, use_t_src=steps > 1,
                  repeat=args.repeat).to(device).eval().requires_grad_(False)
    vae = load_vae(args.vae, device) if args.vae and C == 4 else None
    G.compile_blocks() if args.compile else None
    z, y = torch.randn(B, C, H, H, device=device), torch.randint(0, K, (B,), device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    dt = timed(lambda: (sample_images(G, z, y, steps, "x" if steps == 1 else "v", vae, amp), sync(device)), device,
               2, lambda n, t: n >= 3 and t >= 5)[0]  # 2 warm-up batches, then at least 3 batches and 5 s
    what = f"{args.model}{f' x{args.repeat}' if args.repeat > 1 else ''} {C}x{H}x{H}, {steps} NFE"
    print(f"sample {what}{' + VAE decode' if vae else ''}, batch {B}, {where(device, args)}: {B / dt:.1f} images/s "
          f"({dt * 1000:.1f} ms per batch)", flush=True)


def bench_inception(args, device):
    """Inception images/s at 256 px (ImageNet samples)."""
    model = fid.InceptionV3().to(device).eval()
    torch.set_flush_denormal(True)  # random weights' vanishing activations: keep them out of slow denormal math
    x = torch.randint(0, 256, (args.batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.inference_mode(), fid.exact_fp32():  # 1 warm-up batch, then 5 batches or 20 s, whichever comes first
        dt = timed(lambda: (model(x), sync(device)), device, 1, lambda n, t: n >= 5 or (n > 0 and t >= 20))[0]
    print(f"inception fp32 on {where(device)}: {args.batch_size / dt:.1f} images/s (batch {args.batch_size}, "
          f"256x256 uint8 -> 299)")


@torch.no_grad()
def bench_fid(args, device):
    """A FID-N end to end, timed by stage, with random weights: N class-balanced samples of --model (1 NFE, with
    sample.py's per-index noise) decoded by a full-size SD-VAE (for latent models), Inception features of them,
    then the statistics and the Frechet distances (FID and sFID) against the first half of the samples."""
    C, H, K = latent_shape(args)
    G = Generator(**models[args.model], input_size=H, in_channels=C, num_classes=K).to(device).eval()
    vae = AutoencoderKL().to(device).eval().requires_grad_(False) if C == 4 else None
    G.compile_blocks() if args.compile else None
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    N, B, times = args.num_samples, args.batch_size, {}
    labels = np.arange(N) // max(N // K, 1) % K
    t0 = time.time()
    images = np.concatenate([to_uint8(sample_indices(G, list(range(i, min(i + B, N))), labels[i:i + B].tolist(),
                                                     (C, H, H), 1, "x", 0, B, vae, amp)) for i in range(0, N, B)])
    sync(device)
    times["sampling" + (" + VAE decode" if vae else "")], t0 = time.time() - t0, time.time()
    torch.set_flush_denormal(True)
    feats = fid.compute_features(fid.InceptionV3().to(device).eval(), images, 250, device, progress=False)
    times["Inception features"], t0 = time.time() - t0, time.time()
    s, r = (fid.feature_stats({k: v[part] for k, v in feats.items()}) for part in (slice(None), slice(N // 2)))
    times["statistics"], t0 = time.time() - t0, time.time()
    fid.frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"]), fid.frechet_distance(
        s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"])
    times["FID + sFID (sqrtm)"] = time.time() - t0
    print(f"fid {args.model} {N} samples, batch {B}, {where(device, args)}: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {sum(times.values()) / 60:.2f} min", flush=True)


def bench_data(args, device):
    """Training batches per second: raw images (decode, crop, flip, VAE encode) against the latent cache."""
    tmp = tempfile.TemporaryDirectory()
    vae_path, data = args.vae or os.path.join(tmp.name, "tiny_vae.pt"), args.data or os.path.join(tmp.name, "images")
    if not args.vae:  # tiny random VAE with SD's /8 latents: compares pipelines, not VAEs
        torch.save(AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, norm_num_groups=8).state_dict(),
                   vae_path)
    if not args.data:  # smooth noisy JPEGs of ImageNet-like sizes: decode + crop cost as there
        rng = np.random.default_rng(0)
        for i in range(2 * args.batch_size):
            w, h = rng.integers(300, 600, 2)
            arr = np.linspace(0, 255, w)[None, :, None] * rng.random(3) + rng.normal(0, 20, (h, w, 3))  # (h, w, 3)
            os.makedirs(os.path.join(data, f"class{i % 3}"), exist_ok=True)
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(f"{data}/class{i % 3}/{i}.jpg")
    vae = load_vae(vae_path, device=device)

    def rate(ds, step):  # samples/s over --iters batches, after one untimed (warm-up) batch
        loader = DataLoader(ds, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
                            persistent_workers=args.workers > 0)
        stream = (b for _ in itertools.count() for b in loader)  # as many epochs as needed
        return args.batch_size / timed(lambda: step(*next(stream)), device, 1, lambda n, t: n >= args.iters)[0]

    folder = ImageFolder(data, args.image_size)
    n = min(len(folder), args.max_images)
    raw = rate(Subset(folder, range(n)), lambda x, y: encode(vae, x.to(device)))  # what train.py does per batch
    t0, cache = time.perf_counter(), os.path.join(tmp.name, "cache")
    build_cache(data, vae_path, cache, args.image_size, args.batch_size, 1024, args.workers, n)
    build = n / (time.perf_counter() - t0)
    cached = rate(LatentCache(cache), lambda x, y: x.to(device))
    print(f"data on {where(device)}, {args.image_size}px, batch {args.batch_size}, {args.workers} workers, "
          f"VAE {args.vae or 'tiny random (32,32,32,32)'}, {n} images")
    print(f"raw images (decode, crop, flip, VAE encode, sample): {raw:10.1f} samples/s")
    print(f"latent cache (read, flip, posterior sample):         {cached:10.1f} samples/s")
    print(f"cache build (image + mirror encoded once):            {build:10.1f} images/s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["train", "sample", "inception", "fid", "data"])
    p.add_argument("--num-samples", type=int, default=50000, help="fid: samples (and a reference of half of them)")
    p.add_argument("--model", choices=list(models), default="T/2", help="train, sample: network size")
    p.add_argument("--recipe", choices=list(train.RECIPES)[:-1], default="1nfe", help="train: the method's recipe")
    p.add_argument("--steps", default=None, help="train, sample: NFE (default: the recipe's; sample: 1)")
    p.add_argument("--repeat", type=int, default=1, help="sample: deep generator repetitions")
    p.add_argument("--batch-size", type=int, help="per device (default train/data 32, sample/fid 256, inception 250)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true", help="train: recompute activations in backward")
    p.add_argument("--iters", type=int, default=10, help="train: timed D+G steps; data: timed batches")
    p.add_argument("--profile", metavar="DIR", help="train: torch.profiler table and trace of 2 steps into DIR")
    p.add_argument("--image-size", type=int, default=256, help="latent models: image-size / 8 latents")
    p.add_argument("--vae", help="sample: decode with this SD-VAE; data: encode with it (default: a tiny random one)")
    p.add_argument("--data", help="data: an image folder (default: synthetic JPEGs)")
    p.add_argument("--workers", type=int, default=2, help="data: DataLoader workers")
    p.add_argument("--max-images", type=int, default=256, help="data: images read, and cached")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    args = p.parse_args(argv)
    default_batch = {"train": 32, "sample": 256, "inception": 250, "fid": 256, "data": 32}
    args.batch_size = args.batch_size or default_batch[args.what]
    return args


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py and sample.py
    {"train": bench_train, "sample": bench_sample, "inception": bench_inception, "fid": bench_fid,
     "data": bench_data}[args.what](args, device)


if __name__ == "__main__":
    main(parse_args())

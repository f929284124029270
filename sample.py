"""
Sampling from Adversarial Flow Models (arXiv 2511.22475, Sec. 3.4): noise -> a PNG grid, or the
ADM-format npz that the paper's FID-50K is computed from; DiT's sample.py and sample_ddp.py in
one script. It reads our checkpoints and the release's bare state dicts, as the release's
`generate.py` and `configs/generate/*.yaml` (commit dc11741) sample them.

    python sample.py --ckpt results/000-T-2                         # grid.png: digits, EMA weights
    python sample.py --ckpt xl2_1nfe_guided_FID2.38.pth --vae sd-vae-ft-mse.bin --classes 207 360
    python sample.py --ckpt xl2_2nfe_guided_FID2.11.pth --steps 2 --vae ...       # 2 NFE (pred v)
    python sample.py --ckpt xl2_56layer_1nfe_guided_FID2.08.pth --repeat 2 --vae ...  # 56 layers
    torchrun --nproc_per_node=8 sample.py --ckpt X --vae ... --num-samples 50000 \\
        --out samples.npz --fid VIRTUAL_imagenet256_labeled.npz   # FID, sFID, IS, precision, recall
    python sample.py --ckpt CAFM_OR_FM_RUN --steps 8 --cfg 2        # a velocity model, guided
    python sample.py --ckpt SiT-XL-2-256.pt --vae sd-vae-ft-mse.bin --cfg 1.5 --cfg-channels 3

What a file holds. Our checkpoints carry their settings: flow-matching and CAFM runs are velocity
fields, integrated as an ODE at any --steps, Euler or Heun (default: the run's grid NFE and
solver); AFM generators sample in the steps they were trained for. A bare state dict is read
from its keys (model.generator_config): SiT's layout (SiT-XL-2-256.pt, the release's CAFM
checkpoints), told by its head's 2C output channels, is a velocity field sampled by Heun at 250
NFE, as the release validates its CAFM post-training; any other is the release's AFM
generator, 1 NFE, x-prediction, or velocity when it is t-conditioned (--steps, --pred and
--repeat say what the keys cannot). --cfg SCALE is classifier-free guidance of a velocity model
with a null class (afm.generate): all channels, the definition, or the first 3 of the 4 latent
channels with --cfg-channels 3, as SiT's own sample.py.

An npz holds N / classes samples of each class in the release's shuffled order (fid.file_order);
sample i's noise depends only on (seed, i), so the file is the same for any number of
processes. Each process samples its share and rank 0 writes the file once, atomically. An
existing --out is refused; a stopped run is simply started again. --fid's reference and
Inception weights are loaded before the first sample is drawn.
"""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

import fid
from afm import generate
from dataset import open_vae
from model import Generator, generator_config
from plumbing import (check_out, cleanup, load_checkpoint, load_weights, positive, print0,
                      save_grid, save_npz, setup)
from vae import to_images

# DiT's sample.py grid: dog, otter, panda, ...
IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def load_generator(path, weights="ema", steps=None, pred=None, solver=None, repeat=None,
                   vae=None):
    """--ckpt -> (the Generator in eval mode on the CPU, how to sample it: a dict). What is not
    given comes from our checkpoint's settings, or from a bare file's keys (see above)."""
    path, ckpt = load_checkpoint(path)
    # our checkpoints' settings (train.py's args); None in a bare state dict
    a = ckpt.get("args")
    sd = ckpt[weights] if a else ckpt
    repeat = repeat or (a["repeat"] if a else 1)
    try:
        name, kw = generator_config(sd, repeat)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: --ckpt {path}: {e}") from None
    # shapes only, on the meta device: the tensors come from the file
    with torch.device("meta"):
        G = Generator(**kw)
    load_weights(G, sd, f"--ckpt {path} (read as {name}, repeat {repeat}; --repeat?)")
    sit = kw["learn_sigma"]
    t_input = sit or kw["use_t_src"] or kw["use_t_tgt"]
    if a:  # ours: the run's settings say
        flow = a["objective"] in ("flow", "cafm")
        null = a["class_dropout"] > 0
        trained = a["sample_steps"] if flow else a["steps"]
        pred = pred or a["pred"]
        solver = solver or (a["sample_solver"] if flow else "euler")
        vae = vae or a["vae"]
    else:
        # SiT's layout: trained with class dropout 0.1 (a null row), validated as the release
        # validates its CAFM runs (configs/train/cafm/train_cafm_sit.yaml: heun, 250 steps)
        flow = sit
        null = sit or kw["num_classes"] == 1001
        trained = 250 if sit else 1
        pred = pred or ("v" if t_input else "x")
        solver = solver or ("heun" if sit else "euler")
    steps = steps or (1 if trained == "any" else trained)
    if steps > 1 and not (flow or t_input):
        raise SystemExit(f"error: --steps {steps}: {path} is a 1-NFE generator (no timestep "
                         f"input): it samples in one step")
    K = kw["num_classes"] - null  # the null class, if any, is the last row
    H = kw["input_size"]
    about = f"{path} ({name} on {kw['in_channels']}x{H}x{H}, {K} classes)"
    how = dict(steps=steps, pred=pred, solver=solver, vae=vae, classes=K, flow=flow,
               null=K if null else None, size=kw["input_size"], about=about)
    return G.eval().requires_grad_(False), how


def main(args):
    rank, world, device = setup(args.device)
    G, how = load_generator(args.ckpt, args.weights, args.steps, args.pred, args.solver,
                            args.repeat, args.vae)
    K = how["classes"]
    C = G.in_channels
    if args.cfg != 1 and (how["pred"] != "v" or how["null"] is None):
        raise SystemExit(f"error: --cfg {args.cfg}: guidance needs a velocity model trained "
                         f"with class dropout (a null class); {how['about']}")
    if args.num_samples % K:
        raise SystemExit(f"error: --num-samples {args.num_samples} is not divisible by the {K} "
                         f"classes of {how['about']}")
    classes = args.classes or (IMAGENET_CLASSES if K == 1000 else list(range(min(K, 10))))
    if not args.num_samples and not 0 <= min(classes) <= max(classes) < K:
        raise SystemExit(f"error: --classes: {how['about']} has classes 0 to {K - 1}")
    if C == 4 and not how["vae"]:
        raise SystemExit("error: a latent model (4 channels) needs --vae (sd-vae-ft-mse) to "
                         "decode its samples")
    vae = open_vae(how["vae"], device) if C == 4 else None
    inception = None
    ref = None
    # --fid's files are read before the first sample, not after hours of sampling
    if args.fid and rank == 0:
        inception = fid.load_inception(args.inception, device)
        ref = fid.reference_stats(args.fid, inception, device=device, flag="--fid")
    G.to(device)
    if args.compile:
        G.compile_blocks()
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    guided = f", cfg {args.cfg:g}" if args.cfg != 1 else ""
    print0(f"{how['about']}; {how['steps']} step(s), pred {how['pred']}, {how['solver']}"
           f"{guided}; {world} process(es) on {device}")

    def sample(z, y):  # noise and labels -> images (n, 3, H, W) in [-1, 1]
        with amp:
            x = generate(G, z, y, how["steps"], how["pred"], how["solver"], args.cfg,
                         how["null"], args.cfg_channels)
            return to_images(x, vae)

    # Sample i's noise is its own (fid.noise_of): the same for any batch or process count.
    shape = (C, how["size"], how["size"])

    def samples(indices, labels, progress=False):
        return fid.sample_batches(sample, indices, labels, shape, args.seed, args.batch_size,
                                  device, progress)

    if not args.num_samples:
        # the grid: a row per class, --per-class columns (unconditional: a square)
        y = []
        for c in classes:
            y += [c] * args.per_class
        y = y * args.per_class if K == 1 else y
        if rank == 0:
            x = torch.cat(list(samples(list(range(len(y))), y)))
            save_grid(x, args.out, nrow=args.per_class)
            print0(f"wrote {args.out}: classes {classes}, seed {args.seed}")
        return cleanup()
    # Sample i has class i // (N / K), as in the release's generate.py; rank r makes samples
    # r, r + world, ...
    N = args.num_samples
    labels = np.arange(N) // (N // K)
    batches = samples(list(range(rank, N, world)), labels, progress=rank == 0)
    part = np.concatenate([fid.to_uint8(x) for x in batches])  # (n, H, W, 3)
    parts = [part]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    cleanup()
    if rank != 0:
        return
    # every rank's share in sample order, then in the release's file order (the Inception
    # Score is taken in 5,000-sample chunks of it)
    samples = np.empty((N, *parts[0].shape[1:]), np.uint8)  # (N, H, W, 3)
    for r, p in enumerate(parts):
        samples[r::world] = p
    order = fid.file_order(N)
    save_npz(args.out, arr_0=samples[order], arr_1=labels[order])
    print(f"wrote {args.out}: arr_0 {samples.shape} uint8, arr_1 labels, {N // K} per class")
    if args.fid:
        features = fid.compute_features(inception, samples[order], device=device)
        m = fid.evaluate(features, ref, device=device)
        line = f"FID {m['fid']:.4f} | sFID {m['sfid']:.4f} | IS {m['inception_score']:.4f}"
        # precision and recall need the reference's images
        if m["precision"] is not None:
            line += f" | precision {m['precision']:.4f} | recall {m['recall']:.4f}"
        print(line, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, usage=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="our checkpoint (a file or a run folder) or a bare .pth")
    a("--weights", choices=["ema", "model"], default="ema", help="our checkpoints' weights")
    a("--steps", type=positive, help="NFE (default: as trained; SiT files 250)")
    a("--solver", choices=["euler", "heun"], help="velocity models: the ODE solver")
    a("--pred", choices=["x", "v"], help="bare files: x or v (default: v if t-conditioned)")
    a("--repeat", type=positive, help="a bare deep generator's repeats (2: 56 layers)")
    a("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    a("--cfg-channels", type=positive, help="guide the first N channels only (3: SiT's)")
    a("--vae", help="SD-VAE weights for latent models (default: the run's --vae)")
    a("--classes", type=int, nargs="+", help="grid rows (the first 10; DiT's 8 of 1000)")
    a("--per-class", type=positive, default=8, help="grid columns")
    a("--num-samples", type=int, default=0, help="write this many samples as an npz")
    a("--out", help="grid.png, or samples.npz with --num-samples")
    a("--batch-size", type=positive, default=64, help="per process")
    a("--seed", type=int, default=0, help="sample i's noise is seeded by seed * 10**8 + i")
    a("--fid", metavar="REF.npz", help="score the npz against this ADM reference batch")
    a("--inception", help="Inception weights for --fid (default: ~/.cache/afm)")
    a("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32: the release's")
    a("--compile", action="store_true", help="torch.compile the generator's blocks")
    a("--device", choices=["auto", "cpu"], default="auto")
    args = p.parse_args(argv)
    npz = args.num_samples > 0
    args.out = args.out or ("samples.npz" if npz else "grid.png")
    if args.out.endswith(".npz") != npz:
        p.error("--num-samples N writes an .npz; without it --out is a grid, an image")
    if args.fid and not npz:
        p.error("--fid scores an npz: give --num-samples N")
    check_out(args.out)
    for flag, path in (("--fid", args.fid), ("--inception", args.inception)):
        if path and not os.path.isfile(path):
            p.error(f"{flag} {path}: no such file")
    return args


if __name__ == "__main__":
    main(parse_args())

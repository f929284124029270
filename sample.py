r"""
Sampling from Adversarial Flow Models (AFM_SPEC section 9): noise -> a PNG grid, or the ADM-format npz that
FID-50K is computed from (AFM_SPEC section 12), from our checkpoints or the release's bare state dicts.

    python sample.py --ckpt results/000-T-2                         # grid.png: digits, EMA weights
    python sample.py --ckpt xl2_1nfe_guided_FID2.38.pth --vae sd-vae-ft-mse.bin --classes 207 360 387
    python sample.py --ckpt xl2_2nfe_guided_FID2.11.pth --steps 2 --vae ...             # 2 NFE (pred v)
    python sample.py --ckpt xl2_56layer_1nfe_guided_FID2.08.pth --repeat 2 --vae ...    # deep, 56 layers
    torchrun --nproc_per_node=8 sample.py --ckpt X --vae ... --num-samples 50000 --out samples.npz \
        --fid VIRTUAL_imagenet256_labeled.npz                      # FID, sFID, IS, precision, recall

npz files hold N/classes samples per class in the release's shuffled order; sample i's noise depends only
on (seed, i), so the file is the same for any number of processes. A rerun resumes from OUT.parts/.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from plumbing import (ArgumentParser, any_rank, cleanup, load_checkpoint, positive, print0, save_atomic,
                      save_json, save_npz, setup)
from afm import generate
from model import Generator, models
from vae import decode, load_vae

IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py grid: dog, otter, panda, ...

# --------------------------------------------------------------------------------------
# Noise -> images
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(G, z, y, steps, pred, vae=None, amp=contextlib.nullcontext(), solver="euler"):
    """(N, C, h, w) noise and labels -> (N, 3, H, W) images in [-1, 1]. Latents decode as z / 0.18215."""
    with amp:
        x = generate(G, z, y, steps, pred, solver)  # (N, C, h, w): pixels, or SD-VAE latents x 0.18215
        x = decode(vae, x) if vae is not None else x.float().clamp(-1, 1)  # (N, 3, H, W)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # gray -> RGB: ADM and Inception take 3 channels


def sample_indices(G, idx, y, shape, steps, pred, seed, batch_size, vae=None, amp=contextlib.nullcontext(),
                   solver="euler"):
    """Sample indices `idx` with labels `y` (lists) -> (n, 3, H, W) in [-1, 1]. Sample i's noise comes from its own
    CPU generator: the same on any device, process count or batch. A short batch is padded to batch_size, so every
    batch has one shape (one compiled graph, the same kernels)."""
    device = next(G.parameters()).device
    n, pad = len(idx), batch_size - len(idx)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 10**8 + i))
                     for i in idx + idx[-1:] * pad])  # (B, C, h, w)
    y = torch.tensor(y + y[-1:] * pad, device=device)
    return sample_images(G, z.to(device), y, steps, pred, vae, amp, solver)[:n]


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3) as the release: to_pil_image(x.mul(0.5).add(0.5).clamp(0, 1)),
    and torchvision's to_pil_image does .mul(255).byte(): truncation, not rounding (255 only for exactly 1.0)."""
    return x.mul(0.5).add(0.5).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Images in [-1, 1], (N, 3, H, W) -> one PNG grid, `nrow` images per row, small images enlarged to 64 px."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (N, 3, H, W)
    upscale = max(1, 64 // x.shape[-1])
    x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    N, C, H, W = x.shape
    grid = torch.full((C, math.ceil(N / nrow) * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


# --------------------------------------------------------------------------------------
# Loading: our checkpoints and the release's bare state dicts
# --------------------------------------------------------------------------------------


def load_generator(path, model=None, weights="ema", steps=None, pred=None, repeat=None, num_classes=None,
                   solver=None):
    """-> (Generator in eval mode on the CPU, info dict); a file that does not fit is a one-line ValueError. Flags
    left None come from our checkpoint's args, else from the keys: channels and size (x_embedder, pos_embed), classes
    (y_embedder rows; 1001 = 1000 + a class-dropout null row), depth and width (hence --model), t_src / t_tgt
    (t_embedder, t_tgt_embedder). Else steps 1, pred x for a 1-NFE generator, v otherwise (the release's recipes);
    a t_embedder without t_tgt_embedder is a k-NFE model unless --repeat > 1 makes it the deep 1-NFE generator."""
    path, obj = load_checkpoint(path, "--ckpt")  # a run folder: its newest readable checkpoint
    ours = "args" in obj and weights in obj
    a, sd = (obj["args"], obj[weights]) if ours else ({}, obj)
    try:
        (_, C, p, _), (_, T, hidden) = sd["x_embedder.proj.weight"].shape, sd["pos_embed"].shape
        H = round(T ** 0.5) * p  # (T, hidden) positions of p x p patches
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ValueError(f"{path}: not a generator state dict (x_embedder, pos_embed, y_embedder, blocks)") from None
    sizes = (n for n, c in models.items() if (c["depth"], c["hidden_size"], c["patch_size"]) == (depth, hidden, p))
    name = model or a.get("model") or next(sizes, None)
    if name is None:
        raise ValueError(f"{path}: no --model size has depth {depth}, hidden size {hidden}, patch {p}; pass --model")
    num_classes = num_classes or (1000 if rows == 1001 else rows)
    repeat = repeat or a.get("repeat", 1)
    t_src = repeat == 1 and any(k.startswith("t_embedder.") for k in sd)
    t_tgt = any(k.startswith("t_tgt_embedder.") for k in sd)
    flow = a.get("recipe") in ("fm", "fm-digits")  # a flow-matching run: an ODE, any number of steps
    trained = a.get("steps", 1)  # int or "any" (None for flow matching)
    if flow:
        trained = "any"
        steps = steps or a.get("sample_steps") or 32
        solver = solver or a.get("sample_solver") or "euler"
    steps = steps or (1 if trained == "any" else trained)
    solver = solver or "euler"
    pred = pred or a.get("pred") or ("v" if t_src or t_tgt else "x")
    if solver == "heun" and (pred != "v" or steps % 2):
        raise ValueError(f"--solver heun needs a velocity model (pred v) and an even --steps (its NFE), got "
                         f"pred {pred}, --steps {steps}")
    if ours and trained != "any" and steps != trained:
        print0(f"warning: {path} was trained for {trained} steps; sampling with {steps}")
    if steps > 1 and not (t_src or t_tgt):
        raise ValueError(f"{path}: a 1-NFE generator (no t_src conditioning) cannot take --steps {steps}")
    desc = f"{name} on {C}x{H}x{H}, {num_classes} classes, t_src {t_src}, t_tgt {t_tgt}, repeat {repeat}"
    with torch.device("meta"):  # shapes only: the tensors come from the file (assign=True below)
        G = Generator(**models[name], input_size=H, in_channels=C, num_classes=num_classes, use_t_src=t_src,
                      use_t_tgt=t_tgt, repeat=repeat, class_dropout_prob=0.1 * (rows == num_classes + 1))
    own = {k: tuple(v.shape) for k, v in G.state_dict().items()}
    bad = {"": [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {s}" for k, s in own.items()
                if k in sd and tuple(sd[k].shape) != s],
           "missing ": [k for k in own if k not in sd], "unexpected ": [k for k in sd if k not in own]}
    bad[""].sort(key=lambda s: not s.startswith("blocks.0."))  # the first block's qkv shows both widths first
    if any(bad.values()):  # the first three of each and a count: the error stays one readable line
        few = [w + ", ".join(k[:3]) + (f", ... ({len(k)} in all)" if len(k) > 3 else "") for w, k in bad.items() if k]
        raise ValueError(f"{path} (depth {depth}, hidden {hidden}, patch {p}) does not fit {desc}: "
                         f"{'; '.join(few)} (--model, --repeat, --num-classes?)")
    G.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
    info = dict(model=name, steps=steps, pred=pred, solver=solver, flow=flow, repeat=repeat, num_classes=num_classes, channels=C, size=H,
                use_t_src=t_src, use_t_tgt=t_tgt, vae=a.get("vae"), desc=desc,
                source=f"{weights} weights at step {obj.get('step')}" if ours else "bare state dict")
    return G.eval().requires_grad_(False), info


# --------------------------------------------------------------------------------------
# Many samples: per-rank shards in OUT.parts/ (resumable), assembled into one npz
# --------------------------------------------------------------------------------------


def sample_npz(args, images, labels, meta, rank, world, device):
    """Make the samples not yet in OUT.parts/ (this rank: every world-th of them), then assemble on rank 0.
    Returns (arr_0, arr_1) on rank 0, None elsewhere; exits with status 1 when interrupted."""
    parts, N = args.out + ".parts", len(labels)
    state = [None, np.zeros(N, bool)]  # [error, which samples are done]: rank 0 reads parts/, tells the others
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        for f in glob.glob(os.path.join(parts, "*.tmp")):  # a shard being written when a run died
            os.remove(f)
        meta_path = os.path.join(parts, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            diff = [f"{k}: {old.get(k)} vs {v}" for k, v in meta.items() if old.get(k) != v]
            state[0] = diff and f"{parts} holds samples made with other settings ({'; '.join(diff)}): remove it"
        else:
            save_atomic(meta, meta_path, save_json)
        if not state[0]:
            for f in glob.glob(os.path.join(parts, "*.npz")):
                with np.load(f) as d:
                    state[1][d["idx"]] = True
    if world > 1:
        dist.broadcast_object_list(state)  # doubles as a barrier: no rank writes to parts/ before rank 0 read it
    error, done = state
    if error:
        raise SystemExit(f"sample.py: error: {error}")
    mine = np.flatnonzero(~done)[rank::world].tolist()
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    print0(f"{int(done.sum())} of {N} samples found in {parts}; {len(mine)} to make on rank 0")
    stop, buf, interrupted = [], [], False

    def on_signal(signum, frame):  # finish the batch, save, stop; a second Ctrl-C kills at once
        stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    for b, idx in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=rank != 0)):
        buf.append((np.array(idx, np.int64), to_uint8(images(idx, labels[idx].tolist()))))
        last = stop or b + 1 in (len(batches), args.max_batches)
        if len(buf) >= args.save_every or last:  # a shard named by its first index: finished ones are never redone
            i = np.concatenate([j for j, _ in buf])
            save_npz(os.path.join(parts, f"{i[0]:08d}.npz"), idx=i, images=np.concatenate([x for _, x in buf]))
            buf.clear()
        if last:
            interrupted = b + 1 < len(batches)
            break
    for s, h in handlers.items():
        signal.signal(s, h)
    interrupted = any_rank(interrupted, device)  # also waits for every rank's shards
    if interrupted:
        print0(f"interrupted: finished samples are in {parts}; rerun the same command to resume")
    cleanup()
    if interrupted:
        raise SystemExit(1)
    return assemble(parts, args.out, labels) if rank == 0 else None


def assemble(parts, out, labels):
    """The shards of OUT.parts/ -> OUT (arr_0 images, arr_1 labels) in the release's file order; parts removed."""
    N = len(labels)
    perm = np.random.RandomState(42).permutation(N)  # = the release's pack_npz.py: np.random.seed(42) then permutation
    where = np.argsort(perm)  # file position of sample i: the inverse permutation
    arr, seen = None, np.zeros(N, np.int64)
    for f in glob.glob(os.path.join(parts, "*.npz")):
        with np.load(f) as d:
            idx, img = d["idx"], d["images"]
        arr = np.empty((N, *img.shape[1:]), np.uint8) if arr is None else arr
        arr[where[idx]] = img
        np.add.at(seen, idx, 1)
    if not (seen == 1).all():
        raise SystemExit(f"sample.py: error: {parts} is inconsistent ({int((seen != 1).sum())} samples missing or "
                         f"repeated): remove it and rerun")
    save_npz(out, arr_0=arr, arr_1=labels[perm])
    shutil.rmtree(parts)
    print0(f"wrote {out}: arr_0 {arr.dtype} {arr.shape}, arr_1 labels, {N // len(np.unique(labels))} per class")
    return arr, labels[perm]


# --------------------------------------------------------------------------------------
# Main: grid, or npz (+ FID)
# --------------------------------------------------------------------------------------


def main(args):
    rank, world, device = setup(args.device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    try:
        G, info = load_generator(args.ckpt, args.model, args.weights, args.steps, args.pred, args.repeat,
                                 args.num_classes, args.solver)
        C, H, K = info["channels"], info["size"], info["num_classes"]
        vae_path = args.vae or info["vae"]
        if C == 4 and not vae_path:
            raise ValueError("a latent model (4 channels) needs --vae FILE (sd-vae-ft-mse) to decode its samples")
        if C not in (1, 3, 4):
            raise ValueError(f"{C}-channel samples: neither images (1 or 3) nor SD-VAE latents (4)")
        if args.num_samples % K:  # 0 for the grid
            raise ValueError(f"--num-samples {args.num_samples} is not divisible by the {K} classes")
        vae = load_vae(vae_path, device) if C == 4 else None
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # one line, no traceback
        raise SystemExit(f"sample.py: error: {e}")
    G.to(device)
    G.compile_blocks() if args.compile else None
    print0(f"{args.ckpt} ({info['source']}): {info['desc']}; {info['steps']} step(s), pred {info['pred']}, "
           f"{info['solver']}; "
           f"{world} process(es) on {device}")

    def images(idx, y):  # sample indices and their labels -> (n, 3, H, W) in [-1, 1]
        return sample_indices(G, idx, y, (C, H, H), info["steps"], info["pred"], args.seed, args.batch_size, vae, amp,
                              info["solver"])

    if not args.num_samples:  # the grid: a row per class, --per-class columns (unconditional: --per-class rows)
        classes = args.classes or (list(range(K)) if K <= 10 else IMAGENET_CLASSES)
        if rank == 0:
            if not all(0 <= c < K for c in classes):
                raise SystemExit(f"sample.py: error: --classes must be in [0, {K})")
            y = [c for c in classes for _ in range(args.per_class)]
            y = y * (1 if K > 1 else args.per_class)  # unconditional: a square grid
            x = torch.cat([images(list(range(i, min(i + args.batch_size, len(y)))), y[i:i + args.batch_size])
                           for i in range(0, len(y), args.batch_size)])
            save_grid(x, args.out, nrow=args.per_class)
            print0(f"wrote {args.out}: classes {classes}, seed {args.seed}")
        return cleanup()
    labels = np.arange(args.num_samples) // (args.num_samples // K)  # sample i has class i // per_class (release)
    meta = {k: v for k, v in info.items() if k in ("model", "steps", "pred", "repeat", "num_classes")}
    if info["solver"] != "euler":  # (only when not Euler: earlier parts/ folders stay valid)
        meta["solver"] = info["solver"]
    meta.update(ckpt=os.path.abspath(args.ckpt), weights=args.weights, seed=args.seed, num_samples=args.num_samples,
                vae=vae_path and os.path.abspath(vae_path), precision=args.precision)
    out = sample_npz(args, images, labels, meta, rank, world, device)
    if out is not None and args.fid:  # rank 0, on the samples in memory: no PNGs, no reread
        import fid
        net = fid.load_inception(args.inception, device)
        ref = fid.reference_stats(args.fid, net, device=device)
        m = fid.evaluate(fid.compute_features(net, out[0], device=device), ref, device=device)
        fmt = lambda v: "n/a (reference has no arr_0)" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"FID {m['fid']:.4f} | sFID {m['sfid']:.4f} | IS {m['inception_score']:.4f} | "
              f"precision {fmt(m['precision'])} | recall {fmt(m['recall'])}", flush=True)


def parse_args(argv=None):
    p = ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="our checkpoint (file or run folder) or a bare generator state dict (.pth)")
    a("--weights", choices=["ema", "model"], default="ema", help="which weights of our checkpoints")
    a("--model", choices=list(models), default=None, help="generator size (default: checkpoint's, or from the keys)")
    a("--steps", type=positive, default=None, help="NFE (default: as trained; any-step and bare files: 1)")
    a("--solver", choices=["euler", "heun"], default=None, help="flow matching: Euler, or Heun (NFE = --steps; "
      "default: the run's --sample-solver)")
    a("--pred", choices=["x", "v"], default=None, help="x or v (default: as trained; bare: v if t-conditioned, else x)")
    a("--repeat", type=positive, default=None, help="deep generator: block repetitions (2 = 56, 4 = 112 layers)")
    a("--num-classes", type=positive, default=None, help="classes (default: label-table rows; 1001 rows = 1000 + null)")
    a("--vae", default=None, help="SD-VAE weights to decode latent models (default: the checkpoint's --vae)")
    a("--classes", type=int, nargs="+", default=None, help="grid rows (default: all of <= 10 classes, else DiT's 8)")
    a("--per-class", type=positive, default=8, help="grid columns")
    a("--num-samples", type=int, default=0, help="write this many samples as an npz (FID-50K: 50000)")
    a("--out", default=None, help="grid.png, or samples.npz with --num-samples")
    a("--batch-size", type=positive, default=64, help="per process")
    a("--seed", type=int, default=0, help="sample i uses noise seeded with seed * 10**8 + i")
    a("--save-every", type=positive, default=10, help="batches per resumable shard in OUT.parts/")
    a("--max-batches", type=int, default=0, help="stop after this many batches per process, as if interrupted")
    a("--fid", default=None, metavar="REF.npz", help="score the samples against this ADM reference batch (fid.py)")
    a("--inception", default=None, help="Inception weights for --fid (default: fid.py's cache / download)")
    a("--precision", choices=["fp32", "bf16"], default="fp32", help="the release samples in fp32 (TF32 on GPU)")
    a("--compile", action="store_true", help="torch.compile the generator's blocks (regional)")
    a("--device", choices=["auto", "cpu"], default="auto")
    args = p.parse_args(argv)
    npz = args.num_samples > 0
    args.out = args.out or ("samples.npz" if npz else "grid.png")
    if args.num_samples < 0 or args.max_batches < 0:
        p.error(f"--num-samples and --max-batches must be >= 0, got {args.num_samples} and {args.max_batches}")
    if npz != args.out.endswith(".npz") or (args.fid and not npz):
        p.error("--num-samples N writes an .npz (and --fid needs it); without it --out is an image")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: the folder {os.path.dirname(os.path.abspath(args.out))} does not exist")
    if args.fid and not os.path.isfile(args.fid):
        p.error(f"--fid {args.fid}: no such file")
    return args


if __name__ == "__main__":
    main(parse_args())

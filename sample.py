r"""
Sampling from Adversarial Flow Models (arXiv 2511.22475, Sec. 3.4): noise -> a PNG grid, or the
ADM-format npz that the paper's FID-50K is computed from, from our checkpoints or the release's
bare state dicts (ByteDance-Seed/Adversarial-Flow-Models, `generate.py` and, at commit dc11741,
`configs/generate/*.yaml`).

    python sample.py --ckpt results/000-T-2                         # grid.png: digits, EMA weights
    python sample.py --ckpt xl2_1nfe_guided_FID2.38.pth --vae sd-vae-ft-mse.bin --classes 207 360
    python sample.py --ckpt xl2_2nfe_guided_FID2.11.pth --steps 2 --vae ...       # 2 NFE (pred v)
    python sample.py --ckpt xl2_56layer_1nfe_guided_FID2.08.pth --repeat 2 --vae ...  # 56 layers
    torchrun --nproc_per_node=8 sample.py --ckpt X --vae ... --num-samples 50000 \
        --out samples.npz --fid VIRTUAL_imagenet256_labeled.npz   # FID, sFID, IS, precision, recall
    python sample.py --ckpt CAFM_OR_FM_RUN --steps 8 --cfg 2        # a velocity model, guided
    python sample.py --ckpt SiT-XL-2-256.pt --vae sd-vae-ft-mse.bin --cfg 1.5 --cfg-channels 3

Velocity networks are integrated as an ODE at any --steps, Euler or Heun: train.py's
flow-matching and CAFM runs (default: the run's --sample-steps and --sample-solver), and bare
files in SiT's layout, recognised from their keys (a learned-variance head): SiT-XL-2-256.pt and
the release's CAFM checkpoints (default: Heun, 250 NFE). --cfg SCALE is classifier-free guidance
for a velocity model with a null class (afm.generate); it guides all channels, the definition,
unless --cfg-channels 3 guides the first 3 of the 4 latent channels as SiT's sample.py does.

npz files hold N/classes samples per class in the release's shuffled order; sample i's noise
depends only on (seed, i), so the file is the same for any number of processes. An interrupted
run (Ctrl-C: exit status 130, SIGTERM: 143) resumes from OUT.parts/ when rerun; its meta.json
records the checkpoint file actually used (its step and a hash of its content) and every setting
that changes the samples, and a rerun that differs is refused rather than mixed in.

Nothing is overwritten unless --overwrite: an existing grid is refused, and so is an existing npz,
except the same command's finished file (then there is nothing to do; --fid still scores it). To
know that, the npz also holds `meta`, those settings as a JSON string; ADM's evaluator and fid.py
read only arr_0 (and mu/sigma of references), so the extra key is harmless. --fid's reference
and Inception weights are loaded before the first sample is drawn. While a command writes OUT it
holds OUT.lock: a second command on the same --out is refused, naming the first.
"""

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import signal

# first, before torch: from its import on, Ctrl-C is one line (plumbing.interrupted)
from plumbing import (ArgumentParser, any_rank, cleanup, file_identity, first_line, integer,
                      load_checkpoint, one_line_errors, positive, print0, releases_locks,
                      save_atomic, save_json, save_npz, save_png, setup, take_lock)

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from afm import generate
from model import Generator, models
from vae import decode, load_vae

# DiT's sample.py grid: dog, otter, panda, ...
IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]

# train.py's recipes whose network is a velocity field: an ODE, sampled at any number of steps
FLOW_RECIPES = ("fm", "fm-digits", "cafm", "cafm-digits")

# A bare SiT-layout file (SiT-XL-2-256.pt, the release's CAFM checkpoints) samples with Heun at
# 250 NFE, as the release validates its CAFM post-training of SiT (configs/train/cafm/
# train_cafm_sit.yaml at 519601d: steps 250, sampler heun; train.py's "cafm" recipe samples so).
# SiT's own sample.py integrates the same ODE with the adaptive dopri5 on a 250-point grid.
SIT_STEPS = 250
SIT_SOLVER = "heun"

# The bounds of the command line's numbers, checked before anything is loaded or written. Sample
# i's noise seed is seed * 10**8 + i: below 2**64 (torch's generator) for every seed here and
# i < 10**8. A grid is (classes * per-class) images; an npz's per-sample index lists grow with N.
MAX_SEED = 2**31 - 1
MAX_SAMPLES = 10_000_000
MAX_PER_CLASS = 100
MAX_CLASS = 99_999
MAX_BATCH = 65_536
MAX_BATCHES = 10**9

# --------------------------------------------------------------------------------------
# Noise -> images
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(G, z, y, steps, pred, vae=None, amp=contextlib.nullcontext(), solver="euler",
                  cfg=1.0, null=None, cfg_channels=None):
    """(N, C, h, w) noise and labels -> (N, 3, H, W) images in [-1, 1]. Latents decode as
    z / 0.18215. cfg, null, cfg_channels: classifier-free guidance (afm.generate)."""
    with amp:
        # pixels, or latents x 0.18215
        x = generate(G, z, y, steps, pred, solver, cfg, null, cfg_channels)  # (N, C, h, w)
        if vae is not None:
            x = decode(vae, x)  # (N, 3, H, W)
        else:
            x = x.float().clamp(-1, 1)
    if x.shape[1] == 1:  # gray -> RGB: ADM and Inception take 3 channels
        x = x.expand(-1, 3, -1, -1)
    return x


def sample_indices(G, idx, y, shape, steps, pred, seed, batch_size, vae=None,
                   amp=contextlib.nullcontext(), solver="euler", cfg=1.0, null=None,
                   cfg_channels=None):
    """Sample indices `idx` with labels `y` (lists) -> (n, 3, H, W) in [-1, 1]. Sample i's noise
    comes from its own CPU generator: the same on any device, process count or batch. A short
    batch is padded to batch_size, so every batch has one shape (one compiled graph, the same
    kernels)."""
    device = next(G.parameters()).device
    n = len(idx)
    pad = batch_size - n
    idx = idx + idx[-1:] * pad  # the padding repeats the last sample
    y = y + y[-1:] * pad
    noise = []
    for i in idx:
        g = torch.Generator().manual_seed(seed * 10**8 + i)
        noise.append(torch.randn(shape, generator=g))
    z = torch.stack(noise)  # (B, C, h, w)
    y = torch.tensor(y, device=device)
    return sample_images(G, z.to(device), y, steps, pred, vae, amp, solver, cfg, null,
                         cfg_channels)[:n]


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3) as the release's generate.py:
    to_pil_image(x.mul(0.5).add(0.5).clamp(0, 1)), and torchvision's to_pil_image does
    .mul(255).byte(): truncation, not rounding (255 only for exactly 1.0)."""
    x = x.mul(0.5).add(0.5).clamp(0, 1).mul(255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Images in [-1, 1], (N, 3, H, W) -> one PNG grid, `nrow` images per row, small images
    enlarged to 64 px."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (N, 3, H, W)
    upscale = max(1, 64 // x.shape[-1])
    x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    N, C, H, W = x.shape
    rows = math.ceil(N / nrow)
    grid = torch.full((C, rows * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        top = 2 + r * (H + 2)
        left = 2 + c * (W + 2)
        grid[:, top:top + H, left:left + W] = x[i]
    save_atomic(Image.fromarray(grid.permute(1, 2, 0).numpy()), path, save_png)


# --------------------------------------------------------------------------------------
# Loading: our checkpoints and the release's bare state dicts
# --------------------------------------------------------------------------------------


def shape_problems(sd, own):
    """What keeps state dict `sd` from loading into a model with shapes `own`: one short text per
    kind (wrong shapes, missing keys, unexpected keys), the first of each and a count."""
    wrong = []
    for k, s in own.items():
        if k in sd and tuple(sd[k].shape) != s:
            wrong.append(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {s}")
    wrong.sort(key=lambda s: not s.startswith("blocks.0."))  # the first qkv shows both widths
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    out = []
    for what, keys in (("", wrong), ("missing ", missing), ("unexpected ", unexpected)):
        if not keys:
            continue
        text = what + keys[0]
        if len(keys) > 1:
            text += f", ... ({len(keys)} in all)"
        out.append(text)
    return out


def load_generator(path, model=None, weights="ema", steps=None, pred=None, repeat=None,
                   num_classes=None, solver=None):
    """-> (Generator in eval mode on the CPU, info dict); a file that does not fit is a one-line
    ValueError. Flags left None come from our checkpoint's args, else from the keys: channels and
    size (x_embedder, pos_embed), classes (y_embedder rows; 1001 = 1000 + a class-dropout null
    row), depth and width (hence --model), t_src / t_tgt (t_embedder, t_tgt_embedder). Else steps
    1, pred x for a 1-NFE generator, v otherwise (the release's recipes); a t_embedder without
    t_tgt_embedder is a k-NFE model unless --repeat > 1 makes it the deep 1-NFE generator.

    Velocity networks sample at any steps: our flow-matching and CAFM runs (FLOW_RECIPES), and
    a bare file in SiT's layout: DiT's learned-variance head (final_layer.linear has 2C outputs
    per pixel; the release's AFM generators have C) with a t_embedder and no t_tgt_embedder,
    i.e. SiT-XL-2-256.pt or the release's CAFM checkpoints, read with SiT's time convention
    (model.py's sit_time). DiT's own diffusion checkpoints share that layout but predict noise:
    they are not supported."""
    path, obj = load_checkpoint(path, "--ckpt")  # a run folder: its newest readable checkpoint
    ours = "args" in obj and weights in obj
    if ours:
        a = obj["args"]
        sd = obj[weights]
    else:
        a = {}
        sd = obj
    try:
        C = sd["x_embedder.proj.weight"].shape[1]
        p = sd["x_embedder.proj.weight"].shape[2]
        T = sd["pos_embed"].shape[1]
        hidden = sd["pos_embed"].shape[2]
        H = round(T ** 0.5) * p  # (T, hidden) positions of p x p patches
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        head = sd["final_layer.linear.weight"].shape[0]  # p * p * output channels
    except (KeyError, ValueError, TypeError, AttributeError, IndexError):
        raise ValueError(f"{path}: not a generator state dict "
                         f"(x_embedder, pos_embed, y_embedder, blocks, final_layer)") from None
    name = model or a.get("model")
    for n, c in models.items():  # else the size whose depth, width and patch fit the keys
        if name is None and (c["depth"], c["hidden_size"], c["patch_size"]) == (depth, hidden, p):
            name = n
    if name is None:
        raise ValueError(f"{path}: no --model size has depth {depth}, hidden size {hidden}, "
                         f"patch {p}; pass --model")
    repeat = repeat or a.get("repeat", 1)
    t_src = repeat == 1 and any(k.startswith("t_embedder.") for k in sd)
    t_tgt = any(k.startswith("t_tgt_embedder.") for k in sd)
    learn_sigma = head == 2 * C * p * p  # SiT's (and DiT's) head: velocity, then a variance
    sit_time = a.get("sit_time", learn_sigma)  # our runs say; a bare learn_sigma file is SiT's
    sit = not ours and learn_sigma and t_src and not t_tgt  # a bare SiT velocity network
    if num_classes is None:
        num_classes = rows
        # the last row is the null class: of 1001, of our runs with class dropout, and of SiT's
        # files (SiT trains with class dropout 0.1)
        if rows == 1001 or a.get("class_dropout", 0) > 0 or sit:
            num_classes = rows - 1
    flow = a.get("recipe") in FLOW_RECIPES  # flow matching or CAFM: an ODE, any steps
    trained = a.get("steps", 1)  # int or "any" (None for flow matching)
    if sit:
        flow = True
        steps = steps or SIT_STEPS
        solver = solver or SIT_SOLVER
    if flow:
        trained = "any"
        steps = steps or a.get("sample_steps") or 32
        solver = solver or a.get("sample_solver") or "euler"
    if steps is None:
        steps = trained
        if trained == "any":
            steps = 1
    solver = solver or "euler"
    if pred is None:
        pred = a.get("pred")
    if pred is None:
        pred = "x"
        if t_src or t_tgt:
            pred = "v"
    if solver == "heun" and (pred != "v" or steps % 2):
        raise ValueError(f"--solver heun needs a velocity model (pred v) and an even --steps "
                         f"(its NFE), got pred {pred}, --steps {steps}")
    if ours and trained != "any" and steps != trained:
        print0(f"warning: {path} was trained for {trained} steps; sampling with {steps}")
    if steps > 1 and not (t_src or t_tgt):
        raise ValueError(f"{path}: a 1-NFE generator (no t_src conditioning) cannot take "
                         f"--steps {steps}")
    desc = (f"{name} on {C}x{H}x{H}, {num_classes} classes, t_src {t_src}, t_tgt {t_tgt}, "
            f"repeat {repeat}")
    if learn_sigma or sit_time:
        desc += f", learn_sigma {learn_sigma}, sit_time {sit_time}"
    dropout = 0.0
    null = None  # the null label, for classifier-free guidance
    if rows == num_classes + 1:  # a null-label row: trained with class dropout
        dropout = 0.1
        null = num_classes
    with torch.device("meta"):  # shapes only: the tensors come from the file (assign=True below)
        G = Generator(**models[name], input_size=H, in_channels=C, num_classes=num_classes,
                      use_t_src=t_src, use_t_tgt=t_tgt, repeat=repeat,
                      class_dropout_prob=dropout, learn_sigma=learn_sigma, sit_time=sit_time)
    own = {k: tuple(v.shape) for k, v in G.state_dict().items()}
    problems = shape_problems(sd, own)
    if problems:  # a key and a count of each kind: the error stays one short line
        raise ValueError(f"{path} (depth {depth}, hidden {hidden}, patch {p}) does not fit "
                         f"{desc} (--model, --repeat, --num-classes?): {'; '.join(problems)}")
    fp32 = {}
    for k, v in sd.items():  # half-precision files load as fp32 (autocast does bf16)
        if v.is_floating_point():
            v = v.float()
        fp32[k] = v
    G.load_state_dict(fp32, assign=True)
    source = "bare state dict"
    if ours:
        source = f"{weights} weights at step {obj.get('step')}"
    info = dict(model=name, steps=steps, pred=pred, solver=solver, flow=flow, repeat=repeat,
                num_classes=num_classes, null=null, channels=C, size=H, use_t_src=t_src,
                use_t_tgt=t_tgt, learn_sigma=learn_sigma, sit_time=sit_time, vae=a.get("vae"),
                desc=desc, source=source, file=path, step=obj.get("step"))
    return G.eval().requires_grad_(False), info


# --------------------------------------------------------------------------------------
# Many samples: per-rank shards in OUT.parts/ (resumable), assembled into one npz
# --------------------------------------------------------------------------------------


def settings(args, info, vae_path):
    """Everything that changes the samples of an npz, for OUT.parts/meta.json and the npz's `meta`:
    the checkpoint file actually used (for a run folder: its newest when sampling began), its step
    and content, the sampler and its guidance, the seed, the VAE's content and the precision."""
    def content(path):  # plumbing.file_identity as "<size> bytes, sha256 <16 hex digits>"
        i = file_identity(path)
        return f"{i['size']} bytes, sha256 {i['sha256_head_tail'][:16]}"

    meta = {"ckpt": os.path.abspath(info["file"]), "ckpt_step": info["step"],
            "ckpt_content": content(info["file"]), "weights": args.weights}
    for k in ("model", "steps", "pred", "solver", "repeat", "num_classes"):
        meta[k] = info[k]
    meta["cfg"] = args.cfg
    meta["cfg_channels"] = args.cfg_channels
    meta["seed"] = args.seed
    meta["num_samples"] = args.num_samples
    meta["vae"] = None
    if info["channels"] == 4:
        meta["vae"] = content(vae_path)
    meta["precision"] = args.precision
    return meta


def differences(old, new):
    """'key: old vs new' for each setting that differs. The checkpoint's path is left out: a copy
    elsewhere (same step and content) makes the same samples."""
    out = []
    for k, v in new.items():
        if k != "ckpt" and old.get(k) != v:
            out.append(f"{k}: {old.get(k)} vs {v}")
    return out


def made_with(path):
    """The settings an npz written by sample.py records in its `meta`; {} for any other file."""
    try:
        with np.load(path) as d:
            return json.loads(str(d["meta"]))
    except Exception:  # unreadable, another program's npz, no meta: not ours to call finished
        return {}


def sample_npz(args, images, labels, meta, rank, world, device):
    """Make the samples not yet in OUT.parts/ (this rank: every world-th of them), then assemble
    on rank 0. Returns (arr_0, arr_1) on rank 0, None elsewhere. Interrupted, it exits once the
    finished shards are saved: status 130 (SIGINT), 143 (SIGTERM), 1 (--max-batches), 0 on a rank
    that only stopped with a signalled one."""
    parts = args.out + ".parts"
    N = len(labels)
    # [error, which samples are done]: rank 0 reads parts/, tells the others
    state = [None, np.zeros(N, bool)]
    if rank == 0:
        state[0] = read_parts(parts, meta, state[1])
    if world > 1:
        # doubles as a barrier: no rank writes to parts/ before rank 0 read it
        dist.broadcast_object_list(state)
    error, done = state
    if error:
        raise SystemExit(f"sample.py: error: {error}")
    mine = np.flatnonzero(~done)[rank::world].tolist()
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    print0(f"{int(done.sum())} of {N} samples found in {parts}; {len(mine)} to make on rank 0")
    stop = []
    buf = []
    interrupted = False

    def on_signal(signum, frame):  # finish the batch, save, stop; a second Ctrl-C kills at once
        stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    for b, idx in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=rank != 0)):
        x = to_uint8(images(idx, labels[idx].tolist()))  # (n, H, W, 3)
        buf.append((np.array(idx, np.int64), x))
        finished = b + 1 == len(batches)
        last = finished or b + 1 == args.max_batches or len(stop) > 0
        # a shard named by its first index: finished ones are never redone
        if len(buf) >= args.save_every or last:
            i = np.concatenate([j for j, _ in buf])
            shard = os.path.join(parts, f"{i[0]:08d}.npz")
            save_npz(shard, idx=i, images=np.concatenate([x for _, x in buf]))
            buf.clear()
        if last:
            interrupted = not finished
            break
    for s, h in handlers.items():
        signal.signal(s, h)
    interrupted = any_rank(interrupted, device)  # also waits for every rank's shards
    if interrupted:
        print0(f"interrupted: finished samples are in {parts}; rerun the same command to resume")
    cleanup()
    if interrupted:
        code = 0  # another rank was signalled: torchrun's report names it
        if args.max_batches:
            code = 1  # stopped as if interrupted
        if stop:
            code = 128 + stop[0]  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        raise SystemExit(code)
    if rank != 0:
        return None
    return assemble(parts, args.out, labels, meta)


def read_parts(parts, meta, done):
    """Rank 0: mark in `done` the samples OUT.parts/ already holds (made then, if new, with this
    run's meta.json). Returns None, or the one-line reason it cannot be resumed: made with other
    settings, or damaged (never mixed in, never a traceback)."""
    meta_path = os.path.join(parts, "meta.json")
    if os.path.lexists(parts) and not os.path.isdir(parts):
        return f"{parts} is a file, not sample.py's folder of shards: remove it"
    os.makedirs(parts, exist_ok=True)
    for f in glob.glob(os.path.join(parts, "*.tmp")):  # a shard being written when a run died
        os.remove(f)
    if not os.path.exists(meta_path):
        save_atomic(meta, meta_path, save_json)
    old = None
    try:
        with open(meta_path) as f:
            old = json.load(f)
    except (OSError, ValueError):  # empty, cut or not JSON: the dict check below names it
        pass
    if not isinstance(old, dict):
        return f"{meta_path} is not the settings sample.py writes (empty or cut?): remove {parts}"
    diff = differences(old, meta)
    if diff:  # never mixed: e.g. the run folder got a newer checkpoint since
        return (f"{parts} holds samples made with other settings ({'; '.join(diff[:2])}): "
                f"remove it, or rerun with the checkpoint they were made with, {old.get('ckpt')}")
    damaged = "is not a shard sample.py writes (empty or cut?): remove it (its samples are redone)"
    for f in glob.glob(os.path.join(parts, "*.npz")):
        idx = None
        try:
            with np.load(f) as d:
                idx = d["idx"]
        except Exception:  # empty, cut, or another program's npz: named below
            pass
        if idx is None or idx.dtype.kind not in "iu" or idx.ndim != 1:
            return f"{f} {damaged}"
        if len(idx) and (idx.min() < 0 or idx.max() >= len(done)):
            return f"{f} {damaged}"
        done[idx] = True
    return None


def assemble(parts, out, labels, meta):
    """The shards of OUT.parts/ -> OUT (arr_0 images, arr_1 labels, meta the settings as JSON) in
    the release's file order; parts removed."""
    N = len(labels)
    # = the release's misc/pack_npz.py (commit 519601d): np.random.seed(42), then permutation
    perm = np.random.RandomState(42).permutation(N)
    where = np.argsort(perm)  # file position of sample i: the inverse permutation
    arr = None
    seen = np.zeros(N, np.int64)
    for f in glob.glob(os.path.join(parts, "*.npz")):
        with np.load(f) as d:
            idx = d["idx"]
            img = d["images"]
        if arr is None:
            arr = np.empty((N, *img.shape[1:]), np.uint8)  # (N, H, W, 3)
        arr[where[idx]] = img
        np.add.at(seen, idx, 1)
    if not (seen == 1).all():
        bad = int((seen != 1).sum())
        raise SystemExit(f"sample.py: error: {parts} is inconsistent ({bad} samples missing or "
                         f"repeated): remove it and rerun")
    save_npz(out, arr_0=arr, arr_1=labels[perm], meta=np.array(json.dumps(meta)))
    shutil.rmtree(parts)
    per_class = N // len(np.unique(labels))
    print0(f"wrote {out}: arr_0 {arr.dtype} {arr.shape}, arr_1 labels, {per_class} per class")
    return arr, labels[perm]


# --------------------------------------------------------------------------------------
# Evaluation while training (train.py --eval-every): class-balanced samples, scored
# --------------------------------------------------------------------------------------


class Sampler:
    """How a network is sampled: its prediction ("x" or "v"), NFE and solver, the VAE that decodes
    latent samples (None: pixels), and the autocast it runs under."""

    def __init__(self, pred, steps, solver="euler", vae=None, amp=contextlib.nullcontext()):
        self.pred = pred
        self.steps = steps
        self.solver = solver
        self.vae = vae
        self.amp = amp

    def __call__(self, G, z, y):
        """Noise and labels -> (N, 3, H, W) images in [-1, 1]."""
        return sample_images(G, z, y, self.steps, self.pred, self.vae, self.amp, self.solver)

    def indices(self, G, idx, y, shape, seed, batch_size):
        """Samples `idx` with labels `y` (lists), each with its own noise (sample_indices)."""
        return sample_indices(G, idx, y, shape, self.steps, self.pred, seed, batch_size,
                              self.vae, self.amp, self.solver)


class Evaluation:
    """The evaluation while training: `num_samples` class-balanced samples of a network, made as
    for an npz (sample i has class i // (N / K) and noise seeded by (seed, i), so every evaluation
    sees the same noise) and split over the ranks, as uint8 images -> FID and Inception Score
    against the reference batch `ref` (with the Inception weights `inception`; fid.py), and, for
    data held in memory, fid.pixel_report against that data.

    Everything is checked and loaded here, before the training run makes its folder and takes its
    first step, not after hours of training: a ValueError names train.py's flag. Every rank builds
    one and calls it (collectives)."""

    def __init__(self, sampler, data, shape, num_samples, batch_size, seed, ref=None,
                 inception=None, rank=0, world=1, device="cpu"):
        import fid  # scipy and the Inception: only when evaluating
        K = data.num_classes
        if num_samples % K:
            raise ValueError(f"--eval-samples {num_samples} is not divisible by the {K} classes")
        if data.space == "latent" and sampler.vae is None:
            raise ValueError("evaluating a latent model needs --vae to decode its samples")
        self.inception = None
        self.ref = None
        if ref:
            try:
                self.inception = fid.load_inception(inception, device)
                self.ref = fid.reference_stats(ref, self.inception, device=device, pool3=False)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--eval-ref {ref}: {e}") from None
        self.real = None  # the data's images and labels, for the pixel report
        if data.in_memory:
            self.real = data.tensors
        self.sampler = sampler
        self.shape = shape
        self.labels = np.arange(num_samples) // (num_samples // K)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.device = device

    @torch.no_grad()
    def __call__(self, G, received=()):
        """The numbers of network G: {name: value} on rank 0, {} on the other ranks; None if a
        signal arrived (a list `received` not empty on any rank, checked between batches):
        Ctrl-C stops an evaluation too."""
        part = self.my_share(G, received)
        if part is None:
            return None
        parts = [part]
        if dist.is_initialized():
            parts = None  # rank 0 receives every rank's share
            if self.rank == 0:
                parts = [None] * self.world
            dist.gather_object(part, parts, dst=0)
        if self.rank != 0:
            return {}
        return self.score(parts)

    def my_share(self, G, received):
        """This rank's samples (every world-th) -> {"idx", and its "pool3" and "logits" features
        for FID and IS, its uint8 "images" for the pixel report}; None if a signal arrived."""
        import fid
        N = len(self.labels)
        B = self.batch_size
        mine = list(range(self.rank, N, self.world))
        n_batches = math.ceil(len(range(0, N, self.world)) / B)  # rank 0's: every rank runs as many
        images = []
        # progress only for an evaluation that lasts (delay: shown after 3 s)
        for b in tqdm(range(n_batches), desc="evaluating", unit="batch", leave=False, delay=3,
                      disable=self.rank != 0):
            if any_rank(len(received) > 0, self.device):  # a collective: as many on every rank
                return None
            idx = mine[b * B:(b + 1) * B]
            if not idx:
                continue
            x = self.sampler.indices(G, idx, self.labels[idx].tolist(), self.shape, self.seed, B)
            images.append(to_uint8(x))
        images = np.concatenate(images)
        part = {"idx": mine}
        if self.inception is not None:
            feats = fid.compute_features(self.inception, images, device=self.device,
                                         progress=False)
            part["pool3"] = feats["pool3"]
            part["logits"] = feats["logits"]
        if self.real is not None:
            part["images"] = images
        return part

    def score(self, parts):
        """Every rank's share (rank 0) -> the numbers. sFID and precision/recall: fid.py on an npz
        of this file."""
        import fid
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out = {"eval_samples": len(cat["idx"])}
        if self.inception is not None:
            pool3 = np.empty_like(cat["pool3"], np.float64)  # in sample order
            logits = np.empty_like(cat["logits"])
            pool3[cat["idx"]] = cat["pool3"]
            logits[cat["idx"]] = cat["logits"]
            sigma = np.cov(pool3, rowvar=False)
            out["fid"] = fid.frechet_distance(pool3.mean(0), sigma, self.ref["mu"],
                                              self.ref["sigma"])
            # IS in the order of an npz of this file (the release's shuffled order)
            order = np.random.RandomState(42).permutation(len(self.labels))
            out["inception_score"] = fid.inception_score(logits[order])
        if self.real is not None:
            real, real_labels = self.real
            labels = self.labels[cat["idx"]]
            out.update(fid.pixel_report_of(cat["images"], labels, real, real_labels))
        return out


# --------------------------------------------------------------------------------------
# Main: grid, or npz (+ FID)
# --------------------------------------------------------------------------------------


def load_fid(args, rank, world, device):
    """--fid's Inception and reference statistics, on rank 0 (None elsewhere), loaded before any
    sample is drawn: a corrupt reference, NaN statistics, a wrong --inception file or missing
    weights offline stop every rank with one line, not after hours of sampling."""
    import fid  # scipy and the Inception: only for --fid
    net = None
    ref = None
    error = [None]
    if rank == 0:
        try:
            net = fid.load_inception(args.inception, device)
            ref = fid.reference_stats(args.fid, net, device=device)
        except Exception as e:  # fid.py's errors name the file; no traceback
            error[0] = first_line(e, 300)
    if world > 1:
        dist.broadcast_object_list(error)
    if error[0]:
        raise SystemExit(f"sample.py: error: {error[0]}")
    return net, ref


def metric(value):  # precision and recall are None without reference images
    if value is None:
        return "n/a (reference has no arr_0)"
    return f"{value:.4f}"


def score(images, net, ref, device):
    """FID, sFID, IS, precision and recall of uint8 (N, H, W, 3) samples: one printed line."""
    import fid
    m = fid.evaluate(fid.compute_features(net, images, device=device), ref, device=device)
    print(f"FID {m['fid']:.4f} | sFID {m['sfid']:.4f} | IS {m['inception_score']:.4f} | "
          f"precision {metric(m['precision'])} | recall {metric(m['recall'])}", flush=True)


def check_guidance(args, info):
    """--cfg needs a velocity model with a null class, and --cfg-channels at most its channels:
    else a one-line ValueError naming the file."""
    f = info["file"]
    if info["pred"] != "v":
        raise ValueError(f"--cfg {args.cfg:g}: {f} is pred {info['pred']}; classifier-free "
                         f"guidance needs a velocity model (pred v)")
    if info["null"] is None:
        raise ValueError(f"--cfg {args.cfg:g}: {f} has no null class ({info['num_classes']} "
                         f"label rows for {info['num_classes']} classes): guidance needs a "
                         f"model trained with class dropout")
    if args.cfg_channels is not None and args.cfg_channels > info["channels"]:
        raise ValueError(f"--cfg-channels {args.cfg_channels}: {f} has "
                         f"{info['channels']} channel(s)")


@releases_locks
def main(args):
    rank, world, device = setup(args.device)
    # one writer per output: a second sampler on it would redo and overwrite the same shards
    holder = take_lock(args.out + ".lock")
    if holder:
        raise SystemExit(f"sample.py: error: --out {args.out} is being written by {holder}: wait "
                         f"for it to end, or choose another --out")
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    try:
        G, info = load_generator(args.ckpt, args.model, args.weights, args.steps, args.pred,
                                 args.repeat, args.num_classes, args.solver)
        if args.cfg != 1:
            check_guidance(args, info)
        C = info["channels"]
        H = info["size"]
        K = info["num_classes"]
        vae_path = args.vae or info["vae"]
        if C == 4 and not vae_path:
            raise ValueError("a latent model (4 channels) needs --vae FILE (sd-vae-ft-mse) to "
                             "decode its samples")
        if C not in (1, 3, 4):
            raise ValueError(f"{C}-channel samples: neither images (1 or 3) nor SD-VAE latents "
                             f"(4)")
        if args.num_samples % K:  # 0 for the grid
            raise ValueError(f"--num-samples {args.num_samples} is not divisible by the {K} "
                             f"classes")
        vae = None
        if C == 4:
            vae = load_vae(vae_path, device)
    except (ValueError, RuntimeError, OSError) as e:  # one line, no traceback
        raise SystemExit(f"sample.py: error: {first_line(e, 300)}")
    G.to(device)
    if args.compile:
        G.compile_blocks()
    guidance = ""
    if args.cfg != 1:
        guidance = f", cfg {args.cfg:g} on {args.cfg_channels or 'all'} channel(s)"
    print0(f"{info['file']} ({info['source']}): {info['desc']}; {info['steps']} step(s), "
           f"pred {info['pred']}, {info['solver']}{guidance}; {world} process(es) on {device}")

    def images(idx, y):  # sample indices and their labels -> (n, 3, H, W) in [-1, 1]
        return sample_indices(G, idx, y, (C, H, H), steps=info["steps"], pred=info["pred"],
                              seed=args.seed, batch_size=args.batch_size, vae=vae, amp=amp,
                              solver=info["solver"], cfg=args.cfg, null=info["null"],
                              cfg_channels=args.cfg_channels)

    if not args.num_samples:
        # the grid: a row per class, --per-class columns (unconditional: --per-class rows)
        classes = args.classes
        if classes is None:
            classes = IMAGENET_CLASSES
            if K <= 10:
                classes = list(range(K))
        if rank == 0:
            if not all(0 <= c < K for c in classes):
                raise SystemExit(f"sample.py: error: --classes must be in [0, {K})")
            y = []
            for c in classes:
                y += [c] * args.per_class
            if K == 1:  # unconditional: a square grid
                y = y * args.per_class
            x = []
            for i in range(0, len(y), args.batch_size):
                idx = list(range(i, min(i + args.batch_size, len(y))))
                x.append(images(idx, y[i:i + args.batch_size]))
            save_grid(torch.cat(x), args.out, nrow=args.per_class)
            print0(f"wrote {args.out}: classes {classes}, seed {args.seed}")
        cleanup()
        return
    # sample i has class i // per_class (the release's generate.py)
    labels = np.arange(args.num_samples) // (args.num_samples // K)
    meta = settings(args, info, vae_path)
    finished = os.path.exists(args.out) and not args.overwrite
    if finished and differences(made_with(args.out), meta):
        raise SystemExit(f"sample.py: error: {args.out} exists: remove it, choose another --out, "
                         f"or pass --overwrite")
    net = None
    ref = None
    if args.fid:
        net, ref = load_fid(args, rank, world, device)
    if finished:  # this command's own finished file
        print0(f"{args.out} is already complete (same checkpoint and settings): nothing to do")
        out = None
        if rank == 0 and args.fid:
            with np.load(args.out) as d:
                out = (d["arr_0"], d["arr_1"])
        cleanup()
    else:
        out = sample_npz(args, images, labels, meta, rank, world, device)
    if out is not None and args.fid:  # rank 0, on the samples in memory: no PNGs, no reread
        score(out[0], net, ref, device)


def parse_args(argv=None):
    p = ArgumentParser(prog="sample.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True,
      help="our checkpoint (file or run folder) or a bare generator state dict (.pth)")
    a("--weights", choices=["ema", "model"], default="ema", help="which weights of our checkpoints")
    a("--model", choices=list(models), default=None,
      help="generator size (default: checkpoint's, or from the keys)")
    a("--steps", type=positive, default=None,
      help="NFE (default: as trained; any-step and bare files: 1, SiT files 250)")
    a("--solver", choices=["euler", "heun"], default=None,
      help="velocity models: Euler, or Heun (NFE = --steps; default: the run's --sample-solver, "
           "SiT files heun)")
    a("--cfg", type=float, default=1.0, metavar="SCALE",
      help="classifier-free guidance scale for a velocity model with a null class (1: none)")
    a("--cfg-channels", type=positive, default=None, metavar="N",
      help="guide only the first N channels (3: SiT's sample.py; default: all)")
    a("--pred", choices=["x", "v"], default=None,
      help="x or v (default: as trained; bare: v if t-conditioned, else x)")
    a("--repeat", type=positive, default=None,
      help="deep generator: block repetitions (2 = 56, 4 = 112 layers)")
    a("--num-classes", type=positive, default=None,
      help="classes (default: label-table rows; 1001 rows = 1000 + null)")
    a("--vae", default=None,
      help="SD-VAE weights to decode latent models (default: the checkpoint's --vae)")
    a("--classes", type=integer(0, MAX_CLASS), nargs="+", default=None,
      help="grid rows (default: all of <= 10 classes, else DiT's 8)")
    a("--per-class", type=integer(1, MAX_PER_CLASS), default=8, help="grid columns")
    a("--num-samples", type=integer(0, MAX_SAMPLES), default=0,
      help="write this many samples as an npz (FID-50K: 50000)")
    a("--out", default=None, help="grid.png, or samples.npz with --num-samples")
    a("--overwrite", action="store_true", help="replace an existing --out (else refused)")
    a("--batch-size", type=integer(1, MAX_BATCH), default=64, help="per process")
    a("--seed", type=integer(0, MAX_SEED), default=0,
      help="sample i uses noise seeded with seed * 10**8 + i")
    a("--save-every", type=integer(1, MAX_BATCHES), default=10,
      help="batches per resumable shard in OUT.parts/")
    a("--max-batches", type=integer(0, MAX_BATCHES), default=0,
      help="stop after this many batches per process, as if interrupted")
    a("--fid", default=None, metavar="REF.npz",
      help="score the samples against this ADM reference batch (fid.py)")
    a("--inception", default=None,
      help="Inception weights for --fid (default: fid.py's cache / download)")
    a("--precision", choices=["fp32", "bf16"], default="fp32",
      help="the release samples in fp32 (TF32 on GPU)")
    a("--compile", action="store_true", help="torch.compile the generator's blocks (regional)")
    a("--device", choices=["auto", "cpu"], default="auto")
    args = p.parse_args(argv)
    npz = args.num_samples > 0
    if args.out is None:
        args.out = "grid.png"
        if npz:
            args.out = "samples.npz"
    if args.cfg_channels is not None and args.cfg == 1:
        p.error(f"--cfg-channels {args.cfg_channels} applies only with --cfg SCALE other than 1")
    if not math.isfinite(args.cfg):
        p.error(f"--cfg {args.cfg}: expected a finite number")
    if args.classes is not None and npz:
        p.error("--classes picks the grid's rows; an npz (--num-samples) holds every class")
    if npz != args.out.endswith(".npz") or (args.fid and not npz):
        p.error("--num-samples N writes an .npz (and --fid needs it); without it --out is an image")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        p.error(f"--out {args.out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        p.error(f"--out {args.out}: the folder {folder} is not writable")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder: give a file name")
    if not npz:  # the grid: a format PIL writes, known from the extension
        ext = os.path.splitext(args.out)[1].lower()
        if Image.registered_extensions().get(ext) not in Image.SAVE:
            p.error(f"--out {args.out}: not an image file name (.png, .jpg, ...)")
        if os.path.exists(args.out) and not args.overwrite:
            p.error(f"{args.out} exists: remove it, choose another --out, or pass --overwrite")
    files = {"--fid": args.fid, "--inception": args.inception, "--vae": args.vae}
    for flag, path in files.items():
        if path and os.path.isdir(path):
            p.error(f"{flag} {path} is a folder, not a file")
    if args.fid and not os.path.isfile(args.fid):
        p.error(f"--fid {args.fid}: no such file")
    return args


if __name__ == "__main__":
    with one_line_errors("sample.py"):
        main(parse_args())

"""
Training of Adversarial Flow Models (AFM, arXiv 2511.22475): the objective and a torchrun/DDP loop.

The first half of this file is the method, self-contained (copy `AdversarialFlowLoss` and the
few functions above it into another repo): timestep sampling, the relativistic discriminator
loss with finite-difference R1/R2, the generator loss with the optimal-transport cost, gradient
normalization, the cosine transport schedule, identical augmentation of real and fake, and
classifier guidance. The second half is the loop: data, DDP, precision, EMA, checkpoints, logs.

    python train.py                                        # built-in 8x8 digits, tiny model, CPU ok
    torchrun --nproc_per_node=8 train.py --model XL/2 --data CACHE_DIR --vae sd-vae-ft-mse.bin
    torchrun --nproc_per_node=8 train.py --model XL/2 --steps 2 --data CACHE_DIR --vae ...  # 2-NFE
    python train.py --resume results/000-T-2               # continue a run exactly
    python train.py --train-classifier --model B/2 --data CACHE_DIR   # classifier for guidance
    python train.py --bench --model B/2 --precision bf16 --compile     # time the train step
"""

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from model import Classifier, Discriminator, Generator, models

# --------------------------------------------------------------------------------------
# The method (AFM_SPEC sections 3-7). Notation: x_t = (1 - t) x0 + t z, t = 1 is pure noise.
# --------------------------------------------------------------------------------------


def interp(x0, z, t):
    """The straight (rectified-flow) path between data x0 (t=0) and noise z (t=1)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * z


def sample_timesteps(steps, n, device):
    """(t_src, t_tgt) per example (AFM_SPEC section 3). The generator is trained to move a
    sample of the t_src marginal to the t_tgt marginal in one evaluation:
      steps=1:   t_src = 1, t_tgt = 0 (noise -> data, the 1-NFE model);
      steps=k:   t_src uniform on the grid {1, (k-1)/k, ..., 1/k}, t_tgt = t_src - 1/k, so that k
                 consecutive evaluations from t=1 land on t=0 (`generate` below);
      "any":     t_src ~ U(0, 1), t_tgt ~ U(0, 1) * t_src: any jump, for any number of steps."""
    if steps == "any":
        t_src = torch.rand(n, device=device)
        return t_src, torch.rand(n, device=device) * t_src
    grid = torch.arange(1.0, 0.0, -1 / steps, device=device)  # (k,) = 1, (k-1)/k, ..., 1/k
    t_src = grid[torch.randint(0, steps, (n,), device=device)]
    return t_src, t_src - 1 / steps


def cosine_schedule(step, start, end, steps):
    """The release's cosine decay of the transport weight: start at step 0, end at step
    `steps - 1` and after. The loop's step counts D and G steps alike, as the release's does."""
    if step >= steps - 1:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * step / (steps - 1))) / 2


class _GradNormFn(torch.autograd.Function):
    """Identity forward; backward divides the incoming gradient g by sqrt(s) + eps, where s is an
    EMA (decay 0.9, starting from 0, no bias correction: the release's) of sum(g^2) * numel(g).

    Why numel: sum(g^2) of a mean-reduced loss shrinks like 1/numel, so sum(g^2) * numel is
    independent of the batch and image size. Why all ranks agree: s is averaged across ranks
    before the EMA, so every rank applies the same scale and DDP stays consistent. Its effect:
    the adversarial gradient reaching G has a fixed scale (about 1 / sqrt(numel) per element)
    whatever the discriminator's logit scale, so `ot` alone sets the balance with the transport cost."""

    @staticmethod
    def forward(ctx, x, square_avg, decay, eps):
        ctx.square_avg, ctx.decay, ctx.eps = square_avg, decay, eps
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        sq = g.float().square().sum() * g.numel()
        if dist.is_available() and dist.is_initialized():  # SUM then divide: gloo has no AVG
            dist.all_reduce(sq)
            sq = sq / dist.get_world_size()
        ctx.square_avg.lerp_(sq, 1 - ctx.decay)
        return g * (1 / (ctx.square_avg.sqrt() + ctx.eps)).to(g.dtype), None, None, None


class GradientNormalization(nn.Module):
    """Holds the EMA `square_avg` (the release's buffer name, saved in checkpoints)."""

    def __init__(self, decay=0.9, eps=1e-8):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("square_avg", torch.tensor(0.0))

    def forward(self, x):
        return _GradNormFn.apply(x, self.square_avg, self.decay, self.eps)


def augment(real, fake, p, translate=0.3, erase=(0.1, 0.5), ratio=(0.3, 3.3), n_erase=3):
    """Discriminator augmentation (AFM_SPEC section 5), applied identically to real[i] and
    fake[i]: the two are concatenated along channels, as the release does. Each transform fires
    per example with probability p: a translation by (U(0, translate) * W, U(0, translate) * H)
    pixels, nearest, zero fill; then three erasings of a rectangle of area U(erase) * H * W and
    aspect ratio log-uniform in `ratio`, filled with 0."""
    if p <= 0:
        return real, fake
    x = torch.cat([real, fake], dim=1)  # (N, 2C, H, W)
    N, _, H, W = x.shape
    dev = x.device
    rows, cols = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    on = torch.rand(N, device=dev) < p
    dx = torch.where(on, (torch.rand(N, device=dev) * translate * W).round().long(), 0).view(N, 1, 1)
    dy = torch.where(on, (torch.rand(N, device=dev) * translate * H).round().long(), 0).view(N, 1, 1)
    src_r, src_c = rows - dy, cols - dx  # output pixel (r, c) reads input (r - dy, c - dx)
    valid = (src_r >= 0) & (src_c >= 0)  # (N, H, W)
    idx = (src_r.clamp(min=0) * W + src_c.clamp(min=0)).view(N, 1, H * W).expand(-1, x.shape[1], -1)
    x = x.flatten(2).gather(2, idx).view_as(x) * valid.unsqueeze(1)
    for _ in range(n_erase):
        on = torch.rand(N, device=dev) < p
        area = (erase[0] + (erase[1] - erase[0]) * torch.rand(N, device=dev)) * H * W
        aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(N, device=dev))
        h = (area * aspect).sqrt().round().clamp(1, H).long().view(N, 1, 1)
        w = (area / aspect).sqrt().round().clamp(1, W).long().view(N, 1, 1)
        top = (torch.rand(N, 1, 1, device=dev) * (H - h + 1)).floor().long()
        left = (torch.rand(N, 1, 1, device=dev) * (W - w + 1)).floor().long()
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & on.view(N, 1, 1)
        x = x * ~box.unsqueeze(1)
    return x.chunk(2, dim=1)


@contextlib.contextmanager
def frozen(module):
    """Parameters of `module` do not require grad inside the block (gradients still flow through
    the module to its inputs). The autograd graph remembers this, so restoring afterwards is safe."""
    params = [p for p in module.parameters() if p.requires_grad] if isinstance(module, nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class AdversarialFlowLoss:
    """The AFM objective. `G(x_src, y, t_src, t_tgt)` and `D(x, y, t)` are any callables (DiTs,
    small MLPs); `x0` is a data batch of any shape [B, ...]. Each training step is either a
    discriminator step (`d_loss`) or a generator step (`g_loss`); both return (loss, logs).

    Defaults are the release's 1-NFE ImageNet recipe (AFM_SPEC section 6)."""

    def __init__(self, steps=1, pred="x", ot=0.2, ot_end=0.005, decay_steps=1_000_000, gp=0.25, gp_ratio=0.25,
                 gp_eps=0.01, cp=0.01, augment_p=0.0, classifier=None, cg=0.0, cg_range=(0.0, 0.1),
                 cg_t="uniform", cg_renoise=True):
        assert steps == "any" or (isinstance(steps, int) and steps >= 1), steps
        assert pred in ("x", "v") and cg_t in ("uniform", "tgt")
        self.steps, self.pred = steps, pred
        self.ot, self.ot_end, self.decay_steps = ot, ot_end, decay_steps
        self.gp, self.gp_ratio, self.gp_eps, self.cp = gp, gp_ratio, gp_eps, cp
        self.augment_p = augment_p
        self.classifier, self.cg, self.cg_range, self.cg_t, self.cg_renoise = classifier, cg, cg_range, cg_t, cg_renoise
        self.gradnorm = GradientNormalization()

    def state_dict(self):
        return self.gradnorm.state_dict()

    def load_state_dict(self, sd):
        self.gradnorm.load_state_dict(sd)

    def ot_scale(self, step):
        return cosine_schedule(step, self.ot, self.ot_end, self.decay_steps)

    def pairs(self, G, x0, y, grad):
        """One transport problem per example: source x_src at t_src and a real target x_tgt at
        t_tgt, made with INDEPENDENT noises (the discriminator compares the marginals at t_tgt,
        not pairs), and the generator's fake target. For 1 NFE: x_src = z, x_tgt = x0."""
        t_src, t_tgt = sample_timesteps(self.steps, x0.shape[0], x0.device)
        x_src = interp(x0, torch.randn_like(x0), t_src)
        x_tgt = interp(x0, torch.randn_like(x0), t_tgt)
        with torch.set_grad_enabled(grad):
            out = G(x_src, y, t_src, t_tgt)
        if self.pred == "v":  # G predicts the velocity of the straight path: x_tgt = x_src + (t_tgt - t_src) v
            out = x_src + (t_tgt - t_src).view(-1, *([1] * (x0.dim() - 1))) * out
        # w = |t_src - t_tgt| is the length of the jump: R1/R2 are weighted by it and the
        # transport cost divided by it (a longer jump may move samples further).
        w = (t_src - t_tgt).abs().clamp_min(0.001)
        return x_src, x_tgt, out, t_src, t_tgt, w

    def d_loss(self, G, D, x0, y, step):
        _, real, fake, _, t, w = self.pairs(G, x0, y, grad=False)
        real, fake = augment(real, fake, self.augment_p)
        B = x0.shape[0]
        n = max(round(B * self.gp_ratio), 1)  # R1/R2 on a fraction of the batch
        eps = self.gp_eps
        real_gp = real[:n] + eps * torch.randn_like(real[:n])
        fake_gp = fake[:n] + eps * torch.randn_like(fake[:n])
        # One forward on everything (one DDP all-reduce, one compiled shape).
        logits = D(torch.cat([real, fake, real_gp, fake_gp]), torch.cat([y, y, y[:n], y[:n]]),
                   torch.cat([t, t, t[:n], t[:n]])).float()
        d_real, d_fake, d_real_gp, d_fake_gp = logits.split([B, B, n, n])
        # Relativistic pairing: D is asked that each real scores above its paired fake.
        adv = F.softplus(-(d_real - d_fake)).mean()
        # Finite-difference R1 / R2: |D(x + eps e) - D(x)|^2 / eps^2 estimates |grad_x D . e|^2, i.e.
        # the squared gradient norm along a random direction, for reals (R1) and fakes (R2),
        # without double backprop. Weighted by gp * w.
        r1 = ((d_real_gp - d_real[:n]).square() * (self.gp * w[:n] / eps ** 2)).mean()
        r2 = ((d_fake_gp - d_fake[:n]).square() * (self.gp * w[:n] / eps ** 2)).mean()
        # Logit centering: the relativistic loss only sees differences; this keeps their sum near 0.
        cp = ((d_real + d_fake).square() * self.cp).mean()
        loss = adv + r1 + r2 + cp
        return loss, {"d_adv": adv, "r1": r1, "r2": r2, "cp": cp,
                      "logit_real": d_real.mean(), "logit_fake": d_fake.mean()}

    def g_loss(self, G, D, x0, y, step):
        x_src, real, fake, t_src, t, w = self.pairs(G, x0, y, grad=True)
        real_aug, fake_aug = augment(real, fake, self.augment_p)
        ot_scale = self.ot_scale(step)
        with frozen(D):  # gradients flow through D into G; D's own weights get none
            d_real = D(real_aug, y, t).float()
            d_fake = D(self.gradnorm(fake_aug), y, t).float()  # normalized adversarial gradient
        adv = F.softplus(-(d_fake - d_real)).mean()
        # Transport cost: the squared distance each sample moves, per element, divided by the jump
        # length w. Among all maps that fool D, this selects the W2-optimal (straight-flow) one.
        ot = ((fake.float() - x_src).square().flatten(1).mean(1) * (ot_scale / w)).mean()
        loss = adv + ot
        logs = {"g_adv": adv, "ot": ot, "ot_scale": torch.tensor(ot_scale)}
        if self.classifier is not None and self.cg > 0:
            cg = self.guidance(fake, y, t)
            loss = loss + cg
            logs["cg"] = cg
        return loss, logs

    def guidance(self, fake, y, t_tgt):
        """Classifier guidance at training time (AFM_SPEC section 7): cross-entropy of a frozen
        noisy-image classifier on the fake, scaled by cg, zero outside t_cg in [lo, hi].
          cg_t="uniform" (1 NFE): t_cg ~ U(lo, hi); with cg_renoise the fake is moved to t_cg with
            fresh noise first. NOTE: the release samples t_cg this way but reads the re-noising
            switch from another config key (default off), so its 1-NFE guided run fed the CLEAN
            fake with that t_cg; pass --no-cg-renoise to reproduce that.
          cg_t="tgt" (k NFE): t_cg = t_tgt, the fake as it is."""
        lo, hi = self.cg_range
        if self.cg_t == "uniform":
            t_cg = torch.rand(fake.shape[0], device=fake.device) * (lo - hi) + hi
        else:
            t_cg = t_tgt
        x_cg = interp(fake, torch.randn_like(fake), t_cg) if (self.cg_t == "uniform" and self.cg_renoise) else fake
        with frozen(self.classifier):
            ce = F.cross_entropy(self.classifier(x_cg, t_cg).float(), y, reduction="none") * self.cg
        return torch.where((t_cg >= lo) & (t_cg <= hi), ce, 0.0).mean()


@torch.no_grad()
def generate(G, z, y, steps=1, pred="x"):
    """Sampling (AFM_SPEC section 9): t = linspace(1, 0, steps + 1); each jump t_i -> t_{i+1} is
    one generator evaluation. x-prediction returns the target, v-prediction a velocity."""
    t = torch.linspace(1, 0, steps + 1, device=z.device)
    x = z
    for i in range(steps):
        t_i, t_j = t[i].expand(z.shape[0]), t[i + 1].expand(z.shape[0])
        out = G(x, y, t_i, t_j).float()
        x = out if pred == "x" else x - (t[i] - t[i + 1]) * out
    return x


# --------------------------------------------------------------------------------------
# Distributed set-up, data stream, checkpoints
# --------------------------------------------------------------------------------------


def setup(device_arg="auto"):
    """torchrun's environment when present (NCCL on GPU, gloo on CPU), else one process."""
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the release: TF32 matmuls and convolutions
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def all_mean(values, device):
    """Average a dict of scalars over ranks (one all-reduce)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class IndexStream:
    """An endless, resumable stream of this rank's example indices: epoch e is a permutation
    drawn from (seed, e); rank r takes every world-th index. `position` (examples consumed) is
    all the state, so a resumed run reads exactly the batches the interrupted one would have."""

    def __init__(self, n, rank, world, seed, position=0):
        self.n, self.rank, self.world, self.seed, self.position = n, rank, world, seed, position
        self.per_rank = n // world

    def __iter__(self):
        while True:
            epoch, offset = divmod(self.position, self.per_rank)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            mine = perm[self.rank::self.world][: self.per_rank]
            for i in mine[offset:].tolist():
                self.position += 1
                yield i


def batches(dataset, stream, batch_size, workers):
    """Yield (x, y) batches. In-memory datasets (the digits) are indexed directly; the others go
    through a DataLoader fed by the stream (per-item randomness, e.g. flips, then comes from the
    worker seeds, so only the index order is exactly resumable)."""
    if hasattr(dataset, "tensors"):
        xs, ys = dataset.tensors
        it = iter(stream)
        while True:
            idx = torch.tensor([next(it) for _ in range(batch_size)])
            yield xs[idx], ys[idx]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=stream, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), drop_last=True,
                                         persistent_workers=workers > 0)
    yield from loader


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def save_checkpoint(path, obj):
    """Write to a temporary name, then rename: a crash mid-save never destroys the last good file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def find_checkpoint(path):
    """A checkpoint file, or the newest one of a run folder."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt")) + glob.glob(os.path.join(path, "*.pt")))
    if not found:
        raise SystemExit(f"--resume {path}: no checkpoint (*.pt) found there")
    return found[-1]


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rng(ckpt, seed, rank, world, device):
    """This rank's saved RNG state (exact resume), or a fresh seed if the world size changed."""
    if len(ckpt["rng"]) == world:
        set_rng_state(ckpt["rng"][rank], device)
    else:
        print0(f"resume: {len(ckpt['rng'])} RNG states for {world} processes; reseeding")
        torch.manual_seed((seed + ckpt["step"]) * world + rank)


def gather_rng(device):
    """Every rank's RNG state (rank 0 writes them all to the checkpoint)."""
    states = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state(device))
    else:
        states[0] = rng_state(device)
    return states


def save_grid(images, path, nrow, upscale=1):
    """Images in [-1, 1], (N, C, H, W) -> one PNG grid, `nrow` images per row."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3]
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    N, C, H, W = x.shape
    rows = math.ceil(N / nrow)
    grid = torch.full((C, rows * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------

# The built-in digits recipe (applied when --data digits and the flag is not given): a tiny DiT
# learns recognizable, correctly conditioned digits in about 10 minutes on a 2-core CPU. The
# transport weight decays only to 0.05: decayed to the ImageNet recipe's 0.005 within such a
# short run, within-class diversity collapsed (the plain-GAN failure); at 0.05 it did not.
DIGITS_RECIPE = dict(model="T/2", global_batch_size=32, lr=3e-4, ot_end=0.05, decay_steps=8000, max_steps=8000,
                     ema=0.995, log_every=200, sample_every=1000, ckpt_every=2000)
IMAGENET_RECIPE = dict(model="XL/2", global_batch_size=256, lr=1e-4, ot_end=0.005, decay_steps=1_000_000,
                       max_steps=5_000_000, ema=0.9999, log_every=100, sample_every=1000, ckpt_every=20000)


def resolve_defaults(args):
    """Fill the flags left unset (None) from the recipe of the data and of the number of steps."""
    recipe = DIGITS_RECIPE if args.data == "digits" else IMAGENET_RECIPE
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps != "any":
        args.steps = int(args.steps)
    one = args.steps == 1
    if args.pred is None:
        args.pred = "x" if one else "v"  # 1 NFE: x-prediction; multi-step: velocity
    if args.ot is None:
        args.ot = 0.2 if one else 0.25
    if args.clip is None:
        args.clip = 50.0 if one else 5.0  # 50 "effectively disables, kept for logging" (release)
    if args.lr_d is None:
        args.lr_d = args.lr
    if args.dis_model is None:
        args.dis_model = args.model
    if args.cg_t is None:
        args.cg_t = "uniform" if one else "tgt"
    if args.cg_range is None:
        args.cg_range = [0.0, 0.1] if one else [0.0, 0.49]
    return args


def load_data(args, device):
    """Dataset, and what the networks see: pixels, or SD-VAE latents (cached or encoded here)."""
    from dataset import build_dataset
    try:
        data = build_dataset(args.data, args.image_size, args.vae)
    except (ValueError, FileNotFoundError) as e:  # one line, naming the flag
        raise SystemExit(f"--data {args.data}: {e}")
    vae = None
    if args.vae:
        from vae import load_vae
        vae = load_vae(args.vae, device)
    C, H, _ = data.shape
    encode = data.space == "pixel" and vae is not None  # image folder + VAE: encode on the fly
    if encode:  # the latent shape, read off one encoding (any VAE depth)
        with torch.no_grad():
            C, H = vae.encode(torch.zeros(1, C, H, H, device=device))[0].shape[1:3]
    if getattr(data, "skipped", 0):
        print0(f"{data.skipped} unreadable image(s) skipped so far (warned above)")
    return data, vae, encode, C, H


@torch.no_grad()
def vae_encode(vae, x, device):
    from vae import SCALE
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        mean, logvar = vae.encode(x.clamp(-1, 1))
    return ((mean.float() + (0.5 * logvar.float()).exp() * torch.randn_like(mean.float())) * SCALE)


@torch.no_grad()
def vae_decode(vae, z, device):
    from vae import SCALE
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        return vae.decode(z / SCALE).float().clamp(-1, 1)


def build_models(args, C, H, num_classes):
    kw = dict(input_size=H, in_channels=C, num_classes=num_classes)
    G = Generator(**models[args.model], **kw, use_t_src=args.steps != 1 and args.repeat == 1,
                  use_t_tgt=args.steps == "any", repeat=args.repeat)
    D = Discriminator(**models[args.dis_model], **kw, use_t=args.steps != 1)
    return G, D


def make_run_dir(args, rank):
    """results/NNN-MODEL with checkpoints/, args.json, log.jsonl and sample grids (rank 0 makes it)."""
    run_dir = None
    if rank == 0:
        os.makedirs(args.results_dir, exist_ok=True)
        idx = len(glob.glob(os.path.join(args.results_dir, "*")))
        tag = ("cls-" if args.train_classifier else "") + args.model.replace("/", "-")
        run_dir = os.path.join(args.results_dir, f"{idx:03d}-{tag}")
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    if dist.is_initialized():
        box = [run_dir]
        dist.broadcast_object_list(box)
        run_dir = box[0]
    return run_dir


def main(args):
    ckpt = None
    if args.resume:  # the run's own settings, except flags given explicitly now
        path = find_checkpoint(args.resume)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        defaults = vars(parse_args([]))
        for k, v in ckpt["args"].items():
            if k not in ("resume", "device") and getattr(args, k, None) == defaults.get(k):
                setattr(args, k, v)
    args = resolve_defaults(args)
    rank, world, device = setup(args.device)
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    if args.bench:
        return bench(args, device)
    if args.train_classifier:
        return train_classifier(args, rank, world, device, ckpt)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path))) if ckpt else make_run_dir(args, rank)
    torch.manual_seed(args.seed * world + rank)  # per-rank seeds

    data, vae, encode, C, H = load_data(args, device)
    G, D = build_models(args, C, H, data.num_classes)
    G.grad_checkpointing = D.grad_checkpointing = args.grad_checkpoint
    G.to(device)
    D.to(device)
    ema = copy.deepcopy(G).requires_grad_(False).eval()
    classifier = None
    if args.cls:
        classifier = load_classifier(args.cls, args.cls_model, C, H, data.num_classes, device)
    afm = AdversarialFlowLoss(steps=args.steps, pred=args.pred, ot=args.ot, ot_end=args.ot_end,
                              decay_steps=args.decay_steps, gp=args.gp, gp_ratio=args.gp_ratio, gp_eps=args.gp_eps,
                              cp=args.cp, augment_p=args.augment_p, classifier=classifier, cg=args.cg,
                              cg_range=tuple(args.cg_range), cg_t=args.cg_t, cg_renoise=args.cg_renoise)
    afm.gradnorm.to(device)
    fused = device.type == "cuda"
    opt_g = torch.optim.AdamW(G.parameters(), lr=args.lr, betas=(0.0, 0.9), weight_decay=0.01, eps=1e-8, fused=fused)
    opt_d = torch.optim.AdamW(D.parameters(), lr=args.lr_d, betas=(0.0, 0.9), weight_decay=0.01, eps=1e-8,
                              fused=fused)
    step, position = 0, 0
    if ckpt is not None:
        try:
            G.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            D.load_state_dict(ckpt["dis"])
        except RuntimeError as e:  # e.g. --model given explicitly and different from the run's
            raise SystemExit(f"--resume {path}: written by a {ckpt['args']['model']} run, does not fit "
                             f"--model {args.model}: {str(e).splitlines()[1].strip()}")
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        afm.load_state_dict(ckpt["gradnorm"])
        step, position = ckpt["step"], ckpt["data_position"]
        restore_rng(ckpt, args.seed, rank, world, device)
        print0(f"resumed from {path} at step {step}")
        del ckpt
    print0(f"G {args.model}: {sum(p.numel() for p in G.parameters()):,} parameters, "
           f"D {args.dis_model}: {sum(p.numel() for p in D.parameters()):,}; input {C}x{H}x{H}; "
           f"{world} process(es) on {device}; run folder {run_dir}")

    # The modules keep their plain state-dict keys: compile in place, wrap DDP around them.
    if args.compile:
        G.compile(dynamic=False)
        D.compile(dynamic=False)
    G_train, D_train = G, D
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        G_train = nn.parallel.DistributedDataParallel(G, device_ids=ids)
        D_train = nn.parallel.DistributedDataParallel(D, device_ids=ids)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    local_batch = args.global_batch_size // world
    stream = IndexStream(len(data), rank, world, args.seed, position)
    # Examples consumed, for resuming (the DataLoader's workers read ahead of the loop).
    consumed = lambda step: position + (step - start_step) * local_batch  # noqa: E731
    start_step = step
    data_iter = batches(data, stream, local_batch, args.workers)
    # Fixed noise and labels for the sample grids: classes in rows.
    gen = torch.Generator().manual_seed(args.seed)
    n_cls = min(data.num_classes, 10)
    grid_y = torch.arange(n_cls).repeat_interleave(10 if n_cls <= 10 else 1).to(device)
    grid_z = torch.randn(len(grid_y), C, H, H, generator=gen).to(device)

    received = {"signal": None}  # set by the handler, in this process only

    def on_signal(signum, frame):
        received["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def checkpoint(step):
        rng = gather_rng(device)
        if rank == 0:
            obj = {"model": G.state_dict(), "ema": ema.state_dict(), "dis": D.state_dict(),
                   "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "gradnorm": afm.state_dict(),
                   "args": vars(args), "step": step, "data_position": consumed(step), "rng": rng}
            save_checkpoint(os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"), obj)
            print0(f"saved checkpoint {run_dir}/checkpoints/{step:07d}.pt")

    def sample_grid(step):
        if rank != 0:
            return
        with amp:
            x = generate(ema, grid_z, grid_y, args.sample_steps or (1 if args.steps == "any" else args.steps),
                         args.pred)
        if vae is not None and (encode or data.space == "latent"):
            x = vae_decode(vae, x, device)
        if x.shape[1] in (1, 3):
            save_grid(x, os.path.join(run_dir, f"samples_{step:07d}.png"), nrow=10, upscale=max(1, 64 // x.shape[-1]))

    logs, t0, window = {}, time.time(), 0
    non_finite = torch.zeros((), device=device)  # no host sync per step: checked at log time
    while step < args.max_steps:
        d_step = step % (1 + args.ttur) < args.ttur  # ttur D steps, then one G step
        x0, y = next(data_iter)
        x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        if encode:
            x0 = vae_encode(vae, x0, device)
        with amp:
            if d_step:
                loss, out = afm.d_loss(G, D_train, x0, y, step)  # G without DDP: no grad needed
            else:
                loss, out = afm.g_loss(G_train, D, x0, y, step)  # D without DDP: frozen, see `frozen`
        loss.backward()
        opt, net = (opt_d, D) if d_step else (opt_g, G)
        out["grad_norm_" + ("d" if d_step else "g")] = nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not d_step:  # EMA after each generator update
            ema_update(ema, G, args.ema)
        non_finite = torch.where((non_finite == 0) & ~torch.isfinite(loss.detach()), step + 1, non_finite)
        for k, v in out.items():  # (sum, count): D-step and G-step terms are averaged separately
            total, count = logs.get(k, (0.0, 0))
            logs[k] = (total + v.detach().float(), count + 1)
        window += 1
        step += 1

        must_check = step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.max_steps
        # Stopping on a signal needs every rank at the same step (the checkpoint is collective):
        # ranks agree every 10 steps; a single process stops at once.
        stop = received["signal"] is not None
        if world > 1:
            if step % 10 == 0 or must_check:
                flag = torch.tensor([float(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            else:
                stop = False
        if must_check or stop:
            first_bad = int(non_finite)  # 1 + the first step with a non-finite loss on this rank, or 0
            flag = torch.tensor([float(first_bad > 0)], device=device)
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                where = f"at step {first_bad - 1}" if first_bad else "on another rank"
                print(f"[rank {rank}] non-finite loss {where}; stopping. The last good checkpoint in "
                      f"{run_dir}/checkpoints is unaffected.", flush=True)
                raise SystemExit(1)
        if step % args.log_every == 0:
            means = all_mean({k: total / count for k, (total, count) in logs.items()}, device)
            if not hasattr(data, "tensors"):  # unreadable images met so far, all ranks together
                means["skipped_images"] = all_mean({"s": data.skipped}, device)["s"] * world
            dt = time.time() - t0
            print0(f"step {step:07d} | " + " ".join(f"{k} {v:.4g}" for k, v in means.items()) +
                   f" | {window / dt:.2f} it/s")
            if rank == 0:
                with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, **means, "it_per_s": window / dt}) + "\n")
            logs, t0, window = {}, time.time(), 0
        if args.sample_every and step % args.sample_every == 0:
            sample_grid(step)
        if step % args.ckpt_every == 0 or step == args.max_steps or stop:
            checkpoint(step)
        if stop:
            print0(f"stopped by a signal at step {step}; resume with --resume {run_dir}")
            break
    if step == args.max_steps and args.sample_every and step % args.sample_every:
        sample_grid(step)  # the final grid, when the last step is not a multiple of --sample-every
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Classifier for guidance (AFM_SPEC section 7), and loading one
# --------------------------------------------------------------------------------------


def load_classifier(path, model_name, C, H, num_classes, device):
    """Our classifier checkpoint (its EMA weights) or the release's bare `classifier.pth`."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "ema" in sd:
        model_name = sd.get("args", {}).get("model", model_name)
        sd = sd["ema"]
    cls = Classifier(**models[model_name], input_size=H, in_channels=C, num_classes=num_classes)
    try:
        cls.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"--cls {path}: does not fit a {model_name} classifier on {C}x{H}x{H} with "
                         f"{num_classes} classes (--cls-model?): {str(e).splitlines()[1].strip()}")
    return cls.to(device).eval().requires_grad_(False)


def train_classifier(args, rank, world, device, ckpt=None):
    """Cross-entropy on x_t = interp(x0, z, t), t ~ U(0, 1); AdamW lr 1e-4 betas (0.9, 0.95) and
    EMA 0.9995 as the release. Its checkpoint is what `--cls` takes."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(find_checkpoint(args.resume)))) if ckpt \
        else make_run_dir(args, rank)
    torch.manual_seed(args.seed * world + rank)
    data, vae, encode, C, H = load_data(args, device)
    net = Classifier(**models[args.model], input_size=H, in_channels=C, num_classes=data.num_classes).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8)
    step, position = 0, 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, position = ckpt["step"], ckpt["data_position"]
        restore_rng(ckpt, args.seed, rank, world, device)
    if args.compile:
        net.compile(dynamic=False)
    net_train = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    stream = IndexStream(len(data), rank, world, args.seed, position)
    data_iter = batches(data, stream, args.global_batch_size // world, args.workers)
    logs, t0, start_step = {"loss": 0.0, "acc": 0.0}, time.time(), step
    while step < args.max_steps:
        x0, y = next(data_iter)
        x0, y = x0.to(device), y.to(device).long()
        if encode:
            x0 = vae_encode(vae, x0, device)
        t = torch.rand(x0.shape[0], device=device)
        with amp:
            logits = net_train(interp(x0, torch.randn_like(x0), t), t).float()
        loss = F.cross_entropy(logits, y)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 50.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, net, 0.9995)
        logs["loss"] += loss.detach()
        logs["acc"] += (logits.argmax(1) == y).float().mean()
        step += 1
        if step % args.log_every == 0:
            means = all_mean({k: v / args.log_every for k, v in logs.items()}, device)
            print0(f"step {step:07d} | cls_loss {means['loss']:.4f} acc {means['acc']:.3f} | "
                   f"{args.log_every / (time.time() - t0):.2f} it/s")
            logs, t0 = {"loss": 0.0, "acc": 0.0}, time.time()
        if step % args.ckpt_every == 0 or step == args.max_steps:
            rng = gather_rng(device)
            if rank == 0:
                save_checkpoint(os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"),
                                {"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                 "args": vars(args), "step": step, "rng": rng,
                                 "data_position": position + (step - start_step) * (args.global_batch_size // world)})
    print0(f"classifier checkpoints in {run_dir}/checkpoints (use with --cls)")


# --------------------------------------------------------------------------------------
# Benchmark: time of one D step + one G step, images/s, achieved TFLOP/s
# --------------------------------------------------------------------------------------


def bench(args, device, pairs=10):
    from torch.utils.flop_counter import FlopCounterMode
    C, H = (1, 8) if args.model.startswith("T/") else (4, args.image_size // 8)
    G, D = build_models(args, C, H, 10 if args.model.startswith("T/") else 1000)
    G.grad_checkpointing = D.grad_checkpointing = args.grad_checkpoint
    G.to(device)
    D.to(device)
    afm = AdversarialFlowLoss(steps=args.steps, pred=args.pred)
    afm.gradnorm.to(device)
    opt_g = torch.optim.AdamW(G.parameters(), lr=1e-4, betas=(0.0, 0.9), fused=device.type == "cuda")
    opt_d = torch.optim.AdamW(D.parameters(), lr=1e-4, betas=(0.0, 0.9), fused=device.type == "cuda")
    B = args.bench_batch
    x0, y = torch.randn(B, C, H, H, device=device), torch.randint(0, 10, (B,), device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def pair():
        for d_step, (net, opt) in ((True, (D, opt_d)), (False, (G, opt_g))):
            with amp:
                loss, _ = afm.d_loss(G, D, x0, y, 0) if d_step else afm.g_loss(G, D, x0, y, 0)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 50.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # eager, before compiling: forward + backward
        pair()
    flops = counter.get_total_flops()
    if args.compile:
        G.compile(dynamic=False)
        D.compile(dynamic=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_compile = time.time()
    for _ in range(3):  # warm-up (and compilation)
        pair()
    sync()
    t0 = time.time()
    for _ in range(pairs):
        pair()
    sync()
    dt = (time.time() - t0) / pairs
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    print(f"bench {args.model} batch {B} {args.precision}{' compile' if args.compile else ''} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
          f"D+G step {dt * 1000:.1f} ms, {B / dt:.1f} img/s (one image = one D and one G step), "
          f"{flops / dt / 1e12:.2f} TFLOP/s ({flops / 1e9:.1f} GFLOP per D+G step), "
          f"warm-up {time.time() - t_compile - dt * pairs:.0f} s, peak mem {mem:.1f} GiB", flush=True)


# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # Data and models. Unset (None) flags come from the recipe: digits or ImageNet (resolve_defaults).
    a("--data", default="digits", help='"digits" (built-in), an image folder, or a latent cache (dataset.py)')
    a("--vae", default=None, help="SD-VAE weights (sd-vae-ft-mse): encode images / decode sample grids")
    a("--image-size", type=int, default=256)
    a("--model", choices=list(models), default=None, help="generator size (digits: T/2, ImageNet: XL/2)")
    a("--dis-model", choices=list(models), default=None, help="discriminator size (default: as --model)")
    a("--repeat", type=int, default=1, help="deep generator: run the blocks this many times (2: 56, 4: 112 layers)")
    a("--grad-checkpoint", action="store_true", help="recompute block activations in backward (saves memory)")
    # The method (AFM_SPEC section 6; defaults are the release's).
    a("--steps", default="1", help='NFE the generator is trained for: 1, k, or "any"')
    a("--pred", choices=["x", "v"], default=None, help="x-prediction (default for 1 NFE) or velocity (multi-step)")
    a("--ot", type=float, default=None, help="transport weight at step 0 (1 NFE: 0.2, multi-step: 0.25)")
    a("--ot-end", type=float, default=None, help="transport weight after the decay (ImageNet 0.005, digits 0.05)")
    a("--decay-steps", type=int, default=None, help="length of the cosine decay in loop steps (release: 1M)")
    a("--gp", type=float, default=0.25, help="R1/R2 weight")
    a("--gp-ratio", type=float, default=0.25, help="fraction of the batch used for R1/R2")
    a("--gp-eps", type=float, default=0.01, help="finite-difference step of R1/R2")
    a("--cp", type=float, default=0.01, help="logit-centering weight")
    a("--augment-p", type=float, default=0.0, help="discriminator augmentation probability (guided: 0.4)")
    a("--ttur", type=int, default=1, help="discriminator steps per generator step")
    a("--lr", type=float, default=None, help="generator learning rate (ImageNet 1e-4, deep 5e-5, digits 3e-4)")
    a("--lr-d", type=float, default=None, help="discriminator learning rate (default: --lr)")
    a("--clip", type=float, default=None, help="gradient clipping (1 NFE: 50, multi-step: 5)")
    a("--ema", type=float, default=None, help="EMA decay of the generator (ImageNet 0.9999; digits 0.995: short run)")
    a("--cls", default=None, help="classifier checkpoint for guidance (ours or the release's classifier.pth)")
    a("--cls-model", choices=list(models), default="B/2", help="classifier size for a bare state dict")
    a("--cg", type=float, default=0.0, help="guidance weight (1 NFE: 0.003, k NFE: 0.02)")
    a("--cg-range", type=float, nargs=2, default=None, help="t_cg range (1 NFE: 0 0.1, k NFE: 0 0.49)")
    a("--cg-t", choices=["uniform", "tgt"], default=None, help="t_cg ~ U(range) (1 NFE) or t_tgt (k NFE)")
    a("--cg-renoise", action=argparse.BooleanOptionalAction, default=True,
      help="re-noise the fake to t_cg before the classifier (see AdversarialFlowLoss.guidance)")
    # The loop.
    a("--global-batch-size", type=int, default=None, help="split over processes (ImageNet 256, digits 32)")
    a("--max-steps", type=int, default=None, help="loop steps (each a D or a G step)")
    a("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast or fp32 (+TF32 on GPU)")
    a("--compile", action="store_true", help="torch.compile the networks")
    a("--device", choices=["auto", "cpu"], default="auto")
    a("--workers", type=int, default=4, help="DataLoader workers per process (image folders, caches)")
    a("--seed", type=int, default=0)
    a("--results-dir", default="results")
    a("--resume", default=None, help="a run folder or a checkpoint file to continue from")
    a("--log-every", type=int, default=None)
    a("--sample-every", type=int, default=None, help="sample grid from fixed noise (0: never)")
    a("--sample-steps", type=int, default=None, help="NFE of the grids (default: --steps; any-step: 1)")
    a("--ckpt-every", type=int, default=None)
    a("--train-classifier", action="store_true", help="train the guidance classifier instead (section 7)")
    a("--bench", action="store_true", help="time the train step of --model on this device and exit")
    a("--bench-batch", type=int, default=32, help="per-device batch of --bench")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

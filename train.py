"""
Training of Adversarial Flow Models (AFM, arXiv 2511.22475): the objective, then one torchrun/DDP loop.

The first half of this file is the method, self-contained (copy `AdversarialFlowLoss` and the few
functions above it into another repo): timestep sampling, the relativistic discriminator loss with
finite-difference R1/R2, the generator loss with the optimal-transport cost, gradient normalization,
the cosine transport schedule, identical augmentation of real and fake, classifier guidance, and the
guidance classifier's own loss. Then the release's recipes, and the loop that trains either.

    python train.py                                             # built-in 8x8 digits, tiny model, CPU ok
    torchrun --nproc_per_node=8 train.py --recipe 1nfe --data CACHE_DIR --vae sd-vae-ft-mse.bin
    torchrun --nproc_per_node=8 train.py --recipe knfe --steps 2 --data CACHE_DIR --vae ...     # 2 NFE
    torchrun --nproc_per_node=8 train.py --recipe classifier --data CACHE_DIR --vae ...   # for guidance
    torchrun --nproc_per_node=8 train.py --recipe 1nfe-cg --cls CLS_RUN --data CACHE_DIR --vae ...
    python train.py --resume results/000-T-2                    # continue a run exactly
"""

import argparse
import contextlib
import copy
import json
import math
import os
import re
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dataset import (ArgumentParser, IndexStream, all_mean, batches, cleanup, load_checkpoint, open_data,
                     print0, save_atomic, save_json, setup)
from model import Classifier, Discriminator, Generator, models
import fid
from sample import sample_images, sample_indices, save_grid, to_uint8
from vae import encode

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


class GradientNormalization(nn.Module):
    """Identity forward; backward divides the incoming gradient g by sqrt(s) + eps, where s is an EMA
    (decay 0.9, starting from 0, no bias correction: the release's) of sum(g^2) * numel(g), held in the
    buffer `square_avg` (the release's name, saved in checkpoints).

    Why numel: sum(g^2) of a mean-reduced loss shrinks like 1/numel, so sum(g^2) * numel is
    independent of the batch and image size. Why all ranks agree: s is averaged across ranks
    before the EMA, so every rank applies the same scale and DDP stays consistent. Its effect:
    the adversarial gradient reaching G has a fixed scale (about 1 / sqrt(numel) per element)
    whatever the discriminator's logit scale, so `ot` alone sets the balance with the transport cost."""

    def __init__(self, decay=0.9, eps=1e-8):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("square_avg", torch.tensor(0.0))

    def forward(self, x):
        x = x.clone()  # the hook below replaces the gradient flowing back through this copy
        if x.requires_grad:
            x.register_hook(self.normalize)
        return x

    def normalize(self, g):
        sq = g.float().square().sum() * g.numel()
        if dist.is_available() and dist.is_initialized():  # SUM then divide: gloo has no AVG
            dist.all_reduce(sq)
            sq = sq / dist.get_world_size()
        self.square_avg.lerp_(sq, 1 - self.decay)
        return g * (1 / (self.square_avg.sqrt() + self.eps)).to(g.dtype)


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


def classifier_loss(C, x0, y):
    """The guidance classifier's own objective (AFM_SPEC section 7): cross-entropy on x_t = interp(x0, z, t),
    t ~ U(0, 1), so that it reads the class at every noise level the guidance will show it."""
    t = torch.rand(x0.shape[0], device=x0.device)
    logits = C(interp(x0, torch.randn_like(x0), t), t).float()
    loss = F.cross_entropy(logits, y)
    return loss, {"cls_loss": loss, "acc": (logits.argmax(1) == y).float().mean()}


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# --------------------------------------------------------------------------------------
# Recipes: the release's configurations (AFM_SPEC section 6; its configs/train/*.yaml), one flag each
# --------------------------------------------------------------------------------------

# train_1nfe.yaml. Clip 50 "effectively disables [clipping], but kept for logging"; decay over 1M steps; logs
# every 100 steps, sample grids every 1,000, checkpoints every 20,000 as the release's writer and persistence.
RELEASE = dict(model="XL/2", global_batch_size=256, steps=1, pred="x", repeat=1, ot=0.2, ot_end=0.005,
               decay_steps=1_000_000, gp=0.25, gp_ratio=0.25, gp_eps=0.01, cp=0.01, augment_p=0.0, ttur=1, lr=1e-4,
               lr_d=None, clip=50.0, ema=0.9999, cg=0.0, cg_range=[0.0, 0.1], cg_t="uniform",
               max_steps=5_000_000, log_every=100, sample_every=1000, ckpt_every=20_000, eval_every=10_000,
               eval_samples=10_000)
# What every multi-step recipe changes: velocity prediction, a larger transport weight, clip 5, and the
# guidance (when on) read at t_tgt on [0, 0.49] instead of a re-noised fake on [0, 0.1].
MULTI = dict(pred="v", ot=0.25, clip=5.0, cg_range=[0.0, 0.49], cg_t="tgt")
RECIPES = {
    "1nfe": RELEASE,
    "1nfe-cg": {**RELEASE, "cg": 0.003, "augment_p": 0.4},  # train_1nfe_cg.yaml
    "knfe": {**RELEASE, **MULTI, "steps": 2},  # train_fix_nfe.yaml: --steps 2 or 4
    "knfe-cg": {**RELEASE, **MULTI, "steps": 2, "cg": 0.02, "augment_p": 0.4},  # train_fix_nfe_cg.yaml
    "any": {**RELEASE, **MULTI, "steps": "any", "model": "B/2", "global_batch_size": 32},  # train_any_nfe.yaml
    # train_1nfe_deep.yaml: "gen_lr: 5e-5 # lr / depth" (so 2.5e-5 for --repeat 4), dis_lr 1e-4, clip 5.
    "deep": {**RELEASE, "repeat": 2, "lr": 5e-5, "lr_d": 1e-4, "clip": 5.0},
    # train_classifier.yaml: B/2, lr 1e-4, clip 50, EMA 0.9995 (AdamW betas (0.9, 0.95): see `optimizer`).
    "classifier": {**RELEASE, "model": "B/2", "ema": 0.9995},
}
# The built-in digits: a tiny DiT that learns clean, correctly conditioned digits in minutes on a 2-core CPU.
# A scale, not a method: laid over the release's recipe for --steps (1nfe, knfe, any). Tuned with
# fid.pixel_report every 1,000 steps (README): the transport weight stays constant, where the release decays it
# over 1M steps, because any decay within a run this short let within-class diversity collapse after it
# (0.2 -> 0.05 over 8k steps: 0.83 of the real digits' at 8k, 0.58 at 16k; a constant 0.1: 0.76 at 15k); at a
# constant 0.2-0.25 it held at 0.90-0.94 up to 64k steps while the agreement kept rising. 0.25 (the release's
# multi-step start) keeps a margin; lr 5e-4 and EMA 0.999 reach agreement 0.97 within 16k steps (3e-4: ~20k).
DIGITS = dict(model="T/2", global_batch_size=32, lr=5e-4, ot=0.25, ot_end=0.25, max_steps=16_000, ema=0.999,
              log_every=500, sample_every=2000, ckpt_every=4000, eval_every=1000, eval_samples=1000)
# Pixel space, no VAE, 32x32 and 64x64 RGB (CIFAR-10, FFHQ/CelebA-64): scales laid over the release's recipe for
# --steps, as the digits. The patch keeps 256 tokens, the sequence of the ImageNet-256 latent recipe (32 / 2,
# 64 / 4), B width for one GPU; batch 256, lr 1e-4, EMA 0.9999 as the release. The transport weight stays at
# 0.2, measured as for the digits on 32x32 upscaled digits (T/4, batch 32, 16k steps; README): decayed to 0.05
# over 4k steps, diversity fell to 0.51 of the data's and the pixel FD rose after the decay; constant, diversity
# held at 1.03 and the pixel FD kept falling (5.2 -> 2.5 from 8k to 16k).
PIXEL = dict(global_batch_size=256, lr=1e-4, ot=0.2, ot_end=0.2, max_steps=400_000, ema=0.9999, log_every=100,
             sample_every=2000, ckpt_every=10_000, eval_every=10_000, eval_samples=10_000)
SCALES = {"digits": DIGITS, "pixel32": {**PIXEL, "model": "B/2"}, "pixel64": {**PIXEL, "model": "B/4"}}
DEFAULTS = dict(data="digits", vae=None, eval_ref=None, inception=None, unconditional=False, image_size=256,
                dis_model=None, grad_checkpoint=False, cls=None,
                cls_model="B/2", cg_renoise=True, precision="fp32", compile=False, device="auto", workers=4, seed=0,
                results_dir="results", resume=None, sample_steps=None)


def recipe(name, steps=None):
    """The values of a named recipe (a scale: over the release's recipe for `steps`)."""
    if name not in SCALES:
        return dict(RECIPES[name], recipe=name)
    method = "1nfe" if steps in (None, 1) else "any" if steps == "any" else "knfe"
    return {**RECIPES[method], **SCALES[name], "recipe": name, "steps": steps or 1}


def resolve(argv=None):
    """-> (settings, checkpoint or None, its path). Settings: the recipe's values, then (with --resume) the
    run's own, then every flag given explicitly now. Flag combinations the release never uses are errors."""
    p = parser()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    ckpt = path = None
    if "resume" in given:
        try:
            path, ckpt = load_checkpoint(given["resume"], "--resume")
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}")
        if {"args", "step", "model", "ema", "rng", "data_position"} - set(ckpt):
            raise SystemExit(f"train.py: error: --resume {path}: not a checkpoint of train.py (a bare state dict "
                             f"has no optimizer, step or data position to resume; sample from it with sample.py)")
        base = {k: v for k, v in ckpt["args"].items() if k in DEFAULTS or k in RELEASE or k == "recipe"}
        base.setdefault("recipe", "classifier" if ckpt["args"].get("train_classifier") else "unnamed")  # older runs
    else:
        base = recipe(given.get("recipe") or ("digits" if given.get("data", "digits") == "digits" else "1nfe"),
                      given.get("steps"))
        if base["recipe"] == "deep" and "lr" not in given:
            base["lr"] = 1e-4 / given.get("repeat", 2)  # "lr / depth"
    s = argparse.Namespace(**{**DEFAULTS, **base, **given})
    s.dis_model = s.dis_model or s.model
    s.lr_d = s.lr if s.lr_d is None else s.lr_d  # the release: dis_lr = gen_lr, except the deep recipe
    error = check(s, ckpt is not None)
    if error:
        p.error(error)
    return s, ckpt, path


def check(s, resumed):
    """The first problem with these settings (a one-line message), or None."""
    for k, ok, want in [
            ("global_batch_size max_steps log_every ckpt_every decay_steps repeat ttur lr lr_d clip gp_eps",
             lambda v: v > 0, "positive"),
            ("ot ot_end gp cp cg sample_every workers eval_every eval_samples", lambda v: v >= 0, ">= 0"),
            ("gp_ratio augment_p", lambda v: 0 <= v <= 1, "in [0, 1]"), ("ema", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("cg_range", lambda v: 0 <= v[0] <= v[1] <= 1, "LO HI with 0 <= LO <= HI <= 1")]:
        for key in k.split():
            if getattr(s, key) is not None and not ok(getattr(s, key)):
                return f"--{key.replace('_', '-')} must be {want}, got {getattr(s, key)}"
    if s.steps != "any" and s.steps < 1:
        return f"--steps must be 1, 2, ... or any, got {s.steps}"
    for flag, path in (("--vae", s.vae), ("--cls", s.cls), ("--data", None if s.data == "digits" else s.data),
                       ("--eval-ref", s.eval_ref), ("--inception", s.inception)):
        if path and not os.path.exists(path):
            return f"{flag} {path}: no such file or folder"
    if os.path.exists(s.results_dir) and not os.path.isdir(s.results_dir):
        return f"--results-dir {s.results_dir} is a file, not a folder"
    kind = {1: "1nfe", "any": "any"}
    if s.recipe == "classifier" or resumed:
        return None
    if s.recipe not in SCALES and kind.get(s.steps, "knfe") != kind.get(RECIPES[s.recipe]["steps"], "knfe"):
        return f"--steps {s.steps} does not fit --recipe {s.recipe}: use --recipe {kind.get(s.steps, 'knfe')}"
    if (s.repeat > 1) != (s.recipe == "deep"):
        return "--recipe deep is the deep generator, with --repeat 2 or 4; other recipes have --repeat 1"
    if s.cls and s.cg <= 0:
        return f"--cls without a guidance weight (--recipe {s.recipe} has cg 0): use --recipe 1nfe-cg or knfe-cg"
    if s.cg > 0 and not s.cls:
        return f"--recipe {s.recipe} has guidance weight {s.cg}: it needs --cls (train one with --recipe classifier)"
    return None


# --------------------------------------------------------------------------------------
# The loop's parts: data, what a checkpoint holds, run folders
# --------------------------------------------------------------------------------------


def load_classifier(s, C, H, num_classes, device):
    """The frozen guidance classifier: our checkpoint (its EMA weights) or the release's bare classifier.pth."""
    try:
        sd = load_checkpoint(s.cls, "--cls")[1]
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    name = sd.get("args", {}).get("model", s.cls_model)
    cls = Classifier(**models[name], input_size=H, in_channels=C, num_classes=num_classes)
    try:
        cls.load_state_dict(sd.get("ema", sd), strict=True)
    except RuntimeError as e:
        raise SystemExit(f"train.py: error: --cls {s.cls}: does not fit a {name} classifier on {C}x{H}x{H} with "
                         f"{num_classes} classes (--cls-model?): {str(e).splitlines()[1].strip()}")
    return cls.to(device).eval().requires_grad_(False)


def build(s, C, H, num_classes, device):
    """Everything a checkpoint holds, under its key there: the networks ("model": the generator or the
    classifier; "dis"), the EMA, the AdamW optimizers and the objective's gradient-normalization state."""
    kw = dict(input_size=H, in_channels=C, num_classes=num_classes)

    def adamw(net, lr, betas):  # AFM: betas (0, 0.9); the classifier (0.9, 0.95); weight decay 0.01, eps 1e-8
        return torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=0.01, eps=1e-8,
                                 fused=device.type == "cuda")
    if s.recipe == "classifier":
        net = Classifier(**models[s.model], **kw).to(device)
        return {"model": net, "ema": copy.deepcopy(net).requires_grad_(False).eval(),
                "opt": adamw(net, s.lr, (0.9, 0.95))}
    G = Generator(**models[s.model], **kw, use_t_src=s.steps != 1 and s.repeat == 1, use_t_tgt=s.steps == "any",
                  repeat=s.repeat)
    D = Discriminator(**models[s.dis_model], **kw, use_t=s.steps != 1)
    for net in (G, D):
        net.grad_checkpointing = s.grad_checkpoint
        net.to(device)
    ema = copy.deepcopy(G).requires_grad_(False).eval()
    afm = AdversarialFlowLoss(steps=s.steps, pred=s.pred, ot=s.ot, ot_end=s.ot_end, decay_steps=s.decay_steps,
                              gp=s.gp, gp_ratio=s.gp_ratio, gp_eps=s.gp_eps, cp=s.cp, augment_p=s.augment_p,
                              classifier=load_classifier(s, C, H, num_classes, device) if s.cls else None,
                              cg=s.cg, cg_range=tuple(s.cg_range), cg_t=s.cg_t, cg_renoise=s.cg_renoise)
    afm.gradnorm.to(device)
    return {"model": G, "dis": D, "ema": ema, "opt_g": adamw(G, s.lr, (0.0, 0.9)),
            "opt_d": adamw(D, s.lr_d, (0.0, 0.9)), "gradnorm": afm}


def restore(ckpt, path, state, s, rank, world, device):
    """Load every part of `state` and this rank's RNG from a checkpoint -> (step, data position)."""
    try:
        for key, part in state.items():
            part.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError) as e:  # e.g. --model given explicitly and different from the run's
        raise SystemExit(f"train.py: error: --resume {path}: written by a {ckpt['args']['model']} run, does not fit "
                         f"--model {s.model}: {(str(e).splitlines() + [''])[1].strip() or e}")
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    else:  # another number of processes: the data order is kept, the noise is new
        print0(f"resume: {len(ckpt['rng'])} RNG states for {world} processes; reseeding")
        torch.manual_seed((s.seed + ckpt["step"]) * world + rank)
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["data_position"]


def save_checkpoint(run_dir, state, s, step, position, rank, device):
    """Plain tensors and plain Python (torch.load(weights_only=True) reads it), written atomically; with every
    rank's RNG state, gathered to rank 0 (a collective: every rank calls this), for an exact resume."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    rng = [mine]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, mine)
    if rank == 0:
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        save_atomic({**{key: part.state_dict() for key, part in state.items()}, "args": vars(s), "step": step,
                     "data_position": position, "rng": rng}, path)
        print0(f"saved checkpoint {path}")


def resumed_run_dir(s, path):
    """The run folder a resumed run keeps writing to, or None for a new one. A run folder (--resume RUN) or its
    newest checkpoint file continues in place; a checkpoint file from elsewhere, or an older checkpoint of a run
    (whose later checkpoints must not be overwritten by another history), starts a new run folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) != "checkpoints":
        return None
    newest = max(f for f in os.listdir(folder) if f.endswith(".pt"))
    return os.path.dirname(folder) if os.path.isdir(s.resume) or os.path.basename(path) == newest else None


def make_run_dir(s, rank):
    """results/NNN-MODEL with checkpoints/ and args.json (rank 0 makes it). NNN is one past the largest index
    in use, and the folder is created exclusively: a new run never writes into another's folder."""
    run_dir = None
    if rank == 0:
        tag = ("cls-" if s.recipe == "classifier" else "") + s.model.replace("/", "-")
        try:
            os.makedirs(s.results_dir, exist_ok=True)
            while run_dir is None:
                used = [int(m[1]) for n in os.listdir(s.results_dir) if (m := re.match(r"(\d+)-", n))]
                with contextlib.suppress(FileExistsError):  # another launch took this index first: look again
                    os.mkdir(path := os.path.join(s.results_dir, f"{max(used, default=-1) + 1:03d}-{tag}"))
                    run_dir = path
            os.mkdir(os.path.join(run_dir, "checkpoints"))
        except OSError as e:
            raise SystemExit(f"train.py: error: --results-dir {s.results_dir}: {e.strerror}")
        save_atomic(vars(s), os.path.join(run_dir, "args.json"), save_json)
    box = [run_dir]
    if dist.is_initialized():
        dist.broadcast_object_list(box)
    return box[0]


def write_log(run_dir, record, rank, plot=False):
    """One line of log.jsonl (rank 0); with plot, curves.png redrawn from the whole log (at evaluations and
    checkpoints: a long run's log is long)."""
    if rank == 0:
        with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(run_dir) if plot else None


def open_evaluation(s, data, vae, generator, device):
    """(Inception, reference statistics) for in-loop FID, or (None, None). Everything evaluation needs is checked
    here, before the run folder is made and the first step is taken, not after hours of training."""
    if not (generator and s.eval_every and (s.eval_ref or hasattr(data, "tensors"))):
        return None, None
    if s.eval_samples % data.num_classes:
        raise SystemExit(f"train.py: error: --eval-samples {s.eval_samples} is not divisible by the "
                         f"{data.num_classes} classes")
    if data.space == "latent" and vae is None:
        raise SystemExit("train.py: error: evaluating a latent model needs --vae to decode its samples")
    if not s.eval_ref:
        return None, None  # data held in memory: the pixel report only
    try:
        inception = fid.load_inception(s.inception, device)
        return inception, fid.reference_stats(s.eval_ref, inception, device=device, pool3=False)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: --eval-ref {s.eval_ref}: {e}")


@torch.no_grad()
def evaluate(s, G, data, vae, shape, steps, inception, ref, rank, world, device, amp):
    """Class-balanced samples of the EMA generator, split over the ranks with sample.py's scheme (sample i has
    class i // (N / K) and noise seeded by (seed, i), so every evaluation sees the same noise), decoded to uint8
    images -> FID and Inception Score against --eval-ref; for data held in memory also fid.pixel_report."""
    N, K = s.eval_samples, data.num_classes
    labels = np.arange(N) // (N // K)
    mine, B = list(range(rank, N, world)), s.global_batch_size // world
    images = np.concatenate([to_uint8(sample_indices(G, mine[i:i + B], labels[mine[i:i + B]].tolist(), shape, steps,
                                                     s.pred, s.seed, B, vae, amp)) for i in range(0, len(mine), B)])
    part = {"idx": mine}
    if inception is not None:  # pool3 and logits of this rank's share: FID and IS
        feats = fid.compute_features(inception, images, device=device, progress=False)
        part.update(pool3=feats["pool3"], logits=feats["logits"])
    if hasattr(data, "tensors"):  # small in-memory data: the images themselves, for the pixel report
        part["images"] = images
    parts = [None] * world
    if dist.is_initialized():
        dist.gather_object(part, parts if rank == 0 else None, dst=0)
    else:
        parts = [part]
    if rank != 0:
        return {}
    cat = {k: np.concatenate([p[k] for p in parts]) for k in part}
    out = {"eval_samples": len(cat["idx"])}
    if inception is not None:  # (sFID and precision/recall: fid.py on a sample.py file)
        pool3, logits = np.empty_like(cat["pool3"], np.float64), np.empty_like(cat["logits"])
        pool3[cat["idx"]], logits[cat["idx"]] = cat["pool3"], cat["logits"]  # in sample order
        order = np.random.RandomState(42).permutation(N)  # IS in sample.py's (the release's) shuffled file order
        out.update(fid=fid.frechet_distance(pool3.mean(0), np.cov(pool3, rowvar=False), ref["mu"], ref["sigma"]),
                   inception_score=fid.inception_score(logits[order]))
    if hasattr(data, "tensors"):
        out.update(fid.pixel_report_of(cat["images"], labels[cat["idx"]], data))
    return out


def plot_curves(run_dir, cols=4, w=320, h=170):
    """log.jsonl -> curves.png: one panel per logged quantity against the step (PIL only, no plotting library)."""
    from PIL import Image, ImageDraw
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    first = ["agreement", "diversity", "pixel_fd", "fid", "inception_score"]  # evaluations, then the training terms
    keys = sorted({k for r in rows for k in r if not k.endswith("_floor")} - {"step", "eval_samples", "eval_seconds"},
                  key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
    img = Image.new("RGB", (cols * w, math.ceil(len(keys) / cols) * h), "white")
    draw = ImageDraw.Draw(img)
    for i, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if not pts:
            continue
        x0, y0 = (i % cols) * w + 45, (i // cols) * h + 22  # plot area: (x0, y0) to (x0 + w - 60, y0 + h - 45)
        (s0, *_, s1), ys = [p[0] for p in pts] * (1 + (len(pts) == 1)), [p[1] for p in pts]
        lo, hi = min(ys), max(ys)
        xy = [(x0 + (x - s0) / max(s1 - s0, 1) * (w - 60), y0 + (h - 45) * (1 - (y - lo) / ((hi - lo) or 1)))
              for x, y in pts]
        draw.rectangle([x0, y0, x0 + w - 60, y0 + h - 45], outline=(200, 200, 200))
        draw.line(xy, fill=(31, 119, 180), width=2) if len(xy) > 1 else draw.ellipse([*xy[0], *xy[0]], outline=0)
        floor = next((r[k + "_floor"] for r in rows if k + "_floor" in r), None)  # e.g. pixel_fd of real vs real
        draw.text((x0, y0 - 16), f"{k}: {ys[-1]:.4g}" + (f" (real data {floor:.3g})" if floor else ""), fill=0)
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((x0 - 42, y0 + h - 55), f"{lo:.3g}", fill=(90, 90, 90))
        draw.text((x0, y0 + h - 42), f"step {s0}", fill=(90, 90, 90))
        draw.text((x0 + w - 120, y0 + h - 42), f"{s1}", fill=(90, 90, 90))
    save_atomic(img, os.path.join(run_dir, "curves.png"), lambda im, p: im.save(p, format="PNG"))


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def main(s, ckpt=None, ckpt_path=None):
    rank, world, device = setup(s.device)
    if s.global_batch_size % world:
        raise SystemExit(f"train.py: error: --global-batch-size {s.global_batch_size} is not divisible by {world} "
                         f"processes")
    print0("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(s).items()) if v is not None))
    torch.manual_seed(s.seed * world + rank)  # per-rank seeds
    data, vae, encode_batches, C, H = open_data(s.data, s.image_size, s.vae, device, s.unconditional)
    state = build(s, C, H, data.num_classes, device)
    G, D, afm, ema = state["model"], state.get("dis"), state.get("gradnorm"), state["ema"]
    step, position = restore(ckpt, ckpt_path, state, s, rank, world, device) if ckpt else (0, 0)
    inception, ref = open_evaluation(s, data, vae, afm is not None, device)
    run_dir = resumed_run_dir(s, ckpt_path) if ckpt else None
    run_dir = run_dir or make_run_dir(s, rank)
    if step >= s.max_steps:
        print0(f"{run_dir} is finished: step {step} of --max-steps {s.max_steps}. To train it further: "
               f"--resume {run_dir} --max-steps N (and --decay-steps N to stretch the transport schedule)")
        return cleanup()
    nets = {k: state[k] for k in ("model", "dis") if k in state}
    print0(f"{s.recipe}: " + ", ".join(f"{k} {sum(p.numel() for p in n.parameters()):,} parameters"
                                        for k, n in nets.items()) +
           f"; input {C}x{H}x{H}; {world} process(es) on {device}; run folder {run_dir}")
    train = dict(nets)  # the modules keep their plain state-dict keys: compile in place, wrap DDP around them
    for k, net in nets.items():
        net.compile_blocks() if s.compile else None
        if dist.is_initialized():
            ids = [device.index] if device.type == "cuda" else None
            train[k] = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")
    local_batch, start_step, start_position = s.global_batch_size // world, step, position
    data_iter = batches(data, IndexStream(len(data), rank, world, s.seed, position), local_batch, s.workers)
    K = data.num_classes  # the grid: a row per class (10 at most), or 10 x 10 of an unconditional model
    grid_y = torch.arange(min(K, 10)).repeat_interleave(10 if K <= 10 else 1) if K > 1 else torch.zeros(100).long()
    grid_z = torch.randn(len(grid_y), C, H, H, generator=torch.Generator().manual_seed(s.seed))  # fixed noise
    grid_vae = vae if data.space == "latent" or encode_batches else None  # to decode latent samples
    nfe = s.sample_steps or (1 if s.steps == "any" else s.steps)  # of the grids and the evaluations
    evaluating = afm is not None and s.eval_every and (inception is not None or hasattr(data, "tensors"))
    received = []  # signals this process got: the loop stops at the next step all ranks agree on
    handlers = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}

    logs, t0, window = {}, time.time(), 0
    non_finite = torch.zeros((), device=device)  # 1 + the first step with a non-finite loss; no host sync per step
    while step < s.max_steps:
        x0, y = next(data_iter)
        x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        if encode_batches:
            x0 = encode(vae, x0)  # SD-VAE latents x 0.18215, a fresh posterior sample
        # One step: ttur discriminator steps, then a generator step (AFM_SPEC section 5); or a classifier step.
        # In the G step the raw D (no DDP) is frozen through the backward pass too: gradients flow through it
        # into G, its weights get none, and with grad checkpointing its recomputation sees the same graph.
        d_step = afm is not None and step % (1 + s.ttur) < s.ttur
        with frozen(D if afm is not None and not d_step else None):
            with amp:
                if afm is None:
                    loss, out = classifier_loss(train["model"], x0, y)
                elif d_step:
                    loss, out = afm.d_loss(G, train["dis"], x0, y, step)  # G without DDP: no grad needed
                else:
                    loss, out = afm.g_loss(train["model"], D, x0, y, step)
            loss.backward()
        net, opt = (D, state["opt_d"]) if d_step else (G, state.get("opt_g", state.get("opt")))
        out["grad_norm_" + ("d" if d_step else "g")] = nn.utils.clip_grad_norm_(net.parameters(), s.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not d_step:  # EMA after each generator (or classifier) update
            ema_update(ema, G, s.ema)
        non_finite = torch.where((non_finite == 0) & ~torch.isfinite(loss.detach()), step + 1, non_finite)
        for k, v in out.items():  # (sum, count): D-step and G-step terms are averaged separately
            total, count = logs.get(k, (0.0, 0))
            logs[k] = (total + v.detach().float(), count + 1)
        step, window = step + 1, window + 1

        # A checkpoint needs every rank: a signal stops the loop at a step all ranks agree on (checked every
        # 10 steps and at log/checkpoint steps), and a non-finite loss stops it before anything is saved.
        boundary = step % s.log_every == 0 or step % s.ckpt_every == 0 or step == s.max_steps
        agree = world == 1 or step % 10 == 0 or boundary
        stop = agree and all_mean({"s": len(received)}, device, dist.ReduceOp.MAX)["s"] > 0
        if (boundary or stop) and all_mean({"n": non_finite}, device, dist.ReduceOp.MAX)["n"] > 0:
            where = f"at step {int(non_finite) - 1}" if non_finite > 0 else "on another rank"
            print(f"[rank {rank}] non-finite loss {where}; stopping. The last good checkpoint in "
                  f"{run_dir}/checkpoints is unaffected.", flush=True)
            raise SystemExit(1)
        if step % s.log_every == 0:
            means = all_mean({k: total / count for k, (total, count) in logs.items()}, device)
            if hasattr(data, "bad"):  # unreadable images met so far, all ranks together
                means["skipped_images"] = all_mean({"s": data.skipped}, device)["s"] * world
            means["it_per_s"] = window / (time.time() - t0)
            eta = (s.max_steps - step) / means["it_per_s"]
            print0(f"step {step:07d} | " + " ".join(f"{k} {v:.4g}" for k, v in means.items()) +
                   f" | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m{eta % 60:02.0f}s")
            write_log(run_dir, {"step": step, **means}, rank, plot=step % s.ckpt_every == 0 or step == s.max_steps)
            logs, t0, window = {}, time.time(), 0
        if afm is not None and rank == 0 and s.sample_every and (step % s.sample_every == 0 or step == s.max_steps):
            x = sample_images(ema, grid_z.to(device), grid_y.to(device), nfe, s.pred, grid_vae, amp)
            if x.shape[1] == 3:
                save_grid(x, os.path.join(run_dir, f"samples_{step:07d}.png"), nrow=10)
        if evaluating and (step % s.eval_every == 0 or step == s.max_steps):
            t_eval = time.time()
            metrics = evaluate(s, ema, data, grid_vae, (C, H, H), nfe, inception, ref, rank, world, device, amp)
            t0 += time.time() - t_eval  # evaluation time is not training time: excluded from it/s
            print0(f"eval {step:07d} | " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()) +
                   f" | {time.time() - t_eval:.1f} s")
            write_log(run_dir, {"step": step, **metrics, "eval_seconds": time.time() - t_eval}, rank, plot=True)
        if step % s.ckpt_every == 0 or step == s.max_steps or stop:
            save_checkpoint(run_dir, state, s, step, start_position + (step - start_step) * local_batch, rank, device)
        if stop:
            print0(f"stopped by a signal at step {step}; resume with --resume {run_dir}")
            break
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    print0(f"done at step {step}: checkpoints in {run_dir}/checkpoints, sample grids and curves.png in {run_dir}")
    cleanup()


def steps_type(text):
    if text != "any" and not text.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f'expected 1, 2, ... or "any", got {text!r}')
    return text if text == "any" else int(text)


def parser():
    """Every flag defaults to None: unset flags come from the recipe (or the resumed run), see `resolve`."""
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--recipe", choices=[*SCALES, *RECIPES], help="the release's configuration (default: digits for --data "
      "digits, else 1nfe); flags given explicitly override its values")
    # Data and networks.
    a("--data", help='"digits" (built-in), an image folder (class sub-folders or flat), an npz of images (arr_0, '
      'arr_1 labels), or a latent cache (dataset.py)')
    a("--unconditional", action="store_true", default=None, help="ignore class folders / labels: one class")
    a("--vae", help="SD-VAE weights (sd-vae-ft-mse): encode images / decode sample grids")
    a("--image-size", type=int, help="image folders: crop size (256)")
    a("--model", choices=list(models), help="generator (or classifier) size")
    a("--dis-model", choices=list(models), help="discriminator size (default: as --model)")
    a("--repeat", type=int, help="deep generator: run the blocks this many times (2: 56, 4: 112 layers)")
    a("--grad-checkpoint", action="store_true", default=None, help="recompute activations in backward (memory)")
    # The method (AFM_SPEC sections 3-7).
    a("--steps", type=steps_type, help='NFE the generator is trained for: 1, k or "any"')
    a("--pred", choices=["x", "v"], help="x-prediction (1 NFE) or velocity (multi-step)")
    a("--ot", type=float, help="transport weight at step 0")
    a("--ot-end", type=float, help="transport weight after the cosine decay")
    a("--decay-steps", type=int, help="length of the cosine decay in loop steps")
    a("--gp", type=float, help="R1/R2 weight")
    a("--gp-ratio", type=float, help="fraction of the batch used for R1/R2")
    a("--gp-eps", type=float, help="finite-difference step of R1/R2")
    a("--cp", type=float, help="logit-centering weight")
    a("--augment-p", type=float, help="discriminator augmentation probability")
    a("--ttur", type=int, help="discriminator steps per generator step")
    a("--lr", type=float, help="generator (or classifier) learning rate")
    a("--lr-d", type=float, help="discriminator learning rate")
    a("--clip", type=float, help="gradient-norm clipping")
    a("--ema", type=float, help="EMA decay of the generator (or classifier)")
    a("--cls", help="guidance classifier: a --recipe classifier run or checkpoint, or the release's classifier.pth")
    a("--cls-model", choices=list(models), help="classifier size of a bare state dict (B/2)")
    a("--cg", type=float, help="guidance weight")
    a("--cg-range", type=float, nargs=2, help="t_cg range LO HI")
    a("--cg-t", choices=["uniform", "tgt"], help="t_cg ~ U(range) (1 NFE) or t_tgt (k NFE)")
    a("--cg-renoise", action=argparse.BooleanOptionalAction, help="re-noise the fake to t_cg before the "
      "classifier (default; see AdversarialFlowLoss.guidance)")
    # The loop.
    a("--global-batch-size", type=int, help="split over processes")
    a("--max-steps", type=int, help="loop steps (each a D or a G step)")
    a("--precision", choices=["fp32", "bf16"], help="bf16 autocast or fp32 (+TF32 on GPU; the default)")
    a("--compile", action="store_true", default=None, help="torch.compile the transformer blocks (regional)")
    a("--device", choices=["auto", "cpu"])
    a("--workers", type=int, help="DataLoader workers per process (image folders, caches; 4)")
    a("--seed", type=int)
    a("--results-dir", help="where run folders are made (results)")
    a("--resume", help="a run folder or a checkpoint file to continue from")
    a("--log-every", type=int)
    a("--sample-every", type=int, help="sample grid from fixed noise (0: never)")
    a("--sample-steps", type=int, help="NFE of the grids (default: --steps; any-step: 1)")
    a("--ckpt-every", type=int)
    a("--eval-every", type=int, help="evaluate the EMA generator every N steps (0: never); digits: the pixel report")
    a("--eval-samples", type=int, help="class-balanced samples per evaluation (the release's FID: 50000)")
    a("--eval-ref", help="FID reference: an ADM batch (VIRTUAL_imagenet256_labeled.npz) or fid.py --make-ref output")
    a("--inception", help="FID Inception weights (default: fid.py's cache, ~/.cache/afm)")
    return p


if __name__ == "__main__":
    main(*resolve())

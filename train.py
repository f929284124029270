"""
Training of Adversarial Flow Models (AFM, arXiv 2511.22475): the release's recipes, and one
torchrun/DDP loop for the three objectives: the AFM pair (generator and discriminator), the
guidance classifier, and flow matching, the baseline. The method itself is in afm.py.

    python train.py                                   # built-in 8x8 digits, tiny model, CPU ok
    python train.py --recipe fm-digits                # flow matching on the same digits
    torchrun --nproc_per_node=8 train.py --recipe 1nfe --data CACHE_DIR --vae sd-vae-ft-mse.bin
    torchrun --nproc_per_node=8 train.py --recipe knfe --steps 2 --data CACHE_DIR --vae ...
    torchrun --nproc_per_node=8 train.py --recipe classifier --data CACHE_DIR --vae ...
    torchrun --nproc_per_node=8 train.py --recipe 1nfe-cg --cls CLS_RUN --data CACHE_DIR --vae ...
    python train.py --resume results/000-T-2          # continue a run exactly

"The release" below is ByteDance-Seed/Adversarial-Flow-Models at commit dc11741 (its trainer
train_adversarial_flow.py and configs/train/*.yaml); its flow-matching trainer came later, in
train_flow_matching_imagenet.py and configs/train/fm/*.yaml at commit 519601d.
"""

import argparse
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
from tqdm import tqdm

import fid
from afm import AdversarialFlowLoss, classifier_loss, ema_update, flow_matching_loss, frozen
from dataset import IndexStream, batches, open_data
from model import Classifier, Discriminator, Generator, models
from plumbing import (ArgumentParser, any_rank, cleanup, load_checkpoint, mean_over_ranks, print0,
                      save_atomic, save_json, setup)
from sample import sample_images, sample_indices, save_grid, to_uint8
from vae import encode

# --------------------------------------------------------------------------------------
# Recipes: every value of every recipe, in three tables (training, method, schedule)
# --------------------------------------------------------------------------------------

# Shared by every recipe (the release's configs/train/*.yaml): R1/R2 weight, batch fraction and
# finite-difference step, logit centering, one D step per G step, and the cosine decay of the
# transport weight over 1M loop steps.
COMMON = dict(gp=0.25, gp_ratio=0.25, gp_eps=0.01, cp=0.01, ttur=1, decay_steps=1_000_000)

# Networks and optimizers. lr_d None: as lr. clip None: no clipping (clip 50 "effectively
# disables [clipping], but kept for logging", says train_1nfe.yaml).
TRAINING_KEYS = ("model", "global_batch_size", "lr", "lr_d", "clip", "ema")
TRAINING = {
    #              model   batch lr    lr_d  clip  ema
    "1nfe":       ("XL/2", 256,  1e-4, None, 50,   0.9999),  # train_1nfe.yaml
    "1nfe-cg":    ("XL/2", 256,  1e-4, None, 50,   0.9999),  # train_1nfe_cg.yaml
    "knfe":       ("XL/2", 256,  1e-4, None, 5,    0.9999),  # train_fix_nfe.yaml
    "knfe-cg":    ("XL/2", 256,  1e-4, None, 5,    0.9999),  # train_fix_nfe_cg.yaml
    "any":        ("B/2",  32,   1e-4, None, 5,    0.9999),  # train_any_nfe.yaml
    "deep":       ("XL/2", 256,  5e-5, 1e-4, 5,    0.9999),  # train_1nfe_deep.yaml: lr / --repeat
    "classifier": ("B/2",  256,  1e-4, None, 50,   0.9995),  # train_classifier.yaml
    "fm":         ("XL/2", 256,  1e-4, None, None, 0.9999),  # configs/train/fm/*.yaml (519601d)
    "digits":     ("T/2",  32,   5e-4, None, 50,   0.999),   # ours (README, "Tuning notes")
    "pixel32":    ("B/2",  256,  1e-4, None, 50,   0.9999),  # ours: 256 tokens, B width
    "pixel64":    ("B/4",  256,  1e-4, None, 50,   0.9999),  # ours: 256 tokens, B width
    "fm-digits":  ("T/2",  32,   5e-4, None, None, 0.999),   # ours: as digits
}

# The method. None: not used by that objective. cg_t, where the guidance reads the fake:
# "uniform", re-noised to t_cg ~ U(0, 0.1) (1 NFE); "tgt", at t_tgt in [0, 0.49] (multi-step).
# The flow-matching recipes are guidance-free: no class dropout, no classifier-free guidance.
METHOD_KEYS = ("steps", "pred", "repeat", "ot", "ot_end", "augment_p", "cg", "cg_t")
METHOD = {
    #              steps  pred  repeat ot    ot_end aug   cg     cg_t
    "1nfe":       (1,     "x",  1,     0.2,  0.005, 0.0,  0.0,   "uniform"),
    "1nfe-cg":    (1,     "x",  1,     0.2,  0.005, 0.4,  0.003, "uniform"),
    "knfe":       (2,     "v",  1,     0.25, 0.005, 0.0,  0.0,   "tgt"),  # or --steps 4
    "knfe-cg":    (2,     "v",  1,     0.25, 0.005, 0.4,  0.02,  "tgt"),
    "any":        ("any", "v",  1,     0.25, 0.005, 0.0,  0.0,   "tgt"),
    "deep":       (1,     "x",  2,     0.2,  0.005, 0.0,  0.0,   "uniform"),  # or --repeat 4
    "classifier": (None,  None, 1,     None, None,  None, None,  None),
    "fm":         (None,  "v",  1,     None, None,  None, None,  None),
    "digits":     (1,     "x",  1,     0.25, 0.25,  0.0,  0.0,   "uniform"),
    "pixel32":    (1,     "x",  1,     0.2,  0.2,   0.0,  0.0,   "uniform"),
    "pixel64":    (1,     "x",  1,     0.2,  0.2,   0.0,  0.0,   "uniform"),
    "fm-digits":  (None,  "v",  1,     None, None,  None, None,  None),
}
CG_RANGE = {"uniform": [0.0, 0.1], "tgt": [0.0, 0.49], None: [0.0, 0.1]}

# The loop: its length in loop steps (a D step and a G step are two loop steps), and how often it
# logs, draws a grid, saves, and evaluates (with how many samples). The release logs every 100
# steps, draws every 1,000, saves every 20,000 (its flow matching: 25,000) and evaluates every
# 10,000 (its flow matching: 50,000). NFE and solver: how flow matching samples its grids and
# evaluations (the release validates its flow models with Heun, 256 NFE; the digits use Euler,
# whose NFE is its step count); AFM samples with its own --steps.
SCHEDULE_KEYS = ("max_steps", "log_every", "sample_every", "ckpt_every", "eval_every",
                 "eval_samples", "sample_steps", "sample_solver")
SCHEDULE = {
    #              max_steps  log  grid  ckpt    eval    samples NFE   solver
    "1nfe":       (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "1nfe-cg":    (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "knfe":       (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "knfe-cg":    (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "any":        (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "deep":       (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "classifier": (5_000_000, 100, 1000, 20_000, 10_000, 10_000, None, "euler"),
    "fm":         (1_000_000, 100, 1000, 25_000, 50_000, 10_000, 256,  "heun"),
    "digits":     (16_000,    500, 2000, 4000,   1000,   1000,   None, "euler"),
    "pixel32":    (400_000,   100, 2000, 10_000, 10_000, 10_000, None, "euler"),
    "pixel64":    (400_000,   100, 2000, 10_000, 10_000, 10_000, None, "euler"),
    "fm-digits":  (36_000,    500, 2000, 4000,   2000,   1000,   32,   "euler"),
}

# Why the digits and pixel recipes keep the transport weight constant, where the release decays it
# over 1M steps: within runs this short, every decay tried let within-class diversity collapse
# after it (measured with fid.pixel_report; the README's "Tuning notes").

# Our recipes (digits, pixel32, pixel64) are 1-NFE recipes; given --steps k or "any" they take
# what the release's multi-step recipes change: velocity prediction, clip 5, guidance at t_tgt.
MULTI_STEP = dict(pred="v", clip=5.0, cg_t="tgt", cg_range=[0.0, 0.49])
OURS = ("digits", "pixel32", "pixel64")

# Flags that are not part of a recipe, with their defaults.
DEFAULTS = dict(data="digits", vae=None, eval_ref=None, inception=None, unconditional=False,
                image_size=None, dis_model=None, grad_checkpoint=False, cls=None, cls_model="B/2",
                cg_renoise=True, precision="fp32", compile=False, device="auto", workers=4, seed=0,
                results_dir="results", resume=None)


def recipe(name, steps=None):
    """All values of a named recipe, for --steps `steps` when given (see MULTI_STEP)."""
    values = dict(COMMON)
    values.update(zip(TRAINING_KEYS, TRAINING[name]))
    values.update(zip(METHOD_KEYS, METHOD[name]))
    values.update(zip(SCHEDULE_KEYS, SCHEDULE[name]))
    values["cg_range"] = list(CG_RANGE[values["cg_t"]])
    values["recipe"] = name
    if name in OURS and steps not in (None, 1):
        values.update(MULTI_STEP)
        values["steps"] = steps
    return values


def objective_of(s):
    """Which objective a recipe trains: the AFM pair, the guidance classifier or flow matching."""
    if s.recipe == "classifier":
        return "classifier"
    if s.recipe in ("fm", "fm-digits"):
        return "flow"
    return "afm"


# --------------------------------------------------------------------------------------
# Settings: recipe, then the resumed run's own values, then the flags given
# --------------------------------------------------------------------------------------


def is_image_folder(data):
    return os.path.isdir(data) and not os.path.isfile(os.path.join(data, "meta.json"))


def resolve(argv=None):
    """-> (settings, checkpoint or None, its path). Settings: the recipe's values, then (with
    --resume) the run's own, then every flag given explicitly now. Flag combinations the release
    never uses are errors."""
    p = parser()
    given = {}
    for k, v in vars(p.parse_args(argv)).items():
        if v is not None:
            given[k] = v
    ckpt = None
    path = None
    if "resume" in given:
        try:
            path, ckpt = load_checkpoint(given["resume"], "--resume")
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}")
        if {"args", "step", "model", "ema", "rng", "data_position"} - set(ckpt):
            raise SystemExit(f"train.py: error: --resume {path}: not a checkpoint of train.py "
                             f"(a bare state dict has no optimizer, step or data position to "
                             f"resume; sample from it with sample.py)")
        known = set(DEFAULTS) | set(recipe("1nfe")) | {"recipe"}
        base = {k: v for k, v in ckpt["args"].items() if k in known}
        if not is_image_folder(base.get("data", "digits")):
            # Only an image folder is cropped to --image-size; the other kinds have their own
            # size (runs before this rule saved the default 256 for every kind).
            base["image_size"] = None
        if "recipe" not in base:  # runs older than named recipes
            if ckpt["args"].get("train_classifier"):
                base["recipe"] = "classifier"
            else:
                base["recipe"] = "unnamed"
        # Settings added since the run was made take its recipe's values.
        older = recipe(base["recipe"] if base["recipe"] in METHOD else "1nfe")
        for k, v in older.items():
            base.setdefault(k, v)
    else:
        name = given.get("recipe")
        if name is None and given.get("data", "digits") == "digits":
            name = "digits"
        if name is None:
            name = "1nfe"
        base = recipe(name, given.get("steps"))
        if name == "deep" and "lr" not in given:
            base["lr"] = 1e-4 / given.get("repeat", 2)  # "lr / depth"
    s = argparse.Namespace(**{**DEFAULTS, **base, **given})
    if s.dis_model is None:
        s.dis_model = s.model  # the discriminator defaults to the generator's size
    if s.lr_d is None:
        s.lr_d = s.lr  # the release: dis_lr = gen_lr, except in the deep recipe
    error = check(s, ckpt is not None)
    if error:
        p.error(error)
    return s, ckpt, path


# Flags that must be positive, >= 0, or within a range: (names, test, what is expected).
RANGES = [
    ("global_batch_size max_steps log_every ckpt_every decay_steps repeat ttur lr lr_d clip gp_eps "
     "sample_steps", lambda v: v > 0, "positive"),
    ("ot ot_end gp cp cg sample_every workers eval_every", lambda v: v >= 0, ">= 0"),
    ("eval_samples", lambda v: v > 0, "positive (turn evaluation off with --eval-every 0)"),
    ("gp_ratio augment_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cg_range", lambda v: 0 <= v[0] <= v[1] <= 1, "LO HI with 0 <= LO <= HI <= 1"),
]


def check(s, resumed):
    """The first problem with these settings (a one-line message), or None."""
    for names, ok, want in RANGES:
        for key in names.split():
            value = getattr(s, key)
            if value is not None and not ok(value):
                return f"--{key.replace('_', '-')} must be {want}, got {value}"
    if s.steps is not None and s.steps != "any" and s.steps < 1:
        return f"--steps must be 1, 2, ... or any, got {s.steps}"
    files = [("--vae", s.vae), ("--cls", s.cls), ("--eval-ref", s.eval_ref),
             ("--inception", s.inception)]
    if s.data != "digits":
        files.append(("--data", s.data))
    for flag, path in files:
        if path and not os.path.exists(path):
            return f"{flag} {path}: no such file or folder"
    if os.path.exists(s.results_dir) and not os.path.isdir(s.results_dir):
        return f"--results-dir {s.results_dir} is a file, not a folder"
    objective = objective_of(s)
    if objective == "flow" and s.sample_solver == "heun" and s.sample_steps % 2:
        return f"--sample-solver heun takes an even --sample-steps (its NFE), got {s.sample_steps}"
    if objective == "afm" and s.sample_steps is not None and s.steps == 1 and s.sample_steps != 1:
        return (f"--sample-steps {s.sample_steps}: a 1-NFE generator (--steps 1) samples in one "
                f"step only")
    if objective != "afm" or resumed:
        return None
    kind = {1: "1nfe", "any": "any"}
    if s.recipe not in OURS:
        wanted = kind.get(s.steps, "knfe")
        if wanted != kind.get(METHOD[s.recipe][0], "knfe"):
            return f"--steps {s.steps} does not fit --recipe {s.recipe}: use --recipe {wanted}"
    if (s.repeat > 1) != (s.recipe == "deep"):
        return ("--recipe deep is the deep generator, with --repeat 2 or 4; other recipes have "
                "--repeat 1")
    if s.cls and s.cg <= 0:
        return (f"--cls without a guidance weight (--recipe {s.recipe} has cg 0): use --recipe "
                f"1nfe-cg or knfe-cg")
    if s.cg > 0 and not s.cls:
        return (f"--recipe {s.recipe} has guidance weight {s.cg}: it needs --cls (train one with "
                f"--recipe classifier)")
    return None


# --------------------------------------------------------------------------------------
# The objectives: what each trains, what its checkpoint holds, and its training step
# --------------------------------------------------------------------------------------


def adamw(net, lr, betas, weight_decay, device):
    return torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                             eps=1e-8, fused=device.type == "cuda")


def step_optimizer(net, opt, clip):
    """Clip (None: only measure) the gradient norm, take the step, clear the gradients."""
    max_norm = math.inf if clip is None else clip
    norm = nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def load_classifier(s, C, H, num_classes, device):
    """The frozen guidance classifier: our checkpoint (its EMA weights) or the release's bare
    classifier.pth."""
    try:
        sd = load_checkpoint(s.cls, "--cls")[1]
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")
    name = sd.get("args", {}).get("model", s.cls_model)
    cls = Classifier(**models[name], input_size=H, in_channels=C, num_classes=num_classes)
    try:
        cls.load_state_dict(sd.get("ema", sd), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip()[:200]
        raise SystemExit(f"train.py: error: --cls {s.cls}: does not fit a {name} classifier on "
                         f"{C}x{H}x{H} with {num_classes} classes (--cls-model?): {first}")
    return cls.to(device).eval().requires_grad_(False)


class Objective:
    """What one objective trains. Subclasses set `nets` (the trained networks, by checkpoint
    key), `ema` (the EMA of the network that makes samples, or of the classifier), `pred` (how
    its samples are made; None: it makes none), and define `state` and `step`."""

    pred = None

    def wrap(self, device, compile_blocks):
        """Regional compile in place, then DDP around each trained network. The networks keep
        their plain state-dict keys: checkpoints always save the raw modules."""
        self.ddp = {}
        for key, net in self.nets.items():
            if compile_blocks:
                net.compile_blocks()
            self.ddp[key] = net
            if dist.is_initialized():
                ids = [device.index] if device.type == "cuda" else None
                self.ddp[key] = nn.parallel.DistributedDataParallel(net, device_ids=ids)


class AFMPair(Objective):
    """The AFM pair (paper Sec. 3): generator G and discriminator D, their AdamW optimizers
    (betas (0, 0.9), weight decay 0.01, the release's), the EMA of G, and the loss, whose
    gradient normalization keeps a running scale."""

    def __init__(self, s, C, H, num_classes, device):
        self.s = s
        kw = dict(input_size=H, in_channels=C, num_classes=num_classes)
        # t_src conditioning for multi-step models; t_tgt for any-step ones; the deep generator
        # (repeat > 1) is 1-NFE and uses its timestep embedder for the repeats.
        use_t_src = s.steps != 1 and s.repeat == 1
        use_t_tgt = s.steps == "any"
        self.G = Generator(**models[s.model], **kw, use_t_src=use_t_src, use_t_tgt=use_t_tgt,
                           repeat=s.repeat)
        self.D = Discriminator(**models[s.dis_model], **kw, use_t=s.steps != 1)
        for net in (self.G, self.D):
            net.grad_checkpointing = s.grad_checkpoint
            net.to(device)
        self.ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        classifier = None
        if s.cls:
            classifier = load_classifier(s, C, H, num_classes, device)
        self.loss = AdversarialFlowLoss(
            steps=s.steps, pred=s.pred, ot=s.ot, ot_end=s.ot_end, decay_steps=s.decay_steps,
            gp=s.gp, gp_ratio=s.gp_ratio, gp_eps=s.gp_eps, cp=s.cp, augment_p=s.augment_p,
            classifier=classifier, cg=s.cg, cg_range=tuple(s.cg_range), cg_t=s.cg_t,
            cg_renoise=s.cg_renoise)
        self.loss.gradnorm.to(device)
        self.opt_g = adamw(self.G, s.lr, (0.0, 0.9), 0.01, device)
        self.opt_d = adamw(self.D, s.lr_d, (0.0, 0.9), 0.01, device)
        self.nets = {"model": self.G, "dis": self.D}
        self.pred = s.pred
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")

    def state(self):
        """Checkpoint key -> object. The keys are the release's: "model" is G, "dis" is D, and
        "gradnorm" holds the loss's state (its gradient normalization)."""
        return {"model": self.G, "dis": self.D, "ema": self.ema, "opt_g": self.opt_g,
                "opt_d": self.opt_d, "gradnorm": self.loss}

    def step(self, x0, y, step):
        """`ttur` discriminator steps, then one generator step (the release alternates them)."""
        if step % (1 + self.s.ttur) < self.s.ttur:
            return self.d_step(x0, y, step)
        return self.g_step(x0, y, step)

    # Which network is DDP-wrapped in which step, and why. DDP averages the gradients of the
    # module it wraps, during backward. In the D step only D learns: D runs wrapped, and G runs
    # plain and without grad (it only makes fakes). In the G step only G learns: G runs wrapped,
    # and D runs plain and frozen, so gradients flow through D into G while D's weights get none
    # (and DDP has no D gradients to wait for). D stays frozen through backward too, so that a
    # recomputation (--grad-checkpoint) sees the same graph.
    def d_step(self, x0, y, step):
        with self.amp:
            loss, logs = self.loss.d_loss(self.G, self.ddp["dis"], x0, y, step)
        loss.backward()
        logs["grad_norm_d"] = step_optimizer(self.D, self.opt_d, self.s.clip)
        return loss, logs

    def g_step(self, x0, y, step):
        with frozen(self.D):
            with self.amp:
                loss, logs = self.loss.g_loss(self.ddp["model"], self.D, x0, y, step)
            loss.backward()
        logs["grad_norm_g"] = step_optimizer(self.G, self.opt_g, self.s.clip)
        ema_update(self.ema, self.G, self.s.ema)  # after each generator update
        return loss, logs


class OneNetwork(Objective):
    """An objective that trains one network by a plain loss, with AdamW and an EMA: the guidance
    classifier and flow matching. Subclasses set `net`, `ema`, `opt` and `loss` (a function
    (net, x0, y) -> (loss, logs) of afm.py)."""

    def state(self):
        return {"model": self.net, "ema": self.ema, "opt": self.opt}

    def step(self, x0, y, step):
        with self.amp:
            loss, logs = self.loss(self.ddp["model"], x0, y)
        loss.backward()
        logs["grad_norm"] = step_optimizer(self.net, self.opt, self.s.clip)
        ema_update(self.ema, self.net, self.s.ema)
        return loss, logs


class GuidanceClassifier(OneNetwork):
    """The noisy-image classifier that guides the -cg recipes (the release's
    train_classifier.py): AdamW betas (0.9, 0.95), weight decay 0.01, and an EMA."""

    def __init__(self, s, C, H, num_classes, device):
        self.s = s
        self.net = Classifier(**models[s.model], input_size=H, in_channels=C,
                              num_classes=num_classes).to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.opt = adamw(self.net, s.lr, (0.9, 0.95), 0.01, device)
        self.loss = classifier_loss
        self.nets = {"model": self.net}
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")


class FlowMatching(OneNetwork):
    """Flow matching, the baseline (the release's train_flow_matching_imagenet.py): one velocity
    network v(x_t, y, t) (a Generator with t_src conditioning), AdamW betas (0.9, 0.999) and no
    weight decay, an EMA, no gradient clipping."""

    def __init__(self, s, C, H, num_classes, device):
        self.s = s
        self.net = Generator(**models[s.model], input_size=H, in_channels=C,
                             num_classes=num_classes, use_t_src=True)
        self.net.grad_checkpointing = s.grad_checkpoint
        self.net.to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.opt = adamw(self.net, s.lr, (0.9, 0.999), 0.0, device)
        self.loss = flow_matching_loss
        self.nets = {"model": self.net}
        self.pred = "v"
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")


OBJECTIVES = {"afm": AFMPair, "classifier": GuidanceClassifier, "flow": FlowMatching}


# --------------------------------------------------------------------------------------
# Checkpoints and run folders
# --------------------------------------------------------------------------------------


def restore(ckpt, path, trainee, s, rank, world, device):
    """Load every part of the objective and this rank's RNG from a checkpoint
    -> (step, data position)."""
    try:
        for key, part in trainee.state().items():
            part.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. another --model or --data
        lines = str(e).splitlines() + [""]
        why = (lines[1].strip() or lines[0])[:120]
        old = ckpt["args"]
        raise SystemExit(f"train.py: error: --resume {path}: the run's networks (--model "
                         f"{old.get('model')}, --data {old.get('data')}) do not fit --model "
                         f"{s.model} on --data {s.data}: {why}")
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    else:  # another number of processes: the data order is kept, the noise is new
        print0(f"resume: {len(ckpt['rng'])} RNG states for {world} processes; reseeding")
        torch.manual_seed((s.seed + ckpt["step"]) * world + rank)
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["data_position"]


def save_checkpoint(run_dir, trainee, s, step, position, rank, device):
    """Plain tensors and plain Python (torch.load(weights_only=True) reads it), written
    atomically; with every rank's RNG state, gathered to rank 0 (a collective: every rank calls
    this), for an exact resume."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    rng = [mine]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, mine)
    if rank == 0:
        ckpt = {key: part.state_dict() for key, part in trainee.state().items()}
        ckpt.update(args=vars(s), step=step, data_position=position, rng=rng)
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        save_atomic(ckpt, path)
        print0(f"saved checkpoint {path}")


def resumed_run_dir(s, path):
    """The run folder a resumed run keeps writing to, or None for a new one. A run folder
    (--resume RUN) or its newest checkpoint file continues in place; a checkpoint file from
    elsewhere, or an older checkpoint of a run (whose later checkpoints must not be overwritten
    by another history), starts a new run folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) != "checkpoints":
        return None
    if os.path.isdir(s.resume):
        return os.path.dirname(folder)
    newest = max(f for f in os.listdir(folder) if f.endswith(".pt"))
    if os.path.basename(path) == newest:
        return os.path.dirname(folder)
    return None


def next_run_dir(results_dir, tag):
    """Create results_dir/NNN-TAG exclusively, NNN one past the largest index in use; another
    launch that takes the same index first makes this one look again."""
    while True:
        used = [-1]
        for name in os.listdir(results_dir):
            m = re.match(r"(\d+)-", name)
            if m:
                used.append(int(m[1]))
        path = os.path.join(results_dir, f"{max(used) + 1:03d}-{tag}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def make_run_dir(s, rank):
    """results/NNN-MODEL with checkpoints/ and args.json (rank 0 makes it): a new run never
    writes into another's folder."""
    run_dir = None
    if rank == 0:
        prefix = {"classifier": "cls-", "flow": "fm-", "afm": ""}[objective_of(s)]
        tag = prefix + s.model.replace("/", "-")
        try:
            os.makedirs(s.results_dir, exist_ok=True)
            run_dir = next_run_dir(s.results_dir, tag)
            os.mkdir(os.path.join(run_dir, "checkpoints"))
        except OSError as e:
            raise SystemExit(f"train.py: error: --results-dir {s.results_dir}: {e.strerror}")
        save_atomic(vars(s), os.path.join(run_dir, "args.json"), save_json)
    box = [run_dir]
    if dist.is_initialized():
        dist.broadcast_object_list(box)
    return box[0]


# --------------------------------------------------------------------------------------
# Logs, curves, evaluation
# --------------------------------------------------------------------------------------


def write_log(run_dir, record, rank, plot=False):
    """One line of log.jsonl (rank 0); with plot, curves.png redrawn from the whole log (at
    evaluations and checkpoints: a long run's log is long)."""
    if rank != 0:
        return
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if plot:
        plot_curves(run_dir)


def curve_order(key):
    """Panels: the evaluations first, in this order, then the training terms by name."""
    first = ["agreement", "diversity", "pixel_fd", "fid", "inception_score"]
    if key in first:
        return (0, first.index(key), key)
    return (1, 0, key)


def plot_curves(run_dir, cols=4, w=320, h=170):
    """log.jsonl -> curves.png: one panel per logged quantity against the step (PIL only)."""
    from PIL import Image, ImageDraw
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keys = set()
    for r in rows:
        for k in r:
            if not k.endswith("_floor"):
                keys.add(k)
    keys = sorted(keys - {"step", "eval_samples", "eval_seconds"}, key=curve_order)
    img = Image.new("RGB", (cols * w, math.ceil(len(keys) / cols) * h), "white")
    draw = ImageDraw.Draw(img)
    grey = (90, 90, 90)
    for i, k in enumerate(keys):
        pts = []
        for r in rows:
            v = r.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                pts.append((r["step"], v))
        if not pts:
            continue
        # The plot area: (x0, y0) to (x0 + pw, y0 + ph).
        x0 = (i % cols) * w + 45
        y0 = (i // cols) * h + 22
        pw = w - 60
        ph = h - 45
        s0 = pts[0][0]
        s1 = pts[-1][0]
        ys = [p[1] for p in pts]
        lo = min(ys)
        hi = max(ys)
        xy = []
        for step, v in pts:
            px = x0 + (step - s0) / max(s1 - s0, 1) * pw
            py = y0 + ph * (1 - (v - lo) / ((hi - lo) or 1))
            xy.append((px, py))
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(200, 200, 200))
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([*xy[0], *xy[0]], outline=0)
        title = f"{k}: {ys[-1]:.4g}"
        for r in rows:  # e.g. pixel_fd of real against real
            if k + "_floor" in r:
                title += f" (real data {r[k + '_floor']:.3g})"
                break
        draw.text((x0, y0 - 16), title, fill=0)
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=grey)
        draw.text((x0 - 42, y0 + ph - 10), f"{lo:.3g}", fill=grey)
        draw.text((x0, y0 + ph + 3), f"step {s0}", fill=grey)
        draw.text((x0 + pw - 60, y0 + ph + 3), f"{s1}", fill=grey)
    save_atomic(img, os.path.join(run_dir, "curves.png"), lambda im, p: im.save(p, format="PNG"))


def open_evaluation(s, data, vae, makes_samples, device):
    """(Inception, reference statistics) for in-loop FID, or (None, None). Everything evaluation
    needs is checked here, before the run folder is made and the first step is taken, not after
    hours of training."""
    in_memory = data.in_memory
    if not (makes_samples and s.eval_every and (s.eval_ref or in_memory)):
        return None, None
    if s.eval_samples % data.num_classes:
        raise SystemExit(f"train.py: error: --eval-samples {s.eval_samples} is not divisible by "
                         f"the {data.num_classes} classes")
    if data.space == "latent" and vae is None:
        raise SystemExit("train.py: error: evaluating a latent model needs --vae to decode its "
                         "samples")
    if not s.eval_ref:
        return None, None  # data held in memory: the pixel report only
    try:
        inception = fid.load_inception(s.inception, device)
        ref = fid.reference_stats(s.eval_ref, inception, device=device, pool3=False)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: --eval-ref {s.eval_ref}: {e}")
    return inception, ref


class Sampler:
    """How the loop's grids and evaluations sample a network: its NFE and solver."""

    def __init__(self, s, pred):
        self.pred = pred
        self.solver = "euler"
        if pred is not None and objective_of(s) == "flow":
            self.steps = s.sample_steps
            self.solver = s.sample_solver
        elif s.sample_steps:
            self.steps = s.sample_steps
        elif s.steps == "any":
            self.steps = 1
        else:
            self.steps = s.steps

    def __call__(self, G, z, y, vae, amp):
        return sample_images(G, z, y, self.steps, self.pred, vae, amp, self.solver)


@torch.no_grad()
def evaluate(s, G, sampler, data, vae, shape, inception, ref, rank, world, device, amp,
             received=()):
    """Class-balanced samples of the EMA generator, split over the ranks with sample.py's scheme
    (sample i has class i // (N / K) and noise seeded by (seed, i), so every evaluation sees the
    same noise), decoded to uint8 images -> FID and Inception Score against --eval-ref; for data
    held in memory also fid.pixel_report. None if a signal arrived (checked between batches, on
    all ranks together): Ctrl-C stops an evaluation too."""
    N = s.eval_samples
    K = data.num_classes
    labels = np.arange(N) // (N // K)
    mine = list(range(rank, N, world))
    B = s.global_batch_size // world
    images = []
    n_batches = math.ceil(len(range(0, N, world)) / B)  # rank 0's count: every rank runs as many
    # progress only for an evaluation that lasts (delay: shown after 3 s)
    for b in tqdm(range(n_batches), desc="evaluating", unit="batch", leave=False, delay=3,
                  disable=rank != 0):
        if any_rank(len(received) > 0, device):  # a collective: the same count on every rank
            return None
        idx = mine[b * B:(b + 1) * B]
        if not idx:
            continue
        x = sample_indices(G, idx, labels[idx].tolist(), shape, sampler.steps, sampler.pred,
                           s.seed, B, vae, amp, sampler.solver)
        images.append(to_uint8(x))
    images = np.concatenate(images)
    part = {"idx": mine}
    if inception is not None:  # pool3 and logits of this rank's share: FID and IS
        feats = fid.compute_features(inception, images, device=device, progress=False)
        part["pool3"] = feats["pool3"]
        part["logits"] = feats["logits"]
    if data.in_memory:  # small data held in memory: the images, for the pixel report
        part["images"] = images
    parts = [part]
    if dist.is_initialized():
        parts = [None] * world
        dist.gather_object(part, parts if rank == 0 else None, dst=0)
    if rank != 0:
        return {}
    cat = {k: np.concatenate([p[k] for p in parts]) for k in part}
    out = {"eval_samples": len(cat["idx"])}
    if inception is not None:  # (sFID and precision/recall: fid.py on a sample.py file)
        pool3 = np.empty_like(cat["pool3"], np.float64)  # in sample order
        logits = np.empty_like(cat["logits"])
        pool3[cat["idx"]] = cat["pool3"]
        logits[cat["idx"]] = cat["logits"]
        sigma = np.cov(pool3, rowvar=False)
        out["fid"] = fid.frechet_distance(pool3.mean(0), sigma, ref["mu"], ref["sigma"])
        # IS in sample.py's (the release's) shuffled file order
        order = np.random.RandomState(42).permutation(N)
        out["inception_score"] = fid.inception_score(logits[order])
    if data.in_memory:
        out.update(fid.pixel_report_of(cat["images"], labels[cat["idx"]], data))
    return out


# --------------------------------------------------------------------------------------
# Checks before the first step
# --------------------------------------------------------------------------------------


def check_data(s, data, H):
    """What only the data can tell: the networks' patches tile its inputs, a batch fits in it, and
    an in-memory evaluation asks for no more samples than the data has (capped, said so)."""
    patch = models[s.model]["patch_size"]
    if H % patch:
        raise SystemExit(f"train.py: error: --data {s.data}: its {H}x{H} inputs do not split into "
                         f"the {patch}x{patch} patches of --model {s.model} (--image-size?)")
    if s.global_batch_size > len(data):
        raise SystemExit(f"train.py: error: --global-batch-size {s.global_batch_size} is larger "
                         f"than the {len(data)} examples of --data {s.data}")
    K = data.num_classes
    if data.in_memory and s.eval_every and s.eval_samples > len(data):
        capped = max(len(data) // K, 1) * K
        print0(f"--eval-samples {s.eval_samples} is more than the {len(data)} examples of --data: "
               f"evaluating {capped}")
        s.eval_samples = capped


def check_writable(run_dir, device):
    """Fail now, not at the first checkpoint, if the run folder cannot be written (a resumed run
    on a read-only copy). Every rank learns the answer, so all exit together."""
    why = ""
    if not dist.is_initialized() or dist.get_rank() == 0:
        probe = os.path.join(run_dir, "checkpoints", ".write-test")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            why = e.strerror
    if any_rank(why, device):
        raise SystemExit(f"train.py: error: {run_dir}/checkpoints cannot be written ({why}): no "
                         f"checkpoint could be saved")


def trim_log(run_dir, step, rank):
    """A run resumed in place from step N rewrites log.jsonl up to N: an interrupted run logged
    steps past its last checkpoint, which the resumed run logs again, so each step stays once."""
    path = os.path.join(run_dir, "log.jsonl")
    if rank != 0 or not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        save_atomic("".join(kept), path, write_text)


def write_text(text, path):
    with open(path, "w") as f:
        f.write(text)


def out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def grid_inputs(K, C, H, seed):
    """Fixed noise and labels of the sample grids: a row of 10 per class (10 classes at most),
    or 10 x 10 of an unconditional model."""
    if K > 1:
        per_class = 10 if K <= 10 else 1
        y = torch.arange(min(K, 10)).repeat_interleave(per_class)
    else:
        y = torch.zeros(100).long()
    noise = torch.Generator().manual_seed(seed)
    z = torch.randn(len(y), C, H, H, generator=noise)  # (N, C, H, W)
    return z, y


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def main(s, ckpt=None, ckpt_path=None):
    rank, world, device = setup(s.device)
    if s.global_batch_size % world:
        raise SystemExit(f"train.py: error: --global-batch-size {s.global_batch_size} is not "
                         f"divisible by {world} processes")
    settings = [f"{k}={v}" for k, v in sorted(vars(s).items()) if v is not None]
    print0("settings: " + " ".join(settings))
    torch.manual_seed(s.seed * world + rank)  # per-rank seeds
    data, vae, encode_batches, C, H = open_data(s.data, s.image_size, s.vae, device,
                                                s.unconditional)
    check_data(s, data, H)
    trainee = OBJECTIVES[objective_of(s)](s, C, H, data.num_classes, device)
    step = 0
    position = 0
    if ckpt:
        step, position = restore(ckpt, ckpt_path, trainee, s, rank, world, device)
    makes_samples = trainee.pred is not None
    inception, ref = open_evaluation(s, data, vae, makes_samples, device)
    run_dir = None
    if ckpt:
        run_dir = resumed_run_dir(s, ckpt_path)
    if run_dir is None:
        run_dir = make_run_dir(s, rank)
    else:
        trim_log(run_dir, step, rank)
    check_writable(run_dir, device)
    if step >= s.max_steps:
        print0(f"{run_dir} is finished: step {step} of --max-steps {s.max_steps}. To train it "
               f"further: --resume {run_dir} --max-steps N (and --decay-steps N to stretch the "
               f"transport schedule)")
        return cleanup()
    sizes = []
    for key, net in trainee.nets.items():
        sizes.append(f"{key} {sum(p.numel() for p in net.parameters()):,} parameters")
    print0(f"{s.recipe}: {', '.join(sizes)}; input {C}x{H}x{H}; {world} process(es) on {device}; "
           f"run folder {run_dir}")
    trainee.wrap(device, s.compile)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")
    local_batch = s.global_batch_size // world
    start_step = step
    start_position = position
    stream = IndexStream(len(data), rank, world, s.seed, position)
    data_iter = batches(data, stream, local_batch, s.workers)

    grid_z, grid_y = grid_inputs(data.num_classes, C, H, s.seed)
    grid_vae = None  # decodes latent samples
    if data.space == "latent" or encode_batches:
        grid_vae = vae
    draws_grids = makes_samples and s.sample_every > 0
    if draws_grids and C == 4 and grid_vae is None:
        print0("no --vae: the latent samples cannot be decoded, so no sample grids are drawn")
        draws_grids = False
    sampler = Sampler(s, trainee.pred)
    can_score = inception is not None or data.in_memory
    evaluating = makes_samples and s.eval_every > 0 and can_score

    # Signals: the loop stops at the next step all ranks agree on, after a checkpoint.
    received = []
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))

    logs = {}
    t0 = time.time()
    window = 0
    # 1 + the first step with a non-finite loss (0: none yet); a tensor, so no host sync per step
    non_finite = torch.zeros((), device=device)
    while step < s.max_steps:
        x0, y = next(data_iter)
        x0 = x0.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        if encode_batches:
            x0 = encode(vae, x0)  # SD-VAE latents x 0.18215, a fresh posterior sample
        try:
            loss, out = trainee.step(x0, y, step)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            raise SystemExit(f"train.py: error: out of memory at step {step} with {local_batch} "
                             f"examples per process: lower --global-batch-size (or try "
                             f"--grad-checkpoint, --precision bf16)")
        bad = (non_finite == 0) & ~torch.isfinite(loss.detach())
        non_finite = torch.where(bad, step + 1, non_finite)
        for k, v in out.items():  # (sum, count): D-step and G-step terms averaged separately
            total, count = logs.get(k, (0.0, 0))
            logs[k] = (total + v.detach().float(), count + 1)
        step += 1
        window += 1

        # A checkpoint needs every rank: a signal stops the loop at a step all ranks agree on
        # (checked every 10 steps and at log/checkpoint steps), and a non-finite loss stops it
        # before anything is saved.
        boundary = step % s.log_every == 0 or step % s.ckpt_every == 0 or step == s.max_steps
        stop = False
        if world == 1 or step % 10 == 0 or boundary:
            stop = any_rank(len(received) > 0, device)
        if (boundary or stop) and any_rank(non_finite > 0, device):
            where = "on another rank"
            if non_finite > 0:
                where = f"at step {int(non_finite) - 1}"
            print(f"[rank {rank}] non-finite loss {where}; stopping. The last good checkpoint in "
                  f"{run_dir}/checkpoints is unaffected.", flush=True)
            raise SystemExit(1)
        if step % s.log_every == 0:
            means = {k: total / count for k, (total, count) in logs.items()}
            means = mean_over_ranks(means, device)
            if hasattr(data, "bad"):  # unreadable images met so far, all ranks together
                means["skipped_images"] = mean_over_ranks({"s": data.skipped}, device)["s"] * world
            means["it_per_s"] = window / (time.time() - t0)
            eta = (s.max_steps - step) / means["it_per_s"]
            terms = " ".join(f"{k} {v:.4g}" for k, v in means.items())
            print0(f"step {step:07d} | {terms} | eta {eta // 3600:.0f}h{eta % 3600 // 60:02.0f}m"
                   f"{eta % 60:02.0f}s")
            plot = step % s.ckpt_every == 0 or step == s.max_steps
            write_log(run_dir, {"step": step, **means}, rank, plot=plot)
            logs = {}
            t0 = time.time()
            window = 0
        last = step == s.max_steps
        if draws_grids and rank == 0 and (step % s.sample_every == 0 or last):
            x = sampler(trainee.ema, grid_z.to(device), grid_y.to(device), grid_vae, amp)
            save_grid(x, os.path.join(run_dir, f"samples_{step:07d}.png"), nrow=10)
        # Evaluate every eval_every steps, and at the end of a run that trained at least that
        # long: a short (smoke) run does not spend longer evaluating than it trained.
        final_eval = last and step - start_step >= s.eval_every
        if evaluating and not stop and (step % s.eval_every == 0 or final_eval):
            t_eval = time.time()
            metrics = evaluate(s, trainee.ema, sampler, data, grid_vae, (C, H, H), inception, ref,
                               rank, world, device, amp, received)
            seconds = time.time() - t_eval
            t0 += seconds  # evaluation time is not training time: excluded from it/s
            if metrics is None:
                print0(f"eval {step:07d} | interrupted by a signal")
                stop = True
            else:
                terms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                print0(f"eval {step:07d} | {terms} | {seconds:.1f} s")
                record = {"step": step, **metrics, "eval_seconds": seconds}
                write_log(run_dir, record, rank, plot=True)
        if step % s.ckpt_every == 0 or last or stop:
            position = start_position + (step - start_step) * local_batch
            save_checkpoint(run_dir, trainee, s, step, position, rank, device)
        if stop:
            break
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    cleanup()
    if stop:
        # Exit status 128 + the signal's number, as a shell reports a killed command: a script
        # running `train.py && sample.py` does not go on as if training had finished.
        signum = received[0] if received else signal.SIGINT
        print0(f"stopped by a signal at step {step}; resume with --resume {run_dir}")
        raise SystemExit(128 + signum)
    outputs = f"checkpoints in {run_dir}/checkpoints, log.jsonl and curves.png"
    if draws_grids:
        outputs += ", sample grids"
    print0(f"done at step {step}: {outputs} in {run_dir}")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def steps_type(text):
    if text != "any" and not text.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f'expected 1, 2, ... or "any", got {text!r}')
    if text == "any":
        return text
    return int(text)


def parser():
    """Every flag defaults to None: unset flags come from the recipe (or the resumed run), see
    `resolve`."""
    p = ArgumentParser(prog="train.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--recipe", choices=list(METHOD),
      help="the release's configuration (default: digits for --data digits, else 1nfe); flags "
           "given explicitly override its values")
    # Data and networks.
    a("--data", help='"digits" (built-in), an image folder (class sub-folders or flat), an npz of '
                     'images (arr_0, arr_1 labels), or a latent cache (dataset.py)')
    a("--unconditional", action="store_true", default=None,
      help="ignore class folders / labels: one class")
    a("--vae", help="SD-VAE weights (sd-vae-ft-mse): encode images / decode sample grids")
    a("--image-size", type=int,
      help="image folders: crop size (256); other data: their own size (checked if given)")
    a("--model", choices=list(models), help="generator (or classifier) size")
    a("--dis-model", choices=list(models), help="discriminator size (default: as --model)")
    a("--repeat", type=int,
      help="deep generator: run the blocks this many times (2: 56, 4: 112 layers)")
    a("--grad-checkpoint", action="store_true", default=None,
      help="recompute activations in backward (memory)")
    # The method (paper Sec. 3).
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
    a("--lr", type=float, help="generator (or classifier, or flow) learning rate")
    a("--lr-d", type=float, help="discriminator learning rate")
    a("--clip", type=float, help="gradient-norm clipping")
    a("--ema", type=float, help="EMA decay of the generator (or classifier, or flow)")
    a("--cls", help="guidance classifier: a --recipe classifier run or checkpoint, or the "
                    "release's classifier.pth")
    a("--cls-model", choices=list(models), help="classifier size of a bare state dict (B/2)")
    a("--cg", type=float, help="guidance weight")
    a("--cg-range", type=float, nargs=2, help="t_cg range LO HI")
    a("--cg-t", choices=["uniform", "tgt"], help="t_cg ~ U(range) (1 NFE) or t_tgt (k NFE)")
    a("--cg-renoise", action=argparse.BooleanOptionalAction,
      help="re-noise the fake to t_cg before the classifier (default; see "
           "afm.AdversarialFlowLoss.guidance)")
    # The loop.
    a("--global-batch-size", type=int, help="split over processes")
    a("--max-steps", type=int, help="loop steps (each a D or a G step)")
    a("--precision", choices=["fp32", "bf16"],
      help="bf16 autocast or fp32 (+TF32 on GPU; the default)")
    a("--compile", action="store_true", default=None,
      help="torch.compile the transformer blocks (regional)")
    a("--device", choices=["auto", "cpu"])
    a("--workers", type=int, help="DataLoader workers per process (image folders, caches; 4)")
    a("--seed", type=int)
    a("--results-dir", help="where run folders are made (results)")
    a("--resume", help="a run folder or a checkpoint file to continue from")
    a("--log-every", type=int)
    a("--sample-every", type=int, help="sample grid from fixed noise (0: never)")
    a("--sample-steps", type=int,
      help="NFE of the grids and evaluations (AFM default: --steps, any-step 1; flow matching: "
           "its recipe's)")
    a("--sample-solver", choices=["euler", "heun"],
      help="flow matching's sampler for grids and evaluations (Heun: NFE = --sample-steps)")
    a("--ckpt-every", type=int)
    a("--eval-every", type=int,
      help="evaluate the EMA generator every N steps (0: never); digits: the pixel report")
    a("--eval-samples", type=int,
      help="class-balanced samples per evaluation (the release's FID: 50000)")
    a("--eval-ref", help="FID reference: an ADM batch (VIRTUAL_imagenet256_labeled.npz) or "
                         "fid.py --make-ref output")
    a("--inception", help="FID Inception weights (default: fid.py's cache, ~/.cache/afm)")
    return p


if __name__ == "__main__":
    try:
        main(*resolve())
    except KeyboardInterrupt:  # before the loop's own handler is set, or after it is restored
        print("train.py: interrupted", flush=True)
        raise SystemExit(130)

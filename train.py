"""
Training of Adversarial Flow Models (AFM, arXiv 2511.22475): the release's recipes, and one
torchrun/DDP loop for four objectives: the AFM pair (generator and discriminator), the guidance
classifier, flow matching (the baseline), and continuous AFM (CAFM, arXiv 2604.11521), which
post-trains a flow model against a discriminator read along the flow. The method is in afm.py.

    python train.py                                   # built-in 8x8 digits, tiny model, CPU ok
    python train.py --recipe fm-digits                # flow matching on the same digits
    torchrun --nproc_per_node=8 train.py --recipe 1nfe --data CACHE_DIR --vae sd-vae-ft-mse.bin
    torchrun --nproc_per_node=8 train.py --recipe knfe --steps 2 --data CACHE_DIR --vae ...
    torchrun --nproc_per_node=8 train.py --recipe classifier --data CACHE_DIR --vae ...
    torchrun --nproc_per_node=8 train.py --recipe 1nfe-cg --cls CLS_RUN --data CACHE_DIR --vae ...
    python train.py --recipe cafm-digits --init results/001-fm-T-2   # CAFM from that flow model
    torchrun --nproc_per_node=8 train.py --recipe cafm --init SiT-XL-2-256.pt --data CACHE_DIR
    python train.py --resume results/000-T-2          # continue a run exactly

"The release" below is ByteDance-Seed/Adversarial-Flow-Models at commit dc11741 (its trainer
train_adversarial_flow.py and configs/train/*.yaml); its flow-matching trainer came later, in
train_flow_matching_imagenet.py and configs/train/fm/*.yaml at commit 519601d, as did CAFM's,
train_continuous_adversarial_flow_imagenet.py and configs/train/cafm/train_cafm_sit.yaml.
"""

import argparse
import contextlib
import copy
import math
import os
import signal
import time
import warnings

# first, before torch: from its import on, Ctrl-C is one line (plumbing.interrupted)
from plumbing import (ArgumentParser, any_rank, cleanup, first_line, integer, load_checkpoint,
                      make_run_dir, mean_over_ranks, one_line_errors, plot_curves, print0,
                      releases_locks, resumed_run_dir, save_atomic, setup, sum_over_ranks,
                      take_lock, trim_log, why_unwritable, write_log)

import torch
import torch.distributed as dist
import torch.nn as nn

from afm import (AdversarialFlowLoss, ContinuousAdversarialFlowLoss, FlowDerivative,
                 classifier_loss, drop_labels, ema_update, flow_matching_loss, frozen)
from dataset import ImageFolder, IndexStream, batches, open_data
from model import Classifier, Discriminator, Generator, discriminator_from_flow, models
from sample import Evaluation, Sampler, load_generator, save_grid
from vae import encode

# torch.func.jvp (CAFM's discriminator) runs torch code that warns, once per process, that
# torch.jit.script is deprecated: nothing a user of this script can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")

# --------------------------------------------------------------------------------------
# Recipes: every value of every recipe, in three tables (training, method, schedule)
# --------------------------------------------------------------------------------------

# Shared by every recipe (the release's configs/train/*.yaml): R1/R2 weight, batch fraction and
# finite-difference step, logit centering, one D step per G step, and the cosine decay of the
# transport weight over 1M loop steps.
COMMON = dict(gp=0.25, gp_ratio=0.25, gp_eps=0.01, cp=0.01, ttur=1, decay_steps=1_000_000)

# Networks and optimizers, each row from the release's configs/train/ file named (at dc11741).
# lr_d None: as lr. clip None: no clipping (clip 50 "effectively disables [clipping], but kept
# for logging", says train_1nfe.yaml). drop: class dropout, the probability that a label is
# replaced by the null class (index num_classes) so that classifier-free guidance exists; the
# release's flow-matching and CAFM trainers drop 0.1 (gen.dropout), its AFM recipes none.
TRAINING_KEYS = ("model", "global_batch_size", "lr", "lr_d", "clip", "ema", "class_dropout")
TRAINING = {
    #               model   batch lr    lr_d  clip  ema     drop
    "1nfe":        ("XL/2", 256,  1e-4, None, 50,   0.9999, 0.0),  # train_1nfe.yaml
    "1nfe-cg":     ("XL/2", 256,  1e-4, None, 50,   0.9999, 0.0),  # train_1nfe_cg.yaml
    "knfe":        ("XL/2", 256,  1e-4, None, 5,    0.9999, 0.0),  # train_fix_nfe.yaml
    "knfe-cg":     ("XL/2", 256,  1e-4, None, 5,    0.9999, 0.0),  # train_fix_nfe_cg.yaml
    "any":         ("B/2",  32,   1e-4, None, 5,    0.9999, 0.0),  # train_any_nfe.yaml
    "deep":        ("XL/2", 256,  5e-5, 1e-4, 5,    0.9999, 0.0),  # train_1nfe_deep.yaml
    "classifier":  ("B/2",  256,  1e-4, None, 50,   0.9995, 0.0),  # train_classifier.yaml
    "fm":          ("XL/2", 256,  1e-4, None, None, 0.9999, 0.1),  # fm/*.yaml (519601d)
    "digits":      ("T/2",  32,   5e-4, None, 50,   0.999,  0.0),  # ours (NOTES.md)
    "pixel32":     ("B/2",  256,  1e-4, None, 50,   0.9999, 0.0),  # ours: 256 tokens, B width
    "pixel64":     ("B/4",  256,  1e-4, None, 50,   0.9999, 0.0),  # ours: 256 tokens, B width
    "fm-digits":   ("T/2",  32,   5e-4, None, None, 0.999,  0.1),  # ours: as digits
    "cafm":        ("XL/2", 256,  1e-5, None, 1e4,  0.99,   0.1),  # cafm/*_sit.yaml (519601d)
    "cafm-digits": ("T/2",  32,   1e-5, 5e-5, 1e4,  0.99,   0.1),  # ours (README, CAFM)
}

# The method. None: not used by that objective. cg_t, where the guidance reads the fake:
# "uniform", re-noised to t_cg ~ U(0, 0.1) (1 NFE); "tgt", at t_tgt in [0, 0.49] (multi-step).
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
    "cafm":       (None,  "v",  1,     0.0,  None,  None, None,  None),  # ot: weight of mean(v^2)
    "cafm-digits": (None, "v",  1,     0.0,  None,  None, None,  None),
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
    "cafm":       (1_000_000, 100, 1000, 25_000, 50_000, 10_000, 250,  "heun"),
    "cafm-digits": (4_400,    250, 1100, 1100,   1100,   1000,   32,   "euler"),
}

# Continuous AFM (arXiv 2604.11521; the release's configs/train/cafm/train_cafm_sit.yaml at
# 519601d): D steps per G step after the warm-up, the warm-up's length (D steps only: D's head is
# new, G is a trained flow model), and D's centering weight (in place of COMMON's cp). Its
# optimizers: AdamW betas (0, 0.95), no weight decay, both networks clipped at 1e4.
CAFM_KEYS = ("n_dis", "warmup", "cp")
CAFM = {
    "cafm":        (16, 10_000, 0.001),
    "cafm-digits": (16, 500,    0.001),
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
                results_dir="results", resume=None, init=None, sit_time=False)


def recipe(name, steps=None):
    """All values of a named recipe, for --steps `steps` when given (see MULTI_STEP)."""
    values = dict(COMMON)
    values.update(zip(TRAINING_KEYS, TRAINING[name]))
    values.update(zip(METHOD_KEYS, METHOD[name]))
    values.update(zip(SCHEDULE_KEYS, SCHEDULE[name]))
    values["cg_range"] = list(CG_RANGE[values["cg_t"]])
    if name in CAFM:
        values.update(zip(CAFM_KEYS, CAFM[name]))
    values["recipe"] = name
    if name in OURS and steps not in (None, 1):
        values.update(MULTI_STEP)
        values["steps"] = steps
    return values


def objective_of(s):
    """Which objective a recipe trains: the AFM pair, the guidance classifier, flow matching or
    continuous AFM."""
    if s.recipe == "classifier":
        return "classifier"
    if s.recipe in ("fm", "fm-digits"):
        return "flow"
    if s.recipe in CAFM:
        return "cafm"
    return "afm"


# --------------------------------------------------------------------------------------
# The objectives: what each trains, what its checkpoint holds, and its training step
# --------------------------------------------------------------------------------------


def adamw(net, lr, betas, weight_decay, device):
    return torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                             eps=1e-8, fused=device.type == "cuda")


def step_optimizer(net, opt, clip):
    """Clip (None: only measure) the gradient norm, take the step, clear the gradients."""
    max_norm = clip
    if clip is None:
        max_norm = math.inf
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
        raise SystemExit(f"train.py: error: --cls {s.cls}: does not fit a {name} classifier on "
                         f"{C}x{H}x{H} with {num_classes} classes (--cls-model?): "
                         f"{first_line(e)}")
    return cls.to(device).eval().requires_grad_(False)


class Objective:
    """What one objective trains. Subclasses set `nets` (the trained networks, by checkpoint
    key), `ema` (the EMA of the network that makes samples, or of the classifier), `pred` (how
    its samples are made; None: it makes none), and define `state` and `step`."""

    pred = None

    def wrap(self, device, compile_blocks):
        """Regional compile in place, then DDP around each trained network (as `forward_of`
        says it is called). The networks keep their plain state-dict keys: checkpoints always
        save the raw modules."""
        self.ddp = {}
        for key, net in self.nets.items():
            if compile_blocks:
                net.compile_blocks()
            self.ddp[key] = self.forward_of(key, net)
            if dist.is_initialized():
                ids = None  # gloo on the CPU
                if device.type == "cuda":
                    ids = [device.index]
                self.ddp[key] = nn.parallel.DistributedDataParallel(self.ddp[key],
                                                                    device_ids=ids)

    def forward_of(self, key, net):
        """The module whose forward a step calls for network `key`: the network itself."""
        return net

    def sizes(self):
        """'model 1,234 parameters, dis 5,678 parameters'."""
        sizes = []
        for key, net in self.nets.items():
            sizes.append(f"{key} {sum(p.numel() for p in net.parameters()):,} parameters")
        return ", ".join(sizes)


class AdversarialPair(Objective):
    """A generator G and a discriminator D trained in turns: a step is a D step or a G step, as
    `is_g_step` says. Subclasses set G, D, `critic` (what G's loss reads D through: D itself, or
    its flow derivative), ema, opt_g, opt_d and `loss` (d_loss and g_loss, of afm.py)."""

    def state(self):
        """Checkpoint key -> object, with the release's keys: "model" is G, "dis" is D."""
        return {"model": self.G, "dis": self.D, "ema": self.ema, "opt_g": self.opt_g,
                "opt_d": self.opt_d}

    def step(self, x0, y, step):
        if self.is_g_step(step):
            return self.g_step(x0, y, step)
        return self.d_step(x0, y, step)

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
                loss, logs = self.loss.g_loss(self.ddp["model"], self.critic, x0, y, step)
            loss.backward()
        logs["grad_norm_g"] = step_optimizer(self.G, self.opt_g, self.s.clip)
        ema_update(self.ema, self.G, self.s.ema)  # after each generator update
        return loss, logs


class AFMPair(AdversarialPair):
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
        self.critic = self.D
        self.nets = {"model": self.G, "dis": self.D}
        self.pred = s.pred
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")

    def state(self):
        """As AdversarialPair's, and "gradnorm": the loss's state (its gradient normalization)."""
        return {**super().state(), "gradnorm": self.loss}

    def is_g_step(self, step):
        """`ttur` discriminator steps, then one generator step (the release alternates them)."""
        return step % (1 + self.s.ttur) >= self.s.ttur


def label_rows(num_classes, class_dropout):
    """Rows of a network's label table: one per class, and the null class (index num_classes)
    when labels are dropped. The release builds its SiT networks so: num_classes 1001 with
    class_dropout_prob 0, the dropout done by the trainer (afm.drop_labels), since in CAFM the
    generator and the discriminator must see the same dropped labels."""
    if class_dropout > 0:
        return num_classes + 1
    return num_classes


class OneNetwork(Objective):
    """An objective that trains one network by a plain loss, with AdamW and an EMA: the guidance
    classifier and flow matching. Subclasses set `net`, `ema`, `opt`, `loss` (a function
    (net, x0, y) -> (loss, logs) of afm.py) and `null` (the null class, for class dropout)."""

    def state(self):
        return {"model": self.net, "ema": self.ema, "opt": self.opt}

    def step(self, x0, y, step):
        if self.s.class_dropout > 0:
            y = drop_labels(y, self.s.class_dropout, self.null)
        with self.amp:
            loss, logs = self.loss(self.ddp["model"], x0, y)
        loss.backward()
        logs["grad_norm"] = step_optimizer(self.net, self.opt, self.s.clip)
        ema_update(self.ema, self.net, self.s.ema)
        return loss, logs


class GuidanceClassifier(OneNetwork):
    """The noisy-image classifier that guides the -cg recipes (the release's
    train_classifier.py at dc11741): AdamW betas (0.9, 0.95), weight decay 0.01, and an EMA."""

    def __init__(self, s, C, H, num_classes, device):
        self.s = s
        self.net = Classifier(**models[s.model], input_size=H, in_channels=C,
                              num_classes=num_classes).to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.opt = adamw(self.net, s.lr, (0.9, 0.95), 0.01, device)
        self.loss = classifier_loss
        self.null = None  # no class dropout
        self.nets = {"model": self.net}
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")


class FlowMatching(OneNetwork):
    """Flow matching, the baseline (the release's train_flow_matching_imagenet.py at 519601d):
    one velocity network v(x_t, y, t) (a Generator with t_src conditioning), AdamW betas
    (0.9, 0.999) and no weight decay, an EMA, no gradient clipping."""

    def __init__(self, s, C, H, num_classes, device):
        self.s = s
        self.net = Generator(**models[s.model], input_size=H, in_channels=C,
                             num_classes=label_rows(num_classes, s.class_dropout),
                             use_t_src=True)
        self.null = num_classes
        self.net.grad_checkpointing = s.grad_checkpoint
        self.net.to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.opt = adamw(self.net, s.lr, (0.9, 0.999), 0.0, device)
        self.loss = flow_matching_loss
        self.nets = {"model": self.net}
        self.pred = "v"
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")


class CAFMPair(AdversarialPair):
    """Continuous AFM (arXiv 2604.11521; the release's train_continuous_adversarial_flow_
    imagenet.py at 519601d): post-training of a flow model. G is the velocity network, started
    from --init (a flow-matching run of ours, or SiT's SiT-XL-2-256.pt); D is a discriminator of
    the same blocks with RMSNorm, started from the same weights (only its token and head are
    new). AdamW betas (0, 0.95), no weight decay, for both; the EMA of G (decay 0.99) moves on
    G steps only."""

    def __init__(self, s, C, H, num_classes, device):
        self.s = s
        flow = None
        if s.resume is None:  # a new run starts from --init (a resumed one: from its checkpoint)
            flow, info = load_flow(s.init)
            # Its conventions, kept in the run's settings so that a resume rebuilds the same
            # networks: SiT's (time the other way round, learn_sigma's extra head channels) or
            # ours (DiT's t x 1000).
            s.sit_time = info["sit_time"]
        kw = dict(input_size=H, in_channels=C, num_classes=label_rows(num_classes, 0.1),
                  sit_time=s.sit_time)
        self.G = Generator(**models[s.model], **kw, use_t_src=True, learn_sigma=s.sit_time)
        self.D = Discriminator(**models[s.dis_model], **kw, use_t=True, norm="rms")
        if flow is not None:
            check_fits(flow, self.G, s)
            self.G.load_state_dict(flow)
            discriminator_from_flow(self.D, flow)
        # Recomputation is for G only: D runs inside torch.func.jvp, where checkpointing does not
        # apply.
        self.G.grad_checkpointing = s.grad_checkpoint
        self.G.to(device)
        self.D.to(device)
        self.ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        self.loss = ContinuousAdversarialFlowLoss(
            n_dis=s.n_dis, warmup=s.warmup, cp=s.cp, ot=s.ot, class_dropout=s.class_dropout,
            null_class=num_classes)
        self.critic = FlowDerivative(self.D)  # D read along the flow, unwrapped (G steps)
        self.opt_g = adamw(self.G, s.lr, (0.0, 0.95), 0.0, device)
        self.opt_d = adamw(self.D, s.lr_d, (0.0, 0.95), 0.0, device)
        self.nets = {"model": self.G, "dis": self.D}
        self.pred = "v"
        self.amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")

    def forward_of(self, key, net):
        """D's steps call its flow derivative, so DDP wraps FlowDerivative(D): DDP's forward
        must be the outermost call, not one inside torch.func's transforms (the release wraps
        its DiscriminatorJVP so)."""
        if key == "dis":
            return FlowDerivative(net)
        return net

    def is_g_step(self, step):
        """D steps only during the warm-up, then `n_dis` D steps per G step."""
        return self.loss.is_g_step(step)


def load_flow(path):
    """-> (state dict, info) of the flow model --init names: a flow-matching run's (or
    checkpoint's) EMA weights, or a bare SiT file (sample.py's reader). Anything else is a
    one-line error."""
    try:
        flow, info = load_generator(path)
    except ValueError as e:
        raise SystemExit(f"train.py: error: --init {e}")
    if not info["flow"]:
        raise SystemExit(f"train.py: error: --init {path}: not a flow model (a velocity "
                         f"network: a --recipe fm or fm-digits run, or SiT's checkpoint)")
    return flow.state_dict(), info


def check_fits(flow, G, s):
    """--init must be the velocity network that G is: its size and data, with a null class."""
    for k, v in G.state_dict().items():
        if k not in flow or flow[k].shape != v.shape:
            raise SystemExit(f"train.py: error: --init {s.init} does not fit --model {s.model} "
                             f"on --data {s.data} with a null class (its {k})")


OBJECTIVES = {"afm": AFMPair, "classifier": GuidanceClassifier, "flow": FlowMatching,
              "cafm": CAFMPair}


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


@releases_locks
def main(s, ckpt=None, ckpt_path=None):
    """Train with the settings `s` (see resolve); with a checkpoint `ckpt` (read from
    ckpt_path), continue its run exactly."""
    rank, world, device = setup(s.device)
    if s.global_batch_size % world:
        raise SystemExit(f"train.py: error: --global-batch-size {s.global_batch_size} is not "
                         f"divisible by {world} processes")
    settings = [f"{k}={v}" for k, v in sorted(vars(s).items()) if v is not None]
    print0("settings: " + " ".join(settings))
    torch.manual_seed(s.seed * world + rank)  # per-rank seeds
    local_batch = s.global_batch_size // world

    # Pixels, or SD-VAE latents: cached, or encoded from each batch of images. A VAE is loaded
    # only for latents, and it also decodes the samples of the grids and evaluations.
    data, vae, encode_batches, C, H = open_data(s.data, image_size=s.image_size, vae_path=s.vae,
                                                device=device, unconditional=s.unconditional)
    check_data(s, data, H)
    trainee = OBJECTIVES[objective_of(s)](s, C, H, data.num_classes, device)
    step = 0
    position = 0  # examples this rank has read from its stream
    if ckpt is not None:
        step, position = restore(trainee, ckpt, ckpt_path, s, rank=rank, world=world,
                                 device=device)
    sampler = sampler_of(s, trainee.pred, vae, device)
    evaluation = open_evaluation(s, data, sampler, (C, H, H), rank=rank, world=world,
                                 device=device)
    run_dir = open_run_dir(s, ckpt_path, step, rank, device)
    if step >= s.max_steps:
        print0(f"{run_dir} is finished: step {step} of --max-steps {s.max_steps}. To train it "
               f"further: --resume {run_dir} --max-steps N (and --decay-steps N to stretch the "
               f"transport schedule)")
        cleanup()
        return
    print0(f"{s.recipe}: {trainee.sizes()}; input {C}x{H}x{H}; {world} process(es) on {device}; "
           f"run folder {run_dir}")
    trainee.wrap(device, s.compile)
    stream = IndexStream(len(data), rank, world, s.seed, position)
    data_iter = batches(data, stream, local_batch, s.workers)
    grid = open_grid(s, sampler, data.num_classes, (C, H, H), device)  # None: no sample grids

    log = Log(run_dir, s.max_steps, rank, device)
    non_finite = NonFinite(device)
    start_step = step
    stop = False
    with signals_caught() as received:
        while step < s.max_steps:
            x0, y = next(data_iter)
            x0 = x0.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True).long()
            if encode_batches:
                x0 = encode(vae, x0)  # SD-VAE latents x 0.18215, a fresh posterior sample
            loss, terms = train_step(trainee, x0, y, step)
            non_finite.note(loss, step)
            log.add(terms)
            step += 1
            position += local_batch
            last = step == s.max_steps

            # What this step writes: a grid, an evaluation (every eval_every steps, and at the
            # end of a run that trained at least that long: a short (smoke) run does not spend
            # longer evaluating than it trained), a log line, a checkpoint.
            grid_due = grid is not None and (step % s.sample_every == 0 or last)
            final_eval = last and step - start_step >= s.eval_every
            eval_due = evaluation is not None and (step % s.eval_every == 0 or final_eval)
            boundary = step % s.log_every == 0 or step % s.ckpt_every == 0 or last
            # A checkpoint needs every rank: a signal stops the loop at a step all ranks agree on
            # (checked every 10 steps and at log/checkpoint steps). A non-finite loss stops it
            # before anything is written; the host waits for the device only at such steps.
            if world == 1 or step % 10 == 0 or boundary:
                stop = any_rank(len(received) > 0, device)
            if boundary or grid_due or eval_due or stop:
                non_finite.exit_if_any(run_dir, rank, device)
            if step % s.log_every == 0:
                log.training(step, data, plot=step % s.ckpt_every == 0 or last)
            if grid_due and rank == 0:
                grid.draw(trainee.ema, os.path.join(run_dir, f"samples_{step:07d}.png"))
            if eval_due and not stop:
                stop = evaluate(evaluation, trainee.ema, step, log, received)
            if step % s.ckpt_every == 0 or last or stop:
                save_checkpoint(trainee, s, run_dir, step=step, position=position, rank=rank,
                                device=device)
            if stop:
                break
    if stop:
        print0(f"stopped by a signal at step {step}; resume with --resume {run_dir}")
        cleanup()
        exit_on_signal(received)
    outputs = f"checkpoints in {run_dir}/checkpoints, log.jsonl and curves.png"
    if grid is not None:
        outputs += ", sample grids"
    print0(f"done at step {step}: {outputs} in {run_dir}")
    cleanup()


# --------------------------------------------------------------------------------------
# The loop's parts: checks before the first step, the run folder, checkpoints, logging,
# sampling and evaluation, signals
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


def restore(trainee, ckpt, path, s, rank, world, device):
    """Load every part of the objective and this rank's RNG from a checkpoint
    -> (step, this rank's data position)."""
    try:
        for key, part in trainee.state().items():
            part.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. another --model or --data
        old = ckpt["args"]
        raise SystemExit(f"train.py: error: --resume {path}: the run's networks (--model "
                         f"{old.get('model')}, --data {old.get('data')}) do not fit --model "
                         f"{s.model} on --data {s.data}: {first_line(e, 120)}")
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    else:  # another number of processes: the data order is kept, the noise is new
        print0(f"resume: {len(ckpt['rng'])} RNG states for {world} processes; reseeding")
        torch.manual_seed((s.seed + ckpt["step"]) * world + rank)
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["data_position"]


def open_run_dir(s, ckpt_path, step, rank, device):
    """The run folder: a resumed run's own where it continues in place (its log.jsonl cut back to
    `step`), else a new results/NNN-TAG. Checked writable now, not at the first checkpoint."""
    run_dir = None
    if ckpt_path is not None:
        run_dir = resumed_run_dir(s.resume, ckpt_path)
    if run_dir is None:
        prefix = {"classifier": "cls-", "flow": "fm-", "cafm": "cafm-", "afm": ""}[objective_of(s)]
        tag = prefix + s.model.replace("/", "-")
        try:
            run_dir = make_run_dir(s.results_dir, tag, vars(s), rank)
        except OSError as e:
            raise SystemExit(f"train.py: error: --results-dir {s.results_dir}: {e.strerror}")
    why = why_unwritable(os.path.join(run_dir, "checkpoints"), device)
    if why:
        raise SystemExit(f"train.py: error: {run_dir}/checkpoints cannot be written ({why}): no "
                         f"checkpoint could be saved")
    # one run at a time in a folder: two resumes of one run would log its steps twice
    holder = take_lock(os.path.join(run_dir, ".lock"))
    if holder:
        raise SystemExit(f"train.py: error: {run_dir} is in use by {holder}: wait for it to "
                         f"end, or stop it")
    if ckpt_path is not None and rank == 0:
        trim_log(run_dir, step)
    return run_dir


def save_checkpoint(trainee, s, run_dir, step, position, rank, device):
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


def train_step(trainee, x0, y, step):
    """The objective's step -> (loss, logged terms). Out of memory: one line saying what to
    lower."""
    try:
        return trainee.step(x0, y, step)
    except RuntimeError as e:
        # CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise SystemExit(f"train.py: error: out of memory at step {step} with {len(x0)} "
                         f"examples per process: lower --global-batch-size (or try "
                         f"--grad-checkpoint, --precision bf16)")


class NonFinite:
    """The first step whose loss was not finite, noted on the device: reading the loss on the
    host every step would make each step wait for the accelerator. The loop looks at it only
    before it writes something (a grid, an evaluation, a log line, a checkpoint)."""

    def __init__(self, device):
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.zeros((), dtype=torch.long, device=device)

    def note(self, loss, step):
        new = ~self.seen & ~torch.isfinite(loss.detach())
        self.first_step = torch.where(new, step, self.first_step)
        self.seen = self.seen | new

    def exit_if_any(self, run_dir, rank, device):
        """Exit (status 1) on every rank if any rank has seen one (a collective)."""
        if not any_rank(self.seen, device):
            return
        where = "on another rank"
        if self.seen:
            where = f"at step {int(self.first_step)}"
        print(f"[rank {rank}] non-finite loss {where}; stopping. The last good checkpoint in "
              f"{run_dir}/checkpoints is unaffected.", flush=True)
        raise SystemExit(1)


# curves.png: the evaluations' panels first, in this order, then the training terms by name
EVAL_PANELS = ("agreement", "diversity", "pixel_fd", "fid", "inception_score")


class Log:
    """The printed lines and log.jsonl (rank 0 writes): the training terms averaged over the
    steps since the last line (D-step and G-step terms each over its own steps) and over the
    ranks, the speed of training (evaluations excluded) and the time left; and the evaluations.
    curves.png is redrawn at checkpoints and evaluations: a long run's log is long."""

    def __init__(self, run_dir, max_steps, rank, device):
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.rank = rank
        self.device = device
        self.restart()

    def restart(self):
        self.sums = {}  # name -> (sum, count)
        self.steps = 0
        self.start = time.time()

    def add(self, terms):
        for k, v in terms.items():
            total, count = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v.detach().float(), count + 1)
        self.steps += 1

    def training(self, step, data, plot):
        """The line of `step` (a collective: the means are all-reduced), then a new window."""
        means = {k: total / count for k, (total, count) in self.sums.items()}
        means = mean_over_ranks(means, self.device)
        if isinstance(data, ImageFolder):  # unreadable images met so far, all ranks together
            means["skipped_images"] = sum_over_ranks({"n": data.skipped}, self.device)["n"]
        means["it_per_s"] = self.steps / (time.time() - self.start)
        eta = (self.max_steps - step) / means["it_per_s"]
        terms = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        print0(f"step {step:07d} | {terms} | eta {hms(eta)}")
        self.write({"step": step, **means}, plot)
        self.restart()

    def pause(self, seconds):
        """Take `seconds` out of the training time of this window (an evaluation's)."""
        self.start += seconds

    def evaluation(self, step, metrics, seconds):
        terms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print0(f"eval {step:07d} | {terms} | {seconds:.1f} s")
        self.write({"step": step, **metrics, "eval_seconds": seconds}, plot=True)

    def write(self, record, plot):
        if self.rank != 0:
            return
        write_log(self.run_dir, record)
        if plot:
            plot_curves(self.run_dir, first=EVAL_PANELS, skip=("eval_samples", "eval_seconds"))


def hms(seconds):
    """1h02m03s."""
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m{seconds % 60:02.0f}s"


def sampler_of(s, pred, vae, device):
    """How the grids and evaluations sample: flow matching with its recipe's NFE and solver; AFM
    with --sample-steps if given, else its own --steps (an any-step generator: 1)."""
    amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")
    if objective_of(s) in ("flow", "cafm"):  # velocity fields: an ODE, any NFE
        return Sampler(pred, s.sample_steps, solver=s.sample_solver, vae=vae, amp=amp)
    steps = s.steps
    if s.sample_steps:
        steps = s.sample_steps
    elif s.steps == "any":
        steps = 1
    return Sampler(pred, steps, vae=vae, amp=amp)


def open_grid(s, sampler, K, shape, device):
    """The sample grids (a Grid), or None: the objective makes no samples, --sample-every 0, or
    latents without a VAE to decode them (said so)."""
    if sampler.pred is None or s.sample_every == 0:
        return None
    if shape[0] == 4 and sampler.vae is None:
        print0("no --vae: the latent samples cannot be decoded, so no sample grids are drawn")
        return None
    return Grid(sampler, K, shape, s.seed, device)


class Grid:
    """Fixed noise and labels, sampled into one PNG: a row of 10 per class (10 classes at most),
    or 10 x 10 of an unconditional model."""

    def __init__(self, sampler, K, shape, seed, device):
        if K > 1:
            per_class = 10
            if K > 10:
                per_class = 1
            y = torch.arange(min(K, 10)).repeat_interleave(per_class)
        else:
            y = torch.zeros(100).long()
        noise = torch.Generator().manual_seed(seed)
        z = torch.randn(len(y), *shape, generator=noise)  # (N, C, H, W)
        self.sampler = sampler
        self.z = z.to(device)
        self.y = y.to(device)

    def draw(self, G, path):
        save_grid(self.sampler(G, self.z, self.y), path, nrow=10)


def open_evaluation(s, data, sampler, shape, rank, world, device):
    """sample.py's Evaluation, or None: with --eval-every, an objective that makes samples, and
    something to score them against (--eval-ref, or data held in memory)."""
    if sampler.pred is None or s.eval_every == 0:
        return None
    if not s.eval_ref and not data.in_memory:
        return None
    try:
        return Evaluation(sampler, data, shape, num_samples=s.eval_samples,
                          batch_size=s.global_batch_size // world, seed=s.seed, ref=s.eval_ref,
                          inception=s.inception, rank=rank, world=world, device=device)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}")


def evaluate(evaluation, G, step, log, received):
    """One evaluation, printed and logged; True if a signal stopped it."""
    start = time.time()
    metrics = evaluation(G, received)
    seconds = time.time() - start
    log.pause(seconds)  # evaluation time is not training time: excluded from it/s
    if metrics is None:
        print0(f"eval {step:07d} | interrupted by a signal")
        return True
    log.evaluation(step, metrics, seconds)
    return False


@contextlib.contextmanager
def signals_caught():
    """Inside the `with`, SIGINT and SIGTERM only append their number to the list it gives: the
    loop stops at the next step all ranks agree on, after a checkpoint."""
    received = []
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def exit_on_signal(received):
    """Exit with status 128 + the signal's number, as a shell reports a killed command: a script
    running `train.py && sample.py` does not go on as if training had finished. A rank that the
    signal did not reach stopped with the others and exits 0: torchrun's report then names the
    ranks that were signalled (and torchrun exits 1)."""
    if not received:
        raise SystemExit(0)
    raise SystemExit(128 + received[0])


# --------------------------------------------------------------------------------------
# Command line: the flags, then the settings (recipe, resumed run, flags given), checked
# --------------------------------------------------------------------------------------


# The largest --seed: the noise of the evaluations is seeded by seed * 10**8 + i, the data order
# by seed * 100003 + epoch, and both must stay inside torch's 64-bit seeds.
SEED_MAX = 2**31 - 1
# The largest step count or interval: far past any run (the release's longest is 5M steps).
STEPS_MAX = 10**10


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
    a("--image-size", type=integer(1, 8192),
      help="image folders: crop size (256); other data: their own size (checked if given)")
    a("--model", choices=list(models), help="generator (or classifier) size")
    a("--dis-model", choices=list(models), help="discriminator size (default: as --model)")
    a("--repeat", type=integer(1, 64),
      help="deep generator: run the blocks this many times (2: 56, 4: 112 layers)")
    a("--grad-checkpoint", action="store_true", default=None,
      help="recompute activations in backward (memory)")
    # The method (paper Sec. 3).
    a("--steps", type=steps_type, help='NFE the generator is trained for: 1, k or "any"')
    a("--pred", choices=["x", "v"], help="x-prediction (1 NFE) or velocity (multi-step)")
    a("--ot", type=float, help="transport weight at step 0")
    a("--ot-end", type=float, help="transport weight after the cosine decay")
    a("--decay-steps", type=integer(1, STEPS_MAX), help="length of the cosine decay in loop steps")
    a("--gp", type=float, help="R1/R2 weight")
    a("--gp-ratio", type=float, help="fraction of the batch used for R1/R2")
    a("--gp-eps", type=float, help="finite-difference step of R1/R2")
    a("--cp", type=float, help="logit-centering weight")
    a("--augment-p", type=float, help="discriminator augmentation probability")
    a("--ttur", type=integer(1, 1000), help="discriminator steps per generator step")
    a("--n-dis", type=integer(1, 1000),
      help="CAFM: discriminator steps per generator step after the warm-up")
    a("--warmup", type=integer(0, STEPS_MAX), help="CAFM: discriminator-only steps at the start")
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
    a("--global-batch-size", type=integer(1, 2**30), help="split over processes")
    a("--max-steps", type=integer(1, STEPS_MAX), help="loop steps (each a D or a G step)")
    a("--precision", choices=["fp32", "bf16"],
      help="bf16 autocast or fp32 (+TF32 on GPU; the default)")
    a("--compile", action="store_true", default=None,
      help="torch.compile the transformer blocks (regional)")
    a("--device", choices=["auto", "cpu"], help="auto: the GPU when there is one (the default)")
    a("--workers", type=integer(0, 64),
      help="DataLoader workers per process (image folders, caches; 4)")
    a("--seed", type=integer(0, SEED_MAX),
      help="seeds the weights, the data order and the noise of grids and evaluations (0)")
    a("--results-dir", help="where run folders are made (results)")
    a("--resume", help="a run folder or a checkpoint file to continue from")
    a("--init", help="CAFM: the flow model to post-train (a --recipe fm or fm-digits run or "
                     "checkpoint, or SiT-XL-2-256.pt); G, its EMA and D start from it")
    a("--log-every", type=integer(1, STEPS_MAX),
      help="print the training terms, and add them to log.jsonl, every N steps")
    a("--sample-every", type=integer(0, STEPS_MAX), help="sample grid from fixed noise (0: never)")
    a("--sample-steps", type=int,
      help="NFE of the grids and evaluations (AFM default: --steps, any-step 1; flow matching: "
           "its recipe's)")
    a("--sample-solver", choices=["euler", "heun"],
      help="flow matching's sampler for grids and evaluations (Heun: NFE = --sample-steps)")
    a("--ckpt-every", type=integer(1, STEPS_MAX),
      help="save a checkpoint every N steps (and at the end)")
    a("--eval-every", type=integer(0, STEPS_MAX),
      help="evaluate the EMA generator every N steps (0: never); digits: the pixel report")
    a("--eval-samples", type=int,
      help="class-balanced samples per evaluation (the release's FID: 50000)")
    a("--eval-ref", help="FID reference: an ADM batch (VIRTUAL_imagenet256_labeled.npz) or "
                         "fid.py --make-ref output")
    a("--inception", help="FID Inception weights (default: fid.py's cache, ~/.cache/afm)")
    return p


def resolve(argv=None):
    """-> (settings, checkpoint or None, its path). Settings: the recipe's values, then (with
    --resume) the run's own, then every flag given explicitly now. Flag combinations the release
    never uses are errors."""
    p = parser()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
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
        name = ckpt["args"].get("recipe")
        if name not in METHOD:
            raise SystemExit(f"train.py: error: --resume {path}: made with --recipe {name}, "
                             f"which is none of {', '.join(METHOD)}")
        known = set(DEFAULTS) | set(recipe(name))  # a setting no longer used is dropped
        base = {k: v for k, v in ckpt["args"].items() if k in known}
        for k, v in recipe(name).items():  # settings added since the run take its recipe's
            base.setdefault(k, v)
    else:
        default = "1nfe"  # the release's; for the built-in digits, ours
        if given.get("data", "digits") == "digits":
            default = "digits"
        name = given.get("recipe", default)
        base = recipe(name, given.get("steps"))
        if name == "deep" and "lr" not in given:
            base["lr"] = 1e-4 / given.get("repeat", 2)  # "lr / depth"
    s = argparse.Namespace(**{**DEFAULTS, **base, **given})
    if s.dis_model is None:
        s.dis_model = s.model  # the discriminator defaults to the generator's size
    if s.lr_d is None:
        s.lr_d = s.lr  # the release: dis_lr = gen_lr, except in the deep recipe
    error = check(s, given, ckpt is not None)
    if error:
        p.error(error)
    return s, ckpt, path


# Flags that must be positive, >= 0, or within a range: (names, test, what is expected).
RANGES = [
    ("global_batch_size max_steps log_every ckpt_every decay_steps repeat ttur lr lr_d clip gp_eps "
     "sample_steps n_dis", lambda v: v > 0, "positive"),
    ("ot ot_end gp cp cg sample_every workers eval_every warmup", lambda v: v >= 0, ">= 0"),
    ("eval_samples", lambda v: v > 0, "positive (turn evaluation off with --eval-every 0)"),
    ("gp_ratio augment_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ema", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("cg_range", lambda v: 0 <= v[0] <= v[1] <= 1, "LO HI with 0 <= LO <= HI <= 1"),
]


# Flags an objective does not read, by objective: given explicitly, each would do nothing, so it
# is refused. (--init is CAFM's; check says so.)
GUIDANCE = "cls cls_model cg cg_range cg_t cg_renoise"
ONE_NETWORK = (f"steps pred ot ot_end decay_steps gp gp_ratio gp_eps cp augment_p ttur {GUIDANCE} "
               f"repeat lr_d dis_model n_dis warmup")
IGNORED = {
    "afm": "n_dis warmup sample_solver",
    "classifier": ONE_NETWORK,
    "flow": ONE_NETWORK,
    "cafm": f"steps pred ot_end decay_steps gp gp_ratio gp_eps augment_p ttur {GUIDANCE} repeat",
}


def check(s, given, resumed):
    """The first problem with these settings (a one-line message), or None. `given`: the flags
    given explicitly."""
    objective = objective_of(s)
    for key in IGNORED[objective].split():
        if key in given:
            return (f"--{key.replace('_', '-')} does nothing in --recipe {s.recipe} "
                    f"({objective} training): leave it out")
    for names, ok, want in RANGES:
        for key in names.split():
            value = getattr(s, key, None)  # n_dis, warmup: CAFM's recipes only
            if value is not None and not ok(value):
                return f"--{key.replace('_', '-')} must be {want}, got {value}"
    if s.steps is not None and s.steps != "any" and s.steps < 1:
        return f"--steps must be 1, 2, ... or any, got {s.steps}"
    files = [("--vae", s.vae), ("--cls", s.cls), ("--eval-ref", s.eval_ref),
             ("--inception", s.inception), ("--init", s.init)]
    if s.data != "digits":
        files.append(("--data", s.data))
    for flag, path in files:
        if path and not os.path.exists(path):
            return f"{flag} {path}: no such file or folder"
    if os.path.exists(s.results_dir) and not os.path.isdir(s.results_dir):
        return f"--results-dir {s.results_dir} is a file, not a folder"
    if objective in ("flow", "cafm") and s.sample_solver == "heun" and s.sample_steps % 2:
        return f"--sample-solver heun takes an even --sample-steps (its NFE), got {s.sample_steps}"
    if objective == "afm" and s.sample_steps is not None and s.steps == 1 and s.sample_steps != 1:
        return (f"--sample-steps {s.sample_steps}: a 1-NFE generator (--steps 1) samples in one "
                f"step only")
    if objective == "cafm" and not resumed and s.init is None:
        return (f"--recipe {s.recipe} post-trains a flow model: give it with --init (a --recipe "
                f"fm-digits or fm run, or SiT-XL-2-256.pt)")
    if s.init is not None and objective != "cafm":
        return f"--init starts a CAFM run (--recipe cafm or cafm-digits), not --recipe {s.recipe}"
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


if __name__ == "__main__":
    with one_line_errors("train.py"):
        main(*resolve())

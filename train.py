"""
Training of Adversarial Flow Models (AFM, arXiv 2511.22475): the release's recipes and one
torchrun/DDP loop for four objectives: the AFM pair (a generator and a discriminator), the
guidance classifier, flow matching (the baseline), and continuous AFM (CAFM, arXiv 2604.11521),
which post-trains a flow model against a discriminator read along the flow. The method is in
afm.py, the networks in model.py.

    python train.py                                   # built-in 8x8 digits, tiny model, CPU ok
    python train.py --recipe fm-digits                # flow matching on the same digits
    torchrun --nproc_per_node=8 train.py --recipe 1nfe --data CACHE_DIR --vae sd-vae-ft-mse.bin
    torchrun --nproc_per_node=8 train.py --recipe knfe --steps 2 --data CACHE_DIR --vae ...
    torchrun --nproc_per_node=8 train.py --recipe classifier --data CACHE_DIR --vae ...
    torchrun --nproc_per_node=8 train.py --recipe 1nfe-cg --cls CLS_RUN --data CACHE_DIR --vae ...
    python train.py --recipe cafm-digits --init results/001-fm-T-2   # CAFM from that flow model
    torchrun --nproc_per_node=8 train.py --recipe cafm --init SiT-XL-2-256.pt --data CACHE_DIR
    python train.py --resume results/000-T-2          # continue a run exactly

A run writes results/NNN-MODEL/: args.json, log.jsonl, curves.png, sample grids and
checkpoints/. Ctrl-C or SIGTERM stops it at the next step all ranks agree on, after a
checkpoint, with exit status 130 or 143; --resume continues it bitwise.

"The release" below is ByteDance-Seed/Adversarial-Flow-Models at commit dc11741 (its trainer
train_adversarial_flow.py and configs/train/*.yaml); its flow-matching trainer came later, in
train_flow_matching_imagenet.py and configs/train/fm/*.yaml at commit 519601d, as did CAFM's,
train_continuous_adversarial_flow_imagenet.py and configs/train/cafm/train_cafm_sit.yaml.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from afm import (AdversarialFlowLoss, ContinuousAdversarialFlowLoss, FlowDerivative,
                 classifier_loss, drop_labels, ema_update, flow_matching_loss, frozen, generate)
from dataset import IndexStream, batches, open_data
from fid import Evaluation
from model import Classifier, Discriminator, Generator, discriminator_from_flow, models
from model import generator_config, size_of
from plumbing import (cleanup, ddp, load_checkpoint, load_weights, make_run_dir, plot_curves,
                      positive, print0, resumed_run_dir, save_atomic, save_grid, setup,
                      sum_over_ranks, trim_log)
from vae import encode, to_images

# torch.func.jvp (CAFM's discriminator) runs torch code that warns, once per process, that
# torch.jit.script is deprecated: nothing a user of this script can act on.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")

# --------------------------------------------------------------------------------------
# Recipes: every value of a run, by name. Code reads RECIPES[name]["steps"].
# --------------------------------------------------------------------------------------

# The release's 1-NFE ImageNet recipe, every value (configs/train/train_1nfe.yaml at dc11741);
# the recipes after it say only what they change.
ONE_NFE = dict(
    objective="afm",
    # Networks and optimizers: G's size (D's defaults to it), the global batch, learning rates
    # (lr_d None: as lr), gradient-norm clipping (None: none; 50 "effectively disables [it],
    # but kept for logging", says the yaml), the EMA decay, and class dropout: the chance
    # that a label becomes the null class, so that classifier-free guidance exists (the
    # release's flow-matching and CAFM trainers drop 0.1, its AFM recipes none).
    model="XL/2", global_batch_size=256, lr=1e-4, lr_d=None, clip=50, ema=0.9999,
    class_dropout=0.0,
    # The method (paper Sec. 3; afm.AdversarialFlowLoss): the NFE G is trained for, x- or
    # v-prediction, the deep generator's repeats, the transport weight and its cosine decay
    # over 1M loop steps, R1/R2 (weight, share of the batch, finite-difference step), logit
    # centering, D steps per G step, augmentation, and classifier guidance: its weight and
    # where its classifier reads the fake ("uniform": re-noised to t_cg ~ U(cg_range), 1 NFE;
    # "tgt": at t_tgt, multi-step).
    steps=1, pred="x", repeat=1, ot=0.2, ot_end=0.005, decay_steps=1_000_000,
    gp=0.25, gp_ratio=0.25, gp_eps=0.01, cp=0.01, ttur=1, augment_p=0.0,
    cg=0.0, cg_t="uniform", cg_range=[0.0, 0.1],
    # The loop, in loop steps (a D step and a G step are two): its length, how often it logs,
    # draws a grid, saves and evaluates, with how many samples, and how grids and evaluations
    # sample (NFE None: the generator's own --steps).
    max_steps=5_000_000, log_every=100, sample_every=1000, ckpt_every=20_000,
    eval_every=10_000, eval_samples=10_000, sample_steps=None, sample_solver="euler",
)
# Multi-step AFM (train_fix_nfe.yaml): velocity prediction, the transport weight from 0.25,
# clipping at 5, and guidance read at t_tgt in [0, 0.49].
K_NFE = dict(ONE_NFE, steps=2, pred="v", ot=0.25, clip=5, cg_t="tgt", cg_range=[0.0, 0.49])
# The values of the AFM pair's method that a single network does not read are None.
ONE_NETWORK = dict(steps=None, ot=None, ot_end=None, augment_p=None, cg=None, cg_t=None)
# Flow matching (fm/*.yaml at 519601d): one velocity network, no clipping, class dropout 0.1,
# checkpoints every 25,000 steps, evaluations every 50,000, grids by Heun at 256 NFE (the
# release validates its flow models so).
FLOW = dict(ONE_NFE, **ONE_NETWORK, objective="flow", pred="v", clip=None, class_dropout=0.1,
            max_steps=1_000_000, ckpt_every=25_000, eval_every=50_000, sample_steps=256,
            sample_solver="heun")
# CAFM (cafm/train_cafm_sit.yaml at 519601d): post-training of SiT-XL/2 at lr 1e-5, clipping
# at 1e4, EMA 0.99, class dropout 0.1; no transport term (ot weighs G's mean(v^2)); D's
# centering 0.001; n_dis D steps per G step after `warmup` D-only steps (D's head is new, G
# a trained flow model: afm.ContinuousAdversarialFlowLoss says why).
CAFM = dict(FLOW, objective="cafm", lr=1e-5, clip=1e4, ema=0.99, ot=0.0, cp=0.001, n_dis=16,
            warmup=10_000, sample_steps=250)
# Ours, for small data: the tiny T/2 on the built-in digits at batch 32. Why the transport
# weight stays constant, where the release decays it over 1M steps: within runs this short,
# every decay tried let within-class diversity collapse after it (NOTES.md, "Tuning the
# small-data recipes").
DIGITS = dict(model="T/2", global_batch_size=32, lr=5e-4, ema=0.999, log_every=500,
              sample_every=2000, ckpt_every=4000, eval_samples=1000)
# Ours: pixels without a VAE, 256 tokens of B width, the release's batch, lr and EMA.
PIXEL32 = dict(ONE_NFE, model="B/2", ot_end=0.2, max_steps=400_000, sample_every=2000,
               ckpt_every=10_000)

RECIPES = {
    "1nfe": ONE_NFE,
    # train_1nfe_cg.yaml
    "1nfe-cg": dict(ONE_NFE, augment_p=0.4, cg=0.003),
    # train_fix_nfe.yaml, or --steps 4
    "knfe": K_NFE,
    # train_fix_nfe_cg.yaml
    "knfe-cg": dict(K_NFE, augment_p=0.4, cg=0.02),
    # train_any_nfe.yaml
    "any": dict(K_NFE, steps="any", model="B/2", global_batch_size=32),
    # train_1nfe_deep.yaml
    "deep": dict(ONE_NFE, repeat=2, lr=5e-5, lr_d=1e-4, clip=5),
    # train_classifier.yaml
    "classifier": dict(ONE_NFE, **ONE_NETWORK, objective="classifier", pred=None, model="B/2",
                       ema=0.9995),
    "fm": FLOW,
    "digits": dict(ONE_NFE, **DIGITS, ot=0.25, ot_end=0.25, max_steps=16_000, eval_every=1000),
    "pixel32": PIXEL32,
    # 256 tokens of 4x4 patches
    "pixel64": dict(PIXEL32, model="B/4"),
    # the AFM digits run's training time (NOTES.md, "AFM against flow matching on the digits")
    "fm-digits": dict(FLOW, **DIGITS, max_steps=36_000, eval_every=2000, sample_steps=32,
                      sample_solver="euler"),
    "cafm": CAFM,
    # NOTES.md, "The tries behind cafm-digits"
    "cafm-digits": dict(CAFM, model="T/2", global_batch_size=32, lr_d=5e-5, warmup=500,
                        max_steps=4_400, log_every=250, sample_every=1100, ckpt_every=1100,
                        eval_every=1100, eval_samples=1000, sample_steps=32,
                        sample_solver="euler"),
}
# Our recipes are 1-NFE; given --steps k or "any" they take what the release's multi-step
# recipes change.
OURS = ("digits", "pixel32", "pixel64")
MULTI_STEP = dict(pred="v", clip=5.0, cg_t="tgt", cg_range=[0.0, 0.49])

# Settings that are no recipe's, with their defaults.
DEFAULTS = dict(data="digits", vae=None, eval_ref=None, inception=None, unconditional=False,
                image_size=None, dis_model=None, grad_checkpoint=False, cls=None,
                cg_renoise=True, precision="fp32", compile=False, device="auto", workers=4,
                seed=0, results_dir="results", resume=None, init=None, sit_time=False)

# --------------------------------------------------------------------------------------
# The objectives: what each trains, its checkpoint's parts, its D step and G step
# --------------------------------------------------------------------------------------


def adamw(net, lr, betas, weight_decay, device):
    return torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                             eps=1e-8, fused=device.type == "cuda")


def step_optimizer(net, opt, clip):
    """Clip the gradient norm (clip None: only measure it), step, clear the gradients."""
    norm = nn.utils.clip_grad_norm_(net.parameters(), math.inf if clip is None else clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@contextlib.contextmanager
def guarded(local_batch):
    """Around the loop. SIGINT (Ctrl-C) and SIGTERM only append their number to the list it
    gives: the loop then stops at a step all ranks agree on, after a checkpoint. Out of memory
    ends the run in one line saying what to lower."""
    stop = []
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        yield stop
    except torch.OutOfMemoryError:
        raise SystemExit(f"error: out of memory with {local_batch} examples per process: "
                         f"lower --global-batch-size (or use --grad-checkpoint, bf16)")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class Pair:
    """A generator G and a discriminator D trained in turns, as AFM and CAFM train them: each
    loop step is a D step or a G step (`is_g_step`), and the EMA of G moves after each G step.
    `dis` is the module D steps call, `critic` what G's loss reads D through: D itself for AFM;
    for CAFM its flow derivative (afm.FlowDerivative), which DDP wraps whole in D steps."""

    def __init__(self, s, G, D, dis, critic, loss, is_g_step, betas, weight_decay, device, amp):
        self.s = s
        self.G = G
        self.D = D
        self.ema = copy.deepcopy(G).requires_grad_(False).eval()
        self.loss = loss
        self.is_g_step = is_g_step
        self.opt_g = adamw(G, s.lr, betas, weight_decay, device)
        self.opt_d = adamw(D, s.lr_d, betas, weight_decay, device)
        self.amp = amp
        if s.compile:  # regional, in place: the state-dict keys stay plain
            G.compile_blocks()
            D.compile_blocks()
        self.gen = ddp(G, device)
        self.dis = ddp(dis, device)
        self.critic = critic

    def state(self):
        """Checkpoint key -> object, with the release's keys: "model" is G, "dis" is D, and
        "gradnorm" AFM's running gradient scale (afm.GradientNormalization)."""
        state = {"model": self.G, "dis": self.D, "ema": self.ema, "opt_g": self.opt_g,
                 "opt_d": self.opt_d}
        if isinstance(self.loss, AdversarialFlowLoss):
            state["gradnorm"] = self.loss
        return state

    # Which network runs DDP-wrapped in which step, and why. In the D step only D learns: D
    # runs wrapped; G runs plain and without grad (it only makes fakes). In the G step only G
    # learns: G runs wrapped, D plain and frozen, so gradients flow through D into G while D's
    # weights get none (and DDP has no D gradients to wait for). D stays frozen through
    # backward too, so that a recomputation (--grad-checkpoint) sees the same graph.
    def d_step(self, x0, y, step):
        with self.amp:
            loss, logs = self.loss.d_loss(self.G, self.dis, x0, y, step)
        loss.backward()
        logs["grad_norm_d"] = step_optimizer(self.D, self.opt_d, self.s.clip)
        return loss, logs

    def g_step(self, x0, y, step):
        with frozen(self.D):
            with self.amp:
                loss, logs = self.loss.g_loss(self.gen, self.critic, x0, y, step)
            loss.backward()
        logs["grad_norm_g"] = step_optimizer(self.G, self.opt_g, self.s.clip)
        ema_update(self.ema, self.G, self.s.ema)  # after each generator update
        return loss, logs


class Single:
    """One network trained by a plain loss (net, x0, y) -> (loss, logs) of afm.py, with AdamW
    and an EMA: the guidance classifier and flow matching. Every loop step is its step (the
    loop calls it g_step); labels become the null class `null` with class dropout."""

    def __init__(self, s, net, loss, betas, weight_decay, null, device, amp):
        self.s = s
        self.G = net
        self.ema = copy.deepcopy(net).requires_grad_(False).eval()
        self.loss = loss
        self.opt = adamw(net, s.lr, betas, weight_decay, device)
        self.null = null
        self.amp = amp
        if s.compile:
            net.compile_blocks()
        self.net = ddp(net, device)

    def state(self):
        return {"model": self.G, "ema": self.ema, "opt": self.opt}

    def is_g_step(self, step):
        return True

    def g_step(self, x0, y, step):
        if self.s.class_dropout > 0:
            y = drop_labels(y, self.s.class_dropout, self.null)
        with self.amp:
            loss, logs = self.loss(self.net, x0, y)
        loss.backward()
        logs["grad_norm"] = step_optimizer(self.G, self.opt, self.s.clip)
        ema_update(self.ema, self.G, self.s.ema)
        return loss, logs


def afm_pair(s, C, H, K, device, amp):
    """The AFM pair (paper Sec. 3): G and D, AdamW betas (0, 0.9) and weight decay 0.01 (the
    release's), and the loss, whose gradient normalization keeps a running scale."""
    kw = dict(input_size=H, in_channels=C, num_classes=K)
    # t_src conditioning for multi-step generators, t_tgt for any-step ones; the deep
    # generator (repeat > 1) is 1-NFE and embeds its repeats instead.
    G = Generator(**models[s.model], **kw, use_t_src=s.steps != 1 and s.repeat == 1,
                  use_t_tgt=s.steps == "any", repeat=s.repeat)
    D = Discriminator(**models[s.dis_model], **kw, use_t=s.steps != 1)
    for net in (G, D):
        net.grad_checkpointing = s.grad_checkpoint
        net.to(device)
    classifier = load_classifier(s, C, H, K, device) if s.cls else None
    loss = AdversarialFlowLoss(
        steps=s.steps, pred=s.pred, ot=s.ot, ot_end=s.ot_end, decay_steps=s.decay_steps,
        gp=s.gp, gp_ratio=s.gp_ratio, gp_eps=s.gp_eps, cp=s.cp, augment_p=s.augment_p,
        classifier=classifier, cg=s.cg, cg_range=tuple(s.cg_range), cg_t=s.cg_t,
        cg_renoise=s.cg_renoise)
    loss.gradnorm.to(device)
    # `ttur` D steps, then one G step (the release alternates them)
    return Pair(s, G, D, D, D, loss, lambda step: step % (1 + s.ttur) >= s.ttur, (0.0, 0.9),
                0.01, device, amp)


def cafm_pair(s, C, H, K, device, amp):
    """CAFM (the release's train_continuous_adversarial_flow_imagenet.py at 519601d): G is the
    velocity network, started from --init (a flow-matching run of ours, or SiT's
    SiT-XL-2-256.pt); D has the same blocks with RMSNorm and starts from the same weights (only
    its token and head are new). AdamW betas (0, 0.95), no weight decay, for both. Labels keep
    a null class (the release builds its SiT networks with 1001 classes); a resumed run starts
    from its checkpoint instead."""
    flow = load_flow(s) if s.resume is None else None
    kw = dict(input_size=H, in_channels=C, num_classes=K + 1, sit_time=s.sit_time)
    G = Generator(**models[s.model], **kw, use_t_src=True, learn_sigma=s.sit_time)
    D = Discriminator(**models[s.dis_model], **kw, use_t=True, norm="rms")
    if flow is not None:
        load_weights(G, flow, f"--init {s.init} (as --model {s.model}, with a null class)")
        discriminator_from_flow(D, flow)
    # Recomputation is for G only: D runs inside torch.func.jvp, where it does not apply.
    G.grad_checkpointing = s.grad_checkpoint
    G.to(device)
    D.to(device)
    loss = ContinuousAdversarialFlowLoss(n_dis=s.n_dis, warmup=s.warmup, cp=s.cp, ot=s.ot,
                                         class_dropout=s.class_dropout, null_class=K)
    return Pair(s, G, D, FlowDerivative(D), FlowDerivative(D), loss, loss.is_g_step,
                (0.0, 0.95), 0.0, device, amp)


def guidance_classifier(s, C, H, K, device, amp):
    """The noisy-image classifier that guides the -cg recipes (the release's
    train_classifier.py at dc11741): AdamW betas (0.9, 0.95), weight decay 0.01, an EMA."""
    net = Classifier(**models[s.model], input_size=H, in_channels=C, num_classes=K)
    return Single(s, net.to(device), classifier_loss, (0.9, 0.95), 0.01, None, device, amp)


def flow_matching(s, C, H, K, device, amp):
    """Flow matching, the baseline (the release's train_flow_matching_imagenet.py at
    519601d): one velocity network v(x_t, y, t), a Generator with t_src conditioning (and a
    null class with class dropout), AdamW betas (0.9, 0.999), no weight decay, an EMA."""
    net = Generator(**models[s.model], input_size=H, in_channels=C, use_t_src=True,
                    num_classes=K + 1 if s.class_dropout > 0 else K)
    net.grad_checkpointing = s.grad_checkpoint
    return Single(s, net.to(device), flow_matching_loss, (0.9, 0.999), 0.0, K, device, amp)


OBJECTIVES = {"afm": afm_pair, "cafm": cafm_pair, "classifier": guidance_classifier,
              "flow": flow_matching}


def load_classifier(s, C, H, K, device):
    """The frozen guidance classifier: a --recipe classifier run's EMA weights, or the
    release's bare classifier.pth (its size read from its keys)."""
    path, ckpt = load_checkpoint(s.cls, "--cls")
    name = ckpt["args"]["model"] if "args" in ckpt else size_of(ckpt)
    net = Classifier(**models[name], input_size=H, in_channels=C, num_classes=K)
    load_weights(net, ckpt.get("ema", ckpt), f"--cls {path} (a {name} classifier on "
                                             f"{C}x{H}x{H}, {K} classes)")
    return net.to(device).eval().requires_grad_(False)


def load_flow(s):
    """The flow model --init names -> its state dict: a flow-matching (or CAFM) run's EMA
    weights, or a bare file in SiT's layout (SiT-XL-2-256.pt, the release's CAFM
    checkpoints). Its time convention is kept in the run's settings (`sit_time`: SiT's runs
    from noise to data), so that a resume rebuilds the same networks."""
    path, ckpt = load_checkpoint(s.init, "--init")
    ours = "args" in ckpt
    sd = ckpt["ema"] if ours else ckpt
    s.sit_time = ckpt["args"]["sit_time"] if ours else generator_config(sd)[1]["sit_time"]
    if not (ckpt["args"]["objective"] in ("flow", "cafm") if ours else s.sit_time):
        raise SystemExit(f"error: --init {path}: not a flow model (a --recipe fm or fm-digits "
                         f"run, or SiT's checkpoint)")
    return sd


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def main(s, ckpt=None, ckpt_path=None):
    """Train with the settings `s` (see resolve); with a checkpoint `ckpt` (read from
    ckpt_path), continue its run exactly."""
    rank, world, device = setup(s.device)
    if s.global_batch_size % world:
        raise SystemExit(f"error: --global-batch-size {s.global_batch_size} is not divisible "
                         f"by the {world} processes")
    settings = [f"{k}={v}" for k, v in sorted(vars(s).items()) if v is not None]
    print0("settings: " + " ".join(settings))
    torch.manual_seed(s.seed * world + rank)  # per-rank seeds
    local_batch = s.global_batch_size // world

    # Pixels, or SD-VAE latents: cached, or encoded from each batch of images. A VAE is loaded
    # only for latents, and it also decodes the samples of the grids and evaluations.
    data, vae, shape = open_data(s.data, s.image_size, s.vae, device, s.unconditional)
    C, H, _ = shape
    check_data(s, data, H)
    K = data.num_classes
    amp = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")
    trainer = OBJECTIVES[s.objective](s, C, H, K, device, amp)
    # the loop's step, and the examples this rank has read from its stream
    step, position = restore(trainer, ckpt, ckpt_path, s.seed, world, rank, device)

    # How grids and evaluations sample the EMA generator: velocity fields (flow matching and
    # CAFM) by their recipe's ODE; AFM in its own --steps (an any-step generator: 1).
    steps = s.sample_steps or (1 if s.steps == "any" else s.steps)

    def sample(z, y):
        with amp:
            return to_images(generate(trainer.ema, z, y, steps, s.pred, s.sample_solver), vae)

    samples = s.objective != "classifier"
    evaluation = None
    if samples and s.eval_every and (s.eval_ref or data.in_memory):
        evaluation = Evaluation(s.eval_samples, K, (C, H, H), local_batch, s.seed, s.eval_ref,
                                s.inception, data.tensors if data.in_memory else None,
                                rank, world, device)
    # The grids: fixed noise and labels, a row of 10 per class (the first 10 classes; one
    # sample of each with more), or 10 x 10 of an unconditional model.
    grid = None
    if samples and s.sample_every and (C != 4 or vae is not None):
        y = torch.arange(min(K, 10)).repeat_interleave(10 if K <= 10 else 1)
        y = torch.zeros(100).long() if K == 1 else y
        z = torch.randn(len(y), C, H, H, generator=torch.Generator().manual_seed(s.seed))
        grid = (z.to(device), y.to(device))

    run_dir = resumed_run_dir(ckpt_path) if ckpt_path else None
    if run_dir is None:
        prefix = {"afm": "", "classifier": "cls-", "flow": "fm-", "cafm": "cafm-"}
        run_dir = make_run_dir(s.results_dir, prefix[s.objective] + s.model.replace("/", "-"),
                               vars(s))
    elif rank == 0:
        trim_log(run_dir, step)
    size = sum(p.numel() for p in trainer.G.parameters())
    print0(f"{s.recipe}: G {size:,} parameters; input {C}x{H}x{H}; {world} process(es) on "
           f"{device}; run folder {run_dir}")
    stream = IndexStream(len(data), rank, world, s.seed, position)
    data_iter = batches(data, stream, local_batch, s.workers)
    log = Log(run_dir, s.max_steps, world)
    start = step
    # whether a loss was not finite since the last write step (on the device: no sync)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    with guarded(local_batch) as stop:
        while step < s.max_steps:
            x0, y = next(data_iter)
            x0 = x0.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True).long()
            if vae is not None and data.space == "pixel":
                x0 = encode(vae, x0)  # SD-VAE latents x 0.18215, a fresh posterior sample
            if trainer.is_g_step(step):
                loss, terms = trainer.g_step(x0, y, step)
            else:
                loss, terms = trainer.d_step(x0, y, step)
            bad |= ~torch.isfinite(loss.detach())
            log.add(terms)
            step += 1
            position += local_batch
            last = step == s.max_steps

            # What this step writes. An evaluation comes every eval_every steps, and at the end
            # of a run that trained at least that long: a short run is not held up by one.
            log_due = step % s.log_every == 0
            ckpt_due = step % s.ckpt_every == 0 or last
            grid_due = grid is not None and (step % s.sample_every == 0 or last)
            final_eval = last and step - start >= s.eval_every
            eval_due = evaluation is not None and (step % s.eval_every == 0 or final_eval)
            if not (log_due or ckpt_due or grid_due or eval_due or (world == 1 and stop)):
                continue
            # One all-reduce, one wait for the device: the log's sums, any rank's non-finite
            # loss (then nothing of this step is written) and any rank's signal (then all
            # ranks stop here, after a checkpoint).
            sums = {"bad": bad, "stop": len(stop)}
            if log_due:  # the means of the terms since the last line
                sums.update({k: total / n for k, (total, n) in log.sums.items()})
            sums = sum_over_ranks(sums, device)
            if sums.pop("bad"):
                print(f"[rank {rank}] non-finite loss before step {step}; stopping. The last "
                      f"checkpoint in {run_dir}/checkpoints is unaffected.", flush=True)
                raise SystemExit(1)
            stopping = sums.pop("stop") > 0
            if log_due:
                log.training(step, sums, plot=ckpt_due)
            if grid_due and rank == 0:
                path = os.path.join(run_dir, f"samples_{step:07d}.png")
                save_grid(sample(*grid), path, nrow=10)
            if eval_due and not stopping:
                t0 = time.time()
                metrics = evaluation(sample)
                log.evaluation(step, metrics, time.time() - t0)
            if ckpt_due or stopping:
                save_checkpoint(trainer, s, run_dir, step, position, rank, device)
            if stopping:
                break
    cleanup()
    if stop or step < s.max_steps:
        print0(f"stopped by a signal at step {step}; resume with --resume {run_dir}")
        raise SystemExit(128 + (stop[0] if stop else signal.SIGINT))
    print0(f"done at step {step}: {run_dir}")


# --------------------------------------------------------------------------------------
# The loop's parts: the data check, checkpoints, the log, the grids
# --------------------------------------------------------------------------------------


def check_data(s, data, H):
    """What only the data can tell: the networks' patches tile its inputs, a batch fits in it,
    and an in-memory evaluation asks for no more samples than the data has (capped, said so)."""
    patch = models[s.model]["patch_size"]
    if H % patch:
        raise SystemExit(f"error: --data {s.data}: its {H}x{H} inputs do not split into the "
                         f"{patch}x{patch} patches of --model {s.model} (--image-size?)")
    if s.global_batch_size > len(data):
        raise SystemExit(f"error: --global-batch-size {s.global_batch_size} is larger than the "
                         f"{len(data)} examples of --data {s.data}")
    K = data.num_classes
    if data.in_memory and s.eval_every and s.eval_samples > len(data):
        s.eval_samples = max(len(data) // K, 1) * K
        print0(f"--eval-samples: the data has {len(data)} examples; evaluating "
               f"{s.eval_samples}")


def restore(trainer, ckpt, path, seed, world, rank, device):
    """Every part of the objective and this rank's RNG from a checkpoint (if any) -> (step,
    this rank's data position). With another number of processes the data order is kept, the
    noise is new."""
    if ckpt is None:
        return 0, 0
    try:
        for key, part in trainer.state().items():
            part.load_state_dict(ckpt[key])
    # e.g. another --model on the command line than in the run
    except RuntimeError as e:
        why = str(e).strip().split("\n")[-1].strip()[:150]
        raise SystemExit(f"error: --resume {path}: does not fit the networks ({why})") from None
    if len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    else:
        print0(f"resume: {len(ckpt['rng'])} RNG states for {world} processes; reseeding")
        torch.manual_seed((seed + ckpt["step"]) * world + rank)
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["data_position"]


def save_checkpoint(trainer, s, run_dir, step, position, rank, device):
    """Plain tensors and plain Python (torch.load(weights_only=True) reads it), written
    atomically, with every rank's RNG state (gathered to rank 0: every rank calls this) for an
    exact resume."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    rng = [mine]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, mine)
    if rank == 0:
        ckpt = {key: part.state_dict() for key, part in trainer.state().items()}
        ckpt.update(args=vars(s), step=step, data_position=position, rng=rng)
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        save_atomic(ckpt, path)
        print0(f"saved checkpoint {path}")


class Log:
    """The printed lines and log.jsonl (rank 0 writes): the training terms averaged over the
    steps since the last line (D-step and G-step terms each over its own steps) and over the
    ranks, the training speed (evaluations excluded) and the time left; and the evaluations."""

    def __init__(self, run_dir, max_steps, world):
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.world = world
        self.restart()

    def restart(self):
        self.sums = {}  # name -> (sum on the device, count)
        self.steps = 0
        self.start = time.time()

    def add(self, terms):
        for k, v in terms.items():
            total, count = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + v.detach().float(), count + 1)
        self.steps += 1

    def training(self, step, sums, plot):
        """The line of `step` from the means summed over ranks; then a new window."""
        means = {k: v / self.world for k, v in sums.items()}
        means["it_per_s"] = self.steps / (time.time() - self.start)
        eta = (self.max_steps - step) / means["it_per_s"]
        terms = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        print0(f"step {step:07d} | {terms} | eta {eta / 3600:.0f}h{eta % 3600 / 60:02.0f}m")
        self.write({"step": step, **means}, plot)
        self.restart()

    def evaluation(self, step, metrics, seconds):
        self.start += seconds  # evaluation time is not training time: excluded from it/s
        terms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print0(f"eval {step:07d} | {terms} | {seconds:.1f} s")
        self.write({"step": step, **metrics, "eval_seconds": seconds}, plot=True)

    def write(self, record, plot):
        if os.environ.get("RANK", "0") != "0":
            return
        with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if plot:
            plot_curves(self.run_dir)


# --------------------------------------------------------------------------------------
# Command line: the flags, then the settings (recipe or resumed run, then the flags given)
# --------------------------------------------------------------------------------------


def parser():
    """Every flag is optional: unset ones come from the recipe, or from the resumed run."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, usage=argparse.SUPPRESS,
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--recipe", choices=list(RECIPES), help="default: digits for --data digits, else 1nfe")
    a("--resume", help="a run folder or checkpoint to continue exactly")
    a("--init", help="CAFM: the flow model to post-train (an fm run, SiT-XL-2-256.pt)")
    # Data and networks.
    a("--data", help='"digits", an image folder, an npz of images, a latent cache')
    a("--unconditional", action="store_true", help="ignore class folders or labels")
    a("--vae", help="SD-VAE weights: encode images, decode samples")
    a("--image-size", type=positive, help="image folders: the crop size (256)")
    a("--model", choices=list(models), help="G's size (or the one network's)")
    a("--dis-model", choices=list(models), help="AFM, CAFM: D's size (--model's)")
    a("--repeat", type=positive, help="AFM deep: block repeats (2: 56, 4: 112 layers)")
    a("--grad-checkpoint", action="store_true", help="recompute activations in backward")
    # The method (paper Sec. 3): AFM's; CAFM reads --ot, --cp, --n-dis and --warmup.
    a("--steps", type=lambda t: t if t == "any" else positive(t),
      help='AFM: NFE G is trained for: 1, k or "any"')
    a("--pred", choices=["x", "v"], help="AFM: x-prediction (1 NFE) or velocity")
    a("--ot", type=float, help="AFM: transport weight at step 0; CAFM: of mean(v^2)")
    a("--ot-end", type=float, help="AFM: transport weight after the cosine decay")
    a("--decay-steps", type=positive, help="AFM: length of the cosine decay")
    a("--gp", type=float, help="AFM: R1/R2 weight")
    a("--gp-ratio", type=float, help="AFM: share of the batch for R1/R2")
    a("--gp-eps", type=float, help="AFM: finite-difference step of R1/R2")
    a("--cp", type=float, help="AFM: logit centering; CAFM: D's centering")
    a("--augment-p", type=float, help="AFM: discriminator augmentation probability")
    a("--ttur", type=positive, help="AFM: D steps per G step")
    a("--n-dis", type=positive, help="CAFM: D steps per G step after the warm-up")
    a("--warmup", type=int, help="CAFM: D-only steps at the start")
    a("--cls", help="AFM: guidance classifier (a classifier run, classifier.pth)")
    a("--cg", type=float, help="AFM: guidance weight")
    a("--cg-range", type=float, nargs=2, help="AFM: t_cg range LO HI")
    a("--cg-t", choices=["uniform", "tgt"], help="AFM: t_cg ~ U(range) (1 NFE), or t_tgt")
    a("--cg-renoise", action=argparse.BooleanOptionalAction,
      help="AFM: re-noise the fake to t_cg (default; see afm.py's guidance)")
    # Optimizers and the loop.
    a("--lr", type=float, help="G's (or the one network's) learning rate")
    a("--lr-d", type=float, help="AFM, CAFM: D's learning rate (--lr's)")
    a("--clip", type=float, help="gradient-norm clipping")
    a("--ema", type=float, help="EMA decay of G (or the one network)")
    a("--global-batch-size", type=positive, help="split over the processes")
    a("--max-steps", type=positive, help="loop steps (a D step and a G step are two)")
    a("--precision", choices=["fp32", "bf16"], help="fp32 (+TF32 on GPU) or bf16")
    a("--compile", action="store_true", help="torch.compile the transformer blocks")
    a("--device", choices=["auto", "cpu"], help="auto: a GPU when there is one")
    a("--workers", type=int, help="DataLoader workers per process (4)")
    a("--seed", type=int, help="weights, data order, grid and evaluation noise (0)")
    a("--results-dir", help="where run folders are made (results)")
    a("--log-every", type=positive, help="print and log the training terms")
    a("--sample-every", type=int, help="a grid of samples from fixed noise (0: never)")
    a("--sample-steps", type=positive, help="NFE of grids and evaluations")
    a("--sample-solver", choices=["euler", "heun"], help="flow, CAFM: the grids' solver")
    a("--ckpt-every", type=positive, help="save a checkpoint (and at the end)")
    a("--eval-every", type=int, help="evaluate the EMA generator (0: never)")
    a("--eval-samples", type=positive, help="class-balanced samples per evaluation")
    a("--eval-ref", help="FID reference: an ADM batch, or fid.py --make-ref's")
    a("--inception", help="FID Inception weights (default: ~/.cache/afm)")
    return p


def resolve(argv=None):
    """-> (settings, checkpoint or None, its file). A new run: its recipe's values, then the
    flags given. A resumed run: the settings saved in its checkpoint, then the flags given."""
    given = vars(parser().parse_args(argv))
    ckpt = None
    path = None
    if "resume" in given:
        path, ckpt = load_checkpoint(given["resume"], "--resume")
        if "args" not in ckpt:
            raise SystemExit(f"error: --resume {path}: a bare state dict has no step, optimizer "
                             f"or data position to resume; sample from it with sample.py")
        base = ckpt["args"]
    else:
        digits = given.get("data", "digits") == "digits"
        name = given.get("recipe", "digits" if digits else "1nfe")
        base = {**DEFAULTS, **RECIPES[name], "recipe": name}
        if name in OURS and given.get("steps", 1) != 1:
            base.update(MULTI_STEP)
        if name == "deep" and "lr" not in given:
            base["lr"] = 1e-4 / given.get("repeat", 2)  # the release's "lr / depth"
    s = argparse.Namespace(**{**base, **given})
    s.dis_model = s.dis_model or s.model  # D defaults to G's size
    s.lr_d = s.lr_d or s.lr  # the release: dis_lr = gen_lr, except in the deep recipe
    error = check(s, ckpt is not None)
    if error:
        raise SystemExit(f"error: {error}")
    return s, ckpt, path


def check(s, resumed):
    """The first problem with these settings, in one line, or None: a file that is not
    there, or a flag combination that the release does not have."""
    files = ["vae", "cls", "eval_ref", "inception", "data"] + ([] if resumed else ["init"])
    for key in files:
        path = getattr(s, key)
        if path and path != "digits" and not os.path.exists(path):
            return f"--{key.replace('_', '-')} {path}: no such file or folder"
    if s.objective == "cafm" and s.init is None:
        return f"--recipe {s.recipe} post-trains a flow model: name it with --init"
    if s.init is not None and s.objective != "cafm":
        return f"--init starts a CAFM run (--recipe cafm or cafm-digits), not {s.recipe}"
    if s.objective != "afm" or resumed:
        return None
    kind = {1: "1nfe", "any": "any"}
    wanted = kind.get(s.steps, "knfe")
    if s.recipe not in OURS and wanted != kind.get(RECIPES[s.recipe]["steps"], "knfe"):
        return f"--steps {s.steps} does not fit --recipe {s.recipe}: use --recipe {wanted}"
    if (s.repeat > 1) != (s.recipe == "deep"):
        return "--repeat: the deep generator is --recipe deep (2 or 4); others have 1"
    if s.cls and s.cg <= 0:
        return "--cls without a guidance weight: use --recipe 1nfe-cg or knfe-cg, or --cg"
    if s.cg > 0 and not s.cls:
        return f"--recipe {s.recipe} guides with a classifier: name it with --cls"
    if s.steps == 1 and (s.sample_steps or 1) != 1:
        return f"--sample-steps {s.sample_steps}: a 1-NFE generator samples in one step only"


if __name__ == "__main__":
    main(*resolve())

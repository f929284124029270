"""
Adversarial Flow Models (AFM; Lin, Yang, Lin, Chen, Fan, arXiv 2511.22475): the method alone.

This file imports torch and the standard library only. Copy it next to your own networks and
trainer. A training step is either a discriminator step or a generator step:

    loss = AdversarialFlowLoss(steps=1, pred="x", ot=0.2, ot_end=0.005)

    # D step: G makes the fakes without gradient; only D learns
    loss_d, logs = loss.d_loss(G, D, x0, y, step)
    loss_d.backward()
    opt_d.step()
    opt_d.zero_grad()

    # G step: gradients flow through D into G; D's weights must get none. D stays frozen
    # through backward too, so that a recomputation (gradient checkpointing) sees one graph.
    with frozen(D):
        loss_g, logs = loss.g_loss(G, D, x0, y, step)
        loss_g.backward()
    opt_g.step()
    opt_g.zero_grad()
    ema_update(G_ema, G, 0.9999)  # after each generator update

    x = generate(G_ema, z, y, steps=1, pred="x")  # sampling: noise -> data

The loss's state (its gradient normalization, `loss.state_dict()`) belongs in checkpoints; it
follows the gradients onto their device by itself.

Wiring your networks. The contract:
    G(x_src, y, t_src, t_tgt) returns a tensor of x0's shape (the jump's target, or with
      pred="v" a velocity); any callable.
    D(x, y, t) returns (B,) float scores, one per example; an nn.Module, so that `frozen` can
      keep its weights out of G's backward.
    t is in [0, 1], with the data at t = 0 and the noise at t = 1: x_t = (1 - t) x0 + t z.
A wrong shape, a plain function as D or a missing null class stops the first step with one line
naming the fix.
  DiT (facebookresearch/DiT, models.py) is called as dit(x, t, y), with t on its diffusion
    scale: feed t x 1000. Its default learn_sigma=True returns 2C channels (the last C are its
    variance): drop the extra C. G = lambda x, y, t_src, t_tgt: dit(x, 1000 * t_src, y)[:, :C].
    Its labels drop to a null class in train mode (class_dropout_prob=0.1 by default, for
    guidance): pass 0 unless you want that.
  SiT (willisma/SiT, models.py) is DiT with flow time, which runs the other way: noise at 0,
    data at 1, embedded unscaled. Feed 1 - t, and negate its output, a velocity dx/ds with
    s = 1 - t: v = lambda x, y, t, _: -sit(x, 1 - t, y) (SiT drops the learn_sigma channels
    itself). That is the velocity `flow_matching_loss`, `ContinuousAdversarialFlowLoss` and
    `generate(..., pred="v")` expect. CAFM drops labels itself: build SiT with
    class_dropout_prob=0 and one class more (the release's 1001, the rows of SiT-XL-2-256.pt)
    and pass that last row as null_class (1000).
  D from a DiT: its own head maps each patch back to pixels (zero-initialised), not to one
    score. Read a learned token instead, as model.py's Discriminator does (a token `dis_embed`
    prepended to the patches, its final state through a norm and a Linear). Measured by
    lifting this file alone into DiT's repository, DiT's own classes at the T/2 size, one-step
    AFM on the built-in digits (ot 0.25, Adam betas (0, 0.9), lr 5e-4, batch 32), 1,500 G
    steps, seeds 0, 1, 2: of 1,000 class-balanced samples of G, the share whose nearest real
    digit has their class (fid.py's pixel_report agreement) was 0.55, 0.32, 0.42 with DiT's
    map averaged to (B,) and 0.71, 0.77, 0.76 with a token head.

Beside it, flow matching (the baseline the paper compares with), continuous AFM (CAFM, arXiv
2604.11521: a flow model post-trained against a discriminator read through its derivative;
`ContinuousAdversarialFlowLoss`, same two steps, `is_g_step` says which), the guidance
classifier's loss and the EMA update. Where the paper and the authors' release differ, the
release's behaviour is followed, since its checkpoints were trained with it
(ByteDance-Seed/Adversarial-Flow-Models, commit dc11741: `train_adversarial_flow.py`,
`grad_norm.py`, `configs/train/*.yaml`; commit 519601d for flow matching and CAFM).
toy.py trains the release's 1-D toys with it:

    python toy.py            # AFM, flow matching and CAFM on the 1-D toy, about a minute
    python toy.py --ot 0     # the same without AFM's transport cost
"""

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# --------------------------------------------------------------------------------------
# Paths and timesteps. Notation: x_t = (1 - t) x0 + t z, data x0 at t = 0, noise z at t = 1.
# --------------------------------------------------------------------------------------


def interp(x0, z, t):
    """The straight (rectified-flow) path between data x0 (t=0) and noise z (t=1)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * z


def sample_timesteps(steps, n, device):
    """(t_src, t_tgt) per example. The generator is trained to move a sample of the t_src
    marginal to the t_tgt marginal in one evaluation (paper Sec. 3.3):
      steps=1:   t_src = 1, t_tgt = 0 (noise -> data, the 1-NFE model);
      steps=k:   t_src uniform on the grid {1, (k-1)/k, ..., 1/k}, t_tgt = t_src - 1/k, so that
                 k consecutive evaluations from t=1 land on t=0 (`generate` below);
      "any":     t_src ~ U(0, 1), t_tgt ~ U(0, 1) * t_src: any jump, for any number of steps."""
    if steps == "any":
        t_src = torch.rand(n, device=device)
        t_tgt = torch.rand(n, device=device) * t_src
        return t_src, t_tgt
    grid = torch.arange(1.0, 0.0, -1 / steps, device=device)  # (k,) = 1, (k-1)/k, ..., 1/k
    t_src = grid[torch.randint(0, steps, (n,), device=device)]
    return t_src, t_src - 1 / steps


def cosine_schedule(step, start, end, steps):
    """The release's cosine decay of the transport weight: `start` at step 0, `end` at step
    `steps - 1` and after. The loop's step counts D and G steps alike, as the release's does."""
    if step >= steps - 1:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * step / (steps - 1))) / 2


# --------------------------------------------------------------------------------------
# Gradient normalization, augmentation, freezing
# --------------------------------------------------------------------------------------


class GradientNormalization(nn.Module):
    """Identity forward; backward divides the incoming gradient g by sqrt(s) + eps, where s is an
    EMA (decay 0.9, starting from 0, no bias correction: the release's grad_norm.py) of
    sum(g^2) * numel(g), held in the buffer `square_avg` (the release's name, saved in
    checkpoints).

    Why numel: sum(g^2) of a mean-reduced loss shrinks like 1/numel, so sum(g^2) * numel does not
    depend on the batch or image size. Why all ranks agree: s is averaged across ranks before the
    EMA, so every rank applies the same scale and DDP stays consistent. Its effect: the
    adversarial gradient reaching G has a fixed scale (about 1 / sqrt(numel) per element)
    whatever the discriminator's logit scale, so `ot` alone sets its balance with the transport
    cost."""

    def __init__(self, decay=0.9, eps=1e-8):
        super().__init__()
        self.decay = decay
        self.eps = eps
        self.register_buffer("square_avg", torch.tensor(0.0))

    def forward(self, x):
        x = x.clone()  # the hook below replaces the gradient flowing back through this copy
        if x.requires_grad:
            x.register_hook(self.normalize)
        return x

    def normalize(self, g):
        if self.square_avg.device != g.device:  # the state follows the gradient (same dtype)
            self.square_avg = self.square_avg.to(g.device)
        sq = g.float().square().sum() * g.numel()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq)  # SUM, then divide: gloo has no AVG
            sq = sq / dist.get_world_size()
        self.square_avg.lerp_(sq, 1 - self.decay)
        scale = 1 / (self.square_avg.sqrt() + self.eps)
        return g * scale.to(g.dtype)


def augment(real, fake, p, translate=0.3, erase=(0.1, 0.5), ratio=(0.3, 3.3), n_erase=3):
    """Discriminator augmentation, applied identically to real[i] and fake[i]: the two are
    concatenated along channels, as the release does. Each transform fires per example with
    probability p: a translation by (U(0, translate) * W, U(0, translate) * H) pixels, nearest,
    zero fill; then three erasings of a rectangle of area U(erase) * H * W and aspect ratio
    log-uniform in `ratio`, filled with 0."""
    if p <= 0:
        return real, fake
    x = torch.cat([real, fake], dim=1)  # (N, 2C, H, W)
    N, _, H, W = x.shape
    dev = x.device
    rows = torch.arange(H, device=dev).view(1, H, 1)
    cols = torch.arange(W, device=dev).view(1, 1, W)

    # Translation: output pixel (r, c) reads input pixel (r - dy, c - dx), zero outside.
    on = torch.rand(N, device=dev) < p
    dx = (torch.rand(N, device=dev) * translate * W).round().long()
    dx = torch.where(on, dx, 0).view(N, 1, 1)
    dy = (torch.rand(N, device=dev) * translate * H).round().long()
    dy = torch.where(on, dy, 0).view(N, 1, 1)
    src_r = rows - dy
    src_c = cols - dx
    valid = (src_r >= 0) & (src_c >= 0)  # (N, H, W)
    idx = src_r.clamp(min=0) * W + src_c.clamp(min=0)  # (N, H, W)
    idx = idx.view(N, 1, H * W).expand(-1, x.shape[1], -1)  # (N, 2C, H * W)
    x = x.flatten(2).gather(2, idx).view_as(x) * valid.unsqueeze(1)

    # Random erasing, n_erase times.
    log_lo = math.log(ratio[0])
    log_hi = math.log(ratio[1])
    for _ in range(n_erase):
        on = torch.rand(N, device=dev) < p
        area = (erase[0] + (erase[1] - erase[0]) * torch.rand(N, device=dev)) * H * W
        aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(N, device=dev))
        h = (area * aspect).sqrt().round().clamp(1, H).long().view(N, 1, 1)
        w = (area / aspect).sqrt().round().clamp(1, W).long().view(N, 1, 1)
        top = (torch.rand(N, 1, 1, device=dev) * (H - h + 1)).floor().long()
        left = (torch.rand(N, 1, 1, device=dev) * (W - w + 1)).floor().long()
        inside_rows = (rows >= top) & (rows < top + h)
        inside_cols = (cols >= left) & (cols < left + w)
        box = inside_rows & inside_cols & on.view(N, 1, 1)  # (N, H, W)
        x = x * ~box.unsqueeze(1)
    return x.chunk(2, dim=1)


def need_module(net):
    """A network whose weights must be frozen in G's step (D, the guidance classifier) has to be
    an nn.Module: weights hidden in a plain callable cannot be found, so they would get
    gradients in the G step that add into the next D update."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"got a {type(net).__name__}, not an nn.Module: wrap the callable in an "
                        f"nn.Module so its weights can be frozen in the G step (a plain "
                        f"callable's weights get gradients there that add into the next D update)")


@contextlib.contextmanager
def frozen(module):
    """Parameters of `module` do not require grad inside the block; gradients still flow through
    the module to its inputs. The autograd graph remembers this, so restoring afterwards is safe."""
    need_module(module)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------
# What the networks must return (see "Wiring your networks" above)
# --------------------------------------------------------------------------------------


def g_output(out, x):
    """G's output, checked to have the shape of its input x. A DiT with learn_sigma=True returns
    twice the channels; broadcasting would turn that into a wrong loss, not an error."""
    if out.shape != x.shape:
        raise ValueError(f"G returned {tuple(out.shape)} for x0 of {tuple(x.shape)}: G must "
                         f"return x0's shape (DiT with learn_sigma=True: keep the first C "
                         f"channels)")
    return out


def d_scores(D, x, y, t):
    """D(x, y, t), checked to be one score per example, (B,). A map (B, 1, h, w) or a (B, 1)
    would broadcast against the (B,) weights of R1/R2 into a wrong loss, or fail far from here."""
    out = D(x, y, t)
    if out.shape != (x.shape[0],):
        raise ValueError(f"D returned {tuple(out.shape)} for {x.shape[0]} inputs: D must "
                         f"return (B,) scores (average a DiT-style (B, 1, h, w) map over its "
                         f"pixels; squeeze a (B, 1))")
    return out


def detached(logs):
    """Logged values carry no graph: a trainer that keeps them does not keep a step alive."""
    return {k: v.detach() for k, v in logs.items()}


# --------------------------------------------------------------------------------------
# The AFM objective (paper Sec. 3; the release's train_adversarial_flow.py)
# --------------------------------------------------------------------------------------


class AdversarialFlowLoss:
    """The AFM objective. `G(x_src, y, t_src, t_tgt)` is any callable, `D(x, y, t)` an nn.Module
    (the file's docstring says what each returns); `x0` is a data batch of any shape (B, ...).
    Each training step is either a discriminator step (`d_loss`) or a generator step (`g_loss`);
    both return (loss, logs), the logged values detached.

    Defaults are the release's 1-NFE ImageNet recipe (its configs/train/train_1nfe.yaml)."""

    def __init__(self, steps=1, pred="x", ot=0.2, ot_end=0.005, decay_steps=1_000_000, gp=0.25,
                 gp_ratio=0.25, gp_eps=0.01, cp=0.01, augment_p=0.0, classifier=None, cg=0.0,
                 cg_range=(0.0, 0.1), cg_t="uniform", cg_renoise=True):
        assert steps == "any" or (isinstance(steps, int) and steps >= 1), steps
        assert pred in ("x", "v") and cg_t in ("uniform", "tgt")
        self.steps = steps  # 1, k or "any": the jumps G is trained for (`sample_timesteps`)
        self.pred = pred  # "x": G returns the target; "v": the velocity of the straight path
        self.ot = ot  # transport weight at step 0 ...
        self.ot_end = ot_end  # ... decayed with a cosine to this ...
        self.decay_steps = decay_steps  # ... over this many loop steps
        self.gp = gp  # R1 / R2 weight
        self.gp_ratio = gp_ratio  # fraction of the batch R1 / R2 is computed on
        self.gp_eps = gp_eps  # finite-difference step of R1 / R2
        self.cp = cp  # logit-centering weight
        self.augment_p = augment_p
        self.classifier = classifier  # a frozen nn.Module C(x_t, t) -> logits (or None)
        self.cg = cg
        self.cg_range = cg_range
        self.cg_t = cg_t
        self.cg_renoise = cg_renoise
        self.gradnorm = GradientNormalization()

    # The loss's only state is the gradient normalization's running scale. Trainers save it (the
    # release's checkpoints call it "gradnorm") so that a resumed run continues exactly.
    def state_dict(self):
        return self.gradnorm.state_dict()

    def load_state_dict(self, sd):
        self.gradnorm.load_state_dict(sd)

    def ot_scale(self, step):
        return cosine_schedule(step, self.ot, self.ot_end, self.decay_steps)

    class Pairs(NamedTuple):
        """One batch of transport problems (see `pairs`)."""
        x_src: torch.Tensor  # sources, at t_src
        real: torch.Tensor  # real targets, at t_tgt (other noise than the source's)
        fake: torch.Tensor  # G's targets from x_src
        t_src: torch.Tensor
        t_tgt: torch.Tensor
        w: torch.Tensor  # |t_src - t_tgt|, at least 0.001: the jump's length

    def pairs(self, G, x0, y, grad):
        """One transport problem per example: a source x_src at t_src and a real target x_tgt at
        t_tgt, made with INDEPENDENT noises (the discriminator compares the marginals at t_tgt,
        not pairs), and the generator's fake target. For 1 NFE: x_src = z, x_tgt = x0."""
        t_src, t_tgt = sample_timesteps(self.steps, x0.shape[0], x0.device)
        x_src = interp(x0, torch.randn_like(x0), t_src)
        x_tgt = interp(x0, torch.randn_like(x0), t_tgt)
        with torch.set_grad_enabled(grad):
            out = g_output(G(x_src, y, t_src, t_tgt), x0)
        if self.pred == "v":
            # G predicts the velocity of the straight path: x_tgt = x_src + (t_tgt - t_src) v
            dt = (t_tgt - t_src).view(-1, *([1] * (x0.dim() - 1)))
            out = x_src + dt * out
        # w = |t_src - t_tgt| is the length of the jump: R1/R2 are weighted by it and the
        # transport cost divided by it (a longer jump may move samples further).
        w = (t_src - t_tgt).abs().clamp_min(0.001)
        return self.Pairs(x_src, x_tgt, out, t_src, t_tgt, w)

    def d_loss(self, G, D, x0, y, step):
        """The discriminator's loss (paper Sec. 3.2): relativistic pairing, finite-difference
        R1 and R2, and logit centering. G runs without gradient."""
        p = self.pairs(G, x0, y, grad=False)
        real, fake = augment(p.real, p.fake, self.augment_p)
        t = p.t_tgt
        w = p.w
        B = x0.shape[0]
        n = max(round(B * self.gp_ratio), 1)  # R1/R2 on a fraction of the batch
        eps = self.gp_eps
        real_gp = real[:n] + eps * torch.randn_like(real[:n])
        fake_gp = fake[:n] + eps * torch.randn_like(fake[:n])
        # One forward on everything: one DDP all-reduce, one compiled shape.
        x_all = torch.cat([real, fake, real_gp, fake_gp])
        y_all = torch.cat([y, y, y[:n], y[:n]])
        t_all = torch.cat([t, t, t[:n], t[:n]])
        logits = d_scores(D, x_all, y_all, t_all).float()
        d_real, d_fake, d_real_gp, d_fake_gp = logits.split([B, B, n, n])

        # Relativistic pairing: D is asked that each real scores above its paired fake.
        adv = F.softplus(-(d_real - d_fake)).mean()
        # Finite-difference R1 / R2: |D(x + eps e) - D(x)|^2 / eps^2 estimates |grad_x D . e|^2,
        # the squared gradient norm along a random direction, for reals (R1) and fakes (R2),
        # without double backprop. Weighted by gp * w.
        weight = self.gp * w[:n] / eps ** 2
        r1 = ((d_real_gp - d_real[:n]).square() * weight).mean()
        r2 = ((d_fake_gp - d_fake[:n]).square() * weight).mean()
        # Logit centering: the relativistic loss only sees differences; this keeps their sum near 0.
        cp = ((d_real + d_fake).square() * self.cp).mean()

        loss = adv + r1 + r2 + cp
        logs = {"d_adv": adv, "r1": r1, "r2": r2, "cp": cp,
                "logit_real": d_real.mean(), "logit_fake": d_fake.mean()}
        return loss, detached(logs)

    def g_loss(self, G, D, x0, y, step):
        """The generator's loss (paper Sec. 3.1): fool D, through gradient normalization, plus
        the transport cost, plus optional classifier guidance. D is frozen: gradients flow
        through it into G, its own weights get none."""
        p = self.pairs(G, x0, y, grad=True)
        fake = p.fake
        t = p.t_tgt
        real_aug, fake_aug = augment(p.real, fake, self.augment_p)
        ot_scale = self.ot_scale(step)
        with frozen(D):
            d_real = d_scores(D, real_aug, y, t).float()
            # the adversarial gradient reaching G is normalized
            d_fake = d_scores(D, self.gradnorm(fake_aug), y, t).float()
        adv = F.softplus(-(d_fake - d_real)).mean()
        # Transport cost: the squared distance each sample moves, per element, divided by the
        # jump length w. Among all maps that fool D, this selects the W2-optimal one.
        moved = (fake.float() - p.x_src).square().flatten(1).mean(1)  # (B,)
        ot = (moved * (ot_scale / p.w)).mean()
        loss = adv + ot
        logs = {"g_adv": adv, "ot": ot, "ot_scale": torch.tensor(ot_scale)}
        if self.classifier is not None and self.cg > 0:
            cg = self.guidance(fake, y, t)
            loss = loss + cg
            logs["cg"] = cg
        return loss, detached(logs)

    def guidance(self, fake, y, t_tgt):
        """Classifier guidance at training time (paper Sec. 3.5): cross-entropy of a frozen
        noisy-image classifier on the fake, scaled by cg, zero outside t_cg in [lo, hi].
          cg_t="uniform" (1 NFE): t_cg ~ U(lo, hi); with cg_renoise the fake is first moved to
            t_cg with fresh noise. NOTE: the release samples t_cg this way but reads the
            re-noising switch from another config key (default off), so its 1-NFE guided run fed
            the CLEAN fake with that t_cg; cg_renoise=False reproduces that.
          cg_t="tgt" (k NFE): t_cg = t_tgt, the fake as it is."""
        lo, hi = self.cg_range
        uniform = self.cg_t == "uniform"
        n = fake.shape[0]
        t_cg = torch.rand(n, device=fake.device) * (lo - hi) + hi if uniform else t_tgt
        renoise = uniform and self.cg_renoise
        x_cg = interp(fake, torch.randn_like(fake), t_cg) if renoise else fake
        with frozen(self.classifier):
            logits = self.classifier(x_cg, t_cg).float()
        ce = F.cross_entropy(logits, y, reduction="none") * self.cg
        in_range = (t_cg >= lo) & (t_cg <= hi)
        return torch.where(in_range, ce, 0.0).mean()


def classifier_loss(C, x0, y):
    """The guidance classifier's own objective (the release's train_classifier.py):
    cross-entropy on x_t = interp(x0, z, t), t ~ U(0, 1), so that it reads the class at every
    noise level the guidance will show it."""
    t = torch.rand(x0.shape[0], device=x0.device)
    logits = C(interp(x0, torch.randn_like(x0), t), t).float()
    loss = F.cross_entropy(logits, y)
    accuracy = (logits.argmax(1) == y).float().mean()
    return loss, detached({"cls_loss": loss, "acc": accuracy})


# --------------------------------------------------------------------------------------
# Flow matching: the baseline (the release's train_flow_matching_imagenet.py, commit 519601d)
# --------------------------------------------------------------------------------------


def drop_labels(y, p, null):
    """Classifier-free guidance's training half: each label becomes the null class `null` with
    probability p, so that the same network also learns the unconditional velocity (the
    release's flow-matching and CAFM trainers draw this mask first, in prepare_input)."""
    keep = torch.rand(y.shape[0], device=y.device) >= p
    if p == 0:  # nothing to drop (and perhaps no null class); the draw keeps the random stream
        return y
    return torch.where(keep, y, null)


def flow_matching_loss(v, x0, y):
    """Flow matching (rectified flow): regress the velocity of the same straight path,
    d x_t / dt = z - x0, at t ~ U(0, 1) (the release's "uniform" timesteps), with a plain MSE.

    How it relates to AFM: the same path and the same velocity parametrization as the k-NFE
    generator (`pred="v"`, called as v(x_t, y, t, t)), but one network, no discriminator and no
    transport term. Its ODE dx/dt = v(x, t), integrated from t = 1 to 0, is a deterministic
    noise -> data map, which AFM's transport cost also selects; flow matching needs many small
    steps to follow it, AFM learns the jump itself."""
    t = torch.rand(x0.shape[0], device=x0.device)
    z = torch.randn_like(x0)
    x_t = interp(x0, z, t)
    pred = g_output(v(x_t, y, t, t), x_t).float()
    loss = F.mse_loss(pred, z - x0)
    return loss, detached({"fm_loss": loss})


# --------------------------------------------------------------------------------------
# Continuous AFM (CAFM, arXiv 2604.11521): the release's models/cafm/jvp/discriminator.py and
# train_continuous_adversarial_flow_imagenet.py (commit 519601d)
# --------------------------------------------------------------------------------------


def flow_derivative(D, x, y, t, u):
    """D read along a flow: J(u) = d/ds D(x + s u, y, t + s) at s = 0, a forward-mode
    derivative (a JVP with tangent (u, 1)). Returns (D(x, y, t), J(u)), (B,) each. With K
    tangents u of shape (K, B, ...), all go through one vmap'd JVP (the release's D step pairs
    the real and the generated velocity so) and both outputs are (K, B), D's value repeated.

    What J measures: J(u) = <grad_x D(x, y, t), u> + dD/dt, the rate at which D's score changes
    for a sample that moves with velocity u as time advances, i.e. D along the trajectory that
    u draws through (x, t). It is linear in u: two velocities at the same (x, t) differ by
    <grad_x D, u1 - u2>, so D's gradient in x is the direction in which it tells them apart.

    Attention runs through PyTorch's math kernel here, on every device: forward-mode autodiff
    needs a derivative rule for each operation, and the fused CPU attention kernel has none (the
    release's CAFM trainer turns the fused CUDA kernels off as well)."""
    def d_of(x, t):
        return d_scores(D, x, y, t)

    def one(u, dt):
        return torch.func.jvp(d_of, (x, t), (u, dt))

    with sdpa_kernel(SDPBackend.MATH):
        if u.dim() == x.dim():
            return one(u, torch.ones_like(t))
        dt = torch.ones(u.shape[0], *t.shape, dtype=t.dtype, device=t.device)  # (K, B)
        return torch.func.vmap(one)(u, dt)


class FlowDerivative(nn.Module):
    """A discriminator with its flow derivative as one module: forward(x, y, t, u) returns
    `flow_derivative(D, x, y, t, u)`. The CAFM losses take D in this form, so that DDP can wrap
    the whole JVP, DDP(FlowDerivative(D)), as the release wraps its DiscriminatorJVP: DDP's
    forward must be the outermost call, not one inside torch.func's transforms."""

    def __init__(self, D):
        super().__init__()
        need_module(D)  # its weights are frozen in G's step through this module
        self.D = D

    def forward(self, x, y, t, u):
        return flow_derivative(self.D, x, y, t, u)


def cafm_is_g_step(step, n_dis, warmup):
    """The release's schedule (its is_dis_step): steps 0 to `warmup` (inclusive) train D alone;
    after them, of every 1 + n_dis steps one trains G (step % (1 + n_dis) == n_dis), the others
    D. The loop's step counts D and G steps alike."""
    return step > warmup and step % (1 + n_dis) == n_dis


class ContinuousAdversarialFlowLoss:
    """The CAFM objective. `G(x_t, y, t, t)` is a velocity network, called as flow matching calls
    it. The discriminator D(x, y, t) -> (B,) scores comes as `D_flow = FlowDerivative(D)` (under
    DDP, `DDP(FlowDerivative(D))`). Same path as flow matching: x_t = (1 - t) x0 + t z,
    t ~ U(0, 1), real velocity z - x0. CAFM keeps the flow (sampling integrates
    dx/dt = G(x, y, t, t), `generate(..., pred="v")`) but replaces flow matching's MSE to the
    real velocity by a learned critic of velocities: D, read through its derivative along the
    flow (`flow_derivative`).

    Each step is a D step (`d_loss`) or a G step (`g_loss`), as `is_g_step(step)` says; both
    return (loss, logs), the logged values detached, and are used as AdversarialFlowLoss's are
    (the file's docstring), with D_flow in place of D. The EMA of G moves after G steps only.

    Defaults are the release's post-training of SiT-XL/2 (configs/train/cafm/
    train_cafm_sit.yaml): G and D both start from a flow-matching checkpoint. What the schedule
    means for a short run: the loop's steps 0 to `warmup` (default 10,000) are D steps only, so
    a run shorter than that makes no G step at all; after them `n_dis` D steps (default 16)
    come before each G step, so G moves on one loop step in n_dis + 1 (pass warmup=0 and a
    small n_dis to see G move in a few hundred steps).

    Labels become the null label `null_class` with probability `class_dropout`, the same for G
    and D, so that the model keeps its unconditional velocity for guidance; the networks need
    an embedding row for it and no dropout of their own (the release builds them with 1001
    classes and class_dropout_prob 0, its null label 1000). `null_class` is required whenever
    `class_dropout` > 0: it is that row's index (num_classes for DiT's and SiT's embedders)."""

    def __init__(self, n_dis=16, warmup=10_000, cp=0.001, ot=0.0, class_dropout=0.1,
                 null_class=None):
        if class_dropout > 0 and null_class is None:
            raise ValueError(f"class_dropout {class_dropout} drops labels to a null class: pass "
                             f"null_class= (its embedding row, e.g. num_classes), or "
                             f"class_dropout=0")
        self.n_dis = n_dis  # D steps per G step
        self.warmup = warmup  # D steps before the first G step
        self.cp = cp  # weight of D's centering
        self.ot = ot  # weight of G's kinetic energy mean(v^2) (0 for SiT)
        self.class_dropout = class_dropout
        self.null_class = null_class

    def is_g_step(self, step):
        # Why D takes many steps per G step: G only learns through J, D's derivative along G's
        # own velocities, and J means something only where D has learned to tell G's current
        # velocities from the real ones. G starts as a trained flow model, nearly right: D first
        # needs `warmup` steps of its own to find where G is still wrong (its head is new), then
        # n_dis steps per G step to follow each small change of G.
        return cafm_is_g_step(step, self.n_dis, self.warmup)

    def sample(self, x0, y):
        """(labels, t, z) of one batch, drawn in the order of the release's prepare_input."""
        y = drop_labels(y, self.class_dropout, self.null_class)
        t = torch.rand(x0.shape[0], device=x0.device)
        z = torch.randn_like(x0)
        return y, t, z

    def d_loss(self, G, D_flow, x0, y, step):
        """The discriminator's loss. G runs without gradient; one vmap'd JVP reads D along the
        real velocity and along G's, at the same (x_t, t)."""
        y, t, z = self.sample(x0, y)
        x_t = interp(x0, z, t)
        v_real = z - x0  # the velocity of this example's straight path
        with torch.no_grad():
            v_fake = g_output(G(x_t, y, t, t), x_t).to(x_t.dtype)
        d, j = D_flow(x_t, y, t, torch.stack([v_real, v_fake]))  # (2, B) each
        d = d.float()
        j_real, j_fake = j.float().unbind(0)
        # Least-squares targets (LSGAN's): D's derivative along real trajectories is regressed
        # to +1, along the generator's to -1. Real and fake share x_t, t and so dD/dt: only
        # <grad_x D, v_real - v_fake> can separate them, so D's x-gradient is pushed to point
        # from G's velocity towards the real one. Squares, not a sigmoid's log-loss: the pull
        # grows with the error and never saturates.
        adv = (j_real - 1).square().mean() + (j_fake + 1).square().mean()
        # Centering: both targets constrain D's derivative only, never its value, which may
        # drift by any constant. A small penalty on D(x_t)^2 keeps the value near 0.
        cp = d.square().mean() * self.cp
        loss = adv + cp
        logs = {"d_adv": adv, "cp": cp, "logit_real": j_real.mean(),
                "logit_fake": j_fake.mean(), "logit_out": d.mean()}
        return loss, detached(logs)

    def g_loss(self, G, D_flow, x0, y, step):
        """The generator's loss: its velocity should read +1 along D, the value real velocities
        are trained to, plus `ot` times its kinetic energy. D is frozen: the gradient flows
        through D's JVP (which is linear in G's velocity) into G; D's weights get none."""
        y, t, z = self.sample(x0, y)
        x_t = interp(x0, z, t)
        v_fake = g_output(G(x_t, y, t, t), x_t)
        with frozen(D_flow):
            _, j_fake = D_flow(x_t, y, t, v_fake.to(x_t.dtype))
        j_fake = j_fake.float()
        # J is linear in v_fake: G's gradient is 2 (J - 1) grad_x D, a step along the direction
        # D found to separate real from generated velocities at this (x_t, t).
        adv = (j_fake - 1).square().mean()
        ot = v_fake.float().square().mean() * self.ot
        loss = adv + ot
        logs = {"g_adv": adv, "ot": ot, "logit_fake": j_fake.mean()}
        return loss, detached(logs)


# --------------------------------------------------------------------------------------
# Sampling (paper Sec. 3.4) and the EMA
# --------------------------------------------------------------------------------------


@torch.no_grad()
def generate(G, z, y, steps=1, pred="x", solver="euler", cfg=1.0, null=None, cfg_channels=None):
    """Noise z (t = 1) -> data (t = 0) in `steps` generator evaluations (NFE) on the grid
    t = linspace(1, 0, steps + 1): x-prediction returns the jump's target, v-prediction a
    velocity to step with. With solver="heun" (flow matching; the release validates its flow
    models with it), `steps` still counts evaluations: steps / 2 intervals, each an Euler
    predictor and a trapezoidal corrector, as the release's sampler.

    Classifier-free guidance (Ho & Salimans 2022), `cfg` != 1, for a velocity model trained with
    class dropout to the null label `null`: every evaluation runs the batch twice in one call,
    with its labels and with the null label, and steps with v_null + cfg * (v_cond - v_null)
    (cfg 0: the unconditional model). An evaluation then costs two network passes; `steps`
    still counts evaluations. `cfg_channels` k guides only the first k channels and keeps the
    conditional velocity in the others, as SiT's forward_with_cfg does with k = 3 of the 4
    latent channels (willisma/SiT, models.py, kept from DiT's "for exact reproducibility
    reasons"; its own comment calls guiding all channels "the standard approach"). The
    default, None, guides all channels: the definition, a guided velocity as a whole, for any
    number of channels (the digits have one). cfg == 1 runs the unguided code unchanged."""
    n = z.shape[0]
    if cfg != 1:
        assert pred == "v" and null is not None, "guidance: a velocity model with a null class"
        y = torch.cat([y, torch.full_like(y, null)])  # (2N,): conditional, then null

    def velocity(x, t_src, t_tgt):  # G at scalar times, guided when cfg != 1
        if cfg == 1:
            return G(x, y, t_src.expand(n), t_tgt.expand(n)).float()
        out = G(torch.cat([x, x]), y, t_src.expand(2 * n), t_tgt.expand(2 * n)).float()
        cond, uncond = out.chunk(2)  # (N, C, H, W) each
        v = uncond + cfg * (cond - uncond)
        if cfg_channels is None:
            return v
        return torch.cat([v[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)

    x = z
    if solver == "heun":
        assert pred == "v" and steps % 2 == 0, "Heun: velocity prediction, an even NFE"
        t = torch.linspace(1, 0, steps // 2 + 1, device=z.device)
        for i in range(steps // 2):
            dt = t[i] - t[i + 1]
            v1 = velocity(x, t[i], t[i])
            x_next = x - dt * v1
            v2 = velocity(x_next, t[i + 1], t[i + 1])
            x = x - dt * 0.5 * (v1 + v2)
        return x
    t = torch.linspace(1, 0, steps + 1, device=z.device)
    for i in range(steps):
        out = velocity(x, t[i], t[i + 1])
        x = out if pred == "x" else x - (t[i] - t[i + 1]) * out
    return x


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)

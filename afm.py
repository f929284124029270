"""
Adversarial Flow Models (AFM; Lin, Yang, Lin, Chen, Fan, arXiv 2511.22475): the method alone.

This file imports torch and the standard library only. Copy it next to your own networks and
trainer: `G(x_src, y, t_src, t_tgt)` and `D(x, y, t)` may be any callables (DiTs, small MLPs).

    loss = AdversarialFlowLoss(steps=1, pred="x", ot=0.2, ot_end=0.005)
    loss_d, logs = loss.d_loss(G, D, x0, y, step)     # a discriminator step
    loss_g, logs = loss.g_loss(G, D, x0, y, step)     # a generator step
    x = generate(G_ema, z, y, steps=1, pred="x")      # sampling: noise -> data

Beside it, flow matching (the baseline the paper compares with), the guidance classifier's loss
and the EMA update. Where the paper and the authors' release differ, the release's behaviour is
followed, since its checkpoints were trained with it (ByteDance-Seed/Adversarial-Flow-Models,
commit dc11741: `train_adversarial_flow.py`, `grad_norm.py`, `configs/train/*.yaml`).

    python afm.py            # the release's 1-D toy: AFM and flow matching, under a minute on a CPU
    python afm.py --ot 0     # the same without the transport cost
"""

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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


@contextlib.contextmanager
def frozen(module):
    """Parameters of `module` do not require grad inside the block; gradients still flow through
    the module to its inputs. The autograd graph remembers this, so restoring afterwards is safe."""
    params = []
    if isinstance(module, nn.Module):  # D may be any callable: only a module has weights to freeze
        params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------
# The AFM objective (paper Sec. 3; the release's train_adversarial_flow.py)
# --------------------------------------------------------------------------------------


class AdversarialFlowLoss:
    """The AFM objective. `G(x_src, y, t_src, t_tgt)` and `D(x, y, t)` are any callables; `x0` is
    a data batch of any shape (B, ...). Each training step is either a discriminator step
    (`d_loss`) or a generator step (`g_loss`); both return (loss, logs).

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
        self.classifier = classifier  # a frozen C(x_t, t) -> logits, for guidance (or None)
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

    def pairs(self, G, x0, y, grad):
        """One transport problem per example: a source x_src at t_src and a real target x_tgt at
        t_tgt, made with INDEPENDENT noises (the discriminator compares the marginals at t_tgt,
        not pairs), and the generator's fake target. For 1 NFE: x_src = z, x_tgt = x0."""
        t_src, t_tgt = sample_timesteps(self.steps, x0.shape[0], x0.device)
        x_src = interp(x0, torch.randn_like(x0), t_src)
        x_tgt = interp(x0, torch.randn_like(x0), t_tgt)
        with torch.set_grad_enabled(grad):
            out = G(x_src, y, t_src, t_tgt)
        if self.pred == "v":
            # G predicts the velocity of the straight path: x_tgt = x_src + (t_tgt - t_src) v
            dt = (t_tgt - t_src).view(-1, *([1] * (x0.dim() - 1)))
            out = x_src + dt * out
        # w = |t_src - t_tgt| is the length of the jump: R1/R2 are weighted by it and the
        # transport cost divided by it (a longer jump may move samples further).
        w = (t_src - t_tgt).abs().clamp_min(0.001)
        return x_src, x_tgt, out, t_src, t_tgt, w

    def d_loss(self, G, D, x0, y, step):
        """The discriminator's loss (paper Sec. 3.2): relativistic pairing, finite-difference
        R1 and R2, and logit centering. G runs without gradient."""
        _, real, fake, _, t, w = self.pairs(G, x0, y, grad=False)
        real, fake = augment(real, fake, self.augment_p)
        B = x0.shape[0]
        n = max(round(B * self.gp_ratio), 1)  # R1/R2 on a fraction of the batch
        eps = self.gp_eps
        real_gp = real[:n] + eps * torch.randn_like(real[:n])
        fake_gp = fake[:n] + eps * torch.randn_like(fake[:n])
        # One forward on everything: one DDP all-reduce, one compiled shape.
        x_all = torch.cat([real, fake, real_gp, fake_gp])
        y_all = torch.cat([y, y, y[:n], y[:n]])
        t_all = torch.cat([t, t, t[:n], t[:n]])
        logits = D(x_all, y_all, t_all).float()
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
        return loss, logs

    def g_loss(self, G, D, x0, y, step):
        """The generator's loss (paper Sec. 3.1): fool D, through gradient normalization, plus
        the transport cost, plus optional classifier guidance. D is frozen: gradients flow
        through it into G, its own weights get none."""
        x_src, real, fake, t_src, t, w = self.pairs(G, x0, y, grad=True)
        real_aug, fake_aug = augment(real, fake, self.augment_p)
        ot_scale = self.ot_scale(step)
        with frozen(D):
            d_real = D(real_aug, y, t).float()
            d_fake = D(self.gradnorm(fake_aug), y, t).float()  # normalized adversarial gradient
        adv = F.softplus(-(d_fake - d_real)).mean()
        # Transport cost: the squared distance each sample moves, per element, divided by the
        # jump length w. Among all maps that fool D, this selects the W2-optimal one.
        moved = (fake.float() - x_src).square().flatten(1).mean(1)  # (B,)
        ot = (moved * (ot_scale / w)).mean()
        loss = adv + ot
        logs = {"g_adv": adv, "ot": ot, "ot_scale": torch.tensor(ot_scale)}
        if self.classifier is not None and self.cg > 0:
            cg = self.guidance(fake, y, t)
            loss = loss + cg
            logs["cg"] = cg
        return loss, logs

    def guidance(self, fake, y, t_tgt):
        """Classifier guidance at training time (paper Sec. 3.5): cross-entropy of a frozen
        noisy-image classifier on the fake, scaled by cg, zero outside t_cg in [lo, hi].
          cg_t="uniform" (1 NFE): t_cg ~ U(lo, hi); with cg_renoise the fake is first moved to
            t_cg with fresh noise. NOTE: the release samples t_cg this way but reads the
            re-noising switch from another config key (default off), so its 1-NFE guided run fed
            the CLEAN fake with that t_cg; cg_renoise=False reproduces that.
          cg_t="tgt" (k NFE): t_cg = t_tgt, the fake as it is."""
        lo, hi = self.cg_range
        if self.cg_t == "uniform":
            t_cg = torch.rand(fake.shape[0], device=fake.device) * (lo - hi) + hi
        else:
            t_cg = t_tgt
        x_cg = fake
        if self.cg_t == "uniform" and self.cg_renoise:
            x_cg = interp(fake, torch.randn_like(fake), t_cg)
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
    return loss, {"cls_loss": loss, "acc": accuracy}


# --------------------------------------------------------------------------------------
# Flow matching: the baseline (the release's train_flow_matching_imagenet.py, commit 519601d)
# --------------------------------------------------------------------------------------


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
    pred = v(interp(x0, z, t), y, t, t).float()
    loss = F.mse_loss(pred, z - x0)
    return loss, {"fm_loss": loss}


# --------------------------------------------------------------------------------------
# Sampling (paper Sec. 3.4) and the EMA
# --------------------------------------------------------------------------------------


@torch.no_grad()
def generate(G, z, y, steps=1, pred="x", solver="euler"):
    """Noise z (t = 1) -> data (t = 0) in `steps` generator evaluations (NFE) on the grid
    t = linspace(1, 0, steps + 1): x-prediction returns the jump's target, v-prediction a
    velocity to step with. With solver="heun" (flow matching; the release validates its flow
    models with it), `steps` still counts evaluations: steps / 2 intervals, each an Euler
    predictor and a trapezoidal corrector, as the release's sampler."""
    n = z.shape[0]
    x = z
    if solver == "heun":
        assert pred == "v" and steps % 2 == 0, "Heun: velocity prediction, an even NFE"
        t = torch.linspace(1, 0, steps // 2 + 1, device=z.device)
        for i in range(steps // 2):
            dt = t[i] - t[i + 1]
            v1 = G(x, y, t[i].expand(n), t[i].expand(n)).float()
            x_next = x - dt * v1
            v2 = G(x_next, y, t[i + 1].expand(n), t[i + 1].expand(n)).float()
            x = x - dt * 0.5 * (v1 + v2)
        return x
    t = torch.linspace(1, 0, steps + 1, device=z.device)
    for i in range(steps):
        out = G(x, y, t[i].expand(n), t[i + 1].expand(n)).float()
        if pred == "x":
            x = out
        else:
            x = x - (t[i] - t[i + 1]) * out
    return x


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# --------------------------------------------------------------------------------------
# The 1-D toy of the release's notebooks/adversarial_flow_models.ipynb: N(0, 1) noise to a
# mixture of four narrow modes, 1 NFE, small MLPs. In 1-D the W2-optimal map is the monotone
# quantile map F^-1(Phi(z)), so how far a learned map is from it can be measured exactly.
# --------------------------------------------------------------------------------------

MODES = torch.tensor([-1.5, -0.5, 0.5, 1.5])
MODE_STD = 0.05


def toy_data(n):
    """(n, 1) samples of the equal-weight mixture of N(m, 0.05^2), m in MODES."""
    m = MODES[torch.randint(0, 4, (n,))]
    return (m + MODE_STD * torch.randn(n)).unsqueeze(1)


def exact_map(z, iters=60):
    """The monotone (W2-optimal) map F^-1(Phi(z)) of the toy, by bisection of the mixture's CDF."""
    def normal_cdf(x):
        return 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    target = normal_cdf(z)
    lo = torch.full_like(z, -3.0)
    hi = torch.full_like(z, 3.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        cdf = normal_cdf((mid.unsqueeze(-1) - MODES) / MODE_STD).mean(-1)
        below = cdf < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


class ToyNet(nn.Module):
    """A small MLP on sin/cos features of x (and of t), like the notebook's: it can be steep.
    Called as G(x, y, t_src, t_tgt) or D(x, y, t); labels are ignored. logit=True returns (N,)."""

    def __init__(self, width=128, use_t=False, logit=False):
        super().__init__()
        self.register_buffer("freq", torch.exp(torch.linspace(0, math.log(100), 32)))
        features = 64 * (2 if use_t else 1)
        self.net = nn.Sequential(nn.Linear(features, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))
        self.use_t = use_t
        self.logit = logit

    def forward(self, x, y, *t):
        a = x * self.freq  # (N, 32)
        feats = [a.sin(), a.cos()]
        if self.use_t:
            b = t[0].view(-1, 1) * self.freq
            feats += [b.sin(), b.cos()]
        out = self.net(torch.cat(feats, 1))  # (N, 1)
        if self.logit:
            return out.squeeze(1)
        return out


def train_toy_afm(ot=0.2, g_steps=2500, batch=256, lr=1e-3, seed=0):
    """AFM on the toy: alternating D and G steps, a constant transport weight -> the generator."""
    torch.manual_seed(seed)
    G = ToyNet()
    D = ToyNet(logit=True)
    loss_fn = AdversarialFlowLoss(ot=ot, ot_end=ot)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.9))
    y = torch.zeros(batch, dtype=torch.long)
    for step in range(2 * g_steps):
        if step % 2 == 0:
            loss, _ = loss_fn.d_loss(G, D, toy_data(batch), y, step)
            opt = opt_d
        else:
            loss, _ = loss_fn.g_loss(G, D, toy_data(batch), y, step)
            opt = opt_g
        loss.backward()
        opt.step()
        opt_d.zero_grad()
        opt_g.zero_grad()
    return G


def train_toy_flow(steps=3000, batch=256, lr=1e-3, seed=0):
    """Flow matching on the toy -> the velocity network."""
    torch.manual_seed(seed)
    v = ToyNet(use_t=True)
    opt = torch.optim.Adam(v.parameters(), lr=lr)
    y = torch.zeros(batch, dtype=torch.long)
    for _ in range(steps):
        loss, _ = flow_matching_loss(v, toy_data(batch), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return v


def map_error(G, steps=1, pred="x", n=20000, seed=1):
    """How far G's map is from the exact one: (RMS of G(z) - T(z), fraction of noise sent to
    another mode than the monotone map sends it to), over z ~ N(0, 1)."""
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))
    x = generate(G, z, torch.zeros(n, dtype=torch.long), steps, pred).squeeze(1)
    exact = exact_map(z.squeeze(1))
    rms = (x - exact).square().mean().sqrt().item()
    mode = (x[:, None] - MODES).abs().argmin(1)
    exact_mode = (exact[:, None] - MODES).abs().argmin(1)
    return rms, (mode != exact_mode).float().mean().item()


def draw_maps(curves, path, size=480):
    """A PNG of maps z -> x over z in [-3, 3]: `curves` is a list of (label, rgb, xs)."""
    from PIL import Image, ImageDraw  # only the picture needs PIL: the method keeps torch alone
    img = Image.new("RGB", (size + 200, size), "white")
    draw = ImageDraw.Draw(img)
    pad = 30
    span = size - 2 * pad

    def to_px(z, x):  # z in [-3, 3] -> left to right; x in [-2, 2] -> bottom to top
        return pad + (z + 3) / 6 * span, pad + (2 - x) / 4 * span

    draw.rectangle([pad, pad, pad + span, pad + span], outline=(180, 180, 180))
    for m in MODES.tolist():
        draw.line([to_px(-3, m), to_px(3, m)], fill=(230, 230, 230))
    z = torch.linspace(-3, 3, len(curves[0][2])).tolist()
    for i, (label, color, xs) in enumerate(curves):
        points = [to_px(a, b) for a, b in zip(z, xs)]
        draw.line(points, fill=color, width=2)
        draw.line([(size + 5, 40 + 20 * i), (size + 25, 40 + 20 * i)], fill=color, width=3)
        draw.text((size + 30, 34 + 20 * i), label, fill=0)
    draw.text((pad, size - pad + 8), "noise z from -3 to 3 (x: -2 to 2, modes in grey)", fill=0)
    img.save(path)


def main(args):
    torch.set_num_threads(1)  # small MLPs: one thread is faster than several
    z = torch.linspace(-3, 3, 400).unsqueeze(1)
    y = torch.zeros(400, dtype=torch.long)
    curves = [("exact W2 map", (0, 0, 0), exact_map(z.squeeze(1)).tolist())]
    print(f"1-D toy: N(0, 1) -> 4 modes at {MODES.tolist()}; distance to the exact monotone "
          f"(W2-optimal) map as RMS over z ~ N(0, 1), and the share of noise sent to a wrong mode")

    G = train_toy_afm(ot=args.ot, g_steps=args.g_steps)
    rms, wrong = map_error(G)
    print(f"AFM, ot {args.ot}, 1 step:     RMS {rms:.4f}, wrong mode {wrong:.1%}")
    xs = generate(G, z, y).squeeze(1).tolist()
    curves.append((f"AFM 1 step (ot {args.ot})", (31, 119, 180), xs))

    v = train_toy_flow(steps=args.fm_steps)
    colors = {1: (255, 187, 120), 4: (255, 127, 14), 32: (214, 39, 40)}
    for n in (1, 4, 32):
        rms, wrong = map_error(v, n, "v")
        print(f"flow matching, {n:2d} Euler step(s): RMS {rms:.4f}, wrong mode {wrong:.1%}")
        xs = generate(v, z, y, n, "v").squeeze(1).tolist()
        curves.append((f"flow, {n} Euler step(s)", colors[n], xs))
    draw_maps(curves, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="The 1-D toy: AFM and flow matching, and the exact map")
    p.add_argument("--ot", type=float, default=0.2, help="AFM transport weight (0: a plain GAN)")
    p.add_argument("--g-steps", type=int, default=2500, help="AFM generator steps")
    p.add_argument("--fm-steps", type=int, default=3000, help="flow-matching steps")
    p.add_argument("--out", default="afm_toy.png", help="the picture of the maps")
    main(p.parse_args())

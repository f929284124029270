"""
The 1-D toys of the AFM release (ByteDance-Seed/Adversarial-Flow-Models,
notebooks/adversarial_flow_models.ipynb and, at commit 519601d,
continuous_adversarial_flow_models.ipynb): N(0, 1) noise to a mixture of four narrow modes,
small MLPs, trained with afm.py's losses: AFM (arXiv 2511.22475), flow matching and continuous
AFM (CAFM, arXiv 2604.11521).

In 1-D the W2-optimal map is the monotone quantile map F^-1(Phi(z)), and so is every flow's
ODE map (1-D trajectories cannot cross), so how far a learned map is from it can be measured
exactly: the RMS distance to it, and the share of noise sent to another mode than it sends it
to. The picture draws each learned map z -> x beside the exact one.

    python toy.py            # AFM, flow matching and CAFM, about a minute; writes afm_toy.png
    python toy.py --ot 0     # the same without AFM's transport cost (a plain GAN)
"""

import argparse
import math
import warnings

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from afm import (AdversarialFlowLoss, ContinuousAdversarialFlowLoss, FlowDerivative, ema_update,
                 flow_matching_loss, frozen, generate)

# --------------------------------------------------------------------------------------
# The data and its exact map
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


# --------------------------------------------------------------------------------------
# The networks and their training
# --------------------------------------------------------------------------------------


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
        return out.squeeze(1) if self.logit else out  # D: (N,) logits


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
        # only the stepped network has gradients: G runs without grad in d_loss, D frozen in g_loss
        opt.zero_grad()
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


def train_toy_cafm(steps=2000, n_dis=8, batch=256, lr=1e-4, ema=0.9, seed=0):
    """CAFM on the toy, from scratch, as the release's continuous_adversarial_flow_models.ipynb
    trains it: N 8 D steps per G step from the first step, Adam (betas (0, 0.9), lr 1e-4),
    cp 0.001, ot 0, an EMA of 0.9 after each G step, 2,000 steps in all. A quarter of its batch
    (1024) and the small MLPs above, so that it runs in seconds on a CPU. -> the EMA velocity
    network."""
    torch.manual_seed(seed)
    G = ToyNet(use_t=True)
    D = FlowDerivative(ToyNet(use_t=True, logit=True))
    G_ema = ToyNet(use_t=True)
    G_ema.load_state_dict(G.state_dict())
    loss_fn = ContinuousAdversarialFlowLoss(n_dis=n_dis, warmup=0, cp=0.001, class_dropout=0)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.9))
    y = torch.zeros(batch, dtype=torch.long)
    for step in range(steps):
        if loss_fn.is_g_step(step):
            with frozen(D):
                loss, _ = loss_fn.g_loss(G, D, toy_data(batch), y, step)
                loss.backward()
            opt_g.step()
            ema_update(G_ema, G, ema)
        else:
            loss, _ = loss_fn.d_loss(G, D, toy_data(batch), y, step)
            loss.backward()
            opt_d.step()
        opt_d.zero_grad()
        opt_g.zero_grad()
    return G_ema


# --------------------------------------------------------------------------------------
# Measuring and drawing the maps
# --------------------------------------------------------------------------------------


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
    for n, color in ((1, (255, 187, 120)), (4, (255, 127, 14)), (32, (214, 39, 40))):
        rms, wrong = map_error(v, n, "v")
        print(f"flow matching, {n:2d} Euler step(s): RMS {rms:.4f}, wrong mode {wrong:.1%}")
        xs = generate(v, z, y, n, "v").squeeze(1).tolist()
        curves.append((f"flow, {n} Euler step(s)", color, xs))

    v = train_toy_cafm(steps=args.cafm_steps)
    rms, wrong = map_error(v, 64, "v")
    print(f"CAFM, 64 Euler steps:      RMS {rms:.4f}, wrong mode {wrong:.1%}")
    xs = generate(v, z, y, 64, "v").squeeze(1).tolist()
    curves.append(("CAFM, 64 Euler steps", (44, 160, 44), xs))
    draw_maps(curves, args.out)
    print(f"wrote {args.out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The 1-D toy: AFM, flow matching, CAFM, the exact map")
    p.add_argument("--ot", type=float, default=0.2, help="AFM transport weight (0: a plain GAN)")
    p.add_argument("--g-steps", type=int, default=2500, help="AFM generator steps")
    p.add_argument("--fm-steps", type=int, default=3000, help="flow-matching steps")
    p.add_argument("--cafm-steps", type=int, default=2000, help="CAFM steps, D and G together")
    p.add_argument("--out", default="afm_toy.png", help="the picture of the maps")
    return p.parse_args(argv)


if __name__ == "__main__":
    # torch's forward-mode autodiff loads decompositions through torch.jit.script, which warns
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
    main(parse_args())

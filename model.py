"""
The networks of Adversarial Flow Models (AFM, arXiv 2511.22475): a DiT generator, a DiT
discriminator, the deep (weight-repeated) generator and the DiT classifier used for guidance;
with SiT's conventions, the generator and discriminator of continuous AFM (CAFM, arXiv
2604.11521).

All four are plain DiTs (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"):
patch embedding + fixed 2-D sin-cos positions, a stack of adaLN-Zero transformer blocks
conditioned on `c = label embedding (+ timestep embeddings)`, and a head. The AFM variants
(the release's models/generator.py, generator_deep.py, discriminator.py, classifier.py) only
change what goes into `c` and what the head reads:

    Generator      c = y (+ t_src) (+ t_tgt)   head: adaLN final layer -> patches -> image
    Discriminator  c = y (+ t)                 head: learned token -> LayerNorm -> Linear -> 1 logit
    Classifier     c = t                       head: learned token -> LayerNorm -> Linear -> classes
    deep Generator blocks run `repeat` times, repetition r conditioned on y + t(1 - r/repeat)

Parameter names and shapes are the release's (which are DiT's), so the authors' checkpoints
(`xl2_1nfe_guided_FID2.38.pth`, `xl2_56layer_1nfe_guided_FID2.08.pth`, `classifier.pth`, ...)
load with `load_state_dict(sd, strict=True)`.

SiT (Ma et al. 2024, willisma/SiT) has DiT's layout and keys with `learn_sigma=True`; it differs
in its timestep convention (`sit_time=True`, below). CAFM post-trains it against a discriminator
of SiT's blocks with RMSNorm (`norm="rms"`), as the release does (ByteDance-Seed/
Adversarial-Flow-Models, commit 519601d: models/cafm/sit/{generator,discriminator}.py):

    SiT-XL-2-256.pt   Generator(**models["XL/2"], use_t_src=True, learn_sigma=True,
                                sit_time=True, num_classes=1001)
    CAFM's D          Discriminator(**models["XL/2"], use_t=True, sit_time=True, norm="rms",
                                    num_classes=1001), started by discriminator_from_flow

    python model.py          # parameter counts and forward GFLOPs of every registry entry
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------------------
# Registry of sizes: `--model` everywhere. DiT's S/B/L/XL, AFM's M (the release's
# configs/models/m2.yaml), and a tiny T for the built-in 8x8 digits on a laptop CPU.
# --------------------------------------------------------------------------------------

_sizes = {  # name: (depth, hidden_size, num_heads)
    "T": (3, 64, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (16, 1024, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _registry():
    """{"S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2), ...}"""
    out = {}
    for name, (depth, hidden_size, num_heads) in _sizes.items():
        # 8x8 inputs (the digits): patches of 1, 2 and 4 pixels
        patch_sizes = (1, 2, 4) if name == "T" else (2, 4, 8)
        for p in patch_sizes:
            out[f"{name}/{p}"] = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                      patch_size=p)
    return out


models = _registry()


# --------------------------------------------------------------------------------------
# Fixed embeddings
# --------------------------------------------------------------------------------------


def timestep_embedding(t, dim, max_period=10000):
    """DiT's sinusoidal timestep features: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half).
    `t` is what the embedder receives: t x 1000 (DiT's scale) or 1 - t (SiT's; `embed_time`)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / half)  # (half,)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


def pos_embed_sincos(dim, grid_size):
    """Fixed 2-D sin-cos positions (MAE / DiT): the first half of the channels encodes the
    column, the second half the row; each half is [sin(p w_i), cos(p w_i)],
    w_i = 10000^(-i/(dim/4)). Computed in float64 like the numpy original.
    Returns (grid_size**2, dim), row-major tokens."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # token k = (row k // g, col k % g)

    def embed_1d(pos):
        out = pos.reshape(-1, 1) * omega[None]  # (T, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (T, dim/2)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1)  # (T, dim)


# --------------------------------------------------------------------------------------
# Building blocks (names follow DiT / timm so that state dicts match)
# --------------------------------------------------------------------------------------


def norm_layer(kind, dim):
    """The weightless normalization of every block and head: DiT's LayerNorm, or (kind "rms")
    the RMSNorm of the release's CAFM discriminator. eps 1e-6 in both."""
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as one strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar timestep -> MLP -> hidden_size vector."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> vector. With class dropout (for classifier-free guidance, unused by AFM's
    recipes but present in some configs) an extra row `num_classes` is the null label."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # DiT uses the tanh GELU


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition c regresses shift/scale/gate for both sub-layers; gates
    start at zero (see `init_weights`), so every block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm="layer"):
        super().__init__()
        self.norm1 = norm_layer(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = norm_layer(norm, hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        mods = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """Generator head: adaLN-modulated LayerNorm, then a linear map of each token to a patch."""

    def __init__(self, hidden_size, patch_size, out_channels, norm="layer"):
        super().__init__()
        self.norm_final = norm_layer(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


def token_head(hidden_size, out_features, bias, norm="layer"):
    """Discriminator / classifier head on the learned token: a norm (no affine) -> Linear.
    As an nn.Sequential so the keys are the release's `final_layer.1.weight` (and `.bias`)."""
    return nn.Sequential(norm_layer(norm, hidden_size),
                         nn.Linear(hidden_size, out_features, bias=bias))


# --------------------------------------------------------------------------------------
# The shared trunk
# --------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Patch embedding + positions + adaLN-Zero blocks, with the embedders each variant needs.
    Subclasses take these arguments (`*args, **kw`) plus their own keywords, add a head and
    define forward. `grad_checkpointing = True` recomputes each block's activations in the
    backward pass (the 112-layer generator needs it on one GPU).

    Timesteps are always in [0, 1], data at t = 0 and noise at t = 1 (afm.py's path). What the
    timestep embedders receive (`embed_time`): DiT's scale, t x 1000; or with `sit_time` SiT's
    convention, 1 - t unscaled, since SiT was trained with noise at 0 and data at 1 and embeds
    its time in [0, 1]. `norm="rms"` puts non-affine RMSNorm in every block."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=1000,
                 learn_sigma=False, *, sit_time=False, norm="layer", t_embedder=True,
                 y_embedder=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm {norm!r}: expected 'layer' or 'rms'")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.out_channels = in_channels
        if learn_sigma:  # DiT's learned variance doubles the output channels
            self.out_channels = in_channels * 2
        self.sit_time = sit_time
        self.norm = norm
        self.grad_checkpointing = False
        # The modules are created in this order (x, t, y, blocks) so that random init draws as DiT
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = None
        if t_embedder:
            self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = None
        if y_embedder:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # A parameter, not a buffer, because DiT saves it in its state dict; it is never trained.
        pos = pos_embed_sincos(hidden_size, grid).float()[None]  # (1, T, D)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio, norm) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """DiT's initialization: xavier-uniform linears with zero bias, N(0, 0.02) embeddings,
        zero adaLN regressions (adaLN-Zero). Heads added by subclasses initialize themselves."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.t_embedder is not None:
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def embed_time(self, t):
        """What a timestep embedder receives for t in [0, 1] (see the class docstring)."""
        if self.sit_time:
            return 1 - t
        return t * 1000

    def run_blocks(self, x, c):
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return x  # (N, T, D)

    def compile_blocks(self):
        """Regional compilation: each transformer block is compiled in place, and all blocks
        share one compiled graph (same code, their weights are its inputs), so compile time does
        not grow with depth (28 blocks of XL/2, 112 block calls of the deep generator).
        State-dict keys stay plain: no `_orig_mod.`."""
        for block in self.blocks:
            block.compile(dynamic=False)
        return self

    def prepend_token(self, token, x):
        token = token.view(1, 1, -1).expand(x.shape[0], 1, -1)  # (N, 1, D)
        return torch.cat([token, x], dim=1)  # (N, T+1, D)

    def unpatchify(self, x):
        N, T, _ = x.shape
        p = self.patch_size
        C = self.out_channels
        g = int(T ** 0.5)  # tokens per side
        x = x.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
        return x.reshape(N, C, g * p, g * p)  # (N, C, H, W)


class Generator(DiT):
    """G(x_src, y, t_src, t_tgt) -> output shaped like x (x-prediction or velocity, per recipe).

    Timesteps are in [0, 1] and enter DiT's embedder multiplied by 1000 (the release's
    models/generator.py: "multiply 1000 to align scaling with original DiTs"), or as SiT's
    1 - t with `sit_time`.
    `use_t_src` keeps DiT's `t_embedder` for t_src (needed for multi-step), `use_t_tgt` adds a
    second embedder `t_tgt_embedder` (any-step). A 1-NFE generator has neither: c = label only.

    `repeat > 1` is the release's GeneratorDeep: the block stack runs `repeat` times with the
    same weights (XL/2 x2 = 56 layers, x4 = 112); repetition r is conditioned on
    y + t_embedder(1000 * (1 - r / repeat)), and the final layer on y alone. It keeps
    `t_embedder` for that schedule and ignores t_src / t_tgt.

    With `learn_sigma` (DiT's and SiT's layout) the head has 2C channels; the first C are the
    output, as SiT's forward returns them (the variance half is unused). With `sit_time` (a SiT
    velocity network, e.g. SiT-XL-2-256.pt) the output is negated: SiT's velocity is dx/ds with
    s = 1 - t, and dx/dt = -dx/ds. So v(x, y, t) = -SiT(x, 1 - t, y)[:, :C], as the release's
    models/cafm/sit/generator.py computes it.
    """

    def __init__(self, *args, use_t_src=False, use_t_tgt=False, repeat=1, **kw):
        if repeat > 1 and (use_t_src or use_t_tgt):
            raise ValueError("the deep generator (repeat > 1) is a 1-NFE model: "
                             "use_t_src/use_t_tgt must be False")
        super().__init__(*args, **kw, t_embedder=use_t_src or repeat > 1)
        self.repeat = repeat
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels,
                                      self.norm)
        # zero output at init
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.t_tgt_embedder = None
        # Added after DiT's init, as in the release: default bias init, N(0, 0.02) weights
        if use_t_tgt:
            self.t_tgt_embedder = TimestepEmbedder(self.hidden_size)
            nn.init.normal_(self.t_tgt_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_tgt_embedder.mlp[2].weight, std=0.02)

    def forward(self, x, y, t_src=None, t_tgt=None):
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.y_embedder(y)  # (N, D)
        if self.repeat > 1:
            for r in range(self.repeat):
                t = torch.full((x.shape[0],), 1 - r / self.repeat, device=x.device, dtype=c.dtype)
                h = self.run_blocks(h, c + self.t_embedder(self.embed_time(t)))
        else:
            if self.t_embedder is not None:
                c = c + self.t_embedder(self.embed_time(t_src))
            if self.t_tgt_embedder is not None:
                c = c + self.t_tgt_embedder(self.embed_time(t_tgt))
            h = self.run_blocks(h, c)
        out = self.unpatchify(self.final_layer(h, c))  # (N, out_channels, H, W)
        out = out[:, :self.in_channels]  # (N, C, H, W): without learn_sigma's variance half
        if self.sit_time:
            return -out
        return out


class Discriminator(DiT):
    """D(x, y, t) -> (N,) logits. A learned token `dis_embed` is prepended to the patch tokens
    (without a position); its final state, through a norm and a bias-free Linear, is the
    logit. `use_t` conditions on the timestep of x (multi-step recipes, and CAFM).

    CAFM's discriminator (the release's models/cafm/sit/discriminator.py) is this one with
    `use_t=True, sit_time=True, norm="rms"`: SiT's blocks and embedders, so that it can start
    from the same flow checkpoint as the generator (`discriminator_from_flow`)."""

    def __init__(self, *args, use_t=False, **kw):
        super().__init__(*args, **kw, t_embedder=use_t)
        self.dis_embed = nn.Parameter(torch.randn(self.hidden_size) * 0.02)
        self.final_layer = token_head(self.hidden_size, 1, bias=False, norm=self.norm)

    def forward(self, x, y, t=None):
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.y_embedder(y)  # (N, D)
        if self.t_embedder is not None:
            c = c + self.t_embedder(self.embed_time(t))
        h = self.run_blocks(self.prepend_token(self.dis_embed, h), c)  # (N, T+1, D)
        return self.final_layer(h[:, 0]).view(-1)  # (N,)


class Classifier(DiT):
    """C(x_t, t) -> (N, num_classes) logits, for classifier guidance (the release's
    models/classifier.py, trained by its train_classifier.py). Conditioned on the timestep only
    (no label embedder); reads a learned token `cls_embed`."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw, y_embedder=False)
        self.cls_embed = nn.Parameter(torch.randn(self.hidden_size) * 0.02)
        self.final_layer = token_head(self.hidden_size, self.num_classes, bias=True,
                                      norm=self.norm)

    def forward(self, x, t):
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(self.embed_time(t))  # (N, D)
        h = self.run_blocks(self.prepend_token(self.cls_embed, h), c)  # (N, T+1, D)
        return self.final_layer(h[:, 0])  # (N, num_classes)


def discriminator_from_flow(D, state_dict):
    """Start a discriminator from a flow model's weights (its SiT or DiT state dict), as the
    release starts CAFM's from SiT-XL-2-256.pt with strict=False: the trunk (embedders and
    blocks) is the flow model's; the token `dis_embed` and the head's `final_layer.1.weight`
    keep their fresh init; the flow model's own head (`final_layer.linear`,
    `final_layer.adaLN_modulation`) is left out. Anything else that does not fit is an error."""
    missing, unexpected = D.load_state_dict(state_dict, strict=False)
    new = {"dis_embed", "final_layer.1.weight"}
    unknown = [k for k in unexpected if not k.startswith("final_layer.")]
    if set(missing) != new or unknown:
        raise ValueError(f"not a flow model's state dict for this discriminator: missing "
                         f"{sorted(set(missing) - new)}, unexpected {sorted(unknown)}")
    return D


# --------------------------------------------------------------------------------------
# A generator from its state dict alone (sample.py's --ckpt, train.py's --init)
# --------------------------------------------------------------------------------------


def size_of(sd):
    """The registry name of a DiT state dict's size, from its depth, width and patch."""
    p = sd["x_embedder.proj.weight"].shape[2]
    hidden = sd["pos_embed"].shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for name, c in models.items():
        if (c["depth"], c["hidden_size"], c["patch_size"]) == (depth, hidden, p):
            return name
    raise ValueError(f"no size of model.py's registry has depth {depth}, width {hidden} and "
                     f"patch {p}")


def generator_config(sd, repeat=1):
    """-> (registry name, Generator keyword arguments) of the generator whose state dict is
    `sd`, ours or the release's, read from its keys: channels, patch and width (x_embedder,
    pos_embed), size (the number of positions), label rows (y_embedder; with class dropout
    the last row is the null class), depth (blocks), and timestep conditioning (t_embedder:
    t_src, t_tgt_embedder: t_tgt). The deep generator's t_embedder serves its repeats, which
    the keys cannot tell from t_src: pass `repeat`.

    One key test tells SiT's layout (SiT-XL-2-256.pt, the release's CAFM checkpoints) from the
    release's AFM generators: SiT's head `final_layer.linear` has 2C outputs per pixel (DiT's
    learned variance, learn_sigma), AFM's have C. SiT's are read with SiT's time (sit_time).
    DiT's own diffusion checkpoints share SiT's layout but predict noise: not supported."""
    if "x_embedder.proj.weight" not in sd or "final_layer.linear.weight" not in sd:
        raise ValueError("not a generator's state dict (no x_embedder, final_layer.linear)")
    name = size_of(sd)
    C = sd["x_embedder.proj.weight"].shape[1]
    p = sd["x_embedder.proj.weight"].shape[2]
    sit = sd["final_layer.linear.weight"].shape[0] == 2 * C * p * p
    t_embedder = "t_embedder.mlp.0.weight" in sd
    return name, dict(models[name], input_size=round(sd["pos_embed"].shape[1] ** 0.5) * p,
                      in_channels=C, num_classes=sd["y_embedder.embedding_table.weight"].shape[0],
                      use_t_src=t_embedder and repeat == 1,
                      use_t_tgt="t_tgt_embedder.mlp.0.weight" in sd, repeat=repeat,
                      learn_sigma=sit, sit_time=sit)


# --------------------------------------------------------------------------------------
# `python model.py`: parameter counts, forward GFLOPs and shape checks for the registry
# --------------------------------------------------------------------------------------


def default_input(name):
    """The usual input of a registry entry: SD-VAE latents of ImageNet-256, or the 8x8 digits."""
    return (1, 8) if name.startswith("T/") else (4, 32)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def forward_flops(model, *inputs):
    """FLOPs of one forward pass (2 per multiply-add; DiT's paper reports multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def main():
    torch.manual_seed(0)
    header = ["model".ljust(6), "input".rjust(9), "G params".rjust(13), "G+t params".rjust(13),
              "D params".rjust(13), "G GFLOPs".rjust(10)]
    print(" ".join(header))
    for name, cfg in models.items():
        c, s = default_input(name)
        if s % cfg["patch_size"]:
            continue
        num_classes = 10 if name.startswith("T/") else 1000  # the digits, or ImageNet
        kw = dict(cfg, input_size=s, in_channels=c, num_classes=num_classes)
        with torch.device("meta"):  # shapes and counts only: no memory, no init time
            x = torch.randn(2, c, s, s)
            y = torch.randint(0, num_classes, (2,))
            t = torch.rand(2)
            G = Generator(**kw)
            Gt = Generator(**kw, use_t_src=True)
            D = Discriminator(**kw)
        assert G(x, y, t, t).shape == x.shape
        assert Gt(x, y, t, t).shape == x.shape
        assert D(x, y, t).shape == (2,)
        gflops = forward_flops(G, x[:1], y[:1], t[:1], t[:1]) / 1e9
        size = f"{c}x{s}x{s}"
        counts = f"{param_count(G):>13,} {param_count(Gt):>13,} {param_count(D):>13,}"
        print(f"{name:6} {size:>9} {counts} {gflops:>10.4g}")
    print("G: 1-NFE generator (no timestep embedder); G+t: with t_src (DiT's layout); "
          "FLOPs count 2 per multiply-add; pos_embed (fixed) is included in the parameter counts.")


if __name__ == "__main__":
    main()

"""The frozen SD-VAE (sd-vae-ft-mse) between pixels and latents: diffusers' AutoencoderKL in plain
PyTorch.

AFM trains on SD-VAE latents x 0.18215 (paper section 4.1; the release's
configs/train/train_1nfe.yaml at commit dc11741, `vae: scaling_factor`): 256x256x3 images in
[-1, 1] become 32x32x4 latents. The modules take and give unscaled latents; `encode(vae, x)` and
`decode(vae, z)` apply the scaling (z = latent * SCALE) and are what the other scripts call.
Parameter names are diffusers' current ones, and `load_vae` reads .safetensors (parsed here, no
safetensors package), .bin, .pt, .pth and .ckpt files in the three layouts the published VAEs
ship in (see _RENAMES):
  diffusers current  `attentions.0.to_q`
  diffusers legacy   `attentions.0.query` (sd-vae-ft-mse's .bin)
  LDM / CompVis      `encoder.down.0.block.0` (vae-ft-mse-840000-ema-pruned.ckpt, or a full SD
                     checkpoint's `first_stage_model.*`)

    python vae.py          # self-check: shapes, a state-dict round trip, parameter count
"""

import json
import math
import os
import pickle
import re
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# SD-VAE latent scaling factor (scaling_factor in sd-vae-ft-mse's config): latents ~ unit std
SCALE = 0.18215


# --------------------------------------------------------------------------------------
# AutoencoderKL and its blocks (diffusers' ResnetBlock2D, Downsample2D / Upsample2D,
# Attention, mid block)
# --------------------------------------------------------------------------------------


def _norm(c, groups):
    return nn.GroupNorm(groups, c, eps=1e-6)  # eps 1e-6 everywhere (torch's 1e-5 drifts by ~1e-4)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:  # 1x1 projection only where the width changes (diffusers: conv_shortcut)
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        return x + h


class Resample(nn.Module):
    """2x down (stride-2 conv) or 2x up (nearest neighbour, then conv); diffusers' Downsample2D /
    Upsample2D."""

    def __init__(self, c, down):
        super().__init__()
        self.down = down
        if down:
            self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)
        else:
            self.conv = nn.Conv2d(c, c, 3, stride=1, padding=1)

    def forward(self, x):
        if self.down:
            # One zero row/column on the right and bottom only, then a stride-2 conv without
            # padding, as LDM trained: padding=1 on all sides would shift the sampling grid by
            # one pixel and the weights not fit.
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, C, H/2, W/2)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, 2H, 2W)
        return self.conv(x)


class Attention(nn.Module):
    """One head of width C over all H*W positions, residual; softmax scale 1/sqrt(C)."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = _norm(c, groups)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        # a list because diffusers' is [Linear, Dropout]: key `to_out.0`
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q = self.to_q(t).unsqueeze(1)  # (N, 1, HW, C)
        k = self.to_k(t).unsqueeze(1)
        v = self.to_v(t).unsqueeze(1)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, HW, C); scale 1/sqrt(C)
        o = self.to_out[0](o).transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)
        return x + o


class Stage(nn.Module):
    """A resolution level: n resnets, then an optional 2x resampler (DownEncoderBlock2D /
    UpDecoderBlock2D)."""

    def __init__(self, cin, cout, n, groups, down=False, up=False):
        super().__init__()
        resnets = [ResnetBlock(cin, cout, groups)]  # only the first changes the width
        for _ in range(n - 1):
            resnets.append(ResnetBlock(cout, cout, groups))
        self.resnets = nn.ModuleList(resnets)
        # A list of one, as in diffusers: the `.0.` in `downsamplers.0.conv`, `upsamplers.0.conv`
        if down:
            self.downsamplers = nn.ModuleList([Resample(cout, down=True)])
        if up:
            self.upsamplers = nn.ModuleList([Resample(cout, down=False)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(c, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cin, latent, chans, layers, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chans[0], 3, padding=1)
        blocks = []
        for i, c in enumerate(chans):
            # no downsample after the last level: factor 2^(levels-1)
            down = i < len(chans) - 1
            blocks.append(Stage(chans[max(i - 1, 0)], c, layers, groups, down=down))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = _norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)  # (N, C0, H, W)
        for blk in self.down_blocks:
            h = blk(h)
        h = self.mid_block(h)  # (N, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (N, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, latent, cout, chans, layers, groups):
        super().__init__()
        rev = chans[::-1]  # the decoder runs the levels in reverse, widest first
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        blocks = []
        for i, c in enumerate(rev):
            up = i < len(rev) - 1  # no upsample after the last level
            # one resnet more per level than the encoder has
            blocks.append(Stage(rev[max(i - 1, 0)], c, layers + 1, groups, up=up))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = _norm(rev[-1], groups)
        self.conv_out = nn.Conv2d(rev[-1], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))  # (N, C_last, h, w)
        for blk in self.up_blocks:
            h = blk(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (N, out_channels, h*f, w*f)


class AutoencoderKL(nn.Module):
    def __init__(self, in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32):
        super().__init__()  # defaults = sd-vae-ft-mse's config
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels,
                               layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels,
                               layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """(N, 3, H, W) in [-1, 1] -> posterior mean and logvar, each (N, 4, H/8, W/8),
        unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        # diffusers' DiagonalGaussianDistribution clamps the same way
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """(N, 4, h, w) unscaled latent -> (N, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Accepts all three layouts (see convert_state_dict); a mismatch raises one line."""
        sd = convert_state_dict(state_dict)
        own = self.state_dict()
        shapes = []
        for k in own:
            if k in sd and sd[k].shape != own[k].shape:
                shapes.append(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}")
        bad = {"unexpected": sorted(set(sd) - set(own)),
               "missing": sorted(set(own) - set(sd)),
               "shape mismatches": shapes}
        if strict and any(bad.values()):
            # a count and the first three of each: the error stays one readable line
            parts = []
            for what, keys in bad.items():
                more = ", ..." if len(keys) > 3 else ""
                parts.append(f"{what} {len(keys)} ({', '.join(keys[:3])}{more})")
            raise RuntimeError("AutoencoderKL.load_state_dict: keys do not match this config in "
                               "any known layout (diffusers current/legacy, LDM, optionally under "
                               "first_stage_model.): " + "; ".join(parts))
        return super().load_state_dict(sd, strict=strict, assign=assign)


# --------------------------------------------------------------------------------------
# Loading: legacy diffusers and LDM keys -> current diffusers; safetensors without the package
# --------------------------------------------------------------------------------------

# Renames applied in order to every key; current keys match none, so converting twice is
# harmless. Legacy diffusers (AttentionBlock, diffusers < 0.14) differs only in the attention's
# projections; LDM names everything differently, with the same tensors (decoder.up.I: see
# convert_state_dict, its numbering runs the other way).
_RENAMES = [
    # LDM; its attention's own names follow
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    # LDM
    (r"\.attentions\.0\.norm\.", ".attentions.0.group_norm."),
    # LDM q, k, v; legacy query, key, value
    (r"\.attentions\.0\.(q|k|v)(uery|ey|alue)?\.", r".attentions.0.to_\1."),
    # LDM proj_out; legacy proj_attn
    (r"\.attentions\.0\.(proj_out|proj_attn)\.", ".attentions.0.to_out.0."),
    # LDM from here on
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]


def convert_state_dict(sd):
    """Any known layout -> diffusers' current layout (our state_dict() keys). `loss.*` (LPIPS,
    discriminator) and `model_ema.*` are dropped: LDM's VAE training checkpoints,
    vae-ft-mse-840000-ema-pruned.ckpt included, hold them."""
    if any(k.startswith("first_stage_model.") for k in sd):
        # the VAE inside a full LDM / SD checkpoint
        inner = {}
        for k, v in sd.items():
            if k.startswith("first_stage_model."):
                inner[k.removeprefix("first_stage_model.")] = v
        sd = inner
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    # LDM numbers decoder levels by resolution, highest first (decoder.up.0 runs last);
    # diffusers numbers them in execution order, so up.I -> up_blocks.(n - 1 - I).
    n_up = 0
    for k in sd:
        m = re.match(r"decoder\.up\.(\d+)\.", k)
        if m:
            n_up = max(n_up, int(m[1]) + 1)

    def up(m):
        if m[2] == "block":
            return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets."
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0."

    out = {}
    for key, v in sd.items():
        new = re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.", up, key)
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        projection = re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", new)
        if projection and v.ndim == 4:
            v = v[:, :, 0, 0]  # LDM's projections are 1x1 convs: (C, C, 1, 1) -> Linear's (C, C)
        out[new] = v
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """The safetensors format: u64 little-endian header size N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then raw
    little-endian tensor bytes, offsets counted from the end of the header."""
    if sys.byteorder != "little":
        raise RuntimeError("load_safetensors: big-endian hosts are not supported")
    with open(path, "rb") as f:
        data = bytearray(f.read())  # writable, so torch.frombuffer can share it without copying
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than the 8-byte header size")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"header size {n} runs past the end of the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = _ST_DTYPES[info["dtype"]]
        shape = info["shape"]
        begin, end = info["data_offsets"]
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or 8 + n + end > len(data):
            raise ValueError(f"tensor {name!r}: bytes [{begin}, {end}) do not fit "
                             f"{info['dtype']} {shape}")
        if numel:
            flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=8 + n + begin)
            out[name] = flat.reshape(shape)
        else:
            out[name] = torch.empty(shape, dtype=dtype)
    return out


def load_vae(path, device="cpu", dtype=torch.float32, norm_num_groups=32):
    """Frozen AutoencoderKL (eval, requires_grad False) from a .safetensors/.bin/.pt/.pth/.ckpt
    file. The config is read from the weights' shapes, so any AutoencoderKL-shaped VAE loads;
    norm_num_groups cannot be (32 in every SD VAE). Pickles load with weights_only=True: a .ckpt
    pickling other objects fails (make it safetensors)."""
    expected = "an AutoencoderKL checkpoint (.safetensors, .bin, .pt, .pth or .ckpt)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_vae: no such file {path!r}; expected {expected}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".safetensors":
            sd = load_safetensors(path)
        elif ext in (".bin", ".pt", ".pth", ".ckpt"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict):
                sd = sd.get("state_dict", sd)  # Lightning .ckpt wraps it
        else:
            raise ValueError(f"unknown extension {ext!r}")
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError("not a dict of tensors")
    except Exception as e:
        msg = str(e).strip().split("\n")[0]  # the first line (vae.py imports only torch)
        if isinstance(e, pickle.UnpicklingError):  # torch's advice to unpickle it anyway: no
            msg = "not a torch checkpoint of plain tensors (random or foreign bytes?)"
        raise RuntimeError(f"load_vae: cannot read {path!r} as {expected}: "
                           f"{type(e).__name__}: {msg}") from None
    sd = convert_state_dict(sd)

    def count(prefix):  # 1 + the highest index after prefix: levels, or resnets per level
        return 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))

    def width(i):  # the channels of encoder level i
        return sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]
    try:  # the config from the weights' shapes (norm_num_groups is not in them)
        config = dict(in_channels=sd["encoder.conv_in.weight"].shape[1],
                      out_channels=sd["decoder.conv_out.weight"].shape[0],
                      latent_channels=sd["post_quant_conv.weight"].shape[0],
                      layers_per_block=count("encoder.down_blocks.0.resnets."))
        levels = count("encoder.down_blocks.")
        config["block_out_channels"] = tuple(width(i) for i in range(levels))
    except (KeyError, ValueError):
        config = {}  # unknown keys: the default config, so the error below names them
    with torch.device("meta"):  # no random init of 84M weights that are overwritten anyway
        vae = AutoencoderKL(**config, norm_num_groups=norm_num_groups)
    try:
        vae.load_state_dict(sd, assign=True)  # assign: the loaded tensors replace the meta ones
    except RuntimeError as e:
        raise RuntimeError(f"load_vae: {path!r}: {e}") from None
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# Pixels <-> scaled latents, as training and sampling use them
# --------------------------------------------------------------------------------------


@torch.no_grad()
def posterior(vae, x):
    """Images (N, 3, H, W) in [-1, 1] -> the posterior's mean and std, fp32, each
    (N, 4, H/8, W/8). The VAE runs in bf16 on GPU, as the release's (fp32 on CPU)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
        mean, logvar = vae.encode(x)
    return mean.float(), (0.5 * logvar.float()).exp()


def encode(vae, x):
    """Images in [-1, 1] -> latents x SCALE, a fresh posterior sample each call: the release samples
    the posterior, not its mean, every time it encodes an image."""
    mean, std = posterior(vae, x.clamp(-1, 1))
    return (mean + std * torch.randn_like(mean)) * SCALE


@torch.no_grad()
def decode(vae, z):
    """Latents x SCALE (N, 4, h, w) -> images (N, 3, 8h, 8w) clamped to [-1, 1], under the
    caller's autocast."""
    return vae.decode(z / SCALE).float().clamp(-1, 1)


def to_images(x, vae=None):
    """Samples -> RGB images in [-1, 1], (N, 3, H, W): latents (x SCALE) decoded by the VAE,
    pixels clamped; one channel (the digits) repeated three times, as ADM's suite and the
    Inception take RGB. Under the caller's autocast."""
    x = decode(vae, x) if vae is not None else x.float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


# --------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------


@torch.no_grad()
def main():
    """Shapes, a strict state-dict round trip and sd-vae-ft-mse's parameter count."""
    torch.manual_seed(0)
    small_config = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
    small = AutoencoderKL(**small_config).eval()
    again = AutoencoderKL(**small_config).eval()  # other random weights, then small's
    again.load_state_dict(small.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = small.encode(x)[0]
    assert mean.shape == (2, 4, 8, 8)
    assert small.decode(mean).shape == x.shape
    assert torch.equal(again.encode(x)[0], mean)
    with torch.device("meta"):  # the full sd-vae-ft-mse config, without allocating its weights
        n = sum(p.numel() for p in AutoencoderKL().parameters())
    assert n == 83_653_863, n  # diffusers' count
    print(f"self-check ok: (2, 3, 64, 64) -> {tuple(mean.shape)} -> {tuple(x.shape)}; "
          f"sd-vae-ft-mse: {n:,} parameters")


if __name__ == "__main__":
    main()

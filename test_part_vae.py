"""Tests of vae.py: compat fixture (both diffusers layouts), safetensors reader, LDM layout, errors, bf16.

    python -m pytest -q test_part_vae.py

Tiny configs only (the whole file runs in a few seconds on 2 CPU cores). To be merged into test_afm.py:
helpers are prefixed `_vae`.
"""

import json
import os
import re
import struct

import pytest
import torch

import vae

_VAE_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "fixtures")
_VAE_TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)  # 3 levels: factor 4


def _vae_tiny(seed=0):
    torch.manual_seed(seed)
    m = vae.AutoencoderKL(**_VAE_TINY).eval()
    with torch.no_grad():  # GroupNorm affine params start at 1/0: randomize them so a swapped norm shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return m


def _vae_outputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        mean, logvar = m.encode(x)
        return mean, logvar, m.decode(z)


def _vae_write_safetensors(path, tensors, metadata=None):
    """A minimal safetensors writer, independent of vae.py: u64 LE header size, JSON, raw bytes."""
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _vae_to_ldm(sd):
    """Our (diffusers current) keys -> LDM/CompVis keys, written as the inverse of the documented map."""
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k)
        k = k.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
        k = k.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
        for ours, ldm in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f".mid_block.attentions.0.{ours}." in k:
                k = k.replace(f".mid_block.attentions.0.{ours}.", f".mid.attn_1.{ldm}.")
                v = v[:, :, None, None] if v.ndim == 2 else v  # LDM's projections are 1x1 convs
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[k] = v.clone()
    return out


def _vae_to_legacy(sd):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{names[m[1]]}.", k): v
            for k, v in sd.items()}


def _vae_assert_same(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y), float((x - y).abs().max())


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["state_dict", "state_dict_legacy"])
def test_vae_compat_fixture(layout):
    path = os.path.join(_VAE_FIXTURES, "vae.pt")
    if not os.path.isfile(path):
        pytest.skip(f"fixture {path} not found")
    fx = torch.load(path, map_location="cpu", weights_only=True)
    k = fx["kwargs"]
    m = vae.AutoencoderKL(k["in_channels"], k["out_channels"], k["latent_channels"], tuple(k["block_out_channels"]),
                          k["layers_per_block"], k["norm_num_groups"]).eval()
    assert set(m.state_dict()) == set(fx["state_dict"])  # our own names are the current diffusers layout
    m.load_state_dict(fx[layout], strict=True)
    exp = fx["expected"]
    with torch.no_grad():
        mean, logvar = m.encode(fx["inputs"]["image"])
        got = {"posterior_mean": mean, "posterior_logvar": logvar, "decoded": m.decode(fx["inputs"]["latent"]),
               "reconstruction": m.decode(exp["posterior_mean"])}
    for name, out in got.items():
        ref = exp[name]
        assert out.shape == ref.shape, name
        err, tol = float((out - ref).abs().max()), 2e-5 * max(1.0, float(ref.abs().max()))
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e}"


def test_vae_shapes_logvar_clamp_and_param_count():
    m = _vae_tiny()
    mean, logvar, dec = _vae_outputs(m)
    assert mean.shape == logvar.shape == (2, 4, 4, 4) and dec.shape == (2, 3, 16, 16)
    with torch.no_grad():
        m.quant_conv.bias[4:].fill_(1e4)  # the logvar half of the moments
        assert float(m.encode(torch.zeros(1, 3, 16, 16))[1].min()) == 20.0
        m.quant_conv.bias[4:].fill_(-1e4)
        assert float(m.encode(torch.zeros(1, 3, 16, 16))[1].max()) == -30.0
    with torch.device("meta"):
        assert sum(p.numel() for p in vae.AutoencoderKL().parameters()) == 83_653_863  # diffusers' sd-vae-ft-mse
    assert vae.SCALE == 0.18215


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vae_safetensors_roundtrip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, 2, generator=g).to(dtype),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-3, 6e4]).to(dtype),
        "scalar": torch.tensor(2.5, dtype=dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
        "steps": torch.tensor([1, -2, 2**40], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "t.safetensors"
    _vae_write_safetensors(path, tensors, {"format": "pt"})
    back = vae.load_safetensors(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        b = back[name]
        assert b.dtype == t.dtype and b.shape == t.shape, name
        if t.numel():  # bitwise, so NaN and -0.0 count
            assert torch.equal(b.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_vae_load_vae_files(tmp_path):
    m = _vae_tiny()
    ref = _vae_outputs(m)
    _vae_write_safetensors(tmp_path / "v.safetensors", m.state_dict())
    torch.save(_vae_to_legacy(m.state_dict()), tmp_path / "v.bin")
    torch.save({"state_dict": _vae_to_ldm(m.state_dict()), "global_step": 7}, tmp_path / "v.ckpt")
    for name in ("v.safetensors", "v.bin", "v.ckpt"):
        loaded = vae.load_vae(str(tmp_path / name), norm_num_groups=8)  # config read from the weights' shapes
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        _vae_assert_same(_vae_outputs(loaded), ref)
    half = vae.load_vae(str(tmp_path / "v.safetensors"), dtype=torch.bfloat16, norm_num_groups=8)
    assert half.decoder.conv_out.weight.dtype == torch.bfloat16
    # the f16 file decodes as the f16-rounded weights do
    _vae_write_safetensors(tmp_path / "h.safetensors", {k: v.half() for k, v in m.state_dict().items()})
    m16 = vae.AutoencoderKL(**_VAE_TINY).eval()
    m16.load_state_dict({k: v.half().float() for k, v in m.state_dict().items()})
    _vae_assert_same(_vae_outputs(vae.load_vae(str(tmp_path / "h.safetensors"), norm_num_groups=8)), _vae_outputs(m16))


def test_vae_ldm_layout_and_prefix():
    m = _vae_tiny()
    ref = _vae_outputs(m)
    ldm = _vae_to_ldm(m.state_dict())
    # names as they appear in LDM checkpoints (decoder.up.0 is the highest resolution, run last)
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.conv1.weight",
                "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight", "decoder.mid.attn_1.norm.weight",
                "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.0.block.1.conv2.bias",
                "decoder.up.2.upsample.conv.weight", "decoder.norm_out.bias", "quant_conv.weight",
                "post_quant_conv.bias"):
        assert key in ldm, key
    assert "decoder.up.0.upsample.conv.weight" not in ldm and "encoder.down.2.downsample.conv.weight" not in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)  # 16 -> 8 channels at full res
    assert set(vae.convert_state_dict(ldm)) == set(m.state_dict())

    other = _vae_tiny(seed=5)
    other.load_state_dict(ldm)
    _vae_assert_same(_vae_outputs(other), ref)
    # a full SD checkpoint: only first_stage_model.* is the VAE; LDM training leftovers are dropped
    full = {"first_stage_model." + k: v for k, v in ldm.items()}
    full.update({"model.diffusion_model.out.0.weight": torch.ones(3), "cond_stage_model.x": torch.ones(1),
                 "first_stage_model.loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)})
    other = _vae_tiny(seed=6)
    other.load_state_dict(full)
    _vae_assert_same(_vae_outputs(other), ref)
    # legacy diffusers names
    other = _vae_tiny(seed=7)
    other.load_state_dict(_vae_to_legacy(m.state_dict()))
    _vae_assert_same(_vae_outputs(other), ref)


def test_vae_errors(tmp_path):
    m = _vae_tiny()
    sd = m.state_dict()
    bad = {("encoder.stem.weight" if k == "encoder.conv_in.weight" else k): v for k, v in sd.items()}
    with pytest.raises(RuntimeError) as e:
        m.load_state_dict(bad)
    msg = str(e.value)
    assert "\n" not in msg and "unexpected 1 (encoder.stem.weight)" in msg and "missing 1 (encoder.conv_in.weight)" in msg
    with pytest.raises(RuntimeError, match="shape mismatches 1"):  # weights of another config
        m.load_state_dict(dict(sd, **{"post_quant_conv.bias": torch.zeros(5)}))

    torch.save(bad, tmp_path / "odd.pt")
    with pytest.raises(RuntimeError) as e:
        vae.load_vae(str(tmp_path / "odd.pt"), norm_num_groups=8)
    assert "\n" not in str(e.value) and "odd.pt" in str(e.value) and "encoder.stem.weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such file .*nothing.safetensors"):
        vae.load_vae(str(tmp_path / "nothing.safetensors"))
    _vae_write_safetensors(tmp_path / "v.safetensors", sd)
    data = (tmp_path / "v.safetensors").read_bytes()
    for name, blob in (("cut.safetensors", data[:-10]), ("tiny.safetensors", data[:5]), ("junk.pt", b"not a pickle")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(RuntimeError) as e:
            vae.load_vae(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value) and "cannot read" in str(e.value)


def test_vae_bf16_autocast():
    m = _vae_tiny()
    ref = _vae_outputs(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _vae_outputs(m)
    assert out[2].dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    for o, r in zip(out, ref):
        o = o.float()
        assert torch.isfinite(o).all()
        rel = float((o - r).norm() / r.norm())
        assert 0 < rel < 0.03, rel  # bf16 keeps ~3 significant digits; measured ~0.005

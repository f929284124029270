"""
Tests, organised by what they guarantee (CPU, tiny models; a few minutes on 2 cores):

    python -m pytest -q test_afm.py

A few helpers used throughout come first; every other helper stands just above the section
that first uses it.

1. Formats load: the release's networks, sd-vae-ft-mse and the FID Inception load unchanged
   (real-size key lists) and compute the reference libraries' numbers (fixtures/, a subset of
   the full fixture set made with the release's and the libraries' own code; AFM_FIXTURES=DIR
   runs every case of the full set).
2. The networks are the release's DiTs: initialization, conditioning switches, deep generator;
   regional compilation equals eager.
3. Every loss term equals a hand-computed value (the adversarial and the flow-matching losses);
   gradient normalization, schedule, sampler (Euler and Heun), augmentation; the wiring mistakes
   of a lift into another repo stop with one line from afm.py naming the fix.
4. The 1-D toy (toy.py): AFM and flow matching learn the monotone (W2-optimal) quantile map;
   afm.py imports torch only, and toy.py trains the toy on its own.
5. Recipes resolve to the release's values (flow matching's and CAFM's too).
6. Data: ADM's center crop, image folders, npz files, the latent cache and its posterior
   sampling; the cache is written into a new folder, meta.json last; bad data is one line.
7. Training resumes bitwise (flow matching and CAFM too); signals (exit 130/143, a log that
   holds each step once), non-finite losses, two processes, guidance, every kind of data.
8. Sample files do not depend on the number of processes and equal the definition, are never
   overwritten; grids are the samples; flow-matching runs sample at N steps; bare state dicts
   load.
9. Metrics equal their direct formulas (FID, IS, precision/recall, the pixel report); fid.py's
   reference files; fid.Evaluation; train.py's in-loop evaluation (skipped by short runs).
10. Bad input, in one table per command: one line naming the flag or file, no traceback, no
    file changed, found before the work; one refusal per script as a real process; runs never
    collide.
11. Continuous AFM (CAFM): the release's SiT/CAFM networks, JVPs and D/G steps (also under DDP),
    schedule, loss by hand, the toy.
12. Sampling flow and CAFM checkpoints: classifier-free guidance, SiT's files, CAFM runs.
"""

import argparse
import ast
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import afm as A
import dataset as DS
import fid
import model as M
import sample as S
import toy
import train as T
import vae as V

# --------------------------------------------------------------------------------------
# Helpers used throughout
# --------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
# subprocesses on two shared cores: one thread each is far faster
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def fixture_path(name):
    """The full fixture set's file when AFM_FIXTURES is set, else the subset shipped in
    fixtures/."""
    for folder in (os.environ.get("AFM_FIXTURES"), os.path.join(HERE, "fixtures")):
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    pytest.skip(f"needs {name} of the full fixture set (AFM_FIXTURES=DIR)")


def fixture(name, *needs):
    """A fixture file; the case is skipped (naming what it needs) if the file lacks one of
    `needs`."""
    fx = torch.load(fixture_path(name), map_location="cpu", weights_only=True)
    for key in needs:
        if key not in fx:
            pytest.skip(f"needs {name}['{key}'] of the full fixture set (AFM_FIXTURES=DIR)")
    return fx


@contextlib.contextmanager
def one_thread():  # tiny networks: one thread is several times faster than two on 2 cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def randomize(module, std=0.05, seed=0):
    """DiT starts with zero adaLN gates and a zero output layer: give every trained weight a value
    so that each input visibly matters (pos_embed, fixed, is left alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def run(script, *args, torchrun=False, check=True, timeout=300, env=ENV):
    """Run one of the scripts as a subprocess (two processes under torchrun)."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = launcher + [os.path.join(HERE, script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=timeout)
    # Now and then a gloo rank aborts at interpreter exit, its work done and saved (gloo's
    # threads torn down with the interpreter; pytorch/pytorch#179291): that exit, after the
    # script said it finished, is its success.
    aborted = "terminate called without an active exception" in r.stdout + r.stderr
    finished = "done at step" in r.stdout or "wrote " in r.stdout
    if torchrun and r.returncode != 0 and aborted and finished:
        r = subprocess.CompletedProcess(r.args, 0, r.stdout, r.stderr)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def one_line(text, *words):
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for w in words:
        assert w in text, (w, text)


def spawn_two(worker, *args):
    """worker(rank, port, *args) in two processes; as run(), once more if a rank aborted at exit
    after its work (pytorch/pytorch#179291)."""
    for attempt in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        try:
            return torch.multiprocessing.spawn(worker, args=(port, *args), nprocs=2)
        except torch.multiprocessing.ProcessExitedException as e:
            if attempt == 2 or e.signal_name != "SIGABRT":
                raise


def random_images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def table(names, rows):
    """A table of cases as pytest's parameters: each row (id, *values)."""
    return pytest.mark.parametrize(names, [row[1:] for row in rows], ids=[row[0] for row in rows])


def sample_main(*argv):
    with one_thread():
        return S.main(S.parse_args([str(a) for a in argv]))


# Each script's main, as its command line calls it
MAINS = {"train.py": lambda argv: T.main(*T.resolve(argv)),
         "sample.py": lambda argv: S.main(S.parse_args(argv)),
         "fid.py": lambda argv: fid.main(fid.parse_args(argv)),
         "dataset.py": lambda argv: DS.main(DS.parse_args(argv))}


def refused(script, argv, capsys):
    """A script's main, run here on argv, must stop: (exit status, the one line it said, no
    traceback). A message given to sys.exit is status 1; an argparse error is its status and the
    last line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e, one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MAINS[script]([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    if isinstance(e.value.code, str):
        status, line = 1, e.value.code
    else:
        status, line = e.value.code, ""
        if err:
            line = err[-1]
    assert "\n" not in line and "Traceback" not in line, (argv, line)
    return status, line


# --------------------------------------------------------------------------------------
# 1. Formats load: the release's networks, sd-vae-ft-mse, the FID Inception
# --------------------------------------------------------------------------------------

# A tiny SD-VAE-shaped autoencoder: 3 levels, so a factor 4
VAE_TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)


def vae_tiny(seed=0):
    torch.manual_seed(seed)
    m = V.AutoencoderKL(**VAE_TINY).eval()
    # GroupNorm affine params start at 1/0: randomize them so a swapped norm shows
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                noise = torch.randn_like(p) * 0.2
                if name.endswith("weight"):
                    noise += 1.0
                p.copy_(noise)
    return m


def vae_outputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, z = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        mean, logvar = m.encode(x)
        return mean, logvar, m.decode(z)


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y), float((x - y).abs().max())


def write_safetensors(path, tensors, metadata=None):
    """A minimal safetensors writer, independent of vae.py: u64 LE header size, JSON, raw bytes."""
    names = {torch.float32: "F32", torch.float16: "F16"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        raw = b""
        if t.numel():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def to_ldm(sd):
    """Our (diffusers current) keys -> LDM/CompVis keys, written as the inverse of the
    documented map."""
    levels = set()
    for k in sd:
        m = re.match(r"decoder\.up_blocks\.(\d+)\.", k)
        if m:
            levels.add(int(m[1]))
    n = 1 + max(levels)

    def up(m):  # up_blocks count from the lowest resolution, LDM's up from the highest
        return f"decoder.up.{n - 1 - int(m[1])}."
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                   r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m) + "block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample.", k)
        k = k.replace(".mid_block.resnets.0.", ".mid.block_1.")
        k = k.replace(".mid_block.resnets.1.", ".mid.block_2.")
        k = k.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
        for ours, ldm in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f".mid_block.attentions.0.{ours}." in k:
                k = k.replace(f".mid_block.attentions.0.{ours}.", f".mid.attn_1.{ldm}.")
                if v.ndim == 2:
                    v = v[:, :, None, None]  # LDM's projections are 1x1 convs
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out[k] = v.clone()
    return out


def to_legacy(sd):
    """Our attention names -> diffusers' legacy ones (query/key/value/proj_attn)."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\."
    out = {}
    for k, v in sd.items():
        out[re.sub(pattern, lambda m: f"attentions.0.{names[m[1]]}.", k)] = v
    return out


def test_release_networks_match():
    """Every tiny release model in the fixture: the same key set, a strict load, the same output
    (fp32)."""
    fx = fixture("afm_models.pt")
    classes = {"Generator": M.Generator, "GeneratorDeep": M.Generator,
               "Discriminator": M.Discriminator, "Classifier": M.Classifier}
    assert {"Generator", "Discriminator"} <= {e["class"] for e in fx["models"].values()}
    for name, e in fx["models"].items():
        m = classes[e["class"]](**e["kwargs"]).eval()
        assert set(m.state_dict()) == set(e["state_dict"]), name
        m.load_state_dict(e["state_dict"], strict=True)
        for case in [e, *e.get("extra_cases", [])]:
            with torch.no_grad():
                out = m(*[case["inputs"][k] for k in e["input_order"]])
            ref = case["output"]
            assert out.shape == ref.shape, name
            assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max()), name


def test_fixed_embeddings_match_release_helpers():
    """The fixed sin-cos timestep and position embeddings equal the release's helpers."""
    te, pe = fixture("afm_models.pt")["helpers"].values()
    # The arguments reach 1000 (t x 1000): one float32 ulp there (6e-5) moves sin and cos by as
    # much, and CPUs' vectorized exp differ by an ulp in the frequencies. A swapped sin/cos or a
    # wrong scale is off by 0.1 or more.
    ulp = 1000 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(M.timestep_embedding(te["t"], te["dim"], te["max_period"]),
                               te["out"].float(), atol=2 * ulp, rtol=0)
    torch.testing.assert_close(M.pos_embed_sincos(pe["embed_dim"], pe["grid_size"]).float(),
                               pe["out"].float(), atol=1e-6, rtol=0)


def release_keys():
    """fixtures/release_keys.txt: section title -> {key: shape}, read off the release's and the
    libraries' modules at real sizes."""
    sections = {}
    with open(fixture_path("release_keys.txt")) as f:
        for line in f:
            if line.startswith("## "):
                keys = sections[line[3:].split("  (")[0]] = {}
            elif line.strip():
                key, shape = re.match(r"(\S+) \(([\d, ]*)\)", line).groups()
                keys[key] = tuple(int(d) for d in shape.replace(",", " ").split())
    return sections


def test_real_size_key_lists():
    """At real sizes, our modules have exactly the key names and shapes of the released checkpoints,
    sd-vae-ft-mse (both diffusers layouts load) and the FID Inception (with or without
    num_batches_tracked)."""
    sections = release_keys()
    xl, kw = M.models["XL/2"], dict(input_size=32, in_channels=4)
    with torch.device("meta"):
        ours = {
            "Generator XL/2 use_t_src=True use_t_tgt=True":
                M.Generator(**xl, **kw, use_t_src=True, use_t_tgt=True),
            "Generator XL/2 use_t_src=False use_t_tgt=False (official 1-NFE)":
                M.Generator(**xl, **kw),
            "Discriminator XL/2 use_t=True": M.Discriminator(**xl, **kw, use_t=True),
            "Classifier B/2": M.Classifier(**M.models["B/2"], **kw),
            "GeneratorDeep XL/2 repeat=2": M.Generator(**xl, **kw, repeat=2),
            "AutoencoderKL sd-vae-ft-mse, modern attention names": V.AutoencoderKL(),
            "AutoencoderKL sd-vae-ft-mse, legacy attention names (query/key/value/proj_attn)":
                V.AutoencoderKL(),
            "pytorch-fid fid_inception_v3 (pt_inception-2015-12-05-6726825d.pth layout)":
                fid.InceptionV3(),
        }
    assert set(ours) == set(sections)
    for title, module in ours.items():
        keys = sections[title]
        own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if "legacy" in title:
            keys = {k: tuple(v.shape) for k, v in V.convert_state_dict(
                {k: torch.empty(s, device="meta") for k, s in keys.items()}).items()}
        if "inception" in title:
            assert sum(k.endswith("num_batches_tracked") for k in keys) == 94
            keys = {k: v for k, v in keys.items() if not k.endswith("num_batches_tracked")}
        assert own == keys, title
        empty = {k: torch.empty(s, device="meta") for k, s in sections[title].items()}
        module.load_state_dict(empty, assign=True)


def test_vae_matches_diffusers_fixture():
    fx = fixture("vae.pt")
    k = fx["kwargs"]
    m = V.AutoencoderKL(k["in_channels"], k["out_channels"], k["latent_channels"],
                        tuple(k["block_out_channels"]), k["layers_per_block"],
                        k["norm_num_groups"]).eval()
    # our own names are the current diffusers layout
    assert set(m.state_dict()) == set(fx["state_dict"])
    for layout in ("state_dict", "state_dict_legacy"):
        m.load_state_dict(fx[layout], strict=True)
        with torch.no_grad():
            mean, logvar = m.encode(fx["inputs"]["image"])
            got = {"posterior_mean": mean, "posterior_logvar": logvar,
                   "decoded": m.decode(fx["inputs"]["latent"]),
                   "reconstruction": m.decode(fx["expected"]["posterior_mean"])}
        for name, out in got.items():
            ref = fx["expected"][name]
            err, tol = float((out - ref).abs().max()), 2e-5 * max(1.0, float(ref.abs().max()))
            assert out.shape == ref.shape and err <= tol, f"{layout} {name}: {err:.3e} > {tol:.3e}"


def test_vae_encode_draws_a_scaled_posterior_sample():
    """V.encode returns (mean + std * noise) * 0.18215; V.decode undoes the scale and clamps."""
    m = vae_tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = m.encode(x)
    torch.manual_seed(0)
    z = V.encode(m, x)  # a posterior sample, scaled
    torch.manual_seed(0)
    noise = torch.randn_like(mean)
    torch.testing.assert_close(z, (mean + (0.5 * logvar).exp() * noise) * V.SCALE)
    torch.testing.assert_close(V.decode(m, z), m.decode(z / V.SCALE).clamp(-1, 1))
    assert V.SCALE == 0.18215


def test_vae_files_load_in_every_layout(tmp_path):
    """safetensors, legacy .bin, LDM and full SD .ckpt files of one VAE decode alike; fp16 files
    decode as the fp16-rounded weights."""
    m = vae_tiny()
    sd, ref = m.state_dict(), vae_outputs(m)
    ldm = to_ldm(sd)
    # to_ldm writes LDM's names (decoder.up.0 is the highest resolution: 16 -> 8 channels)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    # a full SD checkpoint: the VAE and the rest
    full = {"first_stage_model." + k: v for k, v in ldm.items()}
    full.update({"model.diffusion_model.out.0.weight": torch.ones(3),
                 "first_stage_model.loss.logvar": torch.zeros(()),
                 "model_ema.decay": torch.tensor(0.999)})
    write_safetensors(tmp_path / "v.safetensors", sd)
    torch.save(to_legacy(sd), tmp_path / "v.bin")
    torch.save({"state_dict": ldm, "global_step": 7}, tmp_path / "v.ckpt")
    torch.save({"state_dict": full}, tmp_path / "sd.ckpt")
    for name in ("v.safetensors", "v.bin", "v.ckpt", "sd.ckpt"):
        # the config is read from the weights' shapes
        loaded = V.load_vae(str(tmp_path / name), norm_num_groups=8)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert_same(vae_outputs(loaded), ref)
    bf16 = V.load_vae(str(tmp_path / "v.safetensors"), dtype=torch.bfloat16, norm_num_groups=8)
    assert bf16.decoder.conv_out.weight.dtype == torch.bfloat16
    write_safetensors(tmp_path / "h.safetensors", {k: v.half() for k, v in sd.items()})
    m16 = V.AutoencoderKL(**VAE_TINY).eval()
    m16.load_state_dict({k: v.half().float() for k, v in sd.items()})
    loaded = V.load_vae(str(tmp_path / "h.safetensors"), norm_num_groups=8)
    assert_same(vae_outputs(loaded), vae_outputs(m16))


def test_bad_vae_files_are_one_line_errors(tmp_path):
    """Weights that do not fit, a cut or junk file: each a one-line error naming the file."""
    sd = vae_tiny().state_dict()
    sd["encoder.stem.weight"] = sd.pop("encoder.conv_in.weight")
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(RuntimeError) as e:
        V.load_vae(str(tmp_path / "odd.pt"), norm_num_groups=8)
    one_line(str(e.value), "odd.pt", "encoder.stem.weight")
    write_safetensors(tmp_path / "v.safetensors", vae_tiny().state_dict())
    data = (tmp_path / "v.safetensors").read_bytes()
    for name, blob in {"cut.safetensors": data[:-10], "junk.pt": b"not a pickle"}.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(RuntimeError) as e:
            V.load_vae(str(tmp_path / name))
        one_line(str(e.value), name, "cannot read")
        assert "weights_only" not in str(e.value)  # not torch's advice to unpickle foreign bytes


def test_inception_resize_matches_fixture():
    """TF1's bilinear resize to 299 (no half-pixel centers), as torch-fidelity computes it."""
    fx = fixture("inception_tf.pt")
    stride = fx.get("resize_stride", 1)  # the shipped subset keeps every 8th row and column
    img = fx["inputs"]["images_64"][:1].float()
    ref = fx["expected"]["resize_64_to_299"]
    assert (fid.resize_tf1(img)[..., ::stride, ::stride] - ref).abs().max().item() <= 1e-4
    other = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    other = other[..., ::stride, ::stride]
    # PyTorch's bilinear (half-pixel centers) is another function
    assert (other - ref).abs().max().item() > 1.0
    x = torch.randint(0, 256, (2, 3, 299, 299)).float()
    assert torch.equal(fid.resize_tf1(x), x)  # the identity at 299


def test_inception_features_match_fixture():
    """pool3, spatial features and logits equal the fixture's under ADM's preprocessing, and
    pool3 equals pytorch-fid's under its own (a PyTorch bilinear resize): the resize matters."""
    fx = fixture("inception_tf.pt", "state_dict")
    model = fid.InceptionV3().eval()
    model.load_state_dict({k: v.float() for k, v in fx["state_dict"].items()})
    img = fx["inputs"]["images_64"][:1]  # (1, 3, 64, 64) uint8
    pfid = F.interpolate(img.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    pfid = pfid * 2 - 1
    with torch.no_grad():
        pool3, spatial, logits = model(img)  # ADM's pipeline
        pfid_pool3 = model.body(pfid)[0]  # the same network under pytorch-fid's preprocessing
    for key, got in (("pool3", pool3), ("spatial", spatial), ("logits_unbiased", logits)):
        ref = fx["expected"][f"{key}_64"][:1]
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-4 * ref.abs().max(), key
    ref = fx["expected"]["pytorch_fid_pool3_64"][:1]
    assert (pfid_pool3 - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (pool3 - ref).abs().max() > 1e-2 * ref.abs().max()  # the resize matters


def test_inception_weight_files(tmp_path, monkeypatch):
    """fp16 files load as fp32; without a path the cache folder's file (pytorch-fid's layout
    too), or a download; offline, one line naming the folder and --inception."""
    sd = {k: torch.full(v.shape, 1 + i / 1024, dtype=torch.half)
          for i, (k, v) in enumerate(fid.InceptionV3().state_dict().items())}
    nbt = {}
    for k in sd:
        if k.endswith("running_mean"):
            nbt[k.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    torch.save(sd, tmp_path / "w.pth")  # torch-fidelity's layout, fp16
    loaded = fid.load_inception(str(tmp_path / "w.pth"))
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values())
    want = sd["Mixed_7c.branch_pool.bn.running_var"].float()
    assert torch.equal(loaded.Mixed_7c.branch_pool.bn.running_var, want)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    monkeypatch.setenv("AFM_CACHE", str(tmp_path / "cache"))

    def offline(url, dst, *a, **kw):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as e:
        fid.load_inception()
    one_line(e.value.code, str(tmp_path / "cache"), "--inception PATH")
    # pytorch-fid's file, with num_batches_tracked
    torch.save(dict(sd, **nbt), tmp_path / "cache" / fid.WEIGHT_NAMES[1])
    assert torch.equal(fid.load_inception().fc.weight, sd["fc.weight"].float())


# --------------------------------------------------------------------------------------
# 2. The networks are the release's DiTs
# --------------------------------------------------------------------------------------

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
            num_classes=10)


def tiny_inputs(n=3, c=4, s=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, s, s, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.rand(n, generator=g), torch.rand(n, generator=g))


def test_init_is_adaln_zero():
    """At initialization the generator outputs exactly zero (DiT's zeroed final layer) and every
    block is the identity (zero gates)."""
    G = M.Generator(**TINY, use_t_src=True)
    x, y, t, _ = tiny_inputs()
    assert G(x, y, t).abs().max() == 0
    h = torch.randn(3, 16, 64)
    torch.testing.assert_close(G.blocks[0](h, torch.randn(3, 64)), h)


def test_timestep_conditioning_switches():
    x, y, t1, t2 = tiny_inputs()
    for use_src, use_tgt in [(False, False), (True, False), (False, True), (True, True)]:
        G = randomize(M.Generator(**TINY, use_t_src=use_src, use_t_tgt=use_tgt))
        with torch.no_grad():
            base = G(x, y, t1, t2)
            for used, moved in ((use_src, G(x, y, t2, t2)), (use_tgt, G(x, y, t1, t1))):
                if used:
                    assert (base - moved).abs().max() > 1e-4
                else:
                    assert torch.equal(base, moved)
        assert (G.t_embedder is not None) == use_src
        assert (G.t_tgt_embedder is not None) == use_tgt


def test_deep_generator_repeats_blocks():
    """repeat=2 runs the blocks twice, conditioned on y + t_emb(1000) then y + t_emb(500), and
    the final layer on y alone; t_src/t_tgt are ignored. Checked against a manual composition."""
    deep = randomize(M.Generator(**TINY, repeat=2))
    x, y, t1, t2 = tiny_inputs()
    with torch.no_grad():
        out = deep(x, y, t1, t2)
        assert torch.equal(out, deep(x, y, t2, t1))
        h = deep.x_embedder(x) + deep.pos_embed
        c = deep.y_embedder(y)
        for t in (1.0, 0.5):
            ct = c + deep.t_embedder(torch.full((3,), t * 1000))
            for b in deep.blocks:
                h = b(h, ct)
        torch.testing.assert_close(out, deep.unpatchify(deep.final_layer(h, c)))
        single = M.Generator(**TINY, use_t_src=True).eval()
        single.load_state_dict(deep.state_dict())  # same keys: one pass of the same weights differs
        assert (single(x, y, torch.ones(3)) - out).abs().max() > 1e-4


def test_regional_compile_equals_eager():
    """--compile compiles the blocks in place: one compiled graph for all of them, plain state-dict
    keys, and a D step and a G step (forward and backward) that equal eager ones within float
    tolerance."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    kw = dict(TINY, depth=3)
    nets = [randomize(M.Generator(**kw, use_t_src=True)).train(),
            randomize(M.Discriminator(**kw, use_t=True)).train()]
    twins = [M.Generator(**kw, use_t_src=True).train(), M.Discriminator(**kw, use_t=True).train()]
    for net, twin in zip(nets, twins):
        twin.load_state_dict(net.state_dict())
        twin.compile_blocks()
        assert set(twin.state_dict()) == set(net.state_dict())
    x0, y, _, _ = tiny_inputs(4)
    for (G, D) in (nets, twins):
        loss_fn = A.AdversarialFlowLoss(steps=2, pred="v")  # its own gradient-normalization state
        torch.manual_seed(0)
        with one_thread():
            loss = loss_fn.d_loss(G, D, x0, y, 0)[0] + loss_fn.g_loss(G, D, x0, y, 0)[0]
            loss.backward()
    for eager, compiled in zip(nets, twins):
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                # measured: up to 1.4e-5
                torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3)
    # One block graph per (input shape, grad mode): 5 here (G with and without grad, D on 2B+2n,
    # D on B with and without trainable weights), not one per block (that would be a multiple of
    # the 3 blocks).
    assert counters["stats"]["unique_graphs"] == 5


# --------------------------------------------------------------------------------------
# 3. Every loss term equals a hand-computed value
# --------------------------------------------------------------------------------------


class LinearD(nn.Module):
    """D(x, y, t) = <a, x> + b * y + c * t: its finite differences are exact and known."""

    def __init__(self, a, b=0.1, c=0.0):
        super().__init__()
        self.a, self.b, self.c, self.calls = a, b, c, []

    def forward(self, x, y, t):
        self.calls.append(x.shape[0])
        return x.flatten(1) @ self.a + self.b * y.float() + self.c * t


def fixed_noise(monkeypatch, values):
    """torch.randn_like returns the given tensors in order (the draws of the loss are then
    known)."""
    queue = list(values)

    def randn_like(x):
        return queue.pop(0).to(x.dtype).expand_as(x).clone()
    monkeypatch.setattr(torch, "randn_like", randn_like)
    return queue


def test_d_loss_terms_by_hand(monkeypatch):
    B, dim = 8, 3
    g = torch.Generator().manual_seed(0)
    x0, a = torch.randn(B, dim, generator=g), torch.randn(dim, generator=g)
    y = torch.arange(B) % 3
    z_src, z_tgt, e1, e2 = (torch.randn(B, dim, generator=g) for _ in range(4))
    n = 2  # round(8 * 0.25)
    fixed_noise(monkeypatch, [z_src, z_tgt, e1[:n], e2[:n]])
    G = lambda x, y, ts, tt: 2 * x + 1  # noqa: E731
    D = LinearD(a)
    loss_fn = A.AdversarialFlowLoss(steps=1, gp=0.25, gp_ratio=0.25, gp_eps=0.01, cp=0.01)
    loss, logs = loss_fn.d_loss(G, D, x0, y, step=0)
    assert D.calls == [2 * B + 2 * n]  # one forward on [real, fake, real_gp, fake_gp]
    real, fake = x0, 2 * z_src + 1  # 1 NFE: x_src = z, x_tgt = x0
    dr, df = real @ a + 0.1 * y, fake @ a + 0.1 * y
    adv = torch.log1p(torch.exp(-(dr - df))).mean()
    r1 = ((0.01 * e1[:n] @ a) ** 2 * 0.25 * 1.0 / 0.01 ** 2).mean()  # only the first n rows; w = 1
    r2 = ((0.01 * e2[:n] @ a) ** 2 * 0.25 * 1.0 / 0.01 ** 2).mean()
    cp = ((dr + df) ** 2 * 0.01).mean()
    for name, want in [("d_adv", adv), ("r1", r1), ("r2", r2), ("cp", cp)]:
        torch.testing.assert_close(logs[name], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, adv + r1 + r2 + cp, rtol=1e-4, atol=1e-6)
    # Sign: a discriminator that scores reals far above fakes has a vanishing adversarial loss.
    fixed_noise(monkeypatch, [z_src, z_tgt, e1[:n], e2[:n]])
    far = A.AdversarialFlowLoss(gp=0, cp=0).d_loss(lambda *_: torch.full_like(x0, -50.0),
                                                    LinearD(torch.ones(dim)),
                                                    x0, y, 0)[1]["d_adv"]
    assert far < 1e-6
    # k NFE: the penalty is weighted by w = t_src - t_tgt, clamped to 0.001:
    # (eps * 3)^2 / eps^2 = 9, times w
    ts, tt = torch.tensor([1.0, 0.5, 0.3, 0.3]), torch.tensor([0.0, 0.25, 0.3, 0.1])
    monkeypatch.setattr(A, "sample_timesteps", lambda steps, n, device: (ts, tt))
    fixed_noise(monkeypatch, [torch.zeros(4, 2)] * 2 + [torch.ones(4, 2)] * 2)
    loss_fn = A.AdversarialFlowLoss(steps=2, gp=1.0, gp_ratio=1.0, gp_eps=0.1, cp=0)
    _, logs = loss_fn.d_loss(lambda x, *_: x, LinearD(torch.tensor([1.0, 2.0]), b=0.0),
                             torch.zeros(4, 2),
                             torch.zeros(4, dtype=torch.long), 0)
    torch.testing.assert_close(logs["r1"], (9.0 * torch.tensor([1.0, 0.25, 0.001, 0.2])).mean())


def test_g_loss_terms_by_hand(monkeypatch):
    """k-NFE v-prediction with t_src == t_tgt: w clamps to 0.001 and divides the transport
    cost."""
    B, dim = 4, 2
    g = torch.Generator().manual_seed(1)
    x0, a = torch.randn(B, dim, generator=g), torch.randn(dim, generator=g)
    y = torch.zeros(B, dtype=torch.long)
    z_src, z_tgt = torch.randn(B, dim, generator=g), torch.randn(B, dim, generator=g)
    ts, tt = torch.tensor([0.5, 0.5, 0.75, 1.0]), torch.tensor([0.5, 0.25, 0.5, 0.0])
    monkeypatch.setattr(A, "sample_timesteps", lambda steps, n, device: (ts, tt))
    fixed_noise(monkeypatch, [z_src, z_tgt])
    v = torch.randn(B, dim, generator=g)
    G = lambda x, y, t1, t2: v  # noqa: E731  (a constant velocity)
    loss_fn = A.AdversarialFlowLoss(steps=4, pred="v", ot=0.3, ot_end=0.3, decay_steps=10)
    loss, logs = loss_fn.g_loss(G, LinearD(a, b=0.0, c=0.5), x0, y, step=3)
    x_src = (1 - ts[:, None]) * x0 + ts[:, None] * z_src
    x_tgt = (1 - tt[:, None]) * x0 + tt[:, None] * z_tgt
    fake = x_src + (tt - ts)[:, None] * v
    w = torch.tensor([0.001, 0.25, 0.25, 1.0])
    adv = F.softplus(-((fake @ a + 0.5 * tt) - (x_tgt @ a + 0.5 * tt))).mean()
    ot = ((fake - x_src).square().mean(1) * 0.3 / w).mean()
    torch.testing.assert_close(logs["g_adv"], adv)
    torch.testing.assert_close(logs["ot"], ot)
    torch.testing.assert_close(loss, adv + ot)


def test_gradient_normalization_scale_free():
    """The gradient reaching x through GN does not depend on the loss scale, and equals
    g / (sqrt(0.1 * sum(g^2) * numel) + 1e-8) on the first step (EMA from 0, decay 0.9)."""
    x0, g = torch.randn(5, 3), torch.arange(15.0).view(5, 3)
    grads = []
    for scale in (1.0, 1000.0):
        gn, x = A.GradientNormalization(), x0.clone().requires_grad_()
        (gn(x) * g).sum().mul(scale).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], g / ((0.1 * g.square().sum() * 15).sqrt() + 1e-8))
    gn = A.GradientNormalization()
    for _ in range(3):  # the EMA state evolves: s_k = 0.9 s_{k-1} + 0.1 q
        x = x0.clone().requires_grad_()
        (gn(x) * g).sum().backward()
    torch.testing.assert_close(gn.square_avg, g.square().sum() * 15 * (1 - 0.9 ** 3))


def test_classifier_guidance_term(monkeypatch):
    """k-NFE guidance: x_cg = fake, t_cg = t_tgt, cross-entropy * cg, zero outside [lo, hi].
    1-NFE guidance: t_cg ~ U(lo, hi); with re-noising the classifier sees interp(fake, z, t_cg)."""
    B, dim = 4, 3
    g = torch.Generator().manual_seed(2)
    W = torch.randn(dim, 5, generator=g)
    seen = []

    class Linear(nn.Module):  # a linear classifier that records what it is shown
        def forward(self, x, t):
            seen.append((x.clone(), t.clone()))
            return x @ W
    cls = Linear()
    y = torch.tensor([0, 1, 2, 3])
    fake = torch.randn(B, dim, generator=g)
    t_tgt = torch.tensor([0.1, 0.3, 0.5, 0.7])
    loss_fn = A.AdversarialFlowLoss(steps=2, classifier=cls, cg=0.02, cg_range=(0.0, 0.49),
                                    cg_t="tgt")
    out = loss_fn.guidance(fake, y, t_tgt)
    ce = F.cross_entropy(fake @ W, y, reduction="none") * 0.02
    torch.testing.assert_close(out, (ce * torch.tensor([1.0, 1.0, 0.0, 0.0])).mean())
    assert torch.equal(seen[-1][0], fake) and torch.equal(seen[-1][1], t_tgt)
    z = torch.randn(B, dim, generator=g)
    fixed_noise(monkeypatch, [z])
    torch.manual_seed(0)
    loss_fn = A.AdversarialFlowLoss(classifier=cls, cg=0.003, cg_range=(0.0, 0.1), cg_t="uniform")
    out = loss_fn.guidance(fake, y, torch.zeros(B))
    x_cg, t_cg = seen[-1]
    assert (t_cg >= 0).all() and (t_cg <= 0.1).all()
    torch.testing.assert_close(x_cg, (1 - t_cg[:, None]) * fake + t_cg[:, None] * z)
    torch.testing.assert_close(out, (F.cross_entropy(x_cg @ W, y, reduction="none") * 0.003).mean())
    loss_fn.cg_renoise = False  # the release's 1-NFE guided run: the clean fake with that t_cg
    loss_fn.guidance(fake, y, torch.zeros(B))
    assert torch.equal(seen[-1][0], fake)


def test_cosine_schedule():
    assert A.cosine_schedule(0, 0.2, 0.005, 1001) == pytest.approx(0.2)
    assert A.cosine_schedule(500, 0.2, 0.005, 1001) == pytest.approx((0.2 + 0.005) / 2)
    assert A.cosine_schedule(250, 0.2, 0.005, 1001) == pytest.approx(
        0.005 + 0.195 * (1 + math.cos(math.pi / 4)) / 2)
    assert A.cosine_schedule(1000, 0.2, 0.005, 1001) == 0.005
    assert A.cosine_schedule(10 ** 7, 0.2, 0.005, 1001) == 0.005


def test_timestep_sampler():
    """1 NFE: (1, 0); k NFE: the grid's steps, each about equally often; any-step: 0 <= t <= s <= 1
    with both means at 1/2."""
    torch.manual_seed(0)
    s, t = A.sample_timesteps(1, 100, "cpu")
    assert (s == 1).all() and (t == 0).all()
    s, t = A.sample_timesteps(4, 4000, "cpu")
    assert set(s.tolist()) == {1.0, 0.75, 0.5, 0.25} and torch.equal(t, s - 0.25)
    assert min((s == v).sum() for v in (1.0, 0.75, 0.5, 0.25)) > 900
    s, t = A.sample_timesteps("any", 20000, "cpu")
    assert (0 <= t).all() and (t <= s).all() and (s <= 1).all()
    assert abs(s.mean() - 0.5) < 0.01 and abs((t / s).mean() - 0.5) < 0.01


def test_ema_update():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    a0 = [p.clone() for p in a.parameters()]
    A.ema_update(a, b, 0.9)
    for p, p0, q in zip(a.parameters(), a0, b.parameters()):
        torch.testing.assert_close(p, 0.9 * p0 + 0.1 * q)


def test_augment_identical_on_real_and_fake():
    torch.manual_seed(0)
    real = torch.randn(64, 2, 16, 16)
    ra, fa = A.augment(real, 3 * real, p=1.0)
    torch.testing.assert_close(fa, 3 * ra)  # the same translation and erasing for each pair
    assert (ra == 0).float().mean() > 0.2  # zero fill and erasing happened
    same = A.augment(real, real, p=0.0)
    assert same[0] is real


def test_augment_translation_only_moves_content():
    """With erasing off, a one-hot pixel at (r, c) lands at (r + dy, c + dx), dy and dx in
    [0, 3] here, and some pixels move."""
    torch.manual_seed(0)
    x = torch.zeros(200, 1, 10, 10)
    x[:, :, 2, 3] = 1
    moved, _ = A.augment(x, x, p=1.0, erase=(0.0, 0.0), n_erase=0)
    pos = moved.flatten(1).argmax(1)
    rows, cols = pos // 10, pos % 10
    kept = moved.flatten(1).sum(1) == 1
    assert (rows[kept] >= 2).all() and (cols[kept] >= 3).all()
    assert (rows[kept] <= 5).all() and (cols[kept] <= 6).all()
    assert (rows[kept] > 2).any() and (cols[kept] > 3).any()


class Scores(nn.Module):
    """D(x, y, t) = net(x flattened) as (B,) scores; or, as glue mistakes, the same as a (B, 1)
    column or as a DiT-style (B, 1, 8, 8) map (the score repeated over its pixels)."""

    def __init__(self, net, out="scores"):
        super().__init__()
        self.net, self.out = net, out

    def forward(self, x, y, t):
        s = self.net(x.flatten(1))  # (B, 1)
        if self.out == "column":
            return s
        if self.out == "map":
            return s.view(-1, 1, 1, 1).expand(-1, 1, 8, 8)  # (B, 1, h, w)
        return s.squeeze(1)  # (B,)


def test_glue_mistakes_are_named():
    """The wiring mistakes of a lift into another repo (afm.py's docstring) stop the first step
    with one line from afm.py that names the fix (without the checks most would broadcast into a
    wrong loss without a word)."""
    lin = nn.Linear(64, 1)
    afm_loss = A.AdversarialFlowLoss()
    cafm_loss = A.ContinuousAdversarialFlowLoss(warmup=0, class_dropout=0)
    x0, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10

    def same(x, *_):
        return x

    def two_c(x, *_):  # DiT with learn_sigma=True: 2C channels
        return torch.cat([x, x], 1)
    column = Scores(lin, "column")
    cases = [  # (mistake, the call, the error, words of the fix)
        ("D map", lambda: afm_loss.d_loss(same, Scores(lin, "map"), x0, y, 0),
         ValueError, "average a DiT-style (B, 1, h, w) map"),
        ("D (B, 1), any-step G step",
         lambda: A.AdversarialFlowLoss(steps="any").g_loss(same, column, x0, y, 0),
         ValueError, "squeeze a (B, 1)"),
        ("D (B, 1), CAFM's JVP",
         lambda: cafm_loss.d_loss(same, A.FlowDerivative(column), x0, y, 0),
         ValueError, "squeeze a (B, 1)"),
        ("G 2C", lambda: afm_loss.d_loss(two_c, Scores(lin), x0, y, 0),
         ValueError, "keep the first C channels"),
        ("G 2C, flow matching", lambda: A.flow_matching_loss(two_c, x0, y),
         ValueError, "keep the first C channels"),
        ("frozen(callable)", lambda: A.frozen(lambda x, y, t: lin(x)).__enter__(),
         TypeError, "wrap the callable in an nn.Module"),
        ("FlowDerivative(callable)", lambda: A.FlowDerivative(lambda x, y, t: lin(x)),
         TypeError, "wrap the callable in an nn.Module"),
        ("no null class", lambda: A.ContinuousAdversarialFlowLoss(class_dropout=0.1),
         ValueError, "pass null_class="),
    ]
    for name, call, error, words in cases:
        with pytest.raises(error) as e:
            call()
        assert os.path.basename(e.traceback[-1].path) == "afm.py", name
        one_line(str(e.value), words)


def test_frozen_discriminator_gets_no_gradient():
    """In the G step, gradients flow through D into G but D's weights receive none; the logged
    values hold no graph."""
    G = nn.Linear(2, 2)
    D = Scores(nn.Linear(2, 1))
    loss_fn = A.AdversarialFlowLoss()
    with A.frozen(D):
        y = torch.zeros(8, dtype=torch.long)
        loss, logs = loss_fn.g_loss(lambda x, *_: G(x), D, torch.randn(8, 2), y, 0)
    loss.backward()
    assert D.net.weight.grad is None and G.weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in D.parameters())
    assert loss.requires_grad and not any(v.requires_grad for v in logs.values())


def test_classifier_objective(monkeypatch):
    """The guidance classifier learns from x_t = interp(x0, z, t), t ~ U(0, 1): cross-entropy of
    C(x_t, t)."""
    x0, z, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    W = torch.randn(3, 3)
    seen = []

    def C(x, t):  # a linear classifier that records its timesteps
        seen.append(t)
        return x @ W + t[:, None]
    fixed_noise(monkeypatch, [z])
    torch.manual_seed(0)
    loss, logs = A.classifier_loss(C, x0, y)
    t = seen[0]
    logits = ((1 - t[:, None]) * x0 + t[:, None] * z) @ W + t[:, None]
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    assert logs["acc"] == (logits.argmax(1) == y).float().mean() and 0 < t.min() and t.max() < 1


def test_flow_matching_loss_by_hand(monkeypatch):
    """MSE between v(x_t, y, t, t) and z - x0, at x_t = (1 - t) x0 + t z (t ~ U(0, 1))."""
    x0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    z = torch.tensor([[0.5, -0.5], [1.0, 1.0]])
    t = torch.tensor([0.25, 0.5])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: t.clone())
    monkeypatch.setattr(torch, "randn_like", lambda x: z.clone())
    seen = {}

    def v(x, y, t_src, t_tgt):  # a known "network": v = 2 x
        seen.update(x=x, t_src=t_src, t_tgt=t_tgt)
        return 2 * x
    loss, logs = A.flow_matching_loss(v, x0, torch.zeros(2, dtype=torch.long))
    # x_t row 0: 0.75 * (1, 2) + 0.25 * (0.5, -0.5) = (0.875, 1.375); row 1: (2, 0)
    # v: (1.75, 2.75), (4, 0); target z - x0: (-0.5, -2.5), (-2, 2)
    # squared errors: 2.25^2 + 5.25^2 + 6^2 + 2^2 = 5.0625 + 27.5625 + 36 + 4 = 72.625; / 4
    assert torch.allclose(seen["x"], torch.tensor([[0.875, 1.375], [2.0, 0.0]]))
    assert torch.equal(seen["t_src"], t) and torch.equal(seen["t_tgt"], t)
    assert loss.item() == pytest.approx(72.625 / 4)
    assert torch.equal(logs["fm_loss"], loss) and not logs["fm_loss"].requires_grad


def test_heun_and_euler_integrate_a_known_velocity():
    """v(x, t) = x: from t = 1 to 0, dx/dt = x gives x(0) = x(1) / e. Euler with n steps gives
    (1 - 1/n)^n, Heun (the release's sampler: NFE/2 intervals) (1 - h + h^2/2)^(NFE/2)."""
    def v(x, y, t_src, t_tgt):
        return x
    z = torch.ones(3, 1)
    y = torch.zeros(3, dtype=torch.long)
    euler = A.generate(v, z, y, 4, "v")
    assert torch.allclose(euler, torch.full((3, 1), (1 - 1 / 4) ** 4))
    heun = A.generate(v, z, y, 8, "v", solver="heun")
    h = 1 / 4
    assert torch.allclose(heun, torch.full((3, 1), (1 - h + h * h / 2) ** 4))
    fine = A.generate(v, z, y, 256, "v", solver="heun")
    assert abs(fine[0, 0].item() - np.exp(-1)) < 1e-5


# --------------------------------------------------------------------------------------
# 4. The 1-D toy (toy.py): AFM and flow matching learn the monotone (W2-optimal) quantile map
# --------------------------------------------------------------------------------------


def test_1d_toy_learns_the_monotone_map():
    """toy.py's AFM toy (4 modes, N(0, 1) noise, 1 NFE) finds the optimal-transport map
    F^-1(Phi(z)), where a plain GAN (ot = 0) misassigns 70-99% (measured after 2500 G steps:
    RMS 0.148 from the exact map, 0.8% sent to a wrong mode; the untrained start: RMS 1.13)."""
    with one_thread():
        torch.manual_seed(0)  # the start train_toy_afm draws with its seed 0
        rms_start, _ = toy.map_error(toy.ToyNet())
        G = toy.train_toy_afm(ot=0.2, g_steps=2500)
        rms, wrong = toy.map_error(G)
    print(f"1-D toy: RMS {rms:.4f} (start {rms_start:.3f}), wrong mode {wrong:.2%}")
    assert wrong < 0.03 and rms < 0.25
    assert rms < rms_start / 4


def test_toy_flow_approaches_the_monotone_map_with_steps():
    """In 1-D the flow's ODE map and the W2-optimal map are both the monotone map F^-1(Phi(z)):
    many Euler steps of a trained flow-matching model follow it, one step does not."""
    rms, wrong = {}, {}
    with one_thread():
        v = toy.train_toy_flow(steps=3000)
        for n in (1, 4, 32):
            rms[n], wrong[n] = toy.map_error(v, n, "v", n=5000)
    print(f"flow matching on the toy: RMS {rms}, wrong mode {wrong}")
    assert rms[32] < 0.15 and wrong[32] < 0.02  # measured: 0.098, 0.3%
    assert rms[1] > rms[4] > rms[32] and wrong[1] > 0.3


def test_exact_map_is_the_quantile_map():
    """exact_map(z) sends noise quantiles to data quantiles: a quarter of N(0, 1) per mode, in
    order, and Phi(z) = F(x) within the bisection's precision."""
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    x = toy.exact_map(z)
    assert torch.all(x[1:] >= x[:-1])
    phi = 0.5 * (1 + torch.erf(z / 2 ** 0.5))
    cdf = 0.5 * (1 + torch.erf((x[:, None] - toy.MODES.double()) / (toy.MODE_STD * 2 ** 0.5)))
    assert torch.allclose(cdf.mean(1), phi, atol=1e-6)
    # the noise's octiles 1/8, 3/8, 5/8, 7/8 go to the middles of the four modes
    q = torch.tensor([-1.1503, -0.3186, 0.3186, 1.1503])
    assert torch.allclose(toy.exact_map(q), toy.MODES, atol=1e-3)


def test_afm_py_imports_torch_only_and_toy_py_runs(tmp_path):
    """afm.py imports nothing of this project, and only torch and the standard library at module
    level; `python toy.py` prints the distances to the exact map and writes the picture."""
    with open(os.path.join(HERE, "afm.py")) as f:
        tree = ast.parse(f.read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        if isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    assert top <= {"contextlib", "math", "typing", "torch"}, top
    out = tmp_path / "toy.png"
    r = run("toy.py", "--g-steps", "100", "--fm-steps", "100", "--cafm-steps", "100", "--ot", "0",
            "--out", out)
    assert "AFM, ot 0.0, 1 step:" in r.stdout and "32 Euler step(s): RMS" in r.stdout, r.stdout
    assert "CAFM, 64 Euler steps:" in r.stdout, r.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# 5. Recipes resolve to the release's values
# --------------------------------------------------------------------------------------

# The release's configurations (arXiv 2511.22475, section 6; ByteDance-Seed/Adversarial-Flow-Models
# at commit dc11741, configs/train/*.yaml) and ours (digits), written out by hand in two tables.
RECIPE_TRAINING_KEYS = ["model", "global_batch_size", "lr", "lr_d", "clip", "ema"]
RECIPE_TRAINING = {
    #           model   batch lr    lr_d  clip ema
    "1nfe":    ("XL/2", 256,  1e-4, 1e-4, 50,  0.9999),  # train_1nfe.yaml
    "1nfe-cg": ("XL/2", 256,  1e-4, 1e-4, 50,  0.9999),  # train_1nfe_cg.yaml
    "knfe":    ("XL/2", 256,  1e-4, 1e-4, 5,   0.9999),  # train_fix_nfe.yaml
    "knfe-cg": ("XL/2", 256,  1e-4, 1e-4, 5,   0.9999),  # train_fix_nfe_cg.yaml
    "any":     ("B/2",  32,   1e-4, 1e-4, 5,   0.9999),  # train_any_nfe.yaml
    "deep":    ("XL/2", 256,  5e-5, 1e-4, 5,   0.9999),  # train_1nfe_deep.yaml
    "digits":  ("T/2",  32,   5e-4, 5e-4, 50,  0.999),
}
RECIPE_METHOD_KEYS = ["steps", "pred", "repeat", "ot", "ot_end", "augment_p", "cg", "cg_range",
                      "cg_t"]
RECIPE_METHOD = {
    #           steps  pred repeat ot    ot_end aug  cg     cg_range   cg_t
    "1nfe":    (1,     "x", 1,     0.2,  0.005, 0.0, 0.0,   [0, 0.1],  "uniform"),
    "1nfe-cg": (1,     "x", 1,     0.2,  0.005, 0.4, 0.003, [0, 0.1],  "uniform"),
    "knfe":    (2,     "v", 1,     0.25, 0.005, 0.0, 0.0,   [0, 0.49], "tgt"),
    "knfe-cg": (2,     "v", 1,     0.25, 0.005, 0.4, 0.02,  [0, 0.49], "tgt"),
    "any":     ("any", "v", 1,     0.25, 0.005, 0.0, 0.0,   [0, 0.49], "tgt"),
    "deep":    (1,     "x", 2,     0.2,  0.005, 0.0, 0.0,   [0, 0.1],  "uniform"),
    "digits":  (1,     "x", 1,     0.25, 0.25,  0.0, 0.0,   [0, 0.1],  "uniform"),
}


@pytest.mark.parametrize("name", list(RECIPE_TRAINING) + ["classifier", "pixel32", "pixel64"])
def test_recipe_values(name, tmp_path):
    (tmp_path / "c.pt").write_bytes(b"")  # --cls must name a file (read when the run starts)
    data = str(tmp_path)
    if name == "digits":
        data = "digits"
    argv = ["--recipe", name, "--data", data]
    if name.endswith("-cg"):
        argv += ["--cls", str(tmp_path / "c.pt")]
    s = T.resolve(argv)[0]
    if name == "classifier":  # train_classifier.yaml: B/2, batch 256, lr 1e-4, clip 50, EMA 0.9995
        assert (s.model, s.global_batch_size, s.lr, s.clip, s.ema) == ("B/2", 256, 1e-4, 50, 0.9995)
        return
    if name.startswith("pixel"):
        # 256 tokens of B width, the release's batch, lr and EMA, a constant transport weight
        model = {"pixel32": "B/2", "pixel64": "B/4"}[name]
        got = (s.model, s.global_batch_size, s.lr, s.lr_d, s.ema, s.ot, s.ot_end, s.steps, s.pred,
               s.clip)
        assert got == (model, 256, 1e-4, 1e-4, 0.9999, 0.2, 0.2, 1, "x", 50)
        return
    assert [getattr(s, k) for k in RECIPE_TRAINING_KEYS] == list(RECIPE_TRAINING[name]), name
    assert [getattr(s, k) for k in RECIPE_METHOD_KEYS] == list(RECIPE_METHOD[name]), name
    got = (s.gp, s.gp_ratio, s.gp_eps, s.cp, s.ttur, s.dis_model)
    assert got == (0.25, 0.25, 0.01, 0.01, 1, s.model)
    assert s.decay_steps == 1_000_000 and s.cg_renoise and s.precision == "fp32"


def test_recipe_overrides():
    def settings(*argv):
        return T.resolve(list(argv))[0]
    assert settings("--recipe", "deep", "--repeat", "4").lr == 2.5e-5  # "gen_lr: 5e-5 # lr / depth"
    s = settings("--recipe", "knfe", "--steps", "4", "--lr", "3e-4", "--clip", "7")
    assert (s.steps, s.lr, s.lr_d, s.clip, s.pred) == (4, 3e-4, 3e-4, 7, "v")
    s = settings("--steps", "any")  # digits laid over the any-step recipe
    assert (s.model, s.steps, s.pred, s.ot, s.clip, s.ot_end) == ("T/2", "any", "v", 0.25, 5, 0.25)


def test_flow_recipe_values():
    """The release's flow-matching values (configs/train/fm/*.yaml at 519601d): AdamW lr 1e-4,
    EMA 0.9999, batch 256, no clipping, Heun for its grids; the digits one as the AFM digits."""
    s = T.resolve(["--recipe", "fm", "--data", HERE])[0]
    assert (s.model, s.global_batch_size, s.lr, s.clip, s.ema) == ("XL/2", 256, 1e-4, None, 0.9999)
    assert (s.sample_solver, s.sample_steps, s.objective) == ("heun", 256, "flow")
    d = T.resolve(["--recipe", "fm-digits"])[0]
    digits = T.resolve([])[0]
    assert (d.model, d.global_batch_size, d.lr, d.ema) == (
        digits.model, digits.global_batch_size, digits.lr, digits.ema)
    assert s.class_dropout == d.class_dropout == 0.1 and digits.class_dropout == 0.0


def test_cafm_recipe_values():
    """The release's CAFM post-training of SiT-XL/2 (configs/train/cafm/train_cafm_sit.yaml at
    519601d): batch 256, lr 1e-5 for both networks, clip 1e4, EMA 0.99, class dropout 0.1,
    16 D steps per G step after 10,000 D-only steps, centering 0.001, no transport term."""
    s = T.resolve(["--recipe", "cafm", "--data", HERE, "--init", HERE])[0]
    assert (s.model, s.dis_model, s.global_batch_size, s.lr, s.lr_d, s.clip, s.ema) == (
        "XL/2", "XL/2", 256, 1e-5, 1e-5, 1e4, 0.99)
    assert (s.class_dropout, s.n_dis, s.warmup, s.cp, s.ot) == (0.1, 16, 10_000, 0.001, 0.0)
    assert (s.sample_solver, s.objective) == ("heun", "cafm")


# --------------------------------------------------------------------------------------
# 6. Data: ADM's center crop, image folders, npz files, the latent cache, bad data
# --------------------------------------------------------------------------------------

# Image folders: name -> (width, height, PIL mode); odd sizes, both sides of ADM's box-downsample
# loop at 32 px.
IMAGES = {
    "ant/a.jpg": (97, 61, "RGB"),  # short side 61 < 64: bicubic only
    "ant/b.png": (300, 517, "RGB"),  # halved 3 times (300 -> 150 -> 75 -> 37), odd sides
    "bee/c.png": (700, 451, "RGB"),  # halved 3 times, odd height
    "bee/d.png": (61, 97, "L"),  # grayscale -> RGB
    "cow/e.png": (64, 80, "RGBA"),  # short side exactly 2 * 32: halved once
}
CORRUPT = "bee/corrupt.jpg"  # a truncated JPEG: opens, fails while decoding


def image_folder(root):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}
    for name, (w, h, mode) in IMAGES.items():
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        arr = rng.integers(0, 256, (h, w, channels[mode]), dtype=np.uint8)
        arr[:, : w // 3] //= 4  # dark left third: no image equals its own mirror
        if mode == "L":
            arr = arr.squeeze(-1)
        Image.fromarray(arr, mode).save(os.path.join(root, name))
    jpg = os.path.join(root, CORRUPT)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(jpg, quality=95)
    with open(jpg, "rb") as f:
        data = f.read()
    with open(jpg, "wb") as f:
        f.write(data[: len(data) // 2])
    for note in ("notes.txt", "ant/notes.txt", "cow/labels.csv"):  # not images: ignored
        with open(os.path.join(root, note), "w") as f:
            f.write("not an image\n")
    return str(root)


def adm_crop(path, size):
    """ADM's center_crop_arr, written from the recipe: (crop uint8 (S, S, 3), box halvings)."""
    img = Image.open(path).convert("RGB")
    halvings = 0
    while min(img.size[0], img.size[1]) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
        halvings += 1
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), resample=Image.BICUBIC)
    a = np.array(img)
    y0, x0 = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y0 : y0 + size, x0 : x0 + size], halvings


def to_x(arr):  # uint8 (S, S, 3) -> float (3, S, S) in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1


def tiny_vae_file(path, seed=0):
    """A 2-level SD-VAE-shaped autoencoder (factor 2), random weights, saved as a state dict."""
    torch.manual_seed(seed)
    vae = V.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    torch.save(vae.state_dict(), path)
    return str(path)


def build_cache(root, vae_path, out, **kwargs):  # 32 px, 2 images per shard, on the CPU
    kwargs = dict(image_size=32, batch_size=2, shard_size=2, num_workers=0, device="cpu") | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt file's warning is tested elsewhere
        return DS.build_cache(root, vae_path, out, **kwargs)


def cached_folder(tmp_path):  # (image folder, VAE file, cache folder, shards written)
    root, vae_path = image_folder(tmp_path / "images"), tiny_vae_file(tmp_path / "vae.pt")
    out = str(tmp_path / "cache")
    return root, vae_path, out, build_cache(root, vae_path, out)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """One image folder for the tests that only read it."""
    return image_folder(tmp_path_factory.mktemp("images"))


def test_image_folder_is_adms_center_crop(image_root):
    """ADM's center crop at 32 and 64 px, with and without its box-downsample loop."""
    root = image_root
    for size in (32, 64):
        ds = DS.ImageFolder(root, size, flip=False)
        halvings = set()
        for name in IMAGES:
            i = ds.files.index(os.path.join(root, name))
            ref, k = adm_crop(ds.files[i], size)
            halvings.add(k)
            x, _ = ds[i]
            assert x.dtype == torch.float32 and torch.equal(x, to_x(ref)), (name, size)
        assert 0 in halvings and max(halvings) >= 1  # both paths: with and without the box loop
    # the box loop matters: one bicubic step from the full 700x451 image gives other pixels
    img = Image.open(os.path.join(root, "bee/c.png")).convert("RGB")
    direct = np.array(img.resize((round(700 * 32 / 451), 32), resample=Image.BICUBIC))
    ref = adm_crop(os.path.join(root, "bee/c.png"), 32)[0]
    assert np.abs(direct[:, 9:41].astype(int) - ref.astype(int)).mean() > 1


def test_image_folder_classes(image_root):
    """Class sub-folders are the labels (or one class with --unconditional); other files are
    ignored."""
    root = image_root  # (each file's label: test_cache_stores_the_vae_moments)
    ds = DS.build_dataset(root, image_size=32)
    assert isinstance(ds, DS.ImageFolder) and ds.space == "pixel" and ds.shape == (3, 32, 32)
    assert ds.class_names == ["ant", "bee", "cow"] and ds.num_classes == 3
    assert len(ds) == 6 and sorted(ds.labels) == [0, 0, 1, 1, 1, 2]  # .txt / .csv ignored
    unconditional = DS.build_dataset(root, 16, unconditional=True)
    assert unconditional.num_classes == 1 and len(unconditional) == 6


def test_corrupt_image_is_skipped_with_a_warning(image_root):
    """A corrupt file: a warning naming it, replaced by the next readable file."""
    ds = DS.ImageFolder(image_root, 32, flip=False)
    bad = ds.files.index(os.path.join(image_root, CORRUPT))
    with pytest.warns(UserWarning, match=CORRUPT):
        x, y = ds[bad]
    assert torch.equal(x, ds[bad + 1][0]) and y == ds[bad + 1][1] == 1


def test_npz_images(tmp_path):
    """An npz of images (arr_0 uint8 N,H,W,C; arr_1 labels or none): held in memory, or
    memory-mapped in place with the same values; flipped with p=0.5; a malformed one refused."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), np.arange(20) % 4
    np.savez(tmp_path / "c.npz", arr_0=x, arr_1=y)
    np.savez(tmp_path / "u.npz", arr_0=x[..., :1])
    ds = DS.build_dataset(str(tmp_path / "c.npz"))
    want = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert ds.num_classes == 4 and ds.shape == (3, 8, 8) and torch.equal(ds.tensors[0], want)
    mapped = DS.ArrayImages(str(tmp_path / "c.npz"), flip=False, max_memory=0)
    assert isinstance(mapped.x, np.memmap) and not hasattr(mapped, "tensors")
    assert all(torch.equal(mapped[i][0], want[i]) and mapped[i][1] == y[i] for i in range(20))
    u = DS.build_dataset(str(tmp_path / "u.npz"))
    assert u.num_classes == 1 and u.shape == (1, 8, 8) and set(u.labels) == {0}
    torch.manual_seed(0)  # in-memory batches: each example flipped, or not, with p = 0.5
    xb, yb = next(DS.batches(ds, DS.IndexStream(20, 0, 1, 0), 20, 0))
    # the stream's first epoch
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    flips = [torch.equal(xb[j], want[i].flip(-1)) for j, i in enumerate(perm)]
    assert all(f or torch.equal(xb[j], want[i]) for j, (f, i) in enumerate(zip(flips, perm)))
    assert 3 <= sum(flips) <= 17 and yb.tolist() == y[perm].tolist()
    bad = {"obj.npz": dict(arr_0=np.array([x[0], x[0, :4]], dtype=object)),
           "neg.npz": dict(arr_0=x, arr_1=y - 1)}
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)  # (np.savez pickles the object array of obj.npz)
        with pytest.raises(SystemExit) as e:
            DS.build_dataset(str(tmp_path / name))
        one_line(e.value.code, f"error: --data {tmp_path / name}: ")


def test_cache_from_flat_folder_or_npz(tmp_path):
    """dataset.py cache takes a flat folder (one class) at --image-size, and an npz with labels
    at its own size (12 px, not upscaled to the default 256)."""
    vae_path = tiny_vae_file(tmp_path / "vae.pt")
    x = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    labels = [0, 1, 1, 0, 1]
    np.savez(tmp_path / "i.npz", arr_0=x, arr_1=np.array(labels))
    (tmp_path / "flat" / "sub").mkdir(parents=True)
    for i, img in enumerate(x):  # odd images in the sub-folder
        Image.fromarray(img).save(tmp_path / "flat" / ("sub" if i % 2 else "") / f"{i}.png")
    build_cache(str(tmp_path / "flat"), vae_path, str(tmp_path / "c_flat"), image_size=8)
    MAINS["dataset.py"](["cache", "--data", str(tmp_path / "i.npz"), "--vae", vae_path,
                         "--out", str(tmp_path / "c_npz"), "--num-workers", "0"])
    for out, size, want in (("c_flat", 8, [0] * 5), ("c_npz", 12, labels)):
        ds = DS.build_dataset(str(tmp_path / out), image_size=size, vae_path=vae_path)
        assert len(ds) == 5 and ds.num_classes == max(want) + 1
        assert ds.shape == (4, size // 2, size // 2)
        assert sorted(int(ds[i][1]) for i in range(5)) == sorted(want), out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(image folder, VAE file, cache folder, shards written): built once for the cache tests
    below, which only read it."""
    return cached_folder(tmp_path_factory.mktemp("cache"))


def test_cache_stores_the_vae_moments(cache):
    """meta.json describes the cache; each shard holds the VAE's posterior moments of the ADM crop
    and of its mirror, in fp16."""
    root, vae_path, out, written = cache
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["image_size"] == 32 and meta["latent_shape"] == [4, 16, 16]
    assert meta["num_files"] == 6 and meta["shard_counts"] == [2, 1, 2]  # the corrupt file left out
    assert meta["class_names"] == ["ant", "bee", "cow"] and meta["num_classes"] == 3
    assert meta["vae"]["file"] == "vae.pt" and meta["vae"]["size"] == os.path.getsize(vae_path)
    shard = [os.path.join(out, DS.SHARD.format(k)) for k in range(3)]
    assert sorted(written) == shard
    assert sorted(os.listdir(out)) == ["meta.json"] + [DS.SHARD.format(k) for k in range(3)]

    # stored moments = the VAE's encoding of the ADM crop and of its mirror, to fp16 precision
    vae, files = V.load_vae(vae_path), DS.ImageFolder(root, 32).files
    for path in written:
        s = torch.load(path, weights_only=True)
        assert s["mean"].dtype == s["std"].dtype == torch.float16
        assert s["mean"].shape[1:] == s["std"].shape[1:] == (2, 4, 16, 16)
        for j, i in enumerate(s["index"].tolist()):
            x = to_x(adm_crop(files[i], 32)[0])[None]  # (1, 3, 32, 32)
            with torch.no_grad():
                mean, logvar = vae.encode(torch.cat([x, x.flip(-1)]))  # (2, 4, 16, 16)
            std = torch.exp(0.5 * logvar)
            torch.testing.assert_close(s["mean"][j].float(), mean, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(s["std"][j].float(), std, rtol=1e-3, atol=1e-4)
            assert not torch.allclose(mean[0], mean[1], atol=1e-2)  # the mirror is another input
            label = os.path.relpath(files[i], root).split(os.sep)[0]
            assert int(s["label"][j]) == ["ant", "bee", "cow"].index(label)


def test_cache_draws_from_the_posterior(cache):
    """An example of the cache is (mean + std * noise) * V.SCALE of a random orientation: under a
    fixed seed exactly, over many draws in law; DataLoader workers read it too."""
    _, vae_path, out, written = cache
    shards = [torch.load(path, weights_only=True) for path in written]
    means = torch.cat([s["mean"] for s in shards]).float()  # (5, 2, 4, 16, 16)
    stds = torch.cat([s["std"] for s in shards]).float()
    ds = DS.build_dataset(out, image_size=32, vae_path=vae_path)
    assert isinstance(ds, DS.LatentCache) and ds.space == "latent" and ds.shape == (4, 16, 16)
    assert len(ds) == 5 and ds.num_classes == 3

    # under a fixed seed the example is (mean + std * noise) * V.SCALE of a random orientation
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = ds[3]
        torch.manual_seed(seed)
        f = int(torch.randint(2, ()))
        flips.add(f)
        noise = torch.randn(4, 16, 16)
        torch.testing.assert_close(x, (means[3][f] + stds[3][f] * noise) * V.SCALE)
    assert flips == {0, 1}

    # over many draws: the law of an even mixture of N(mean_f, std_f^2), scaled
    torch.manual_seed(0)
    n = 4000
    draws = torch.stack([ds[3][0] for _ in range(n)]) / V.SCALE  # (n, 4, 16, 16)
    m, s = means[3], stds[3]
    mix_mean = m.mean(0)
    mix_var = (s**2).mean(0) + ((m[0] - m[1]) / 2) ** 2
    chi2 = ((draws.mean(0) - mix_mean) ** 2 / (mix_var / n)).mean()
    assert 0.85 < chi2 < 1.15, chi2
    ratio = (draws.var(0) / mix_var).mean()
    assert 0.95 < ratio < 1.05, ratio

    # through DataLoader workers (each maps the shards itself)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 4, 16, 16)] * 2 + [(1, 4, 16, 16)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 1, 1, 2]


def test_cache_refuses_another_vae_or_size(cache, tmp_path):
    """Training on a cache refuses another VAE than the cache's (it would decode and evaluate
    with the wrong one) or another resolution, in one line; the same weights under another name
    are accepted."""
    _, vae_path, out, _ = cache
    other = tiny_vae_file(tmp_path / "vae.pt", seed=1)  # same name and size, other weights
    for kwargs, words in [({"vae_path": other}, ["--vae", other, "another VAE"]),
                          ({"image_size": 64}, ["--image-size 64", "32px"])]:
        with pytest.raises(SystemExit) as e:
            DS.build_dataset(out, **{"image_size": 32, "vae_path": vae_path, **kwargs})
        one_line(e.value.code, *words)
    copy = tmp_path / "renamed.pt"
    copy.write_bytes(open(vae_path, "rb").read())
    assert len(DS.build_dataset(out, image_size=32, vae_path=str(copy))) == 5


def test_digits():
    """The default data: sklearn's 1797 8x8 digits (digits.npz, 0-16 shades) in [-1, 1]."""
    ds = DS.build_dataset("digits")
    x, y = ds.tensors
    assert ds.num_classes == 10 and ds.shape == (1, 8, 8) and x.shape == (1797, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1 and abs(x.mean().item() + 0.389) < 0.001
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    data = np.load(os.path.join(HERE, "digits.npz"))
    assert torch.equal(ds[5][0], torch.from_numpy(data["images"][5]).float()[None] / 8 - 1)
    assert int(ds[5][1]) == int(data["labels"][5]) and ds.class_names[3] == "3"


# Bad data: one line naming the flag or file, said before long work starts


def test_truncated_shard_is_found_on_open(tmp_path):
    """A truncated shard: one line naming it when the cache is opened, before training."""
    out = cached_folder(tmp_path)[2]
    path = os.path.join(out, DS.SHARD.format(1))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(SystemExit) as e:
        DS.open_data(out)
    one_line(e.value.code, f"error: --data {path}: ", "dataset.py cache")
    assert len(e.value.code) < 300


def test_cache_is_new_and_whole(tmp_path, monkeypatch):
    """A stopped build leaves no meta.json (written last), so its folder is no cache (it is
    started again into a new --out)."""
    root, vae_path = image_folder(tmp_path / "images"), tiny_vae_file(tmp_path / "vae.pt")
    calls = []
    encode = DS.encode_moments

    def stopped(vae, x):  # call 1: the latent-shape probe; 2: shard 0; 3: Ctrl-C
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(vae, x)
    monkeypatch.setattr(DS, "encode_moments", stopped)
    out = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        build_cache(root, vae_path, out)
    assert os.listdir(out) == [DS.SHARD.format(0)]
    with pytest.raises(SystemExit) as e:  # read as an image folder: it holds none
        DS.build_dataset(out)
    one_line(e.value.code, f"--data {out}", "no images")


def test_image_size_must_match_an_npz_or_the_digits(tmp_path):
    """--image-size other than the data's is refused, not silently ignored."""
    np.savez(tmp_path / "d.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for data in (str(tmp_path / "d.npz"), "digits"):
        assert DS.build_dataset(data, image_size=8).shape[1:] == (8, 8)
        with pytest.raises(SystemExit) as e:
            DS.open_data(data, 32)
        one_line(e.value.code, "--image-size 32", "8px")


def test_stray_image_next_to_class_folders_warns(tmp_path, capsys):
    """A class tree with a stray image: one clear warning line (the folder reads as one class)."""
    root = image_folder(tmp_path / "tree")
    Image.new("RGB", (20, 20)).save(tmp_path / "tree" / "stray.png")
    capsys.readouterr()
    ds = DS.build_dataset(root, image_size=16)
    out = capsys.readouterr().out.strip().splitlines()
    assert ds.num_classes == 1 and len(ds) == 7 and len(out) == 1
    one_line(out[0], "warning", root, "stray.png", "ONE class", "--unconditional")
    DS.build_dataset(root, image_size=16, unconditional=True)  # asked for one class: silent
    os.remove(tmp_path / "tree" / "stray.png")
    assert DS.build_dataset(root, image_size=16).num_classes == 3  # a clean tree: silent
    assert capsys.readouterr().out == ""


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    """A 16-bit grayscale PNG (PIL mode "I;16" or "I") was read as pure white: PIL clips it at
    255. It is scaled, 65535 -> 255, as an 8-bit image of the same shades."""
    root = tmp_path / "gray16"
    root.mkdir()
    for value in (0, 257 * 100, 65535):
        img = Image.fromarray(np.full((8, 8), value, np.uint16))
        img.save(root / f"{value:05d}.png")
        with Image.open(root / f"{value:05d}.png") as back:
            assert back.mode in ("I;16", "I"), back.mode
    ds = DS.ImageFolder(str(root), 8, flip=False)
    shades = [np.unique(ds.load(i)).tolist() for i in range(len(ds))]
    assert shades == [[0], [100], [255]], shades


# --------------------------------------------------------------------------------------
# 7. Training resumes bitwise; signals, non-finite losses, two processes, guidance, every
#    kind of data
# --------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--log-every", "2", "--sample-every", "0", "--ckpt-every", "4", "--workers", "0",
               "--eval-every", "0"]


def train(tmp, *flags, **kw):
    return run("train.py", "--results-dir", tmp, *TRAIN_FLAGS, *flags, **kw)


def train_here(results, *argv):
    """train.py in this process, checkpoints every 2 steps."""
    with one_thread():
        T.main(*T.resolve(["--results-dir", str(results), *TRAIN_FLAGS, "--ckpt-every", "2",
                           *map(str, argv)]))


def assert_states_equal(a, b, nets, optimizers):
    """Two checkpoints hold the same tensors (torch.equal) in every network and optimizer state."""
    for key in nets:
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for key in optimizers:
        for i, st in a[key]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, b[key]["state"][i][k]), (key, i, k)


def test_resume_after_a_non_finite_loss_is_bitwise_exact(tmp_path):
    """Interrupted at step 4 and resumed, a run ends bitwise as the uninterrupted one (weights,
    optimizers, gradient normalization, logged losses; that one with --grad-checkpoint). A
    non-finite loss stops a run with exit 1 before its next write."""
    train(tmp_path / "a", "--max-steps", "8", "--grad-checkpoint")
    train(tmp_path / "b", "--max-steps", "4")
    run_a, run_b = tmp_path / "a" / "000-T-2", tmp_path / "b" / "000-T-2"
    good = (run_b / "checkpoints" / "0000004.pt").read_bytes()
    # A transport weight of 1e39 overflows float32: the first G step's loss (step 5) is inf.
    r = train(tmp_path / "b", "--resume", run_b, "--max-steps", "8", "--ot", "1e39", check=False)
    assert r.returncode == 1 and "non-finite loss before step 6" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in (run_b / "checkpoints").iterdir()) == ["0000004.pt"]
    assert (run_b / "checkpoints" / "0000004.pt").read_bytes() == good
    assert [r["step"] for r in read_log(run_b)] == [2, 4]
    train(tmp_path / "b", "--resume", run_b, "--max-steps", "8")
    a, b = load(run_a / "checkpoints" / "0000008.pt"), load(run_b / "checkpoints" / "0000008.pt")
    assert_states_equal(a, b, ("model", "ema", "dis", "gradnorm"), ("opt_g", "opt_d"))
    assert a["gradnorm"]["square_avg"] > 0 and a["step"] == b["step"] == 8
    assert a["args"]["recipe"] == "digits"
    logs = []
    for run_dir in (run_a, run_b):  # the logged losses, timings left out
        logs.append([dict(r, it_per_s=0) for r in read_log(run_dir) if "it_per_s" in r])
    assert logs[0] == logs[1] and len(logs[0]) == 4


def test_non_finite_loss_stops_before_the_next_grid(tmp_path):
    """With --lr 1e9 the loss is non-finite from the second step on: the run stops there, with
    no grid, evaluation or checkpoint of the diverged model, although no log or checkpoint step
    came (only the grid and evaluation of step 1, after a D step, while the loss was finite)."""
    r = train(tmp_path, "--lr", "1e9", "--log-every", "100", "--sample-every", "1",
              "--eval-every", "1", "--eval-samples", "20", "--max-steps", "20", check=False)
    assert r.returncode == 1 and "non-finite loss before step 2" in r.stdout, r.stdout + r.stderr
    run_dir = tmp_path / "000-T-2"
    assert sorted(p.name for p in run_dir.glob("samples_*.png")) == ["samples_0000001.png"]
    assert not os.listdir(run_dir / "checkpoints")
    assert [r["step"] for r in read_log(run_dir)] == [1]  # step 1's evaluation only


def test_flow_matching_run_resumes_bitwise(tmp_path):
    """A flow-matching run interrupted at step 4 and resumed ends as the uninterrupted one."""
    train(tmp_path / "a", "--recipe", "fm-digits", "--max-steps", "8")
    train(tmp_path / "b", "--recipe", "fm-digits", "--max-steps", "4")
    run_b = tmp_path / "b" / "000-fm-T-2"
    train(tmp_path / "b", "--resume", run_b, "--max-steps", "8")
    a = load(tmp_path / "a" / "000-fm-T-2" / "checkpoints" / "0000008.pt")
    b = load(run_b / "checkpoints" / "0000008.pt")
    assert sorted(k for k in a if k not in ("args", "rng")) == [
        "data_position", "ema", "model", "opt", "step"]
    assert_states_equal(a, b, ("model", "ema"), ("opt",))
    assert a["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert a["opt"]["param_groups"][0]["weight_decay"] == 0.0


def test_cafm_run_from_a_flow_run_resumes_bitwise(tmp_path):
    """--recipe cafm-digits --init FLOW_RUN: G and its EMA start as the flow run's EMA weights (the
    warm-up's D steps leave them as they are); a run interrupted at step 4 and resumed ends as
    the uninterrupted one (G, EMA, D, both optimizers); sample.py samples it as a flow model."""
    train(tmp_path / "fm", "--recipe", "fm-digits", "--max-steps", "4")
    flow = load(tmp_path / "fm" / "000-fm-T-2" / "checkpoints" / "0000004.pt")
    flags = ["--recipe", "cafm-digits", "--init", tmp_path / "fm" / "000-fm-T-2", "--warmup",
             "3", "--n-dis", "2"]
    train(tmp_path / "a", *flags, "--max-steps", "8")
    train(tmp_path / "b", *flags, "--max-steps", "4")
    run_b = tmp_path / "b" / "000-cafm-T-2"
    after_warmup = load(run_b / "checkpoints" / "0000004.pt")  # steps 0-3: D steps only
    for key in ("model", "ema"):
        for k, v in flow["ema"].items():
            assert torch.equal(after_warmup[key][k], v), (key, k)
    assert after_warmup["dis"]["dis_embed"].shape == (M.models["T/2"]["hidden_size"],)
    train(tmp_path / "b", "--resume", run_b, "--max-steps", "8")
    a = load(tmp_path / "a" / "000-cafm-T-2" / "checkpoints" / "0000008.pt")
    b = load(run_b / "checkpoints" / "0000008.pt")
    assert_states_equal(a, b, ("model", "ema", "dis"), ("opt_g", "opt_d"))
    for key in ("opt_g", "opt_d"):
        assert a[key]["param_groups"][0]["betas"] == (0.0, 0.95)
    assert not torch.equal(a["model"]["final_layer.linear.weight"],
                           flow["ema"]["final_layer.linear.weight"])  # a G step was taken
    logged = set()
    for r in read_log(run_b):
        logged |= set(r)
    assert {"d_adv", "g_adv", "logit_real", "logit_fake"} <= logged
    out = run("sample.py", "--ckpt", run_b, "--steps", "4", "--out", tmp_path / "g.png").stdout
    assert "4 step(s), pred v, euler" in out, out


def test_resume_from_an_older_checkpoint_keeps_the_later_ones(tmp_path):
    """--resume of a run's older checkpoint file starts a new run folder: the later checkpoints stay
    as they were."""
    train(tmp_path, "--max-steps", "8")
    ckpts = tmp_path / "000-T-2" / "checkpoints"
    later = (ckpts / "0000008.pt").read_bytes()
    train(tmp_path, "--resume", ckpts / "0000004.pt", "--max-steps", "8", "--lr", "1e-3")
    assert (ckpts / "0000008.pt").read_bytes() == later
    assert load(tmp_path / "001-T-2" / "checkpoints" / "0000008.pt")["args"]["lr"] == 1e-3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_stopped_by_a_signal_resumes(tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM: a checkpoint is saved (no .tmp left), exit 130 / 143;
    --resume continues from it, dropping log lines past it and a torn last line (as a kill -9
    leaves them): log.jsonl holds each step once."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--results-dir", str(tmp_path),
           *TRAIN_FLAGS, "--max-steps", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         cwd=HERE)
    run_dir = tmp_path / "000-T-2"
    deadline = time.time() + 120
    while not (run_dir / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig and "stopped by a signal" in out, out
    step = load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1])["step"]
    assert step >= 2 and not list((run_dir / "checkpoints").glob("*.tmp"))
    # Pretend a kill -9 came after more log lines than checkpoints, the last one cut short
    with open(run_dir / "log.jsonl", "a") as f:
        for extra in (step + 2, step + 4):
            f.write(json.dumps({"step": extra, "written_before_the_kill": 1}) + "\n")
        f.write('{"step": 9999, "d_lo')
    train(tmp_path, "--resume", run_dir, "--max-steps", step + 2)
    assert load(run_dir / "checkpoints" / f"{step + 2:07d}.pt")["step"] == step + 2
    rows = read_log(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] > step, steps
    assert not [r for r in rows if "written_before_the_kill" in r]


def test_after_kill_9_the_last_checkpoint_loads(tmp_path):
    """A checkpoint is written under a temporary name, then renamed: a kill -9 mid-save leaves
    the .tmp file, which --resume passes over for the last whole checkpoint."""
    train_here(tmp_path, "--max-steps", "4")
    ckpts = tmp_path / "000-T-2" / "checkpoints"
    (ckpts / "0000006.pt.tmp").write_bytes(b"half a checkpoint")
    s, ckpt, path = T.resolve(["--resume", str(tmp_path / "000-T-2")])
    assert path.endswith("0000004.pt") and ckpt["step"] == 4


def test_classifier_then_guided_run(tmp_path):
    """--recipe classifier writes a checkpoint that --cls takes (its EMA weights); a bare state
    dict (the release's classifier.pth) loads too, its size read from its keys."""
    digits = ["--model", "T/2", "--global-batch-size", "32"]
    r = train(tmp_path, "--recipe", "classifier", *digits, "--max-steps", "4")
    assert " cls_loss " in r.stdout and " acc " in r.stdout
    ck = load(tmp_path / "000-cls-T-2" / "checkpoints" / "0000004.pt")
    assert sorted(ck) == ["args", "data_position", "ema", "model", "opt", "rng", "step"]
    assert set(ck["ema"]) == set(M.Classifier(**M.models["T/2"], input_size=8, in_channels=1,
                                              num_classes=10).state_dict())
    torch.save(ck["ema"], tmp_path / "bare_classifier.pth")
    for cls_file in (tmp_path / "000-cls-T-2", tmp_path / "bare_classifier.pth"):
        r = train(tmp_path / "g", "--max-steps", "2", "--cls", cls_file, "--cg", "0.01",
                  "--augment-p", "0.4")
        assert " cg " in r.stdout


def test_torchrun_two_processes_gloo(tmp_path):
    """Two CPU processes (gloo): the global batch is split, DDP keeps the replicas equal and the
    checkpoint holds both ranks' RNG states."""
    r = run("train.py", "--results-dir", tmp_path, *TRAIN_FLAGS, "--max-steps", "4", torchrun=True)
    ck = load(tmp_path / "000-T-2" / "checkpoints" / "0000004.pt")
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["cpu"], ck["rng"][1]["cpu"])
    assert ck["data_position"] == 4 * 16  # 32 examples per step, split over 2 ranks
    assert "2 process(es)" in r.stdout


def test_every_data_kind_runs_end_to_end(tmp_path):
    """4 steps from an npz without labels, whose checkpoint samples (a square grid, arr_1 all
    zeros) without extra flags; an image folder through the VAE and the latent cache train."""
    np.savez(tmp_path / "unl.npz", arr_0=random_images(24, size=16))
    train_here(tmp_path / "unl", "--data", tmp_path / "unl.npz", "--model", "T/2",
               "--global-batch-size", "4", "--max-steps", "4", "--image-size", "16")
    run_dir = tmp_path / "unl" / "000-T-2"
    ck = load(run_dir / "checkpoints" / "0000004.pt")
    assert ck["model"]["y_embedder.embedding_table.weight"].shape == (1, 64)
    assert ck["model"]["x_embedder.proj.weight"].shape == (64, 3, 2, 2)
    sample_main("--ckpt", run_dir, "--per-class", 4, "--out", tmp_path / "u.png")
    # 4 x 4 of 16 px -> 64
    assert np.asarray(Image.open(tmp_path / "u.png")).shape == (4 * 66 + 2, 4 * 66 + 2, 3)
    sample_main("--ckpt", run_dir, "--num-samples", 6, "--out", tmp_path / "u.npz")
    out = read_npz(tmp_path / "u.npz")
    assert out["arr_0"].shape == (6, 16, 16, 3) and out["arr_1"].tolist() == [0] * 6
    # an image folder (VAE encoding on the fly) and the latent cache: the networks see 4x16x16
    # latents (32 px images, a 2-level tiny VAE) and the grids are decoded to pixels
    root, vae_path, cache, _ = cached_folder(tmp_path)
    flags = ["--vae", vae_path, "--image-size", "32", "--model", "T/2", "--global-batch-size", "4",
             "--max-steps", "2", "--sample-every", "2"]
    for data in (root, cache):
        assert "input 4x16x16" in train(tmp_path / "runs", "--data", data, *flags).stdout
    for run_dir in ("000-T-2", "001-T-2"):
        ck = load(tmp_path / "runs" / run_dir / "checkpoints" / "0000002.pt")
        assert ck["model"]["x_embedder.proj.weight"].shape == (64, 4, 2, 2)
        assert ck["args"]["recipe"] == "1nfe"
        grid = Image.open(tmp_path / "runs" / run_dir / "samples_0000002.png")
        # 10 decoded 32 px images per row (+ borders)
        assert grid.mode == "RGB" and grid.size[0] > 10 * 32


def test_out_of_memory_is_one_line(tmp_path, monkeypatch):
    """Out of memory in a step ends the run with one line saying what to lower."""
    def oom(self, x0, y, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(T.Pair, "d_step", oom)
    with pytest.raises(SystemExit) as e:
        train_here(tmp_path, "--max-steps", "2")
    one_line(e.value.code, "out of memory with 32 examples per process", "--global-batch-size")


# --------------------------------------------------------------------------------------
# 8. Sample files do not depend on the number of processes, and are never overwritten; bare
#    state dicts and flow runs load
# --------------------------------------------------------------------------------------


def digits_checkpoint(path, steps="any"):
    """A checkpoint in train.py's format (model, ema, args, step) of the digits model, model and
    EMA weights made different."""
    s = T.resolve(["--steps", steps])[0]
    G = T.OBJECTIVES["afm"](s, 1, 8, 10, torch.device("cpu"), contextlib.nullcontext()).G
    ema = M.Generator(**M.models["T/2"], input_size=8, in_channels=1, num_classes=10,
                      use_t_src=steps != "1", use_t_tgt=steps == "any")
    randomize(G, seed=1)
    randomize(ema, seed=2)
    torch.save({"model": G.state_dict(), "ema": ema.state_dict(), "args": vars(s), "step": 7}, path)
    return G, ema, s


def bare_generator(path, seed=0, **kw):
    """A plain .pth of generator weights, as the release ships them (the digits size unless
    told)."""
    size = {"input_size": 8, "in_channels": 1, "num_classes": 10, **kw}
    G = randomize(M.Generator(**M.models["T/2"], **size), seed=seed)
    torch.save(G.state_dict(), path)
    return G


def expected_samples(G, indices, labels, steps, pred, seed=0, vae=None, **guidance):
    """uint8 NHWC samples computed here from the definition: per-index CPU noise, generate,
    decode, truncation."""
    H = int(G.pos_embed.shape[1] ** 0.5) * G.patch_size
    z = []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 10**8 + int(i))
        z.append(torch.randn(G.in_channels, H, H, generator=g))
    z = torch.stack(z)  # (N, C, H, W)
    with torch.no_grad(), one_thread():
        x = A.generate(G, z, torch.as_tensor(np.asarray(labels)), steps, pred, **guidance)
        if vae is not None:
            x = vae.decode(x / V.SCALE)
    x = x.float().clamp(-1, 1).expand(-1, 3, -1, -1)
    return ((x + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class InceptionStandIn(nn.Module):
    """Stands in for InceptionV3 in plumbing tests: the features (pool3, spatial, logits) are the
    first pixel values in NCHW order, `widths` of them each."""

    def __init__(self, widths=(6, 4, 5)):
        super().__init__()
        self.w, self.widths = nn.Parameter(torch.ones(())), widths

    def forward(self, x):
        f = x.float().flatten(1) * self.w
        a, b, c = self.widths
        return f[:, :a], f[:, a:a + b], f[:, :c]


def stand_in(path=None, device="cpu"):
    """Replaces fid.load_inception in the tests."""
    return InceptionStandIn()


def test_npz_same_for_one_and_two_processes(tmp_path):
    """ADM's sample batch format; the same bits from 1 process x batch 40 and 2 processes x
    batch 16; exactly N / K per class in the release's shuffled order; the samples are those of
    the definition (EMA weights, per-index noise)."""
    ckpt = tmp_path / "ck.pt"
    _, ema, _ = digits_checkpoint(ckpt)
    N, K = 120, 10
    flags = ["--ckpt", ckpt, "--steps", 2, "--num-samples", N]
    sample_main(*flags, "--batch-size", 40, "--out", tmp_path / "a.npz")
    r = run("sample.py", *flags, "--batch-size", 16, "--out", tmp_path / "b.npz", torchrun=True)
    assert "2 process(es)" in r.stdout
    a, b = read_npz(tmp_path / "a.npz"), read_npz(tmp_path / "b.npz")
    # uint8 NHWC RGB (the gray digit in all three channels), labels beside it
    assert sorted(a) == ["arr_0", "arr_1"]
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (N, 8, 8, 3)
    assert a["arr_1"].dtype == np.int64 and a["arr_1"].shape == (N,)
    assert (a["arr_0"] == a["arr_0"][..., :1]).all() and a["arr_0"].std() > 20
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert np.bincount(a["arr_1"], minlength=K).tolist() == [N // K] * K
    perm = np.random.RandomState(42).permutation(N)  # the release's pack_npz.py order
    np.testing.assert_array_equal(a["arr_1"], perm // (N // K))
    assert (np.diff(a["arr_1"]) != 0).sum() > N // 2  # shuffled, not class-sorted
    j = np.arange(16)  # a batch of 16 (tiny CPU batches may round differently)
    want = expected_samples(ema, perm[j], a["arr_1"][j], 2, "v")
    np.testing.assert_array_equal(a["arr_0"][j], want)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A 1-NFE digits checkpoint and 120 samples of it made at once (batch 40) with --fid:
    {"ckpt", "ema", "ref", "a.npz", "stdout"}, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("one_step")
    ckpt, ref = tmp / "ck.pt", tmp / "ref.npz"
    _, ema, _ = digits_checkpoint(ckpt, steps="1")
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(ref, arr_0=images)
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(fid, "load_inception", stand_in)
        sample_main("--ckpt", ckpt, "--num-samples", 120, "--batch-size", 40, "--fid", ref,
                    "--out", tmp / "a.npz")
    return {"ckpt": ckpt, "ema": ema, "ref": ref, "a.npz": tmp / "a.npz",
            "stdout": stdout.getvalue()}


def test_fid_flag_prints_one_line_of_scores(one_step):
    """--fid scores the samples in memory and prints one line; no grid is drawn."""
    lines = one_step["stdout"].splitlines()
    line = [ln for ln in lines if ln.startswith("FID ")]
    a = read_npz(one_step["a.npz"])
    net = InceptionStandIn()
    feats = fid.compute_features(net, a["arr_0"], progress=False)
    m = fid.evaluate(feats, fid.reference_stats(str(one_step["ref"]), net))
    assert line == [f"FID {m['fid']:.4f} | sFID {m['sfid']:.4f} | IS {m['inception_score']:.4f} | "
                    f"precision {m['precision']:.4f} | recall {m['recall']:.4f}"]
    assert m["fid"] > 0 and not list(one_step["a.npz"].parent.glob("*.png"))


def test_grids_are_the_samples_one_class_per_row(one_step, tmp_path):
    """A PNG grid holds the samples, one class per row, the same bits for the same seed."""
    ckpt = one_step["ckpt"]
    sample_main("--ckpt", ckpt, "--out", tmp_path / "g.png")
    img = np.asarray(Image.open(tmp_path / "g.png"))
    # all 10 digit classes in rows, 8 per row, upscaled to 64 px
    assert img.shape == (10 * 66 + 2, 8 * 66 + 2, 3)
    row = 3  # class 3 = sample indices 24..31; cells are 64 px with 2 px borders; save_grid rounds
    # truncated: within 1 of rounded
    x = expected_samples(one_step["ema"], range(24, 32), [3] * 8, 1, "x").astype(np.float64)
    for c in range(8):
        top, left = 2 + row * 66, 2 + c * 66
        cell = img[top: top + 64: 8, left: left + 64: 8]  # (8, 8, 3)
        assert np.abs(cell.astype(np.float64) - x[c]).max() <= 1
    sample_main("--ckpt", ckpt, "--out", tmp_path / "g2.png")
    # fixed seed
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "g2.png").read_bytes()


# A bare state dict as the release ships it: (id, the saved generator's kwargs, load_generator's
# flags, what sample.py must find: model.generator_config's values and how it samples)
BARE_FILES = [
    ("k-nfe", dict(use_t_src=True), {}, dict(use_t_src=True, use_t_tgt=False, pred="v", steps=1)),
    ("flags-win", dict(use_t_src=True), dict(steps=2, pred="x"), dict(pred="x", steps=2)),
    ("any-step", dict(use_t_src=True, use_t_tgt=True), {}, dict(use_t_tgt=True, pred="v")),
    ("deep", dict(repeat=2), dict(repeat=2), dict(use_t_src=False, repeat=2, pred="x")),
    ("null-row", dict(num_classes=1000, class_dropout_prob=0.1), {},
     dict(num_classes=1001, classes=1000, null=1000)),
]


@table("saved, flags, want", BARE_FILES)
def test_bare_state_dicts_load(tmp_path, saved, flags, want):
    """The configuration is read off the weights (flags win over it); the loaded generator
    computes what the saved one did."""
    f = str(tmp_path / "g.pth")
    G = bare_generator(f, **saved)
    L, how = S.load_generator(f, **flags)
    name, kw = M.generator_config(torch.load(f, weights_only=True), flags.get("repeat", 1))
    got = {**kw, **how}
    assert name == "T/2" and {k: got[k] for k in want} == want, got
    assert not any(p.requires_grad for p in L.parameters()) and not L.training
    z, y, t = torch.randn(8, 1, 8, 8), torch.arange(8) % 10, torch.rand(8)
    with torch.no_grad(), one_thread():
        assert torch.equal(G(z, y, t, t), L(z, y, t, t))


def test_files_that_do_not_fit_are_one_line(tmp_path):
    """A generator of no registry size, --steps for a 1-NFE generator, a state dict of something
    else: one line naming the file and what does not fit."""
    f = tmp_path / "g.pth"
    bare_generator(f)
    odd = M.Generator(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                      num_heads=2, num_classes=10)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    torch.save({"pos_embed": torch.zeros(1, 16, 64)}, tmp_path / "other.pth")
    cases = [
        (f, ["--steps", 2], "is a 1-NFE generator"),
        (tmp_path / "odd.pth", [], "no size of model.py's registry has depth 2, width 32"),
        (tmp_path / "other.pth", [], "not a generator's state dict"),
    ]
    for path, argv, words in cases:
        with pytest.raises(SystemExit) as e:
            sample_main("--ckpt", path, *argv, "--out", tmp_path / "g.png")
        one_line(e.value.code, "error: --", str(path), words)
        assert len(e.value.code) < 300
    assert not (tmp_path / "g.png").exists()


def test_latent_model_through_vae(tmp_path):
    """A latent generator's samples are decoded by --vae: the npz holds the definition's."""
    vae = V.load_vae(tiny_vae_file(tmp_path / "vae.pt"))
    f = str(tmp_path / "g.pth")
    G = bare_generator(f, in_channels=4, input_size=4, num_classes=3)
    sample_main("--ckpt", f, "--vae", tmp_path / "vae.pt", "--num-samples", 24, "--batch-size", 8,
                "--out", tmp_path / "a.npz")
    a = read_npz(tmp_path / "a.npz")
    # 4x4 latents -> 8x8 RGB
    assert a["arr_0"].shape == (24, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    assert np.bincount(a["arr_1"]).tolist() == [8, 8, 8] and a["arr_0"].std() > 5
    perm = np.random.RandomState(42).permutation(24)
    want = []
    for i in (0, 8, 16):  # class i // 8 = sample indices i..i+7
        want.append(expected_samples(G, range(i, i + 8), [i // 8] * 8, 1, "x", vae=vae))
    want = np.concatenate(want)
    np.testing.assert_array_equal(a["arr_0"], want[perm])
    sample_main("--ckpt", f, "--vae", tmp_path / "vae.pt", "--out", tmp_path / "g.png")
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (3 * 66 + 2, 8 * 66 + 2, 3)


def test_sample_py_samples_a_flow_checkpoint_at_n_steps(tmp_path):
    """sample.py knows a flow-matching run without flags (velocity, Euler, the run's NFE, the null
    class of its class dropout for --cfg), takes --steps N and --solver heun, and its npz does not
    depend on the number of processes."""
    train(tmp_path, "--recipe", "fm-digits", "--max-steps", "4")
    ckpt = tmp_path / "000-fm-T-2"
    r = run("sample.py", "--ckpt", ckpt, "--cfg", 3, "--per-class", 2, "--out", tmp_path / "g.png")
    assert "32 step(s), pred v, euler, cfg 3;" in r.stdout, r.stdout
    for steps, procs, solver in ((4, False, "euler"), (4, True, "euler"), (8, False, "heun")):
        out = tmp_path / f"s{steps}{procs}.npz"
        run("sample.py", "--ckpt", ckpt, "--steps", steps, "--num-samples", 20, "--out", out,
            "--batch-size", 8, "--weights", "model", "--solver", solver, torchrun=procs)
    a = np.load(tmp_path / "s4False.npz")["arr_0"]
    b = np.load(tmp_path / "s4True.npz")["arr_0"]
    c = np.load(tmp_path / "s8False.npz")["arr_0"]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def no_sampling(*a, **kw):
    raise AssertionError("a sample was drawn before the inputs were checked")


def test_npz_and_grid_are_never_overwritten(tmp_path, capsys):
    """An existing --out (a file, or a folder where a file is meant) is refused in one line
    before the checkpoint is read; nothing changes."""
    (tmp_path / "s.npz").write_bytes(b"mine")
    (tmp_path / "g.png").write_bytes(b"mine")
    (tmp_path / "d.npz").mkdir()
    for out, extra in (("s.npz", ["--num-samples", 20]), ("g.png", []),
                       ("d.npz", ["--num-samples", 20])):
        status, line = refused("sample.py", ["--ckpt", tmp_path / "none.pt", "--out",
                                             tmp_path / out, *extra], capsys)
        assert status == 1 and line == f"error: --out {tmp_path / out} exists: remove it or " \
                                       f"choose another name", line
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "g.png").read_bytes() == b"mine"


# --------------------------------------------------------------------------------------
# 9. Metrics equal their direct formulas; fid.py's reference files; in-loop evaluation
# --------------------------------------------------------------------------------------


def direct_is(logits, split):
    """Inception Score in float64: exp of the mean KL(p(y|x) || p(y)) per chunk, chunks averaged."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(np.mean([np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean())
                          for q in (p[i:i + split] for i in range(0, len(p), split))]))


def direct_pr(ref, sam, k=3):
    """Improved precision/recall by brute force: k-th neighbour radii (self excluded), squared
    distances."""
    def d2(a, b):
        return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
    r_ref, r_sam = np.sort(d2(ref, ref), 1)[:, k], np.sort(d2(sam, sam), 1)[:, k]
    d = d2(ref, sam)  # (n_ref, n_sam)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sam[None]).any(1).mean()


def eval_worker(rank, port, argv):
    """One of two gloo processes of a training run that evaluates with the stand-in Inception."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fid.load_inception = stand_in
    T.main(*T.resolve(argv))


def test_compute_features_batching():
    """Features of NHWC uint8 images, numpy or torch, in batches of any size (the last one
    short): the same numbers, in input order."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 4, 5, 3), dtype=np.uint8)
    # NHWC in, NCHW to the network
    want = images.transpose(0, 3, 1, 2).reshape(11, -1).astype(np.float32)
    for inp, batch_size in ((images, 3), (torch.from_numpy(images), 11), (images, 1)):
        f = fid.compute_features(stand_in(), inp, batch_size=batch_size, progress=False)
        assert f["pool3"].dtype == np.float32
        np.testing.assert_array_equal(f["pool3"], want[:, :6])
        np.testing.assert_array_equal(f["spatial"], want[:, 6:10])
        np.testing.assert_array_equal(f["logits"], want[:, :5])
    with pytest.raises(ValueError, match="uint8"):
        fid.compute_features(stand_in(), images.astype(np.float32), progress=False)


def test_evaluate_on_given_features():
    """fid.evaluate on given features: a set against itself, and shifted by 1 without reference
    pool3 features (precision and recall then skipped)."""
    rng = np.random.default_rng(1)
    feats = {"pool3": rng.standard_normal((40, 6)).astype(np.float32),
             "spatial": rng.standard_normal((40, 5)).astype(np.float32),
             "logits": rng.standard_normal((40, 1008)).astype(np.float32)}
    st = fid.feature_stats(feats)
    cov = np.cov(feats["pool3"].astype(np.float64).T)
    np.testing.assert_allclose(st["sigma"], cov, rtol=1e-12)
    m = fid.evaluate(feats, dict(st, pool3=feats["pool3"]), device="cpu")
    assert abs(m["fid"]) < 1e-9 and abs(m["sfid"]) < 1e-9
    assert m["inception_score"] == fid.inception_score(feats["logits"])
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    other = dict(feats, pool3=feats["pool3"] + 1)
    m2 = fid.evaluate(other, dict(st, pool3=None))
    assert m2["precision"] is None and m2["recall"] is None
    assert abs(m2["fid"] - 6.0) < 1e-6  # a mean shift of 1 in 6 dimensions, same covariance


def test_frechet_distance(monkeypatch):
    """The direct formula; a set against itself; the retry of a non-finite sqrtm; the imaginary
    part's tolerance; pytorch-fid's number (scipy's sqrtm) on the fixture's d=64 statistics."""
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(2):
        x = rng.standard_normal((50, 8)) @ rng.standard_normal((8, 8))
        stats += [x.mean(0), np.cov(x, rowvar=False)]
    mu1, s1, mu2, s2 = stats
    # directly: tr sqrtm(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), both roots by eigendecomposition
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    val = fid.frechet_distance(mu1, s1, mu2, s2)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert isinstance(val, float) and val > 1
    assert abs(val - direct) <= 1e-9 * val
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) <= 1e-9 * np.trace(s1)
    # a non-finite sqrtm is retried once with 1e-6 I added to both covariances
    calls, sqrtm = [], fid.linalg.sqrtm

    def nan_once(m):
        calls.append(m)
        if len(calls) == 1:
            return np.full_like(m, np.nan)
        return sqrtm(m)
    monkeypatch.setattr(fid.linalg, "sqrtm", nan_once)
    with pytest.warns(UserWarning, match="singular"):
        val2 = fid.frechet_distance(mu1, s1, mu2, s2)
    eps = 1e-6 * np.eye(8)
    np.testing.assert_allclose(calls[1], (s1 + eps) @ (s2 + eps), rtol=1e-12)
    assert abs(val2 - val) < 1e-4
    # an imaginary part above 1e-3 on the diagonal is an error; a smaller one is dropped
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda m: sqrtm(m) + 1e-4j * np.eye(8))
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - val) <= 1e-9 * val
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda m: sqrtm(m) + 1e-2j * np.eye(8))
    with pytest.raises(ValueError, match="Imaginary"):
        fid.frechet_distance(mu1, s1, mu2, s2)
    monkeypatch.undo()
    # pytorch-fid's number (scipy's sqrtm) on the fixture's d=64 statistics, and a set against
    # itself (last, so that a missing fixture file skips the test after the checks above ran)
    c = fixture("fid_stats.pt")["cases"]["d64"]
    mu1, s1, mu2, s2 = (c[k].double().numpy() for k in ("mu1", "sigma1", "mu2", "sigma2"))
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - c["fid"]) <= 1e-6 * abs(c["fid"])
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1) - c["fid_self"]) <= 1e-6 * (np.trace(s1) * 2)


def test_inception_score_chunks_in_file_order():
    rng = np.random.default_rng(0)
    # 10 classes, class-sorted like an unshuffled sample file
    labels = np.repeat(np.arange(10), 1000)
    logits = 0.5 * rng.standard_normal((10000, 1008)) + 12 * np.eye(1008)[labels]
    logits = logits.astype(np.float32)
    sorted_is = fid.inception_score(logits)
    shuffled = logits[rng.permutation(10000)]
    shuffled_is = fid.inception_score(shuffled)
    assert abs(sorted_is - direct_is(logits, 5000)) <= 1e-4 * sorted_is
    assert abs(shuffled_is - direct_is(shuffled, 5000)) <= 1e-4 * shuffled_is
    assert sorted_is < 0.6 * shuffled_is  # each 5,000 chunk of the sorted file sees only 5 classes
    one_chunk = fid.inception_score(logits, split_size=10000)
    assert abs(one_chunk - direct_is(logits, 10000)) <= 1e-4 * shuffled_is


def test_precision_recall_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.integers(-3, 4, (30, 8)).astype(np.float32)
    sam = rng.integers(-3, 4, (25, 8)).astype(np.float32)
    sam[:12] += 3  # part of the samples off the reference manifold: precision < 1
    ref[:10] -= 3  # a mode of the reference that the samples miss: recall < 1
    want = direct_pr(ref, sam)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    for bs in (10000, 7):  # one distance block, and many blocks whose k-NN must be merged
        got = fid.precision_recall(ref, sam, batch_size=bs, device="cpu")
        assert got == pytest.approx(want, abs=1e-12)
    # large values overflow ADM's fp16 distances: the block falls back to fp32
    big_ref, big_sam = ref * 37, sam * 37
    big_ref[0] = 100
    t = torch.from_numpy(big_ref)
    assert not torch.isfinite(fid._sqdist(t.half(), t.half())).all()
    assert fid.precision_recall(big_ref, big_sam, batch_size=7, device="cpu") == pytest.approx(
        direct_pr(big_ref, big_sam), abs=1e-12)
    # ordinary features: the distances are ADM's fp16 ones, within fp16 rounding of the exact ones
    f = torch.from_numpy(rng.random((20, 64)).astype(np.float32))
    exact = ((f[:, None].double() - f[None].double()) ** 2).sum(-1)
    err = (fid._distances(f, f).double() - exact).abs().max().item()
    assert 1e-4 < err < 1e-2 * exact.max().item()  # fp32 distances would be ~1e-6 off


def test_make_ref_writes_adms_reference_format(tmp_path, monkeypatch):
    """--make-ref on a nested image folder writes ADM's reference format: arr_0 (sorted paths keep
    this order) and the statistics of its features."""
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        os.makedirs(tmp_path / "imgs" / f"d{i // 2}", exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / f"d{i // 2}" / f"{i}.png")
    monkeypatch.setattr(fid, "load_inception", stand_in)
    out = str(tmp_path / "ref.npz")
    fid.main(fid.parse_args(["--make-ref", str(tmp_path / "imgs"), "--out", out,
                             "--device", "cpu"]))
    ref = read_npz(out)
    assert sorted(ref) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    assert not os.path.exists(out + ".tmp")
    np.testing.assert_array_equal(ref["arr_0"], images)
    # the stand-in's features
    feats = images.transpose(0, 3, 1, 2).reshape(3, -1).astype(np.float64)
    for stat, f in (("mu", feats[:, :6]), ("mu_s", feats[:, 6:10])):
        np.testing.assert_allclose(ref[stat], f.mean(0), rtol=1e-12)
        np.testing.assert_allclose(ref["sigma" + stat[2:]], np.cov(f, rowvar=False), rtol=1e-12)


def test_pixel_report_on_hand_made_sets():
    """Identical sets: agreement 1, diversity 1, pixel FD 0; a copy shifted by c in every one of D
    pixels: FD = D c^2 exactly; every sample of a class the same image: diversity 0; wrong
    labels: agreement 0."""
    d = np.load(os.path.join(HERE, "digits.npz"))
    x, y = d["images"].astype(np.float64) / 8 - 1, d["labels"]
    r = fid.pixel_report(x, y, x, y)
    assert r["agreement"] == 1.0 and abs(r["diversity"] - 1.0) < 1e-12 and abs(r["pixel_fd"]) < 1e-8
    assert 0 < r["pixel_fd_floor"] < 1
    assert abs(fid.pixel_report(x + 0.1, y, x, y)["pixel_fd"] - 64 * 0.01) < 1e-8
    # each sample: the first real image of its class
    one = np.stack([x[np.flatnonzero(y == c)[0]] for c in y])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a collapsed set has a singular covariance
        assert fid.pixel_report(one, y, x, y)["diversity"] == 0.0
    assert fid.pixel_report(x, (y + 1) % 10, x, y)["agreement"] == 0.0
    # (N, 1, 32, 32): pixel FD on 8x8 averages, 64 dims
    big = np.kron(x.reshape(-1, 1, 8, 8), np.ones((4, 4)))
    assert abs(fid.pixel_report(big + 0.1, y, big, y)["pixel_fd"] - 64 * 0.01) < 1e-8


def test_in_loop_evaluation_over_two_processes(tmp_path):
    """--eval-every with --eval-ref: FID and IS of exactly --eval-samples class-balanced EMA
    samples, split over 2 gloo processes, equal the numbers computed here from the checkpoint; the
    digits' pixel report beside them; curves.png drawn."""
    d = np.load(os.path.join(HERE, "digits.npz"))
    gray = (d["images"][:40, :, :, None] * 255 // 16).astype(np.uint8)
    ref_images = np.repeat(gray, 3, axis=3)  # (40, 8, 8, 3)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    argv = ["--results-dir", str(tmp_path / "runs"), *TRAIN_FLAGS, "--max-steps", "4",
            "--eval-every", "2", "--eval-samples", "30", "--eval-ref", str(tmp_path / "ref.npz")]
    spawn_two(eval_worker, argv)
    run_dir = tmp_path / "runs" / "000-T-2"
    evals = [r for r in read_log(run_dir) if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_samples"] == 30 for r in evals)
    for r in evals:
        assert 0 <= r["agreement"] <= 1 and r["diversity"] >= 0 and r["pixel_fd"] > 0
    ema = M.Generator(**M.models["T/2"], input_size=8, in_channels=1, num_classes=10)
    ema.load_state_dict(load(run_dir / "checkpoints" / "0000004.pt")["ema"])
    labels = np.arange(30) // 3
    samples = expected_samples(ema.eval(), range(30), labels, 1, "x")
    feats = fid.compute_features(stand_in(), samples, progress=False)
    ref_feats = fid.compute_features(stand_in(), ref_images, progress=False)
    ref = fid.feature_stats(ref_feats)
    p = feats["pool3"].astype(np.float64)
    want = fid.frechet_distance(p.mean(0), np.cov(p, rowvar=False), ref["mu"], ref["sigma"])
    assert evals[1]["fid"] == pytest.approx(want, rel=1e-6)
    shuffled = feats["logits"][np.random.RandomState(42).permutation(30)]  # as sample.py's file
    assert evals[1]["inception_score"] == pytest.approx(fid.inception_score(shuffled), rel=1e-6)
    assert Image.open(run_dir / "curves.png").size[0] > 600


def test_short_run_skips_the_final_evaluation(tmp_path):
    """The end of a run shorter than --eval-every is not evaluated (a smoke run does not spend
    longer evaluating than training); a run of at least that length is."""
    r = train(tmp_path / "a", "--max-steps", "4", "--eval-every", "1000")
    assert "eval " not in r.stdout
    r = train(tmp_path / "b", "--max-steps", "6", "--eval-every", "4", "--eval-samples", "20")
    evals = [line for line in r.stdout.splitlines() if line.startswith("eval ")]
    assert [line[:12] for line in evals] == ["eval 0000004", "eval 0000006"], r.stdout


def test_evaluation_samples_and_scores_as_an_npz(tmp_path, monkeypatch):
    """fid.Evaluation: class-balanced labels, each sample's own noise (noise_of), short batches
    padded with their last sample; the numbers are those of its samples as uint8 images: FID
    and IS (in file order) against the reference, and the pixel report against real images."""
    calls = []

    def sample(z, y):  # a stand-in network: the label's shade plus the noise's mean
        calls.append((z, y))
        return (y[:, None, None, None] / 3 - 0.8 + z.mean(1, keepdim=True) / 4).expand(-1, 3, 8, 8)
    d = np.load(os.path.join(HERE, "digits.npz"))
    ref = np.repeat((d["images"][:40, :, :, None] * 255 // 16).astype(np.uint8), 3, axis=3)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    monkeypatch.setattr(fid, "load_inception", stand_in)
    real = (torch.rand(12, 1, 8, 8) * 2 - 1, torch.arange(12) % 3)
    evaluation = fid.Evaluation(6, 3, (2, 8, 8), 4, seed=5, ref=str(tmp_path / "ref.npz"),
                                real=real)
    got = evaluation(sample)
    assert [y.tolist() for _, y in calls] == [[0, 0, 1, 1], [2, 2, 2, 2]]  # 2nd: 4, 5 + padding
    indices = [0, 1, 2, 3, 4, 5, 5, 5]
    z = torch.cat([c[0] for c in calls])  # (8, 2, 8, 8)
    assert torch.equal(z, fid.noise_of(indices, (2, 8, 8), 5))
    g = torch.Generator().manual_seed(5 * 10**8 + 3)  # sample 3's own generator
    assert torch.equal(z[3], torch.randn(2, 8, 8, generator=g))
    images = fid.to_uint8(sample(z[:6], torch.tensor([0, 0, 1, 1, 2, 2])))  # (6, 8, 8, 3)
    feats = fid.compute_features(stand_in(), images, progress=False)
    want = fid.evaluate(feats, fid.reference_stats(str(tmp_path / "ref.npz"), stand_in()))
    assert got["eval_samples"] == 6 and got["fid"] == pytest.approx(want["fid"], rel=1e-9)
    logits = feats["logits"][fid.file_order(6)]
    assert got["inception_score"] == pytest.approx(fid.inception_score(logits), rel=1e-9)
    labels = [0, 0, 1, 1, 2, 2]
    for k, v in fid.pixel_report_of(images, labels, *real).items():
        assert got[k] == v, k
    x = torch.tensor([-1.0, 0.0, 0.999, 1.0]).view(1, 1, 1, 4).expand(-1, 3, -1, -1)
    assert fid.to_uint8(x)[0, 0, :, 0].tolist() == [0, 127, 254, 255]  # truncated, as the release


# --------------------------------------------------------------------------------------
# 10. Bad input gets one line naming the flag or file (exit 2 for usage, 1 for the rest),
#     before the work, and changes no file; runs never collide
# --------------------------------------------------------------------------------------


def snapshot(root):
    """Every file's bytes and every folder under root: what a refusal must leave as it was."""
    files = {}
    for p in sorted(root.rglob("*")):
        files[str(p)] = None  # a folder
        if p.is_file():
            files[str(p)] = p.read_bytes()
    return files


def png_folder(path, truncated=False):
    """5 PNG files 0.png ... 4.png; truncated: 2.png cut in half."""
    os.makedirs(path)
    for i, img in enumerate(random_images(5)):
        Image.fromarray(img).save(os.path.join(path, f"{i}.png"))
    if truncated:
        data = open(os.path.join(path, "2.png"), "rb").read()
        open(os.path.join(path, "2.png"), "wb").write(data[: len(data) // 2])
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the refusal tables below name, made once in one folder: {"t": the folder}."""
    t = tmp_path_factory.mktemp("inputs")
    # a finished 2-step run (runs/000-T-2, checkpoint at step 2), a cut checkpoint, a bare state
    # dict, and a pickle of a class torch.load(weights_only) refuses (nothing in it is run)
    train_here(t / "runs", "--max-steps", "2")
    good = t / "runs" / "000-T-2" / "checkpoints" / "0000002.pt"
    (t / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    torch.save(load(good)["ema"], t / "bare.pth")
    torch.save({"ema": argparse.Namespace(lr=1)}, t / "foreign.pt")
    # an image folder, its VAE and a latent cache of it; a file and a folder where the other is
    # meant
    cached_folder(t / "c")
    (t / "afile").write_text("x")
    (t / "d.npz").mkdir()
    # npz files: samples (and with labels 99), a reference, one image, 16 px, 15 px (2x2
    # patches do not tile), a cut one, NaN statistics, not an npz, one not to overwrite
    np.savez(t / "s.npz", arr_0=random_images(5))
    np.savez(t / "s99.npz", arr_0=random_images(5), arr_1=np.full(5, 99))
    np.savez(t / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(t / "one.npz", arr_0=random_images(1))
    np.savez(t / "c.npz", arr_0=np.zeros((64, 16, 16, 3), np.uint8))
    np.savez(t / "x15.npz", arr_0=np.zeros((8, 15, 15, 3), np.uint8))
    data = (t / "s.npz").read_bytes()
    (t / "trunc.npz").write_bytes(data[: len(data) // 2])
    stats = dict(mu=np.ones(2048), sigma=np.eye(2048), mu_s=np.ones(2023), sigma_s=np.eye(2023))
    np.savez(t / "nan.npz", **dict(stats, mu=np.full(2048, np.nan)))
    (t / "junk.npz").write_text("not an npz")
    (t / "precious.npz").write_bytes(b"precious")
    # image folders, good and with a truncated PNG; weights that are not the FID Inception's
    png_folder(t / "imgs")
    png_folder(t / "imgs_truncated", truncated=True)
    small = V.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1)
    torch.save(small.state_dict(), t / "vae.pth")
    return {"t": t}


def fill(items, inputs):
    """A table's argv or words with {t} filled in."""
    return [str(a).format(t=inputs["t"]) for a in items]


def assert_refused(script, argv, status, words, inputs, capsys):
    """One row: the exit status, one line under 300 characters holding every word (a usage
    error's begins with `script: error: `, as argparse's do), no traceback, every file and folder
    of the inputs as it was."""
    before = snapshot(inputs["t"])
    code, line = refused(script, fill(argv, inputs), capsys)
    assert code == status, (argv, code, line)
    if status == 2:  # dataset.py's subcommand: "dataset.py cache: error: "
        assert re.match(rf"{re.escape(script)}( \w+)?: error: ", line), line
    assert all(w in line for w in fill(words, inputs)), (argv, words, line)
    assert len(line) < 300 and "weights_only" not in line, line  # no advice to load unsafely
    assert snapshot(inputs["t"]) == before, argv


# train.py: (id, argv, exit status, words its line must hold), found before a run folder is
# made or a step taken (every row also gets --results-dir inside the inputs, where a run would
# show)
EVAL = ["--max-steps", "4", "--eval-every", "2", "--eval-samples", "30"]
TRAIN_REFUSALS = [
    # combinations the release never uses
    ("1nfe-at-2-steps", ["--recipe", "1nfe", "--steps", "2"], 1, ["use --recipe knfe"]),
    ("cls-without-cg", ["--cls", HERE], 1, ["--cls without a guidance weight"]),
    ("init-of-an-afm-recipe", ["--init", "{t}/bare.pth"], 1, ["--init starts a CAFM run"]),
    # a positive integer where 0 would divide by zero (argparse's type)
    ("batch-0", ["--global-batch-size", "0"], 2, ["--global-batch-size"]),
    # files that do not exist, are damaged, or do not fit
    ("vae-missing", ["--vae", "{t}/nothing.pt"], 1, ["--vae {t}/nothing.pt: no such file"]),
    ("eval-ref-unreadable", [*EVAL, "--eval-ref", "{t}/junk.npz"], 1,
     ["--eval-ref {t}/junk.npz: ", "not a readable npz"]),
    ("data-a-cut-npz", ["--data", "{t}/trunc.npz"], 1,
     ["error: --data {t}/trunc.npz: ", "not a readable npz"]),
    ("resume-cut", ["--resume", "{t}/trunc.pt"], 1, ["trunc.pt", "not a readable checkpoint"]),
    ("resume-a-foreign-pickle", ["--resume", "{t}/foreign.pt"], 1,
     ["foreign.pt", "not a readable checkpoint", "more than tensors"]),
    ("resume-with-other-data",
     ["--resume", "{t}/runs/000-T-2", "--max-steps", "4", "--data", "{t}/c.npz"], 1,
     ["--resume", "does not fit the networks"]),
    ("init-an-afm-generator", ["--recipe", "cafm-digits", "--init", "{t}/runs/000-T-2"], 1,
     ["--init", "not a flow model"]),
    # data that does not fit
    ("batch-larger-than-the-data", ["--global-batch-size", "100000000"], 1,
     ["larger than the 1797 examples"]),
    ("patches-do-not-tile",
     ["--data", "{t}/x15.npz", "--recipe", "pixel32", "--model", "T/2", "--global-batch-size",
      "4"], 1, ["2x2 patches"]),
]


@table("argv, status, words", TRAIN_REFUSALS)
def test_train_py_refuses(inputs, capsys, monkeypatch, argv, status, words):
    monkeypatch.setattr(fid, "load_inception", stand_in)
    assert_refused("train.py", [*argv, "--results-dir", "{t}/r2"], status, words, inputs, capsys)


def test_a_global_batch_not_divisible_by_the_processes(tmp_path):
    """Under torchrun the global batch must split evenly: refused in one line per rank before
    any run folder is made."""
    r = run("train.py", "--results-dir", tmp_path, *TRAIN_FLAGS, "--global-batch-size", "33",
            torchrun=True, check=False)
    assert r.returncode != 0 and not os.listdir(tmp_path), r.stdout + r.stderr
    assert "error: --global-batch-size 33 is not divisible by the 2 processes" in r.stderr


@pytest.fixture
def inception_calls(monkeypatch):
    """Inception loads as a stand-in, or from the file --inception names; it never runs over
    images. The paths it was loaded from."""
    calls = []
    load = fid.load_inception

    def counted(path=None, device="cpu"):
        calls.append(path)
        if path:
            return load(path, device)
        return stand_in()

    def ran(*args, **kwargs):
        raise AssertionError("Inception ran before the bad input was found")
    monkeypatch.setattr(fid, "load_inception", counted)
    monkeypatch.setattr(fid, "compute_features", ran)
    return calls


# sample.py: refused before the first sample is drawn (--fid's reference and the --inception
# weights read first)
CK = "{t}/runs/000-T-2/checkpoints/0000002.pt"
FID = ["--ckpt", CK, "--num-samples", "20", "--out", "{t}/new.npz", "--fid"]
SAMPLE_REFUSALS = [
    ("batch-size-0", ["--ckpt", CK, "--batch-size", "0", "--out", "{t}/g.png"], 2,
     ["--batch-size"]),
    ("unreadable-checkpoint", ["--ckpt", "{t}/trunc.pt", "--out", "{t}/g.png"], 1,
     ["trunc.pt", "not a readable checkpoint"]),
    ("unreadable-reference", [*FID, "{t}/junk.npz"], 1,
     ["error: --fid {t}/junk.npz: not a readable npz"]),
    ("non-finite-reference", [*FID, "{t}/nan.npz"], 1, ["error: --fid {t}/nan.npz: ", "NaN"]),
    ("another-networks-weights", [*FID, "{t}/ref.npz", "--inception", "{t}/vae.pth"], 1,
     ["error: --inception {t}/vae.pth does not fit"]),
]


@table("argv, status, words", SAMPLE_REFUSALS)
def test_sample_py_refuses(inputs, capsys, monkeypatch, inception_calls, argv, status, words):
    monkeypatch.setattr(S, "generate", no_sampling)
    assert_refused("sample.py", argv, status, words, inputs, capsys)


# fid.py: the files are read and checked before the Inception loads, and it never runs over
# images before the bad input is found
FID_REFUSALS = [
    ("cut-reference", ["{t}/s.npz", "{t}/trunc.npz"], 1,
     ["error: ref {t}/trunc.npz: ", "not a readable npz"]),
    ("one-sample", ["{t}/one.npz", "{t}/s.npz"], 1, ["error: samples {t}/one.npz", "2 or more"]),
    ("non-finite-reference", ["{t}/s.npz", "{t}/nan.npz"], 1, ["{t}/nan.npz", "NaN"]),
    # a corrupt image is refused by name, not skipped
    ("truncated-image-in-samples", ["{t}/imgs_truncated", "{t}/s.npz"], 1,
     ["error: samples {t}/imgs_truncated/2.png: ", "not a readable image"]),
    # labels the reference has no images of: agreement 0 and diversity NaN, said to be fine
    ("pixel-labels-above-the-classes", ["{t}/s99.npz", "--pixel-ref", "digits"], 1,
     ["error: samples {t}/s99.npz: ", "arr_1", "0 to 9"]),
    ("make-ref-onto-a-file", ["--make-ref", "{t}/imgs", "--out", "{t}/precious.npz"], 1,
     ["error: --out {t}/precious.npz", "exists"]),
    ("make-ref-onto-a-folder", ["--make-ref", "{t}/imgs", "--out", "{t}/d.npz"], 1,
     ["error: --out {t}/d.npz", "exists"]),
    ("inception-a-vae", ["{t}/s.npz", "{t}/s.npz", "--inception", "{t}/vae.pth"], 1,
     ["error: --inception {t}/vae.pth does not fit"]),
]


@table("argv, status, words", FID_REFUSALS)
def test_fid_py_refuses(inputs, capsys, inception_calls, argv, status, words):
    assert_refused("fid.py", argv, status, words, inputs, capsys)
    if "--inception" not in argv:  # the files are checked before the Inception loads
        assert inception_calls == []


# dataset.py cache: refused before anything is written
CACHE = ["cache", "--data", "{t}/c/images", "--vae", "{t}/c/vae.pt"]
DATASET_REFUSALS = [
    ("out-exists", [*CACHE, "--out", "{t}/c/cache"], 1, ["error: --out {t}/c/cache", "exists"]),
    ("out-a-file", [*CACHE, "--out", "{t}/afile"], 1, ["error: --out {t}/afile", "exists"]),
    ("data-a-cut-npz", ["cache", "--data", "{t}/trunc.npz", "--vae", "{t}/c/vae.pt", "--out",
                        "{t}/new"], 1, ["error: --data {t}/trunc.npz: ", "not a readable npz"]),
    ("batch-size-0", [*CACHE, "--out", "{t}/new", "--batch-size", "0"], 2, ["--batch-size"]),
]


@table("argv, status, words", DATASET_REFUSALS)
def test_dataset_py_refuses(inputs, capsys, argv, status, words):
    assert_refused("dataset.py", argv, status, words, inputs, capsys)


# One refusal per script from a real process: the exit status and one stderr line, no
# traceback; no Inception weights in the cache, so nothing is downloaded
PROCESS_REFUSALS = [
    ("train.py", ["--resume", "{t}/trunc.pt"], 1, ["trunc.pt", "not a readable checkpoint"]),
    ("sample.py", ["--ckpt", CK, "--batch-size", "0"], 2, ["--batch-size"]),
    ("fid.py", ["{t}/s.npz", "{t}/one.npz"], 1, ["error: ref {t}/one.npz: "]),
    ("dataset.py", [*CACHE, "--out", "{t}/c/cache"], 1, ["error: --out {t}/c/cache"]),
]


@pytest.mark.parametrize("script, argv, status, words", PROCESS_REFUSALS,
                         ids=[row[0] for row in PROCESS_REFUSALS])
def test_refusals_as_processes(inputs, tmp_path, script, argv, status, words):
    before = snapshot(inputs["t"])
    env = dict(ENV, AFM_CACHE=str(tmp_path / "cache"))
    r = run(script, *fill(argv, inputs), check=False, timeout=60, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and len(lines) == 1 and "Traceback" not in r.stderr, r
    assert all(w in lines[0] for w in fill(words, inputs)), (words, lines)
    assert snapshot(inputs["t"]) == before


def test_runs_never_collide(tmp_path):
    """The next run takes a new index (never a deleted run's) and the other files stay
    byte-identical."""
    for _ in range(2):
        train_here(tmp_path, "--max-steps", "2")
    shutil.rmtree(tmp_path / "000-T-2")
    (tmp_path / "notes.txt").write_text("a stray file")
    kept = snapshot(tmp_path)
    train_here(tmp_path, "--max-steps", "2")
    assert sorted(os.listdir(tmp_path)) == ["001-T-2", "002-T-2", "notes.txt"]
    assert {k: v for k, v in snapshot(tmp_path).items() if "002-T-2" not in k} == kept


# --------------------------------------------------------------------------------------
# 11. Continuous AFM (CAFM)
# --------------------------------------------------------------------------------------
# fixtures/cafm.pt: tiny random networks and their numbers, made with the release's CAFM (arXiv
# 2604.11521; ByteDance-Seed/Adversarial-Flow-Models at 519601d, models/cafm/ and
# train_continuous_adversarial_flow_imagenet.py's training_step) over SiT's models.py
# (willisma/SiT): outputs, JVPs, one D and one G step with every gradient (see its `about` key).

# Tolerance, relative to the reference's largest magnitude, for every output, loss, log and
# gradient. Measured with this code: 2e-7 to 1.1e-6 (the largest: a D gradient). Each wrong
# detail tried (time not flipped, DiT's t x 1000, no sign flip, LayerNorm, RMSNorm's eps) is
# 10^3 to 10^6 times larger.
CAFM_TOL = 1e-5

# the release's log names -> ours (AdversarialFlowLoss's style)
CAFM_LOGS = {"loss/dis": "d_adv", "loss/cp": "cp", "logits/real": "logit_real",
             "logits/fake": "logit_fake", "logits/out": "logit_out", "loss/gen": "g_adv",
             "loss/ot": "ot"}


def cafm_error(out, ref):
    """max |out - ref| / max |ref|, after checking the shapes agree."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def cafm_networks(fx):
    """The fixture's SiT generator and CAFM discriminator, as our Generator and Discriminator
    with SiT's conventions, weights loaded strictly."""
    names = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
             "mlp_ratio", "num_classes", "learn_sigma")
    kw = {k: fx["config"][k] for k in names}
    G = M.Generator(**kw, sit_time=True, use_t_src=True)
    D = M.Discriminator(**kw, sit_time=True, norm="rms", use_t=True)
    G.load_state_dict(fx["sit_state"], strict=True)
    D.load_state_dict(fx["dis_state"], strict=True)
    return G, D


def cafm_loss(fx, step_inputs):
    """The loss with the fixture's settings, its batch given instead of drawn."""
    c = fx["config"]
    loss = A.ContinuousAdversarialFlowLoss(n_dis=16, warmup=0, cp=c["cp_scale"],
                                           ot=c["ot_scale"], class_dropout=0.0)
    si = step_inputs
    loss.sample = lambda x0, y: (si["labels"], si["timesteps"], si["noises"])
    return loss


def cafm_step_errors(fx, G, D, kind):
    """One D step ("d") or G step ("g") on the fixture's batch, as relative errors against the
    fixture: {"loss": e, log name: e, param: e}."""
    si, ref = fx["step_inputs"], fx[f"{kind}_step"]
    loss = cafm_loss(fx, si)
    if kind == "d":
        value, logs = loss.d_loss(G, A.FlowDerivative(D), si["latents"], si["labels"], 1)
        value.backward()
    else:
        with A.frozen(D):
            value, logs = loss.g_loss(G, A.FlowDerivative(D), si["latents"], si["labels"], 16)
            value.backward()
    grads = {}
    for prefix, net in (("G.", G), ("D.", D)):
        for name, p in net.named_parameters():
            if p.grad is not None:
                grads[prefix + name] = p.grad
    # Only the network that learns gets gradients: G runs without grad in the D step, and D is
    # frozen in the G step.
    owner = {"d": "D.", "g": "G."}[kind]
    assert set(grads) == {owner + k for k in ref["grads"]}
    errors = {"loss": cafm_error(value.detach(), ref["loss"])}
    for name, r in ref["logs"].items():
        errors[name] = cafm_error(logs[CAFM_LOGS[name]].detach(), r)
    for name, r in ref["grads"].items():
        errors[name] = cafm_error(grads[owner + name], r)
    return errors


def test_cafm_weights_load_strictly():
    """The fixture's SiT and CAFM states load strictly (equal key sets); the discriminator starts
    from the SiT state as the release's does (only dis_embed and final_layer.1.weight new)."""
    fx = fixture("cafm.pt")
    G, D = cafm_networks(fx)
    assert set(G.state_dict()) == set(fx["sit_state"])
    assert set(D.state_dict()) == set(fx["dis_state"])
    fresh = cafm_networks(fx)[1]
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    M.discriminator_from_flow(fresh, fx["sit_state"])
    for k, v in fresh.state_dict().items():
        if k in ("dis_embed", "final_layer.1.weight"):
            assert torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, fx["sit_state"][k]), k


def test_cafm_real_size_keys_sit_xl2():
    """At XL/2 (meta device): the SiT-convention generator has SiT-XL-2-256.pt's layout (the AFM
    release's XL/2 generator with t_src, 2C output channels and a null row; 675M parameters as
    DiT's and SiT's papers); CAFM's discriminator the release's XL/2 one with the null row."""
    sections = release_keys()
    sit = dict(sections["Generator XL/2 use_t_src=True use_t_tgt=True"])
    for k in [k for k in sit if k.startswith("t_tgt_embedder.")]:
        del sit[k]
    sit["final_layer.linear.weight"] = (2 * 4 * 2 * 2, 1152)  # learn_sigma: 2C per pixel
    sit["final_layer.linear.bias"] = (2 * 4 * 2 * 2,)
    sit["y_embedder.embedding_table.weight"] = (1001, 1152)  # 1000 classes + the null class
    dis = dict(sections["Discriminator XL/2 use_t=True"])
    dis["y_embedder.embedding_table.weight"] = (1001, 1152)
    kw = dict(M.models["XL/2"], input_size=32, in_channels=4, num_classes=1001, sit_time=True)
    with torch.device("meta"):
        G = M.Generator(**kw, use_t_src=True, learn_sigma=True)
        D = M.Discriminator(**kw, use_t=True, norm="rms")
    assert {k: tuple(v.shape) for k, v in G.state_dict().items()} == sit
    assert {k: tuple(v.shape) for k, v in D.state_dict().items()} == dis
    assert sum(p.numel() for p in G.parameters()) == 675_129_632
    M.discriminator_from_flow(D, G.state_dict())


def test_cafm_velocity_and_discriminator_match():
    """v(x, y, t) = -SiT(x, 1 - t, y)[:, :C] and D(x, y, t) (fed 1 - t, RMSNorm) equal the
    fixture's."""
    fx = fixture("cafm.pt")
    G, D = cafm_networks(fx)
    x, y, t = fx["x"], fx["y"], fx["t"]
    with torch.no_grad():
        assert cafm_error(G(x, y, t, t), fx["v"]) <= CAFM_TOL  # measured 2e-7
        assert cafm_error(D(x, y, t), fx["d"]) <= CAFM_TOL  # measured 5.5e-7


def test_cafm_jvp_single_and_paired_match():
    """J(u) = d/ds D(x + s u, y, t + s) at s = 0 for one tangent, and for two through one vmap'd
    call (the release's D step), equal the fixture's; the paired call's D values repeat D(x)."""
    fx = fixture("cafm.pt")
    _, D = cafm_networks(fx)
    x, y, t = fx["x"], fx["y"], fx["t"]
    d, j = A.flow_derivative(D, x, y, t, fx["dx"])
    assert cafm_error(j, fx["jvp"]) <= CAFM_TOL  # measured 6.4e-7
    assert cafm_error(d, fx["d"]) <= CAFM_TOL
    d, j = A.flow_derivative(D, x, y, t, torch.stack([fx["dx"], fx["v"]]))
    assert cafm_error(j, fx["jvp_pair"]) <= CAFM_TOL  # measured 4.6e-7
    assert cafm_error(d, fx["d"].expand(2, -1)) <= CAFM_TOL


@pytest.mark.parametrize("kind", ["d", "g"])
def test_cafm_step_matches(kind):
    """One step of the release's training_step, D's (G gets no gradient) or G's (D frozen,
    gradients through D's JVP into G): loss, logs and every gradient (measured: 1.1e-6, 4.4e-7)."""
    fx = fixture("cafm.pt")
    errors = cafm_step_errors(fx, *cafm_networks(fx), kind)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= CAFM_TOL, (worst, errors[worst])


def cafm_ddp_worker(rank, port, out):
    """One of two processes: the fixture's D step and G step on half the batch each, the
    network that learns DDP-wrapped as train.py wraps it (D step: DDP(FlowDerivative(D)); G step:
    DDP(G), D plain and frozen); rank 0 saves the averaged gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        fx = fixture("cafm.pt")
        G, D = cafm_networks(fx)
        si = {k: v[3 * rank:3 * rank + 3] for k, v in fx["step_inputs"].items()}
        loss = cafm_loss(fx, si)
        # built once, as a trainer does: a DDP wrapper gone before backward averages nothing
        ddp_d = torch.nn.parallel.DistributedDataParallel(A.FlowDerivative(D))
        ddp_g = torch.nn.parallel.DistributedDataParallel(G)
        value, _ = loss.d_loss(G, ddp_d, si["latents"], si["labels"], 1)
        value.backward()
        d_grads = {k: p.grad.clone() for k, p in D.named_parameters() if p.grad is not None}
        D.zero_grad()
        with A.frozen(D):
            value, _ = loss.g_loss(ddp_g, A.FlowDerivative(D), si["latents"], si["labels"], 16)
            value.backward()
        g_grads = {k: p.grad for k, p in G.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save({"d": d_grads, "g": g_grads}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_cafm_under_ddp_two_processes(tmp_path):
    """The JVP under DDP, as the release runs it: two processes with half the fixture's batch
    each average to the fixture's gradients (every loss term is a mean over equal halves)."""
    fx = fixture("cafm.pt")
    out = str(tmp_path / "grads.pt")
    spawn_two(cafm_ddp_worker, out)
    grads = torch.load(out, weights_only=True)
    for kind in ("d", "g"):
        ref = fx[f"{kind}_step"]["grads"]
        assert set(grads[kind]) == set(ref)
        for name, r in ref.items():
            assert cafm_error(grads[kind][name], r) <= CAFM_TOL, (kind, name)


def test_cafm_schedule():
    """The release's is_dis_step: steps up to `warmup` train D; after it, of every 1 + N steps,
    N train D and one trains G (the fixture's G step was step 16, its D step step 1)."""
    assert A.cafm_is_g_step(16, 16, 0) and not A.cafm_is_g_step(1, 16, 0)
    g_steps = [s for s in range(10_000 + 3 * 17 + 1) if A.cafm_is_g_step(s, 16, 10_000)]
    assert g_steps == [10_012, 10_029, 10_046]  # 10_012 = 588 * 17 + 16
    # the release's SiT recipe: N 16, warmup 10,000; its null label 1000 is passed, not assumed
    loss = A.ContinuousAdversarialFlowLoss(null_class=1000)
    assert (loss.n_dis, loss.warmup, loss.cp, loss.ot) == (16, 10_000, 0.001, 0.0)
    assert loss.class_dropout == 0.1
    assert loss.is_g_step(10_012) and not loss.is_g_step(10_000)


def test_cafm_loss_by_hand_and_class_dropout():
    """With a linear D(x, y, t) = <a, x> + c t, J(u) = <a, u> + c exactly: both losses equal
    their formulas on the path x_t = (1 - t) x0 + t z. Dropped labels become the null class, the
    same for G and D."""
    B, dim, c = 64, 3, 0.3
    g = torch.Generator().manual_seed(0)
    x0, a, w = (torch.randn(B, dim, generator=g) for _ in range(3))
    a = a[0]
    seen = {}

    def G(x, y, t_src, t_tgt):  # a velocity that depends on x, so G gets a gradient
        seen["G"] = y
        return x * w

    class LinearFlowD(nn.Module):
        def forward(self, x, y, t):
            seen["D"] = y
            return x @ a + c * t
    D = LinearFlowD()

    loss = A.ContinuousAdversarialFlowLoss(cp=0.01, ot=0.1, class_dropout=0.5, null_class=10)
    y = torch.arange(B) % 10
    torch.manual_seed(1)
    d, logs = loss.d_loss(G, A.FlowDerivative(D), x0, y, 0)
    torch.manual_seed(1)
    y_drop, t, z = loss.sample(x0, y)
    assert torch.equal(seen["G"], y_drop) and torch.equal(seen["D"], y_drop)
    dropped = y_drop == 10
    assert 0 < dropped.sum() < B and torch.equal(y_drop[~dropped], y[~dropped])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * z
    j_real = (z - x0) @ a + c
    j_fake = (x_t * w) @ a + c
    d_adv = (j_real - 1).square().mean() + (j_fake + 1).square().mean()
    cp = 0.01 * (x_t @ a + c * t).square().mean()
    torch.testing.assert_close(logs["d_adv"], d_adv)
    torch.testing.assert_close(logs["cp"], cp)
    torch.testing.assert_close(d, d_adv + cp)
    w.requires_grad_(True)
    torch.manual_seed(1)
    gl, logs = loss.g_loss(G, A.FlowDerivative(D), x0, y, 0)
    g_adv = (j_fake - 1).square().mean()
    ot = 0.1 * (x_t * w).square().mean()
    torch.testing.assert_close(logs["g_adv"], g_adv)
    torch.testing.assert_close(gl, g_adv + ot)
    gl.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_cafm_toy_sends_noise_to_the_right_modes():
    """toy.py's CAFM toy (the release's continuous_adversarial_flow_models.ipynb, scaled to a
    CPU): its 64-step Euler map sends noise to the monotone map's mode (measured: 2.3% wrong,
    RMS 0.265; the untrained start: 17.6%, RMS 0.39; the modes stay wider than the data's)."""
    with one_thread():
        torch.manual_seed(0)  # the start train_toy_cafm draws with its seed 0
        start = toy.map_error(toy.ToyNet(use_t=True), 64, "v", n=5000)
        v = toy.train_toy_cafm()
        rms, wrong = toy.map_error(v, 64, "v", n=5000)
    print(f"CAFM on the toy: RMS {rms:.4f} (start {start[0]:.3f}), wrong mode {wrong:.2%}")
    assert wrong < 0.06 and wrong < start[1] / 3
    assert rms < 0.35


# --------------------------------------------------------------------------------------
# 12. Sampling flow and CAFM checkpoints
# --------------------------------------------------------------------------------------


class LabelVelocity(nn.Module):
    """A velocity known in closed form: v(x, y, t) = a[y] * x + b[y] (per class and channel),
    independent of t; it counts its calls and the batch sizes it saw."""

    def __init__(self, classes=11, channels=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(classes, channels, generator=g)
        self.b = torch.randn(classes, channels, generator=g)
        self.batches = []

    def forward(self, x, y, t_src, t_tgt):
        self.batches.append(len(x))
        return self.a[y][:, :, None, None] * x + self.b[y][:, :, None, None]  # (N, C, H, W)


def test_generate_with_cfg_is_the_guidance_formula():
    """afm.generate's classifier-free guidance: one call on the batch and its null-label copy,
    v_null + s (v_cond - v_null) by hand for an Euler step and a Heun interval; cfg_channels 3
    keeps channel 3 conditional (SiT's forward_with_cfg); cfg 1 is the unguided sampler."""
    G = LabelVelocity()
    z = torch.randn(3, 4, 2, 2)
    y = torch.tensor([0, 4, 9])
    null, s = 10, 2.5

    def v(x, labels):
        return G.a[labels][:, :, None, None] * x + G.b[labels][:, :, None, None]

    def guided(x, channels=4):
        out = v(x, y)  # the conditional velocity; guidance on the first `channels`
        mix = v(x, torch.full_like(y, null)) + s * (v(x, y) - v(x, torch.full_like(y, null)))
        out[:, :channels] = mix[:, :channels]
        return out

    x = A.generate(G, z, y, 1, "v", cfg=s, null=null)
    torch.testing.assert_close(x, z - guided(z))
    assert G.batches == [6]  # one call: conditional and null together
    x = A.generate(G, z, y, 1, "v", cfg=s, null=null, cfg_channels=3)
    torch.testing.assert_close(x, z - guided(z, 3))
    assert torch.equal(x[:, 3], (z - v(z, y))[:, 3])
    x = A.generate(G, z, y, 2, "v", "heun", cfg=s, null=null)  # one interval, t from 1 to 0
    v1 = guided(z)
    torch.testing.assert_close(x, z - 0.5 * (v1 + guided(z - v1)))
    assert torch.equal(A.generate(G, z, y, 2, "v"), A.generate(G, z, y, 2, "v", cfg=1.0, null=3))


def sit_layout_file(path, seed=0):
    """A bare state dict in SiT's layout (learned-variance head, t_embedder, a null row), tiny:
    T/2 on 4x4x4 latents, 10 classes + null, random weights."""
    G = M.Generator(**M.models["T/2"], input_size=4, in_channels=4, num_classes=11,
                    learn_sigma=True, sit_time=True, use_t_src=True)
    torch.save(randomize(G, seed=seed).state_dict(), path)
    return G


def test_sample_py_recognises_a_sit_file_and_guides_it(tmp_path):
    """A SiT-layout file (SiT-XL-2-256.pt, the release's CAFM checkpoints) is a velocity network
    with SiT's time and a null class, sampled by default with Heun at 250 NFE; sample.py's npz
    with and without --cfg are afm.generate's samples decoded by the VAE."""
    f = tmp_path / "sit.pt"
    G = sit_layout_file(f)
    L, how = S.load_generator(str(f))
    want = dict(flow=True, pred="v", steps=250, solver="heun", classes=10, null=10, size=4)
    assert {k: how[k] for k in want} == want
    assert M.generator_config(G.state_dict())[1]["sit_time"]
    z, y, t = torch.randn(4, 4, 4, 4), torch.tensor([0, 3, 9, 10]), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(G(z, y, t, t), L(z, y, t, t))
    vae = V.load_vae(tiny_vae_file(tmp_path / "vae.pt"))
    perm = np.random.RandomState(42).permutation(10)
    runs = {  # name: (flags, solver, steps, guidance)
        "heun": ([], "heun", 4, {}),
        "heun-cfg": (["--cfg", 2], "heun", 4, dict(cfg=2.0, null=10)),
        "euler-cfg3": (["--solver", "euler", "--cfg", 2, "--cfg-channels", 3], "euler", 3,
                       dict(cfg=2.0, null=10, cfg_channels=3)),
    }
    files = {}
    for name, (flags, solver, steps, guidance) in runs.items():
        out = tmp_path / f"{name}.npz"
        sample_main("--ckpt", f, "--vae", tmp_path / "vae.pt", "--num-samples", 10,
                    "--batch-size", 10, "--out", out, "--steps", steps, *flags)
        files[name] = read_npz(out)["arr_0"]
        want = expected_samples(G, range(10), range(10), steps, "v", vae=vae, solver=solver,
                                **guidance)
        np.testing.assert_array_equal(files[name], want[perm])
    assert (files["heun"] != files["heun-cfg"]).any()


def test_sample_py_reads_a_cafm_run_from_sit(tmp_path):
    """A CAFM run started from SiT's file keeps SiT's head and time and is sampled as its args
    say (the solver; --steps wins over its NFE), with the null class of its class dropout."""
    sit = sit_layout_file(tmp_path / "sit.pt")
    sd = sit.state_dict()
    args = {**T.RECIPES["cafm-digits"], "recipe": "cafm", "sit_time": True, "sample_steps": 256,
            "sample_solver": "heun", "vae": None}
    torch.save({"args": args, "model": sd, "ema": sd, "step": 5}, tmp_path / "cafm-sit.pt")
    L, how = S.load_generator(str(tmp_path / "cafm-sit.pt"), steps=4)
    want = dict(flow=True, steps=4, solver="heun", classes=10, null=10)
    assert {k: how[k] for k in want} == want
    z, y, t = torch.randn(4, 4, 4, 4), torch.tensor([0, 3, 9, 10]), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(sit(z, y, t, t), L(z, y, t, t))

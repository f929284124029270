"""Tests of sample.py: checkpoint loading (ours and the release's bare state dicts), npz determinism across batch
sizes and process counts, class balance, file format and order, resume after an interruption, grid PNG, latent
models through a VAE, --fid in the same run. CPU only, tiny models; two subprocesses (torchrun, SIGINT).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fid
import sample as S
import train as T
from model import Generator, models
from vae import SCALE, AutoencoderKL, load_vae

_SMP_HERE = os.path.dirname(os.path.abspath(__file__))
_SMP_ENV = dict(os.environ, OMP_NUM_THREADS="1")  # two shared cores: one thread per process is far faster


@contextlib.contextmanager
def _smp_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _smp_randomize(module, seed, std=0.05):
    """A fresh Generator outputs zeros (adaLN-Zero, zero head): perturb every weight so samples carry information."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _smp_ckpt(path, steps="any"):
    """A checkpoint in train.py's format (model, ema, args, step) with different model and EMA weights."""
    args = T.resolve_defaults(T.parse_args(["--steps", steps]))
    G, _ = T.build_models(args, 1, 8, 10)  # the digits model: T/2, 1x8x8, 10 classes
    ema = Generator(**models["T/2"], input_size=8, in_channels=1, num_classes=10, use_t_src=steps != "1",
                    use_t_tgt=steps == "any")
    _smp_randomize(G, 1), _smp_randomize(ema, 2)
    torch.save({"model": G.state_dict(), "ema": ema.state_dict(), "args": vars(args), "step": 7}, path)
    return G, ema, args


def _smp_main(*argv):
    with _smp_one_thread():
        return S.main(S.parse_args([str(a) for a in argv]))


def _smp_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _smp_expected(G, indices, labels, steps, pred, seed=0, vae=None):
    """uint8 NHWC samples computed here from the definition: per-index CPU noise, generate, decode, truncation."""
    H = int(G.pos_embed.shape[1] ** 0.5) * G.patch_size
    z = torch.stack([torch.randn(G.in_channels, H, H, generator=torch.Generator().manual_seed(seed * 10**8 + int(i)))
                     for i in indices])  # (N, C, H, W)
    with torch.no_grad(), _smp_one_thread():
        x = T.generate(G, z, torch.as_tensor(np.asarray(labels)), steps, pred)
        if vae is not None:
            x = vae.decode(x / SCALE)
    x = x.float().clamp(-1, 1).expand(-1, 3, -1, -1)
    return ((x + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------
# Many samples: determinism, balance, format, order
# --------------------------------------------------------------------------------------


def test_smp_npz_same_for_one_and_two_processes(tmp_path):
    ckpt = tmp_path / "ck.pt"
    _, ema, args = _smp_ckpt(ckpt)
    N, K = 120, 10
    _smp_main("--ckpt", ckpt, "--steps", 2, "--num-samples", N, "--batch-size", 40, "--out", tmp_path / "a.npz")
    with pytest.raises(SystemExit):  # b.npz: begun by one process, interrupted, finished by two
        _smp_main("--ckpt", ckpt, "--steps", 2, "--num-samples", N, "--batch-size", 16, "--max-batches", 2,
                  "--out", tmp_path / "b.npz")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(_SMP_HERE, "sample.py"), "--ckpt", str(ckpt), "--steps", "2", "--num-samples",
                        str(N), "--batch-size", "16", "--save-every", "2", "--out", str(tmp_path / "b.npz")],
                       capture_output=True, text=True, env=_SMP_ENV, cwd=_SMP_HERE, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 process(es)" in r.stdout and "32 of 120 samples found" in r.stdout and "44 to make on rank 0" in r.stdout
    a, b = _smp_npz(tmp_path / "a.npz"), _smp_npz(tmp_path / "b.npz")
    # Format: ADM's sample batch, uint8 NHWC RGB (the gray digit in all three channels), labels beside it.
    assert sorted(a) == ["arr_0", "arr_1"] and a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (N, 8, 8, 3)
    assert a["arr_1"].dtype == np.int64 and a["arr_1"].shape == (N,)
    assert (a["arr_0"] == a["arr_0"][..., :1]).all() and a["arr_0"].std() > 20
    # The same bits for 1 process x batch 40 and (1, then 2 processes) x batch 16.
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    # Exactly N / K per class; the order is the release's pack_npz.py shuffle (seed 42) of the sample indices.
    assert np.bincount(a["arr_1"], minlength=K).tolist() == [N // K] * K
    perm = np.random.RandomState(42).permutation(N)
    np.testing.assert_array_equal(a["arr_1"], perm // (N // K))
    assert (np.diff(a["arr_1"]) != 0).sum() > N // 2  # shuffled, not class-sorted
    # The images are what the definition gives: EMA weights, 2 steps of v-prediction, noise seeded by index.
    assert args.pred == "v"
    j = np.arange(16)  # a batch of 16 (tiny CPU batches may round differently)
    np.testing.assert_array_equal(a["arr_0"][j], _smp_expected(ema, perm[j], a["arr_1"][j], 2, "v"))
    assert not (tmp_path / "a.npz.parts").exists() and not (tmp_path / "b.npz.parts").exists()


def test_smp_num_samples_must_divide_and_flags(tmp_path):
    ckpt = tmp_path / "ck.pt"
    _smp_ckpt(ckpt)
    with pytest.raises(SystemExit, match="--num-samples 125 is not divisible by the 10 classes"):
        _smp_main("--ckpt", ckpt, "--num-samples", 125, "--out", tmp_path / "a.npz")
    with pytest.raises(SystemExit, match="writes an .npz"):
        _smp_main("--ckpt", ckpt, "--num-samples", 100, "--out", tmp_path / "a.png")
    with pytest.raises(SystemExit, match="writes an .npz"):
        _smp_main("--ckpt", ckpt, "--fid", tmp_path / "ref.npz", "--out", tmp_path / "a.png")
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


def test_smp_resume_equals_uninterrupted_run(tmp_path):
    ckpt, out = tmp_path / "ck.pt", tmp_path / "b.npz"
    _smp_ckpt(ckpt, steps="1")
    flags = ["--ckpt", ckpt, "--num-samples", 120]
    _smp_main(*flags, "--batch-size", 40, "--out", tmp_path / "a.npz")
    parts = tmp_path / "b.npz.parts"
    with pytest.raises(SystemExit) as e:  # interrupted after 3 batches of 16 (as Ctrl-C would, after a batch)
        _smp_main(*flags, "--batch-size", 16, "--save-every", 2, "--max-batches", 3, "--out", out)
    assert e.value.code == 1 and not out.exists()
    shards = sorted(p.name for p in parts.glob("*.npz"))
    assert shards == ["00000000.npz", "00000032.npz"]  # 2 batches, then the last one flushed on stopping
    assert sorted(np.concatenate([_smp_npz(parts / s)["idx"] for s in shards]).tolist()) == list(range(48))
    with pytest.raises(SystemExit, match=r"other settings \(seed: 0 vs 1\)"):  # parts of another run are not mixed in
        _smp_main(*flags, "--seed", 1, "--out", out)
    (parts / "00000048.npz.tmp").write_bytes(b"half a shard")  # a crash mid-write leaves only a temporary name
    with pytest.raises(SystemExit):  # a second interruption, another batch size
        _smp_main(*flags, "--batch-size", 8, "--save-every", 1, "--max-batches", 2, "--out", out)
    assert not list(parts.glob("*.tmp")) and len(list(parts.glob("*.npz"))) == 4
    _smp_main(*flags, "--batch-size", 24, "--out", out)
    a, b = _smp_npz(tmp_path / "a.npz"), _smp_npz(out)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert not parts.exists()


def test_smp_sigint_stops_after_a_batch_with_parts_saved(tmp_path):
    ckpt, out = tmp_path / "ck.pt", tmp_path / "s.npz"
    _, ema, _ = _smp_ckpt(ckpt, steps="1")
    parts = tmp_path / "s.npz.parts"
    p = subprocess.Popen([sys.executable, os.path.join(_SMP_HERE, "sample.py"), "--ckpt", str(ckpt), "--num-samples",
                          "200000", "--batch-size", "16", "--save-every", "1", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_SMP_ENV, cwd=_SMP_HERE)
    deadline = time.time() + 120
    while not list(parts.glob("*.npz")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "rerun the same command to resume" in log and "Traceback" not in log, log
    assert not out.exists() and not list(parts.glob("*.tmp"))
    idx = np.sort(np.concatenate([_smp_npz(f)["idx"] for f in parts.glob("*.npz")]))
    assert 16 <= len(idx) < 200000 and idx.tolist() == list(range(len(idx)))  # whole batches, in order
    first = _smp_npz(parts / "00000000.npz")
    assert first["images"].shape == (16, 8, 8, 3) and first["idx"].tolist() == list(range(16))
    np.testing.assert_array_equal(first["images"], _smp_expected(ema, range(16), [0] * 16, 1, "x"))


# --------------------------------------------------------------------------------------
# Loading the release's bare state dicts
# --------------------------------------------------------------------------------------


def _smp_bare(path, seed=0, **kw):
    cfg = dict(input_size=8, in_channels=1, num_classes=10)
    cfg.update(kw)
    G = _smp_randomize(Generator(**models["T/2"], **cfg), seed)
    torch.save(G.state_dict(), path)  # a plain .pth of generator weights, as released
    return G


def _smp_same_outputs(G1, G2):
    z, y = torch.randn(8, G1.in_channels, 8, 8), torch.arange(8) % 10
    t_src, t_tgt = torch.full((8,), 0.75), torch.full((8,), 0.25)
    with torch.no_grad(), _smp_one_thread():
        assert torch.equal(G1(z, y, t_src, t_tgt), G2(z, y, t_src, t_tgt))


def test_smp_bare_state_dict_inference(tmp_path):
    f = str(tmp_path / "g.pth")
    G = _smp_bare(f, use_t_src=True)  # a k-NFE model: t_embedder, no t_tgt_embedder
    L, info = S.load_generator(f, model="T/2")  # t-conditioned: v-prediction, as the release's k-NFE recipes
    assert {k: info[k] for k in ("model", "channels", "size", "num_classes", "use_t_src", "use_t_tgt", "repeat",
                                 "steps", "pred")} == dict(model="T/2", channels=1, size=8, num_classes=10,
                                                           use_t_src=True, use_t_tgt=False, repeat=1, steps=1, pred="v")
    _smp_same_outputs(G, L)
    assert not any(p.requires_grad for p in L.parameters()) and not L.training
    assert S.load_generator(f, steps=2, pred="x")[1]["pred"] == "x"  # flags win over the defaults
    assert S.load_generator(f)[1]["model"] == "T/2"  # the size is found from depth, width and patch
    G = _smp_bare(f, use_t_src=True, use_t_tgt=True)  # any-step
    L, info = S.load_generator(f, model="T/2")
    assert info["use_t_src"] and info["use_t_tgt"] and info["pred"] == "v" and info["steps"] == 1
    _smp_same_outputs(G, L)
    G = _smp_bare(f, repeat=2)  # the deep generator: a t_embedder, no t_tgt, --repeat 2
    L, info = S.load_generator(f, model="T/2", repeat=2)
    assert L.repeat == 2 and not info["use_t_src"] and info["steps"] == 1 and info["pred"] == "x"
    _smp_same_outputs(G, L)
    with pytest.raises(ValueError, match="1-NFE generator .* cannot take --steps 2"):
        S.load_generator(str(tmp_path / "g.pth"), model="T/2", repeat=2, steps=2)
    G = _smp_bare(f, num_classes=1000, class_dropout_prob=0.1)  # 1001 rows: 1000 classes + the null label
    L, info = S.load_generator(f, model="T/2")
    assert info["num_classes"] == 1000 and L.y_embedder.embedding_table.weight.shape[0] == 1001
    _smp_same_outputs(G, L)
    _smp_bare(f, num_classes=10, class_dropout_prob=0.1)  # 11 rows: 11 classes unless told
    assert S.load_generator(f)[1]["num_classes"] == 11 and S.load_generator(f, num_classes=10)[1]["num_classes"] == 10
    _smp_bare(f, in_channels=4, input_size=4)  # SD-VAE latents
    assert S.load_generator(f)[1]["channels"] == 4 and S.load_generator(f)[1]["size"] == 4


def test_smp_mismatch_is_one_line(tmp_path):
    f = str(tmp_path / "g.pth")
    _smp_bare(f)
    with pytest.raises(ValueError) as e:
        S.load_generator(f, model="S/2")
    msg = str(e.value)
    assert "\n" not in msg and "depth 3, hidden 64, patch 2" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (192, 64) vs model (1152, 384)" in msg and "missing blocks.3" in msg
    with pytest.raises(ValueError, match="missing t_embedder.mlp.0.weight"):  # --repeat needs a t_embedder
        S.load_generator(f, repeat=2)
    with pytest.raises(SystemExit) as e:  # the command line: one line, no traceback
        _smp_main("--ckpt", f, "--model", "B/2")
    assert str(e.value).startswith("sample.py: error: ") and "\n" not in str(e.value)
    assert "blocks.0.attn.qkv.weight: checkpoint (192, 64) vs model (2304, 768)" in str(e.value)
    torch.save({"pos_embed": torch.zeros(1, 16, 64)}, f)
    with pytest.raises(ValueError, match="not a generator state dict"):
        S.load_generator(f)


# --------------------------------------------------------------------------------------
# Grid PNG, latent models, FID in the same run
# --------------------------------------------------------------------------------------


def test_smp_grid_png(tmp_path):
    ckpt = tmp_path / "ck.pt"
    _, ema, _ = _smp_ckpt(ckpt, steps="1")
    _smp_main("--ckpt", ckpt, "--out", tmp_path / "g.png")
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (10 * 66 + 2, 8 * 66 + 2, 3)  # all 10 digit classes in rows, 8 per row, upscaled to 64 px
    row = 3  # class 3 = sample indices 24..31; cells are 64 px with 2 px borders; save_grid rounds
    x = _smp_expected(ema, range(24, 32), [3] * 8, 1, "x").astype(np.float64)  # truncated: within 1 of rounded
    for c in range(8):
        cell = img[2 + row * 66: 2 + row * 66 + 64: 8, 2 + c * 66: 2 + c * 66 + 64: 8]  # (8, 8, 3)
        assert np.abs(cell.astype(np.float64) - x[c]).max() <= 1
    _smp_main("--ckpt", ckpt, "--out", tmp_path / "g2.png")
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "g2.png").read_bytes()  # fixed seed
    _smp_main("--ckpt", ckpt, "--weights", "model", "--classes", 3, 5, "--per-class", 4, "--out", tmp_path / "m.png")
    m = np.asarray(Image.open(tmp_path / "m.png"))
    assert m.shape == (2 * 66 + 2, 4 * 66 + 2, 3) and not np.array_equal(m[:66, :66], img[:66, :66])


def test_smp_latent_model_through_vae(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    vae = load_vae(str(tmp_path / "vae.pt"))  # what sample.py will use (32 groups: shapes fit, numbers differ)
    f = str(tmp_path / "g.pth")
    G = _smp_bare(f, in_channels=4, input_size=4, num_classes=3)
    with pytest.raises(SystemExit, match="needs --vae"):
        _smp_main("--ckpt", f, "--out", tmp_path / "g.png")
    _smp_main("--ckpt", f, "--vae", tmp_path / "vae.pt", "--num-samples", 24, "--batch-size", 8,
              "--out", tmp_path / "a.npz")
    a = _smp_npz(tmp_path / "a.npz")
    assert a["arr_0"].shape == (24, 8, 8, 3) and a["arr_0"].dtype == np.uint8  # 4x4 latents -> 8x8 RGB
    assert np.bincount(a["arr_1"]).tolist() == [8, 8, 8] and a["arr_0"].std() > 5
    perm = np.random.RandomState(42).permutation(24)
    want = np.concatenate([_smp_expected(G, range(i, i + 8), [i // 8] * 8, 1, "x", vae=vae) for i in (0, 8, 16)])
    np.testing.assert_array_equal(a["arr_0"], want[perm])
    _smp_main("--ckpt", f, "--vae", tmp_path / "vae.pt", "--out", tmp_path / "g.png")
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (3 * 66 + 2, 8 * 66 + 2, 3)


class _SmpInception(nn.Module):
    """Stands in for InceptionV3: features are the first pixel values (NCHW order)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        f = x.float().flatten(1) * self.w
        return f[:, :6], f[:, 6:10], f[:, :5]


def test_smp_fid_in_the_same_run(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ck.pt"
    _smp_ckpt(ckpt, steps="1")
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": _SmpInception())
    _smp_main("--ckpt", ckpt, "--num-samples", 50, "--fid", ref, "--out", tmp_path / "a.npz")
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FID ")]
    a = _smp_npz(tmp_path / "a.npz")["arr_0"]
    net = _SmpInception()
    m = fid.evaluate(fid.compute_features(net, a, progress=False), fid.reference_stats(str(ref), net))
    assert line == [f"FID {m['fid']:.4f} | sFID {m['sfid']:.4f} | IS {m['inception_score']:.4f} | "
                    f"precision {m['precision']:.4f} | recall {m['recall']:.4f}"]
    assert m["fid"] > 0 and not list(tmp_path.glob("*.png"))

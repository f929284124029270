"""Tests of fid.py (to be merged into test_afm.py): python3 -m pytest -q test_part_fid.py

CPU only, well under a minute. Tests that need ../shared/fixtures/inception_tf.pt skip without it; the full
fixture comparison is ../shared/compat/check.py --only inception --only fid.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid

_FID_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "fixtures")


def _fid_fixture(name):
    path = os.path.join(_FID_FIXTURES, name)
    if not os.path.isfile(path):
        pytest.skip(f"fixture {path} not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def _fid_direct(mu1, s1, mu2, s2):
    """Frechet distance with tr sqrtm(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), both roots by eigendecomposition."""
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def _fid_is_direct(logits, split):
    """Inception Score in float64: exp of the mean KL(p(y|x) || p(y)) per chunk, chunks averaged."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        q = p[i:i + split]
        scores.append(np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()))
    return float(np.mean(scores))


def _fid_pr_direct(ref, sam, k=3):
    """Improved precision/recall by brute force: k-th neighbour radii (self excluded), squared distances."""
    def d2(a, b):
        return ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
    r_ref, r_sam = np.sort(d2(ref, ref), 1)[:, k], np.sort(d2(sam, sam), 1)[:, k]
    d = d2(ref, sam)  # (n_ref, n_sam)
    return (d <= r_ref[:, None]).any(0).mean(), (d <= r_sam[None]).any(1).mean()


def _fid_random_stats(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return x.mean(0), np.cov(x, rowvar=False)


# --------------------------------------------------------------------------------------
# Inception network
# --------------------------------------------------------------------------------------


def test_fid_resize_tf1_matches_fixture():
    fx = _fid_fixture("inception_tf.pt")
    for size in (64, 256):
        img = fx["inputs"][f"images_{size}"][:1].float()
        err = (fid.resize_tf1(img) - fx["expected"][f"resize_{size}_to_299"]).abs().max().item()
        assert err <= 1e-4, (size, err)
        # PyTorch's bilinear resize (half-pixel centers) is a different function: the test can tell them apart
        other = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        assert (other - fx["expected"][f"resize_{size}_to_299"]).abs().max().item() > 1.0
    x = torch.randint(0, 256, (2, 3, 299, 299)).float()
    assert torch.equal(fid.resize_tf1(x), x)  # the identity at 299


def test_fid_state_dict_layouts(tmp_path, monkeypatch):
    model = fid.InceptionV3()
    sd = model.state_dict()
    assert len(sd) == 472 and "fc.bias" in sd and not any(k.endswith("num_batches_tracked") for k in sd)
    sd = {k: torch.full(v.shape, 1 + i / 1024, dtype=torch.half) for i, (k, v) in enumerate(sd.items())}  # fp16 files
    nbt = {k.replace("running_mean", "num_batches_tracked"): torch.tensor(0) for k in sd if k.endswith("running_mean")}
    model.load_state_dict(dict(sd, **nbt), strict=True)  # pytorch-fid's layout
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in sd.items() if k != "fc.bias"})
    torch.save(sd, tmp_path / "w.pth")  # torch-fidelity's layout, fp16
    loaded = fid.load_inception(str(tmp_path / "w.pth"))
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values())
    assert torch.equal(loaded.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"].float())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # no path: the cache folder is used, and an offline download fails with a one-line hint
    monkeypatch.setenv("AFM_CACHE", str(tmp_path / "cache"))

    def offline(url, dst, *a, **kw):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="--inception PATH") as e:
        fid.load_inception()
    assert "\n" not in str(e.value) and str(tmp_path / "cache") in str(e.value)
    os.makedirs(tmp_path / "cache", exist_ok=True)
    torch.save(dict(sd, **nbt), tmp_path / "cache" / fid.WEIGHT_NAMES[1])  # pytorch-fid's file is found too
    assert torch.equal(fid.load_inception().fc.weight, sd["fc.weight"].float())


def test_fid_forward_matches_fixture_and_pytorch_fid():
    fx = _fid_fixture("inception_tf.pt")
    model = fid.InceptionV3().eval()
    model.load_state_dict({k: v.float() for k, v in fx["state_dict"].items()})
    img = fx["inputs"]["images_64"][:1]  # (1, 3, 64, 64) uint8
    pfid = F.interpolate(img.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        pool3, spatial, logits = model(img)  # ADM's pipeline
        pfid_pool3 = model.body(pfid)[0]  # the same network under pytorch-fid's preprocessing
    for key, got in (("pool3", pool3), ("spatial", spatial), ("logits_unbiased", logits)):
        ref = fx["expected"][f"{key}_64"][:1]
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-4 * ref.abs().max(), key
    ref = fx["expected"]["pytorch_fid_pool3_64"][:1]
    assert (pfid_pool3 - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (pool3 - ref).abs().max() > 1e-2 * ref.abs().max()  # the resize matters


class _FidStandIn(nn.Module):
    """Stands in for InceptionV3 in plumbing tests: features are the first pixel values in NCHW order."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        f = x.float().flatten(1) * self.w
        return f[:, :4], f[:, 4:6], f[:, :3]


def test_fid_compute_features_batching():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 4, 5, 3), dtype=np.uint8)
    want = images.transpose(0, 3, 1, 2).reshape(11, -1).astype(np.float32)  # NHWC in, NCHW to the network
    batches = [images[:2], torch.from_numpy(images[2:9]), images[9:]]  # uneven, numpy and torch
    for inp in (images, batches, iter(batches)):
        f = fid.compute_features(_FidStandIn(), inp, batch_size=3, progress=False)
        assert f["pool3"].dtype == np.float32
        np.testing.assert_array_equal(f["pool3"], want[:, :4])
        np.testing.assert_array_equal(f["spatial"], want[:, 4:6])
        np.testing.assert_array_equal(f["logits"], want[:, :3])
    with pytest.raises(ValueError, match="uint8"):
        fid.compute_features(_FidStandIn(), images.astype(np.float32), progress=False)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def test_fid_frechet_distance(monkeypatch):
    rng = np.random.default_rng(0)
    mu1, s1 = _fid_random_stats(rng, 8, 50)
    mu2, s2 = _fid_random_stats(rng, 8, 50)
    val = fid.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(val, float) and val > 1
    assert abs(val - _fid_direct(mu1, s1, mu2, s2)) <= 1e-9 * val
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) <= 1e-9 * np.trace(s1)
    # a non-finite sqrtm is retried once with 1e-6 I added to both covariances
    calls, sqrtm = [], fid.linalg.sqrtm
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda m: calls.append(m) or (np.full_like(m, np.nan) if len(calls) == 1
                                                                              else sqrtm(m)))
    with pytest.warns(UserWarning, match="singular"):
        val2 = fid.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)), rtol=1e-12)
    assert abs(val2 - val) < 1e-4
    # an imaginary part above 1e-3 on the diagonal is an error; a smaller one is dropped
    for imag, raises in ((1e-2, True), (1e-4, False)):
        monkeypatch.setattr(fid.linalg, "sqrtm", lambda m: sqrtm(m) + 1j * imag * np.eye(8))
        if raises:
            with pytest.raises(ValueError, match="Imaginary"):
                fid.frechet_distance(mu1, s1, mu2, s2)
        else:
            assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - val) <= 1e-9 * val


def test_fid_inception_score_chunks_in_file_order():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 1000)  # 10 classes, class-sorted like an unshuffled sample file
    logits = (0.5 * rng.standard_normal((10000, 1008)) + 12 * np.eye(1008)[labels]).astype(np.float32)
    sorted_is = fid.inception_score(logits)
    shuffled = logits[rng.permutation(10000)]
    shuffled_is = fid.inception_score(shuffled)
    assert abs(sorted_is - _fid_is_direct(logits, 5000)) <= 1e-4 * sorted_is
    assert abs(shuffled_is - _fid_is_direct(shuffled, 5000)) <= 1e-4 * shuffled_is
    assert sorted_is < 0.6 * shuffled_is  # each 5,000 chunk of the sorted file sees only 5 classes
    assert abs(fid.inception_score(logits, split_size=10000) - _fid_is_direct(logits, 10000)) <= 1e-4 * shuffled_is


def test_fid_precision_recall_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.integers(-3, 4, (30, 8)).astype(np.float32)
    sam = rng.integers(-3, 4, (25, 8)).astype(np.float32)
    sam[:12] += 3  # part of the samples off the reference manifold: precision < 1
    ref[:10] -= 3  # a mode of the reference that the samples miss: recall < 1
    want = _fid_pr_direct(ref, sam)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    for bs in (10000, 7):  # one distance block, and many blocks whose k-NN must be merged
        assert fid.precision_recall(ref, sam, batch_size=bs, device="cpu") == pytest.approx(want, abs=1e-12)
    # large values overflow ADM's fp16 distances: the block falls back to fp32
    big_ref, big_sam = ref * 37, sam * 37
    big_ref[0] = 100
    t = torch.from_numpy(big_ref)
    assert not torch.isfinite(fid._sqdist(t.half(), t.half())).all()
    assert fid.precision_recall(big_ref, big_sam, batch_size=7, device="cpu") == pytest.approx(
        _fid_pr_direct(big_ref, big_sam), abs=1e-12)
    # ordinary features: the distances are ADM's fp16 ones, within fp16 rounding of the exact ones
    f = torch.from_numpy(rng.random((20, 64)).astype(np.float32))
    exact = ((f[:, None].double() - f[None].double()) ** 2).sum(-1)
    err = (fid._distances(f, f).double() - exact).abs().max().item()
    assert 1e-4 < err < 1e-2 * exact.max().item()  # fp32 distances would be ~1e-6 off


def test_fid_evaluate_on_given_features():
    rng = np.random.default_rng(1)
    feats = {"pool3": rng.standard_normal((40, 6)).astype(np.float32),
             "spatial": rng.standard_normal((40, 5)).astype(np.float32),
             "logits": rng.standard_normal((40, 1008)).astype(np.float32)}
    st = fid.feature_stats(feats)
    np.testing.assert_allclose(st["sigma"], np.cov(feats["pool3"].astype(np.float64).T), rtol=1e-12)
    m = fid.evaluate(feats, dict(st, pool3=feats["pool3"]), device="cpu")
    assert abs(m["fid"]) < 1e-9 and abs(m["sfid"]) < 1e-9
    assert m["inception_score"] == fid.inception_score(feats["logits"])
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    other = dict(feats, pool3=feats["pool3"] + 1)
    m2 = fid.evaluate(other, dict(st, pool3=None))
    assert m2["precision"] is None and m2["recall"] is None
    assert abs(m2["fid"] - 6.0) < 1e-6  # a mean shift of 1 in 6 dimensions, same covariance


# --------------------------------------------------------------------------------------
# Files and command line
# --------------------------------------------------------------------------------------


def test_fid_bad_npz_one_line_errors(tmp_path):
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    cases = {"nokey": dict(foo=imgs), "float": dict(arr_0=imgs.astype(np.float32)),
             "nchw": dict(arr_0=imgs.transpose(0, 3, 1, 2)), "partial": dict(mu=np.zeros(2048)),
             "badmu": dict(mu=np.zeros(10), sigma=np.zeros((2048, 2048)), mu_s=np.zeros(2023), sigma_s=np.zeros((2023, 2023)))}
    for name, arrays in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        for fn in (fid.read_images, fid.reference_stats):
            with pytest.raises(ValueError) as e:
                fn(path)
            assert path in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(SystemExit) as e:  # the command line: one line, before any Inception work
        fid.main(fid.parse_args([str(tmp_path / "junk.npz"), str(tmp_path / "float.npz")]))
    assert str(e.value).startswith("fid.py: error:") and "junk.npz" in str(e.value) and "\n" not in str(e.value)
    # a stats-only reference has no images: no pool3, so precision/recall will be skipped
    path = str(tmp_path / "stats.npz")
    np.savez(path, mu=np.ones(2048), sigma=np.eye(2048), mu_s=np.ones(2023), sigma_s=np.eye(2023))
    ref = fid.reference_stats(path)
    assert ref["pool3"] is None and ref["mu"].dtype == np.float64 and ref["sigma_s"].shape == (2023, 2023)
    # image folders: one size only
    os.makedirs(tmp_path / "mixed" / "sub")
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "sub" / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        fid.read_images(str(tmp_path / "mixed"))


def test_fid_make_ref_round_trip(tmp_path):
    fx = _fid_fixture("inception_tf.pt")
    torch.save(fx["state_dict"], tmp_path / "w.pth")  # fp16 as the fixture ships it
    images = fx["inputs"]["images_64"][:2].permute(0, 2, 3, 1).numpy()  # (2, 64, 64, 3)
    for i, img in enumerate(images):  # nested folders; sorted paths keep this order
        os.makedirs(tmp_path / "imgs" / f"d{i // 2}", exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / f"d{i // 2}" / f"{i}.png")
    out = str(tmp_path / "ref.npz")
    fid.main(fid.parse_args(["--make-ref", str(tmp_path / "imgs"), "--out", out, "--inception",
                             str(tmp_path / "w.pth"), "--device", "cpu"]))
    ref = np.load(out)
    assert sorted(ref.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    np.testing.assert_array_equal(ref["arr_0"], images)
    for key, stat in (("pool3", "mu"), ("spatial", "mu_s")):
        want = fx["expected"][f"{key}_64"][:2].double().numpy()
        assert np.abs(ref[stat] - want.mean(0)).max() <= 1e-4 * np.abs(want).max()
        cov = np.cov(want, rowvar=False)
        assert np.abs(ref["sigma" + stat[2:]] - cov).max() <= 1e-3 * np.abs(cov).max()
    # the written file reads back as a reference with the stored statistics
    ref2 = fid.reference_stats(out, model=_FidStandIn())
    np.testing.assert_array_equal(ref2["mu"], ref["mu"])
    np.testing.assert_array_equal(ref2["pool3"], images.transpose(0, 3, 1, 2).reshape(2, -1)[:, :4])

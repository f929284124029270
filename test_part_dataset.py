"""Tests of dataset.py: ADM crop, flip, skipped files, folder errors, latent cache (round trip,
posterior sampling, resume, refusal of another VAE or resolution), digits. CPU, a few seconds.

    python -m pytest -q test_part_dataset.py
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset import SHARD, ImageFolder, LatentCache, build_cache, build_dataset, check_cache
from dataset import vae_identity
from vae import SCALE, AutoencoderKL, load_vae

# name -> (width, height, PIL mode); odd sizes, both sides of the box-downsample loop at 32px
_DS_IMAGES = {
    "ant/a.jpg": (97, 61, "RGB"),  # short side 61 < 64: bicubic only
    "ant/b.png": (300, 517, "RGB"),  # halved 3 times (300 -> 150 -> 75 -> 37), odd sides
    "bee/c.png": (700, 451, "RGB"),  # halved 3 times, odd height
    "bee/d.png": (61, 97, "L"),  # grayscale -> RGB
    "cow/e.png": (64, 80, "RGBA"),  # short side exactly 2 * 32: halved once
}
_DS_CORRUPT = "bee/corrupt.jpg"  # a truncated JPEG: opens, fails while decoding


def _ds_make_folder(root):
    rng = np.random.default_rng(0)
    for name, (w, h, mode) in _DS_IMAGES.items():
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        arr[:, : w // 3] //= 4  # dark left third: no image equals its own mirror
        img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)
        img.save(os.path.join(root, name))
    jpg = os.path.join(root, _DS_CORRUPT)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(jpg, quality=95)
    with open(jpg, "rb") as f:
        data = f.read()
    with open(jpg, "wb") as f:
        f.write(data[: len(data) // 2])
    for note in ("notes.txt", "ant/notes.txt", "cow/labels.csv"):  # not images: ignored
        with open(os.path.join(root, note), "w") as f:
            f.write("not an image\n")
    return str(root)


def _ds_adm_crop(path, size):
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


def _ds_to_x(arr):  # uint8 (S, S, 3) -> float (3, S, S) in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1


def _ds_tiny_vae(path, seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    torch.save(vae.state_dict(), path)
    return str(path)


def _ds_build(root, vae_path, out, **kwargs):  # 32px, 2 images per shard, on the CPU
    kwargs = dict(image_size=32, batch_size=2, shard_size=2, num_workers=0, device="cpu") | kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt file's warning is tested elsewhere
        return build_cache(root, vae_path, out, **kwargs)


def _ds_cache(tmp_path):  # (image folder, VAE file, cache folder, shards written)
    root = _ds_make_folder(tmp_path / "images")
    vae_path = _ds_tiny_vae(tmp_path / "vae.pt", seed=0)
    out = str(tmp_path / "cache")
    return root, vae_path, out, _ds_build(root, vae_path, out)


def test_ds_center_crop_matches_adm(tmp_path):
    root = _ds_make_folder(tmp_path)
    for size in (32, 64):
        ds = ImageFolder(root, size, flip=False)
        halvings = set()
        for name in _DS_IMAGES:
            i = ds.files.index(os.path.join(root, name))
            ref, k = _ds_adm_crop(ds.files[i], size)
            halvings.add(k)
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, size, size)
            assert torch.equal(x, _ds_to_x(ref)), (name, size)
            assert y == ds.class_names.index(name.split("/")[0])
        assert 0 in halvings and max(halvings) >= 1  # both paths: with and without the box loop
    # the box loop matters: one bicubic step from the full 700x451 image gives other pixels
    img = Image.open(os.path.join(root, "bee/c.png")).convert("RGB")
    direct = np.array(img.resize((round(700 * 32 / 451), 32), resample=Image.BICUBIC))
    ref = _ds_adm_crop(os.path.join(root, "bee/c.png"), 32)[0]
    assert np.abs(direct[:, 9:41].astype(int) - ref.astype(int)).mean() > 1


def test_ds_folder_layout_flip_and_skip(tmp_path):
    root = _ds_make_folder(tmp_path)
    ds = build_dataset(root, image_size=32)
    assert isinstance(ds, ImageFolder) and ds.space == "pixel" and ds.shape == (3, 32, 32)
    assert ds.class_names == ["ant", "bee", "cow"] and ds.num_classes == 3
    assert len(ds) == 6 and sorted(ds.labels) == [0, 0, 1, 1, 1, 2]  # .txt / .csv ignored

    # flip: with a fixed seed both orientations occur, and one is the other's mirror
    ref = _ds_to_x(_ds_adm_crop(os.path.join(root, "ant/a.jpg"), 32)[0])
    assert not torch.equal(ref, ref.flip(-1))
    torch.manual_seed(0)
    outs = [ds[0][0] for _ in range(40)]
    plain = sum(torch.equal(x, ref) for x in outs)
    mirrored = sum(torch.equal(x, ref.flip(-1)) for x in outs)
    assert plain + mirrored == 40 and 10 <= plain <= 30, (plain, mirrored)

    # the corrupt file: one warning naming it, counted once, replaced by the next readable file
    bad = ds.files.index(os.path.join(root, _DS_CORRUPT))
    with pytest.warns(UserWarning, match="corrupt.jpg"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1 and ds.skipped_files == [os.path.join(root, _DS_CORRUPT)]
    assert items[bad][1] == items[bad + 1][1] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is not re-read, so no second warning
        ds[bad]
    assert ds.skipped == 1

    # the count reaches the training process from DataLoader worker processes too
    ds = ImageFolder(root, 32)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert sum(len(y) for _, y in batches) == 6 and ds.skipped == 1


def test_ds_folder_errors(tmp_path):
    def error(path):
        with pytest.raises((FileNotFoundError, ValueError)) as e:
            build_dataset(str(path), image_size=32)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        return str(e.value)

    assert "not found" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in error(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "x.png")  # images but no class folders
    assert "no class sub-folders" in error(tmp_path / "flat")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("hi")
    assert "no images" in error(tmp_path / "noimg")


def test_ds_cache_round_trip_and_sampling(tmp_path):
    root, vae_path, out, written = _ds_cache(tmp_path)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["complete"] and meta["image_size"] == 32 and meta["latent_shape"] == [4, 16, 16]
    assert meta["num_files"] == 6 and meta["num_images"] == 5 and meta["skipped"] == [_DS_CORRUPT]
    assert meta["class_names"] == ["ant", "bee", "cow"] and meta["num_classes"] == 3
    assert meta["vae"]["file"] == "vae.pt" and meta["vae"]["size"] == os.path.getsize(vae_path)
    assert len(written) == 3
    assert sorted(os.listdir(out)) == ["meta.json"] + [SHARD.format(k) for k in range(3)]

    # stored moments = the VAE's encoding of the ADM crop and of its mirror, to fp16 precision
    vae, files = load_vae(vae_path), ImageFolder(root, 32).files
    means, stds = [], []
    for path in written:
        s = torch.load(path, weights_only=True)
        assert s["mean"].dtype == s["std"].dtype == torch.float16
        assert s["mean"].shape[1:] == s["std"].shape[1:] == (2, 4, 16, 16)
        for j, i in enumerate(s["index"].tolist()):
            x = _ds_to_x(_ds_adm_crop(files[i], 32)[0])[None]  # (1, 3, 32, 32)
            with torch.no_grad():
                mean, logvar = vae.encode(torch.cat([x, x.flip(-1)]))  # (2, 4, 16, 16)
            std = torch.exp(0.5 * logvar)
            torch.testing.assert_close(s["mean"][j].float(), mean, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(s["std"][j].float(), std, rtol=1e-3, atol=1e-4)
            assert not torch.allclose(mean[0], mean[1], atol=1e-2)  # the mirror is another input
            label = os.path.relpath(files[i], root).split(os.sep)[0]
            assert int(s["label"][j]) == ["ant", "bee", "cow"].index(label)
            means.append(s["mean"][j].float())
            stds.append(s["std"][j].float())

    ds = build_dataset(out, image_size=32, vae_path=vae_path)
    assert isinstance(ds, LatentCache) and ds.space == "latent" and ds.shape == (4, 16, 16)
    assert len(ds) == 5 and ds.skipped == 1 and ds.num_classes == 3

    # under a fixed seed the example is (mean + std * noise) * SCALE of a random orientation
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = ds[3]
        torch.manual_seed(seed)
        f = int(torch.randint(2, ()))
        flips.add(f)
        torch.testing.assert_close(x, (means[3][f] + stds[3][f] * torch.randn(4, 16, 16)) * SCALE)
    assert flips == {0, 1}

    # over many draws: the law of an even mixture of N(mean_f, std_f^2), scaled
    torch.manual_seed(0)
    n = 4000
    draws = torch.stack([ds[3][0] for _ in range(n)]) / SCALE  # (n, 4, 16, 16)
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


def test_ds_cache_resume_and_refusals(tmp_path):
    root, vae_path, out, written = _ds_cache(tmp_path)
    shard = [os.path.join(out, SHARD.format(k)) for k in range(3)]
    before = torch.load(shard[1], weights_only=True)
    mtimes = [os.stat(p).st_mtime_ns for p in shard]

    # an interrupted run: shard 1 missing, a half-written temp file, meta not yet complete
    os.remove(shard[1])
    with open(shard[1] + ".tmp", "wb") as f:
        f.write(b"half a shard")
    meta = json.load(open(os.path.join(out, "meta.json")))
    json.dump({**meta, "complete": False}, open(os.path.join(out, "meta.json"), "w"))
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(out)

    # another VAE or resolution is refused before anything is written
    (tmp_path / "other").mkdir()
    other = _ds_tiny_vae(tmp_path / "other" / "vae.pt", seed=1)  # same name and size, other weights
    assert os.path.getsize(other) == os.path.getsize(vae_path)
    with pytest.raises(ValueError, match="VAE"):
        _ds_build(root, other, out)
    with pytest.raises(ValueError, match="64px"):
        _ds_build(root, vae_path, out, image_size=64)
    assert not os.path.exists(shard[1])

    # batch size 1 this time: shard 1's second batch holds only the corrupt file
    rewritten = _ds_build(root, vae_path, out, batch_size=1)
    assert rewritten == [shard[1]]
    assert [os.stat(p).st_mtime_ns for p in (shard[0], shard[2])] == [mtimes[0], mtimes[2]]
    after = torch.load(shard[1], weights_only=True)
    for k in ("label", "index"):
        assert torch.equal(before[k], after[k])
    for k in ("mean", "std"):
        torch.testing.assert_close(before[k].float(), after[k].float(), rtol=1e-3, atol=1e-4)
    assert after["skipped"] == before["skipped"] == [_DS_CORRUPT]
    assert json.load(open(os.path.join(out, "meta.json"))) == meta
    assert sorted(os.listdir(out)) == ["meta.json"] + [SHARD.format(k) for k in range(3)]
    assert len(LatentCache(out)) == 5

    # check_cache: one-line refusals; the same weights under another name are accepted
    for kwargs, match in [({"vae_path": other}, "VAE"), ({"image_size": 64}, "64px")]:
        with pytest.raises(ValueError, match=match) as e:
            check_cache(out, **kwargs)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=match):
            build_dataset(out, **{"image_size": 32, "vae_path": vae_path, **kwargs})
    copy = tmp_path / "renamed.pt"
    copy.write_bytes(open(vae_path, "rb").read())
    assert check_cache(out, vae_path=str(copy), image_size=32)["num_images"] == 5

    # a changed file list makes the finished shards meaningless: refused too
    Image.new("RGB", (40, 40)).save(os.path.join(root, "ant", "new.png"))
    with pytest.raises(ValueError, match="new --out"):
        _ds_build(root, vae_path, out)


def test_ds_vae_identity_sees_head_and_tail(tmp_path):
    big = bytes(9 << 20)  # 9 MiB: only the first and last 4 MiB are hashed
    for name, data in [("a", big), ("b", big[:-1] + b"\1"), ("c", b"\1" + big[1:])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "vae.pt").write_bytes(data)
    ids = [vae_identity(str(tmp_path / name / "vae.pt")) for name in "abc"]
    assert len({i["sha256_head_tail"] for i in ids}) == 3 and {i["size"] for i in ids} == {9 << 20}


def test_ds_digits():
    ds = build_dataset("digits")
    x, y = ds.tensors
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.shape == (1, 8, 8)
    assert ds.space == "pixel" and ds.skipped == 0
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1 and abs(x.mean().item() + 0.389) < 0.001
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    data = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz"))
    assert torch.equal(ds[5][0], torch.from_numpy(data["images"][5]).float()[None] / 8 - 1)
    assert int(ds[5][1]) == int(data["labels"][5]) and ds.class_names[3] == "3"

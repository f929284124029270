"""
Data for Adversarial Flow Models (AFM_SPEC section 11): `build_dataset(data, image_size, vae_path)` turns
"digits" (the built-in 8x8 digits, for CPU runs), an image folder (ImageNet's DIR/<class>/<image> or flat;
ADM's center crop, random flip), an npz of images (ADM's format) or a latent cache into (x, y) examples.
It also holds the resumable index stream that feeds training.

    python dataset.py                                                  # self-check: digits stats
    python dataset.py cache --data /data/imagenet/train --vae sd-vae-ft-mse.pt --out cache/in256
    torchrun --nproc_per_node=8 dataset.py cache --data ... --vae ... --out ...  # split over ranks

Latent cache: meta.json (VAE identity, image size, latent shape, classes, counts, skipped files) and
shard_00000.pt, ... (plain tensors): posterior mean, std fp16 (n, 2, C, h, w) of each image ([:, 0]) and its
mirror ([:, 1]), label and index (into the sorted file list) int64 (n,), and the shard's unreadable files.
An interrupted run resumes when rerun: finished shards are kept.
"""

import hashlib
import json
import math
import os
import struct
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from plumbing import ArgumentParser, cleanup, positive, save_atomic, save_json, setup
from vae import SCALE, load_vae, posterior

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # ADM's list + bmp, any case
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL on bad files
SHARD = "shard_{:05d}.pt"

# --------------------------------------------------------------------------------------
# The training stream: which examples each rank reads, resumable to the example
# --------------------------------------------------------------------------------------


class IndexStream:
    """An endless, resumable stream of this rank's example indices: epoch e is a permutation
    drawn from (seed, e); rank r takes every world-th index. `position` (examples consumed) is
    all the state, so a resumed run reads exactly the batches the interrupted one would have."""

    def __init__(self, n, rank, world, seed, position=0):
        self.n, self.rank, self.world, self.seed, self.position = n, rank, world, seed, position
        self.per_rank = n // world

    def __iter__(self):
        while True:
            epoch, offset = divmod(self.position, self.per_rank)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            mine = perm[self.rank::self.world][: self.per_rank]
            for i in mine[offset:].tolist():
                self.position += 1
                yield i


def batches(dataset, stream, batch_size, workers):
    """Yield (x, y) batches. In-memory datasets (`tensors`: the digits, small npz files) are indexed directly; the
    others go through a DataLoader fed by the stream (per-item randomness, e.g. flips, then comes from the worker
    seeds, so only the index order is exactly resumable)."""
    if hasattr(dataset, "tensors"):
        xs, ys = dataset.tensors
        it = iter(stream)
        while True:
            idx = torch.tensor([next(it) for _ in range(batch_size)])
            x = xs[idx]
            if dataset.flip:  # horizontal flip, p = 0.5 per example (the digits are never flipped)
                x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(-1), x)
            yield x, ys[idx]
    yield from DataLoader(dataset, batch_size=batch_size, sampler=stream, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=workers > 0)


# --------------------------------------------------------------------------------------
# Datasets: the digits, an image folder (ADM's preprocessing), an npz of images, a latent cache. Each has
# num_classes, shape (C, H, W) of x, space ("pixel" | "latent"), class_names and skipped (unreadable files).
# --------------------------------------------------------------------------------------


class Digits(TensorDataset):  # `tensors`: batches() indexes whole batches at once
    """1797 8x8 digits, ink 0..16 -> [-1, 1]. No flip: mirrored handwriting is another glyph."""

    space, num_classes, shape, skipped, flip = "pixel", 10, (1, 8, 8), 0, False
    class_names = [str(d) for d in range(10)]

    def __init__(self):
        d = np.load(DIGITS)
        super().__init__(torch.from_numpy(d["images"]).float()[:, None] / 8 - 1,  # (N, 1, 8, 8)
                         torch.from_numpy(d["labels"]).long())


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    # ADM's crop (guided-diffusion), as the release: halve with a box filter while the short side stays >= 2 * size,
    # so the one bicubic step below never shrinks by 2x or more (aliasing). Sides round down, as ADM: odd sizes match.
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    s = size / min(img.size)  # short side -> size; the long side is Python-round()ed, as ADM
    img = img.resize((round(img.width * s), round(img.height * s)), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W, 3) uint8
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]  # (size, size, 3)


def list_images(root, unconditional=False):
    """(files, labels, class_names), sorted. ImageNet's layout (ROOT/<class>/.../<image>, labels = sorted folder
    names), unless ROOT holds images itself (FFHQ, CelebA, LSUN as one folder) or `unconditional`: then every
    image below ROOT, one class. One-line errors."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder not found: {root}")
    entries = [e for e in os.scandir(root) if e.name[0] != "."]
    classes = sorted(e.name for e in entries if e.is_dir())
    flat = unconditional or not classes or any(e.is_file() and e.name.lower().endswith(IMAGE_EXTS) for e in entries)
    groups = [root] if flat else [os.path.join(root, c) for c in classes]
    files, labels = [], []
    for label, folder in enumerate(groups):
        for path, subdirs, names in os.walk(folder):
            subdirs.sort()
            hits = [os.path.join(path, f) for f in sorted(names) if f.lower().endswith(IMAGE_EXTS)]
            files += hits
            labels += [label] * len(hits)
    if not files:
        raise ValueError(f"no images ({' '.join(IMAGE_EXTS)}) in {root} or its sub-folders")
    return files, labels, [""] if flat else classes


class ImageFolder(Dataset):
    space = "pixel"

    def __init__(self, root, image_size=256, flip=True, unconditional=False):
        self.root, self.image_size, self.flip = root, image_size, flip
        self.files, self.labels, self.class_names = list_images(root, unconditional)
        self.names = [os.path.relpath(f, root) for f in self.files]
        self.num_classes, self.shape = len(self.class_names), (3, image_size, image_size)
        # A flag per file in shared memory: DataLoader workers (fork or spawn) mark unreadable
        # files here, so the training process sees `skipped` and nobody re-reads a bad file.
        self.bad = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()
        if not any(self.load(i) is not None for i in range(len(self.files))):  # stops at the first readable one
            raise ValueError(f"none of the {len(self.files)} image files in {root} is readable")

    @property
    def skipped(self):
        return int(self.bad.sum())

    @property
    def skipped_files(self):
        return [self.files[i] for i in self.bad.nonzero().flatten().tolist()]

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """ADM crop of file i, RGB uint8 (S, S, 3); None if unreadable (warned once, counted)."""
        if self.bad[i]:
            return None
        try:
            with Image.open(self.files[i]) as img:
                return center_crop_arr(img.convert("RGB"), self.image_size)
        except UNREADABLE as e:
            warnings.warn(f"skipping unreadable image {self.files[i]}: {e}")
            self.bad[i] = 1
            return None

    def __getitem__(self, i):
        # An unreadable file is replaced by the next readable one, so batches keep their size.
        for j in (k % len(self) for k in range(i, i + len(self))):
            if (arr := self.load(j)) is not None:
                break
        else:
            raise RuntimeError(f"no readable image in {self.root}")
        if self.flip and torch.rand(()) < 0.5:  # ADM and the release: horizontal flip, p = 0.5
            arr = arr[:, ::-1]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1, self.labels[j]


def npz_array(path, key, max_bytes):
    """npz[key]: read into memory up to max_bytes, else memory-mapped in place (np.savez stores arrays
    uncompressed: the .npy member's data is a contiguous run of the file)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
        if info.file_size <= max_bytes or info.compress_type != zipfile.ZIP_STORED:
            with np.load(path, allow_pickle=False) as f:
                return f[key]
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # the local header: 30 bytes, then the name and an extra field
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return np.memmap(path, dtype, "r", offset=f.tell(), shape=shape, order="F" if fortran else "C")


class ArrayImages(Dataset):
    """Images in an npz, the ADM / sample.py format (CIFAR-10 users keep theirs so): arr_0 uint8 (N, H, W, C) with
    C 1 or 3 and H == W, optional arr_1 int labels (N,) (without them: one class). Random horizontal flip p=0.5.
    Up to 2 GiB of floats it is held in memory (`tensors`), larger files are memory-mapped. Training reads the images
    as they are; image_size is that of load()'s crops, for the cache writer."""

    space, skipped = "pixel", 0

    def __init__(self, path, image_size=None, flip=True, unconditional=False, in_memory=2 << 30):
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = f.files
            x = npz_array(path, "arr_0", in_memory // 4)
            y = npz_array(path, "arr_1", 1 << 40) if "arr_1" in keys and not unconditional else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            why = "arr_0 is an object array (images of different sizes?)" if "allow_pickle" in str(e) else (
                "no arr_0 (uint8 images N, H, W, C)" if isinstance(e, KeyError) else f"not a readable .npz ({e})")
            raise ValueError(f"{path}: {why}") from None
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3) or x.shape[1] != x.shape[2] or not len(x):
            raise ValueError(f"{path}: arr_0 should be uint8 (N, H, W, C) square images with C 1 or 3, got "
                             f"{x.dtype} {x.shape}")
        if y is not None and (y.dtype.kind not in "iu" or y.shape != (len(x),) or (len(y) and y.min() < 0)):
            raise ValueError(f"{path}: arr_1 should be {len(x)} integer labels >= 0, got {y.dtype} {y.shape}")
        self.x, self.y = x, np.zeros(len(x), np.int64) if y is None else y.astype(np.int64)
        self.labels, self.num_classes, self.flip = self.y.tolist(), int(self.y.max()) + 1, flip
        self.class_names, self.names = [str(c) for c in range(self.num_classes)], [str(i) for i in range(len(x))]
        self.image_size, self.shape = image_size or x.shape[1], (x.shape[3], x.shape[1], x.shape[1])
        if not isinstance(x, np.memmap):  # (N, C, H, W) in [-1, 1]
            self.tensors = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.from_numpy(self.y))

    def __len__(self):
        return len(self.x)

    def load(self, i):  # uint8 RGB (S, S, 3) at image_size (ADM's crop when it differs), for the cache writer
        img = Image.fromarray(self.x[i].squeeze(-1) if self.x.shape[3] == 1 else np.asarray(self.x[i])).convert("RGB")
        return np.asarray(img) if img.size[0] == self.image_size else center_crop_arr(img, self.image_size)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.x[i])).permute(2, 0, 1).float() / 127.5 - 1  # (C, H, W)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def build_dataset(data, image_size=256, vae_path=None, unconditional=False):
    """"digits", an npz of images, a latent cache (a folder with meta.json), or an image folder."""
    if data == "digits":
        return Digits()
    if os.path.isfile(os.path.join(data, "meta.json")):
        return LatentCache(data, vae_path, image_size)
    if data.endswith(".npz") and not os.path.isdir(data):
        return ArrayImages(data, flip=True, unconditional=unconditional)
    return ImageFolder(data, image_size, unconditional=unconditional)


def open_data(data, image_size=256, vae_path=None, device="cpu", unconditional=False):
    """(dataset, VAE or None, encode per batch?, C, H): the dataset and what the networks see, pixels or
    SD-VAE latents (cached, or encoded per batch from images). Bad input: one line naming the flag."""
    try:
        ds = build_dataset(data, image_size, vae_path, unconditional)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: --data {data}: {e}")
    try:
        vae = load_vae(vae_path, device) if vae_path else None
    except (RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: --vae {vae_path}: {e}")
    C, H, _ = ds.shape
    encode = ds.space == "pixel" and vae is not None
    if encode:  # the latent shape, read off one encoding (any VAE depth)
        C, H = vae.encode(torch.zeros(1, C, H, H, device=device))[0].shape[1:3]
    return ds, vae, encode, C, H


# --------------------------------------------------------------------------------------
# Latent cache: checked, read, written. Shard k holds files [k * shard_size, (k + 1) * shard_size) of the
# sorted list (minus unreadable ones), so a rerun knows what is done; rank r writes k = r mod world.
# --------------------------------------------------------------------------------------


def vae_identity(path):
    """Name, size, sha256 of the first and last 4 MiB: cheap, and it tells apart VAEs that differ
    only in the decoder (stored last), as sd-vae-ft-ema and sd-vae-ft-mse do."""
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        f.seek(max(4 << 20, size - (4 << 20)))
        h.update(f.read())
    return {"file": os.path.basename(path), "size": size, "sha256_head_tail": h.hexdigest()}


def check_cache(cache_dir, vae_path=None, image_size=None):
    """The cache's meta.json; a one-line error if it was made with another VAE or resolution.
    The VAE is compared by content (size and hash), so a renamed copy is accepted."""
    path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{cache_dir} is not a latent cache (no meta.json)")
    with open(path) as f:
        meta = json.load(f)
    old, key = meta["vae"], ("size", "sha256_head_tail")
    if vae_path is not None and [old[k] for k in key] != [vae_identity(vae_path)[k] for k in key]:
        raise ValueError(f"latent cache {cache_dir} was made with VAE {old['file']} ({old['size']} "
                         f"bytes), not {vae_path}: rebuild it, or pass the VAE it was made with")
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(f"latent cache {cache_dir} holds {meta['image_size']}px images, not "
                         f"{image_size}px: rebuild it with --image-size {image_size}")
    return meta


class LatentCache(Dataset):
    space = "latent"

    def __init__(self, root, vae_path=None, image_size=None):  # the VAE and size, if given, are checked too
        m = self.meta = check_cache(root, vae_path, image_size)
        if not m["complete"]:
            raise ValueError(f"latent cache {root} is incomplete: rerun the command that made it")
        self.root, self.shape = root, tuple(m["latent_shape"])
        self.num_classes, self.class_names = m["num_classes"], m["class_names"]
        self.skipped, self.skipped_files = len(m["skipped"]), m["skipped"]
        self.offsets = np.cumsum([0] + m["shard_counts"])  # shard k: examples offsets[k]..[k+1]-1
        missing = [SHARD.format(k) for k in range(len(m["shard_counts"])) if not os.path.isfile(
            os.path.join(root, SHARD.format(k)))]
        if missing:
            raise ValueError(f"latent cache {root} lacks {', '.join(missing[:3])}: rebuild it (dataset.py cache)")
        self.shards = {}  # memory-mapped on first use, by each DataLoader worker for itself

    def __getstate__(self):
        return {**self.__dict__, "shards": {}}

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        if k not in self.shards:
            path = os.path.join(self.root, SHARD.format(k))
            self.shards[k] = torch.load(path, mmap=True, weights_only=True)
        s, j = self.shards[k], i - int(self.offsets[k])
        # The release flips, encodes and samples the posterior each time it reads an image: same
        # law here. Draw the orientation, then the noise (in this order: the tests replay it).
        f = int(torch.randint(2, ()))
        mean, std = s["mean"][j, f].float(), s["std"][j, f].float()  # (C, h, w)
        return (mean + std * torch.randn(self.shape)) * SCALE, int(s["label"][j])


def encode_moments(vae, x):
    """Posterior mean and std of uint8 (N, 3, S, S) crops and their mirrors: (N, 2, C, h, w)."""
    x = x.float() / 127.5 - 1
    mean, std = posterior(vae, torch.cat([x, x.flip(-1)]))  # (2N, C, h, w) each: images, then mirrors
    return [t.unflatten(0, (2, -1)).transpose(0, 1) for t in (mean, std)]  # (N, 2, C, h, w)


class _Crops(Dataset):  # unflipped uint8 crops for the writer; unreadable -> ok = False
    def __init__(self, folder):
        self.folder = folder

    def __getitem__(self, i):
        arr = self.folder.load(i)
        if arr is None:
            return torch.zeros(self.folder.shape, dtype=torch.uint8), i, False
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i, True  # (3, S, S)


def build_cache(data, vae_path, out, image_size=256, batch_size=64, shard_size=1024,
                num_workers=8, max_images=None, device=None, unconditional=False):
    """Encode every image of `data` and its mirror into `out`; returns the shards this rank wrote.
    device: default cuda (this rank's) if available, else cpu."""
    rank, world, default_device = setup()
    device = torch.device(device or default_device)
    npz = data.endswith(".npz") and not os.path.isdir(data)
    folder = (ArrayImages(data, image_size, flip=False, unconditional=unconditional, in_memory=0) if npz
              else ImageFolder(data, image_size, flip=False, unconditional=unconditional))
    n = len(folder) if max_images is None else min(len(folder), max_images)
    names = folder.names[:n]
    vae = load_vae(vae_path, device=device)
    probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    meta = dict(vae=vae_identity(vae_path), image_size=image_size, num_files=n,
                latent_shape=list(encode_moments(vae, probe)[0].shape[2:]),  # [C, h, w]
                num_classes=folder.num_classes, class_names=folder.class_names,
                files_sha256=hashlib.sha256("\n".join(names).encode()).hexdigest(),
                shard_size=shard_size, complete=False)
    if os.path.isfile(os.path.join(out, "meta.json")):  # resuming: are finished shards still valid?
        old = check_cache(out, vae_path, image_size)
        for key in ("files_sha256", "shard_size", "num_files"):
            if old[key] != meta[key]:
                raise ValueError(f"{out} was cached with another {key}: use a new --out")
    if rank == 0:  # complete=False until every shard is written
        os.makedirs(out, exist_ok=True)
        save_atomic(meta, os.path.join(out, "meta.json"), save_json)
    if dist.is_initialized():
        dist.barrier()

    paths = [os.path.join(out, SHARD.format(k)) for k in range(math.ceil(n / shard_size))]
    ends = [min(n, (k + 1) * shard_size) for k in range(len(paths))]  # shard k ends before ends[k]
    todo = [k for k in range(rank, len(paths), world) if not os.path.exists(paths[k])]
    jobs = [list(range(i, min(i + batch_size, ends[k])))  # batches of file indices, shard by shard
            for k in todo for i in range(k * shard_size, ends[k], batch_size)]
    loader = DataLoader(_Crops(folder), batch_sampler=jobs, pin_memory=device.type == "cuda",
                        num_workers=min(num_workers, os.cpu_count() or 1))
    desc = "caching" if world == 1 else f"caching (rank 0 of {world})"
    bar = tqdm(total=sum(map(len, jobs)), unit="img", desc=desc, disable=rank != 0)
    labels, written, parts = torch.tensor(folder.labels), [], []
    empty = torch.empty(0, 2, *meta["latent_shape"])  # a batch of unreadable files only
    for x, idx, ok in loader:
        moments = encode_moments(vae, x[ok].to(device)) if ok.any() else [empty, empty]
        parts.append([idx[ok], idx[~ok]] + [t.half().cpu() for t in moments])
        bar.update(len(idx))
        k = int(idx[0]) // shard_size
        if int(idx[-1]) + 1 == ends[k]:  # the last batch of shard k: write the shard
            index, bad, mean, std = [torch.cat(t) for t in zip(*parts)]  # mean, std (n, 2, C, h, w)
            shard = dict(mean=mean, std=std, label=labels[index], index=index,
                         skipped=[names[i] for i in bad.tolist()])
            save_atomic(shard, paths[k])
            written, parts = written + [paths[k]], []
    bar.close()

    if dist.is_initialized():
        dist.barrier()
    if rank == 0:  # every shard is on disk: record the totals, and the cache is usable
        shards = [torch.load(path, mmap=True, weights_only=True) for path in paths]
        meta.update(shard_counts=[len(s["label"]) for s in shards], complete=True,
                    skipped=[f for s in shards for f in s["skipped"]])
        meta["num_images"] = sum(meta["shard_counts"])
        save_atomic(meta, os.path.join(out, "meta.json"), save_json)
        print(f"cached {meta['num_images']} images and mirrors in {len(paths)} shards at {out}; "
              f"skipped {len(meta['skipped'])} unreadable files")
    return written


# --------------------------------------------------------------------------------------
# Self-check, command line
# --------------------------------------------------------------------------------------


def self_check():
    ds = build_dataset("digits")
    x, y = ds.tensors
    counts = torch.bincount(y, minlength=10)
    print(f"digits: {len(ds)} images, {ds.num_classes} classes, x {tuple(x.shape)} {x.dtype} in "
          f"[{x.min():.2f}, {x.max():.2f}] mean {x.mean():.3f}, {counts.min()}..{counts.max()} per class")
    assert len(ds) == 1797 and ds.num_classes == 10 and x.min() == -1 and x.max() == 1
    print(f"ADM crop 517x300 -> {center_crop_arr(Image.new('RGB', (517, 300)), 256).shape}")


def parse_args(argv=None):
    p = ArgumentParser(prog="dataset.py", description="AFM data: self-check (no command) or cache")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("cache", help="encode an image folder and its mirror into a latent cache")
    c.add_argument("--data", required=True, help="an image folder (class sub-folders, or flat) or an npz of images")
    c.add_argument("--unconditional", action="store_true", help="ignore class folders / labels: one class")
    c.add_argument("--vae", required=True, help="VAE weights (the release: sd-vae-ft-mse)")
    c.add_argument("--out", required=True, help="cache folder; rerun the same command to resume")
    c.add_argument("--image-size", type=positive, default=256)  # paper: ImageNet 256x256
    c.add_argument("--batch-size", type=positive, default=64)  # images per VAE call, per rank
    c.add_argument("--shard-size", type=positive, default=1024)  # images per shard: 32 MiB at 256px
    c.add_argument("--num-workers", type=int, default=8)  # decode + crop processes per rank
    c.add_argument("--max-images", type=positive, default=None)  # first N files only (smoke tests)
    return p.parse_args(argv)


def main(args):
    if args.command == "cache":
        try:
            build_cache(args.data, args.vae, args.out, args.image_size, args.batch_size,
                        args.shard_size, args.num_workers, args.max_images, unconditional=args.unconditional)
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad folder, VAE file, or another cache's --out
            raise SystemExit(f"dataset.py cache: error: {e}")
        cleanup()
    else:
        self_check()


if __name__ == "__main__":
    main(parse_args())

"""
Data for Adversarial Flow Models (arXiv 2511.22475; the paper trains on ImageNet 256x256).
`build_dataset(data, image_size, vae_path)` turns "digits" (the built-in 8x8 digits, for CPU
runs), an image folder (ImageNet's DIR/<class>/<image>, or flat; ADM's center crop, random flip),
an npz of images (ADM's format) or a latent cache into (x, y) examples. It also holds the
resumable index stream that feeds training.

    python dataset.py                                          # self-check: digits stats
    python dataset.py cache --data /data/imagenet/train --vae sd-vae-ft-mse.pt --out cache/in256
    torchrun --nproc_per_node=8 dataset.py cache --data ... --vae ... --out ...  # over ranks

Latent cache: meta.json (VAE identity, image size, latent shape, the labelling: --unconditional,
classes and a hash of the labels, file counts, skipped files) and shard_00000.pt, ... (plain
tensors): posterior mean, std fp16 (n, 2, C, h, w) of each image ([:, 0]) and its mirror
([:, 1]), label and index (into the sorted file list) int64 (n,), and the shard's unreadable
files. An interrupted run resumes when rerun with the same flags: finished shards are kept, and
a rerun with settings that would change the shards' contents is refused.
"""

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import warnings
import zipfile

# first, before torch: from its import on, Ctrl-C is one line (plumbing.interrupted)
from plumbing import (ArgumentParser, cleanup, file_identity, first_line, one_line_errors,
                      positive, print0, save_atomic, save_json, setup)

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from vae import SCALE, load_vae, posterior

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # ADM's list + bmp, any case
# PIL's errors on bad files
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
SHARD = "shard_{:05d}.pt"
MAX_CLASSES = 100_000  # labels bound: ImageNet-21k has 21,841 classes
MAX_IMAGE_SIZE = 4096  # crop sizes: the paper's largest is 512
MAX_WORKERS = 32  # loader processes per rank, whatever --workers asks
FOLDER_SIZE = 256  # an image folder's crop size unless given: the paper's ImageNet 256x256
DATA_KINDS = ('"digits", an image folder (DIR/<class>/<image>, or flat), an .npz of images '
              '(arr_0 uint8 N, H, W, C) or a latent cache folder (made by dataset.py cache)')

# --------------------------------------------------------------------------------------
# The training stream: which examples each rank reads, resumable to the example
# --------------------------------------------------------------------------------------


class IndexStream:
    """An endless, resumable stream of this rank's example indices: epoch e is a permutation
    drawn from (seed, e); rank r takes every world-th index. `position` (examples consumed) is
    all the state, so a resumed run reads exactly the batches the interrupted one would have."""

    def __init__(self, n, rank, world, seed, position=0):
        self.n = n
        self.rank = rank
        self.world = world
        self.seed = seed
        self.position = position
        self.per_rank = n // world

    def __iter__(self):
        while True:
            epoch, offset = divmod(self.position, self.per_rank)
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(self.n, generator=generator)
            mine = perm[self.rank :: self.world][: self.per_rank]
            for i in mine[offset:].tolist():
                self.position += 1
                yield i


def worker_count(n):
    """Loader processes for a request of n: at most one per CPU and MAX_WORKERS (--workers 1000
    would start 1,000 processes); said in one line when capped."""
    cap = min(os.cpu_count() or 1, MAX_WORKERS)
    if n > cap:
        print0(f"note: {n} loader workers asked, {cap} used (one per CPU, at most {MAX_WORKERS})")
        return cap
    return n


def batches(dataset, stream, batch_size, workers):
    """Yield (x, y) batches. In-memory datasets (`tensors`: the digits, small npz files) are
    indexed directly; the others go through a DataLoader fed by the stream (per-item randomness,
    e.g. flips, then comes from the worker seeds, so only the index order is exactly
    resumable)."""
    if dataset.in_memory:
        xs, ys = dataset.tensors
        it = iter(stream)
        while True:
            idx = torch.tensor([next(it) for _ in range(batch_size)])
            x = xs[idx]
            if dataset.flip:  # horizontal flip, p = 0.5 per example (the digits are never flipped)
                x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(-1), x)
            yield x, ys[idx]
    workers = worker_count(workers)
    yield from DataLoader(dataset, batch_size=batch_size, sampler=stream, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), drop_last=True,
                          persistent_workers=workers > 0)


# --------------------------------------------------------------------------------------
# Datasets: the digits, an image folder (ADM's preprocessing), an npz of images, a latent cache.
# Each has num_classes, shape (C, H, W) of x, space ("pixel" | "latent"), class_names,
# skipped (unreadable files) and in_memory (held as `tensors`, indexed a batch at a time).
# --------------------------------------------------------------------------------------


class Digits(TensorDataset):  # `tensors`: batches() indexes whole batches at once
    """1797 8x8 digits, ink 0..16 -> [-1, 1]. No flip: mirrored handwriting is another glyph."""

    space = "pixel"
    num_classes = 10
    shape = (1, 8, 8)
    skipped = 0
    flip = False
    in_memory = True
    class_names = [str(d) for d in range(10)]

    def __init__(self):
        d = np.load(DIGITS)
        images = torch.from_numpy(d["images"]).float()[:, None] / 8 - 1  # (N, 1, 8, 8)
        super().__init__(images, torch.from_numpy(d["labels"]).long())


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    # ADM's crop (guided-diffusion's image_datasets.py), as the release's
    # data/imagenet_resize.py: halve with a box filter while the short side stays >= 2 * size,
    # so the one bicubic step below never shrinks by 2x or more (aliasing). Sides round down,
    # as ADM: odd sizes match.
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    s = size / min(img.size)  # short side -> size; the long side is Python-round()ed, as ADM
    img = img.resize((round(img.width * s), round(img.height * s)), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W, 3) uint8
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]  # (size, size, 3)


def rgb(img: Image.Image) -> Image.Image:
    """img in RGB. 16-bit grayscale (a PNG opens as mode "I;16" or "I", values 0..65535) is
    scaled to 8 bits first: PIL's convert("RGB") clips it at 255, a white image."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img).astype(np.float64) / 257  # 65535 -> 255
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def check_image_size(size, vae=False):
    """A one-line error naming --image-size unless it is a crop size the networks can take:
    from 8 to MAX_IMAGE_SIZE, and a multiple of 8 when a VAE encodes it (8x down)."""
    if not 8 <= size <= MAX_IMAGE_SIZE or (vae and size % 8):
        need = "from 8"
        if vae:
            need = "a multiple of 8 from 8"
        raise ValueError(f"--image-size {size}: expected {need} to {MAX_IMAGE_SIZE}")


def walk_images(folder):
    """Every image file below `folder`, sorted (sub-folders in name order)."""
    found = []
    for path, subdirs, names in os.walk(folder):
        subdirs.sort()
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTS):
                found.append(os.path.join(path, name))
    return found


def list_images(root, unconditional=False):
    """(files, labels, class_names), sorted. ImageNet's layout (ROOT/<class>/.../<image>,
    labels = sorted folder names), unless ROOT holds images itself (CelebA, LSUN as one folder;
    or images in ROOT and in numbered sub-folders) or `unconditional`: then every image below
    ROOT, one class. Images both in ROOT and in its sub-folders are also what a class tree with
    stray files looks like, and reading it as one class would silently train without classes:
    so that case is said in one warning line (--unconditional, "one class", silences it).
    One-line errors."""
    if os.path.isfile(root):
        raise ValueError(f"{root} is a file, not an image folder or an .npz of images")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = []
    top = []  # images directly in root
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes.append(entry.name)
        elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTS):
            top.append(entry.name)
    classes.sort()
    top.sort()
    if top and classes and not unconditional:
        for c in classes:
            if walk_images(os.path.join(root, c)):
                print0(f"warning: {root} holds {len(top)} image(s) of its own ({top[0]}, ...) "
                       f"next to sub-folders with images ({c}, ...): read as ONE class, every "
                       f"image below it. For a class per sub-folder move those images into "
                       f"one; --unconditional keeps one class and silences this")
                break
    flat = unconditional or not classes or bool(top)
    groups = [root]
    if not flat:
        groups = [os.path.join(root, c) for c in classes]
    files = []
    labels = []
    for label, folder in enumerate(groups):
        hits = walk_images(folder)
        files += hits
        labels += [label] * len(hits)
    if not files:
        raise ValueError(f"no images ({' '.join(IMAGE_EXTS)}) in {root} or its sub-folders")
    if flat:
        return files, labels, [""]
    return files, labels, classes


class ImageFolder(Dataset):
    space = "pixel"
    in_memory = False

    def __init__(self, root, image_size=FOLDER_SIZE, flip=True, unconditional=False):
        check_image_size(image_size)
        self.root = root
        self.image_size = image_size
        self.flip = flip
        self.files, self.labels, self.class_names = list_images(root, unconditional)
        self.names = [os.path.relpath(f, root) for f in self.files]
        self.num_classes = len(self.class_names)
        self.shape = (3, image_size, image_size)
        # A flag per file in shared memory: DataLoader workers (fork or spawn) mark unreadable
        # files here, so the training process sees `skipped` and nobody re-reads a bad file.
        self.bad = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()
        self.find_readable()

    def find_readable(self):
        """Read files in order up to the first readable one; the unreadable ones before it are
        marked and said in one line (not a warning each), or, if none is readable, one error."""
        first = None  # (name, why) of the first unreadable file
        for i in range(len(self.files)):
            try:
                self.read(i)
                break
            except UNREADABLE as e:
                self.bad[i] = 1
                if first is None:
                    first = (self.names[i], first_line(e))
        else:
            raise ValueError(f"none of the {len(self.files)} image files in {self.root} is "
                             f"readable (first: {first[0]}: {first[1]})")
        if first is not None:
            print0(f"warning: skipping {self.skipped} unreadable image file(s) in {self.root} "
                   f"(first: {first[0]}: {first[1]})")

    @property
    def skipped(self):
        return int(self.bad.sum())

    @property
    def skipped_files(self):
        return [self.files[i] for i in self.bad.nonzero().flatten().tolist()]

    def __len__(self):
        return len(self.files)

    def read(self, i):
        """ADM crop of file i, RGB uint8 (S, S, 3); PIL's error if unreadable."""
        with Image.open(self.files[i]) as img:
            return center_crop_arr(rgb(img), self.image_size)

    def load(self, i):
        """ADM crop of file i, RGB uint8 (S, S, 3); None if unreadable (warned once, counted)."""
        if self.bad[i]:
            return None
        try:
            return self.read(i)
        except UNREADABLE as e:
            warnings.warn(f"skipping unreadable image {self.files[i]}: {e}")
            self.bad[i] = 1
            return None

    def __getitem__(self, i):
        # An unreadable file is replaced by the next readable one, so batches keep their size.
        for k in range(i, i + len(self)):
            j = k % len(self)
            arr = self.load(j)
            if arr is not None:
                break
        else:
            raise RuntimeError(f"no readable image in {self.root}")
        if self.flip and torch.rand(()) < 0.5:  # ADM and the release: horizontal flip, p = 0.5
            arr = arr[:, ::-1]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, S, S)
        return x, self.labels[j]


def check_labels(y, n, name):
    """Class labels as int64 (n,), or a one-line error naming them: integers (a uint64 label
    past 2**63 would wrap negative in int64), one per image, from 0 to MAX_CLASSES - 1 (a label
    of 2**40 would build a table of 2**40 classes: a MemoryError, or a hang)."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise ValueError(f"{name} should be {n} integer labels (one per image), got {y.dtype} "
                         f"{y.shape}")
    low = int(y.min())  # Python ints: exact for any int or uint dtype
    high = int(y.max())
    if low < 0 or high >= MAX_CLASSES:
        raise ValueError(f"{name} should hold labels from 0 to {MAX_CLASSES - 1:,}, got "
                         f"{low:,} to {high:,}")
    return y.astype(np.int64)


def npz_array(path, key, max_bytes):
    """npz[key]: read into memory up to max_bytes, else memory-mapped in place (np.savez stores
    arrays uncompressed: the .npy member's data is a contiguous run of the file)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
        if info.file_size <= max_bytes or info.compress_type != zipfile.ZIP_STORED:
            with np.load(path, allow_pickle=False) as f:
                return f[key]
    with open(path, "rb") as f:
        # the local header: 30 bytes, then the name and an extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    order = {False: "C", True: "F"}[fortran]
    return np.memmap(path, dtype, "r", offset=offset, shape=shape, order=order)


class ArrayImages(Dataset):
    """Images in an npz, the ADM / sample.py format (CIFAR-10 users keep theirs so): arr_0 uint8
    (N, H, W, C) with C 1 or 3 and H == W, optional arr_1 int labels (N,) (without them: one
    class). Random horizontal flip p=0.5. Up to 2 GiB of floats it is held in memory
    (`tensors`), larger files are memory-mapped. Training reads the images as they are;
    image_size is that of load()'s crops, for the cache writer."""

    space = "pixel"
    skipped = 0

    def __init__(self, path, image_size=None, flip=True, unconditional=False, max_memory=2 << 30):
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = f.files
            x = npz_array(path, "arr_0", max_memory // 4)
            y = None
            if "arr_1" in keys and not unconditional:
                y = npz_array(path, "arr_1", 1 << 40)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                why = "is empty (0 bytes), not a readable .npz"
            elif "Object arrays" in str(e):  # numpy on an object array (a junk file: "pickled")
                why = "arr_0 is an object array (images of different sizes?)"
            elif isinstance(e, KeyError):
                why = "no arr_0 (uint8 images N, H, W, C)"
            else:
                why = f"not a readable .npz ({first_line(e)})"
            raise ValueError(f"{path}: {why}") from None
        square = x.ndim == 4 and x.shape[1] == x.shape[2] and x.shape[3] in (1, 3)
        if x.dtype != np.uint8 or not square or not len(x):
            raise ValueError(f"{path}: arr_0 should be uint8 (N, H, W, C) square images with C 1 "
                             f"or 3, got {x.dtype} {x.shape}")
        self.x = x
        if y is None:
            self.y = np.zeros(len(x), np.int64)
        else:
            self.y = check_labels(y, len(x), f"{path}: arr_1")
        self.labels = self.y.tolist()
        self.num_classes = int(self.y.max()) + 1
        self.flip = flip
        self.class_names = [str(c) for c in range(self.num_classes)]
        self.names = [str(i) for i in range(len(x))]
        self.image_size = image_size
        if image_size is None:
            self.image_size = x.shape[1]
        self.shape = (x.shape[3], x.shape[1], x.shape[1])
        self.in_memory = not isinstance(x, np.memmap)
        if self.in_memory:
            # (N, C, H, W) in [-1, 1]
            images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
            self.tensors = (images, torch.from_numpy(self.y))

    def __len__(self):
        return len(self.x)

    def load(self, i):
        """uint8 RGB (S, S, 3) at image_size (ADM's crop when it differs), for the cache
        writer."""
        arr = np.asarray(self.x[i])  # (H, W, C)
        if self.x.shape[3] == 1:
            arr = arr.squeeze(-1)
        img = Image.fromarray(arr).convert("RGB")
        if img.size[0] == self.image_size:
            return np.asarray(img)
        return center_crop_arr(img, self.image_size)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.x[i])).permute(2, 0, 1).float() / 127.5 - 1  # (C, H, W)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def is_npz(data):
    """--data names an npz file (a folder named *.npz is a folder)."""
    return data.endswith(".npz") and not os.path.isdir(data)


def build_dataset(data, image_size=None, vae_path=None, unconditional=False):
    """"digits", an npz of images, a latent cache (a folder with meta.json), or an image folder.
    image_size: an image folder's crop size (None: 256, the paper's); the other kinds have a
    size of their own, which a given image_size must equal (one-line error otherwise)."""
    if data == "digits":
        if image_size not in (None, 8):
            raise ValueError(f"the digits are 8x8 images: --image-size {image_size} does not "
                             f"apply (omit it, or pass --image-size 8)")
        if unconditional:
            raise ValueError("the digits always have their 10 classes: omit --unconditional")
        return Digits()
    if os.path.isfile(os.path.join(data, "meta.json")):
        return LatentCache(data, vae_path, image_size, unconditional)
    if os.path.isfile(data) and not data.endswith(".npz"):
        raise ValueError(f"{data} is a file of an unsupported kind: --data takes {DATA_KINDS}")
    if is_npz(data):
        ds = ArrayImages(data, flip=True, unconditional=unconditional)
        if image_size is not None and image_size != ds.image_size:
            raise ValueError(f"{data} holds {ds.image_size}px images, not {image_size}px: omit "
                             f"--image-size (an npz is read at its own size), or pass "
                             f"--image-size {ds.image_size}")
        return ds
    if image_size is None:
        image_size = FOLDER_SIZE
    check_image_size(image_size, vae=vae_path is not None)
    return ImageFolder(data, image_size, unconditional=unconditional)


def open_data(data, image_size=None, vae_path=None, device="cpu", unconditional=False):
    """(dataset, VAE or None, encode per batch?, C, H): the dataset and what the networks see,
    pixels or SD-VAE latents (cached, or encoded per batch from images). image_size None: the
    data's own (256 for an image folder). Bad input: one line naming the flag."""
    try:
        ds = build_dataset(data, image_size, vae_path, unconditional)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: --data {data}: {e}")
    try:
        vae = None
        if vae_path:
            vae = load_vae(vae_path, device)
    except (RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: --vae {vae_path}: {e}")
    C, H, _ = ds.shape
    encode = ds.space == "pixel" and vae is not None
    if encode and C != 3:
        raise SystemExit(f"error: --vae {vae_path}: the VAE encodes RGB images, and --data {data} "
                         f"holds {C}-channel ones (train them without --vae)")
    if encode:  # the latent shape, read off one encoding (any VAE depth)
        C, H = vae.encode(torch.zeros(1, C, H, H, device=device))[0].shape[1:3]
    return ds, vae, encode, C, H


# --------------------------------------------------------------------------------------
# Latent cache: checked, read, written. Shard k holds files [k * shard_size,
# (k + 1) * shard_size) of the sorted list (minus unreadable ones), so a rerun knows what is
# done; rank r writes k = r mod world.
# --------------------------------------------------------------------------------------


CACHE_FIELDS = {"vae.file", "vae.size", "vae.sha256_head_tail", "image_size", "complete"}


def check_cache(cache_dir, vae_path=None, image_size=None):
    """The cache's meta.json; a one-line error if it was made with another VAE or resolution.
    The VAE is compared by content (size and hash), so a renamed copy is accepted."""
    path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{cache_dir} is not a latent cache (no meta.json)")
    meta = None
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError:  # empty, cut or not JSON: every field is missing below
        pass
    # the fields read here and by LatentCache: a damaged or hand-edited file is one line
    fields = set()
    if isinstance(meta, dict):
        fields = set(meta)
        if isinstance(meta.get("vae"), dict):
            fields |= {"vae." + k for k in meta["vae"]}
    missing = sorted(CACHE_FIELDS - fields)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not the meta.json that dataset.py "
                         f"cache writes (damaged or edited?); rebuild the cache into a new --out")
    old = meta["vae"]
    if vae_path is not None:
        new = file_identity(vae_path)
        if (old["size"], old["sha256_head_tail"]) != (new["size"], new["sha256_head_tail"]):
            raise ValueError(f"latent cache {cache_dir} was made with VAE {old['file']} "
                             f"({old['size']} bytes), not {vae_path}: rebuild it, or pass the "
                             f"VAE it was made with")
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(f"latent cache {cache_dir} holds {meta['image_size']}px images, not "
                         f"{image_size}px: pass --image-size {meta['image_size']} (or omit it: "
                         f"the cache's size is used), or build a {image_size}px cache")
    return meta


def open_shard(root, k):
    """Shard k, memory-mapped (cheap: the tensors are read when used); a one-line error if it is
    missing or unreadable (a copy cut short, a full disk)."""
    name = SHARD.format(k)
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise ValueError(f"latent cache {root} lacks {name}: rebuild it (dataset.py cache)")
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as e:  # torch reports a truncated zip as a RuntimeError, garbage otherwise
        raise ValueError(f"latent cache {root}: {name} is unreadable ({first_line(e, 120)}): "
                         f"rerun the `dataset.py cache` command that made the cache (it "
                         f"rewrites unreadable shards)") from None


class LatentCache(Dataset):
    space = "latent"
    in_memory = False

    def __init__(self, root, vae_path=None, image_size=None, unconditional=False):
        # the VAE and size, if given, are checked too; image_size None: the cache's own
        m = check_cache(root, vae_path, image_size)
        self.meta = m
        if not m["complete"]:
            raise ValueError(f"latent cache {root} is incomplete: rerun the command that made it")
        self.root = root
        self.image_size = m["image_size"]
        self.shape = tuple(m["latent_shape"])
        self.unconditional = unconditional  # the labels are dropped, as ArrayImages drops arr_1
        self.num_classes = m["num_classes"]
        self.class_names = m["class_names"]
        if unconditional:
            self.num_classes = 1
            self.class_names = [""]
        self.skipped = len(m["skipped"])
        self.skipped_files = m["skipped"]
        self.offsets = np.cumsum([0] + m["shard_counts"])  # shard k: examples offsets[k]..[k+1]-1
        # Every shard is opened now (memory-mapped), so a missing or truncated one stops the run
        # here in one line rather than mid-training. DataLoader workers map them for themselves.
        self.shards = {}
        for k in range(len(m["shard_counts"])):
            self.shards[k] = open_shard(root, k)

    def __getstate__(self):
        return {**self.__dict__, "shards": {}}

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        if k not in self.shards:
            self.shards[k] = open_shard(self.root, k)
        s = self.shards[k]
        j = i - int(self.offsets[k])
        # The release flips, encodes and samples the posterior each time it reads an image: same
        # law here. Draw the orientation, then the noise (in this order: the tests replay it).
        f = int(torch.randint(2, ()))
        mean = s["mean"][j, f].float()  # (C, h, w)
        std = s["std"][j, f].float()
        x = (mean + std * torch.randn(self.shape)) * SCALE
        if self.unconditional:
            return x, 0
        return x, int(s["label"][j])


def encode_moments(vae, x):
    """Posterior mean and std of uint8 (N, 3, S, S) crops and their mirrors: (N, 2, C, h, w)."""
    x = x.float() / 127.5 - 1
    # (2N, C, h, w) each: images, then mirrors
    mean, std = posterior(vae, torch.cat([x, x.flip(-1)]))
    return [t.unflatten(0, (2, -1)).transpose(0, 1) for t in (mean, std)]  # (N, 2, C, h, w)


class _Crops(Dataset):  # unflipped uint8 crops for the writer; unreadable -> ok = False
    def __init__(self, folder):
        self.folder = folder

    def __getitem__(self, i):
        arr = self.folder.load(i)
        if arr is None:
            return torch.zeros(self.folder.shape, dtype=torch.uint8), i, False
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i, True  # (3, S, S)


# What a shard's contents depend on, besides the VAE, and the flags that set it: a rerun that
# differs in any of them would mix two kinds of shards (two labellings, say) in one cache.
SHARD_SETTINGS = {
    "num_files": "--data, --max-images",
    "files_sha256": "--data (its file list)",
    "shard_size": "--shard-size",
    "unconditional": "--unconditional",
    "num_classes": "--data, --unconditional",
    "class_names": "--data, --unconditional",
    "labels_sha256": "--data, --unconditional",
    "latent_shape": "--vae",
}


def short(value):
    """A setting's value for an error line: its JSON, cut at 40 characters."""
    text = json.dumps(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return text


def check_resume(out, meta, vae_path):
    """A one-line refusal to go on with the cache in `out` if its shards were made with other
    settings than `meta`'s."""
    old = check_cache(out, vae_path)  # the VAE, compared by content
    if old["image_size"] != meta["image_size"]:
        raise ValueError(f"{out} holds a cache of {old['image_size']}px images, not "
                         f"{meta['image_size']}px: rerun with --image-size {old['image_size']} "
                         f"to resume it, or use a new --out")
    for key, flags in SHARD_SETTINGS.items():
        if key not in old:
            raise ValueError(f"{out} was made by an older dataset.py, which did not record "
                             f"{key}: use a new --out")
        if old[key] != meta[key]:
            raise ValueError(f"{out} was cached with another {key} ({short(old[key])}, now "
                             f"{short(meta[key])}; set by {flags}): rerun with the first run's "
                             f"flags to resume it, or use a new --out")


def shard_ok(path):
    """Whether a finished shard is on disk and readable (a rerun rewrites the others)."""
    if not os.path.exists(path):
        return False
    try:
        torch.load(path, mmap=True, weights_only=True)
    except Exception:  # truncated or garbage: see open_shard
        return False
    return True


def build_cache(data, vae_path, out, image_size=None, batch_size=64, shard_size=1024,
                num_workers=8, max_images=None, device=None, unconditional=False):
    """Encode every image of `data` and its mirror into `out`; returns the shards this rank
    wrote. image_size None: 256 for an image folder, an npz's own size. device: default cuda
    (this rank's) if available, else cpu."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: name a folder for the cache (a new one, or the "
                         f"cache to resume)")
    rank, world, default_device = setup()
    if device is None:
        device = default_device
    device = torch.device(device)
    if is_npz(data):
        folder = ArrayImages(data, image_size, flip=False, unconditional=unconditional,
                             max_memory=0)
    else:
        if image_size is None:
            image_size = FOLDER_SIZE
        folder = ImageFolder(data, image_size, flip=False, unconditional=unconditional)
    image_size = folder.image_size
    n = len(folder)
    if max_images is not None:
        n = min(len(folder), max_images)
    names = folder.names[:n]
    labels = ",".join(str(y) for y in folder.labels[:n])
    vae = load_vae(vae_path, device=device)
    probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    meta = dict(vae=file_identity(vae_path), image_size=image_size, num_files=n,
                latent_shape=list(encode_moments(vae, probe)[0].shape[2:]),  # [C, h, w]
                num_classes=folder.num_classes, class_names=folder.class_names,
                files_sha256=hashlib.sha256("\n".join(names).encode()).hexdigest(),
                shard_size=shard_size, complete=False, unconditional=unconditional,
                labels_sha256=hashlib.sha256(labels.encode()).hexdigest())
    if os.path.isfile(os.path.join(out, "meta.json")):  # resuming: are finished shards valid?
        check_resume(out, meta, vae_path)
    if rank == 0:  # complete=False until every shard is written
        os.makedirs(out, exist_ok=True)
        save_atomic(meta, os.path.join(out, "meta.json"), save_json)
    if dist.is_initialized():
        dist.barrier()

    paths = [os.path.join(out, SHARD.format(k)) for k in range(math.ceil(n / shard_size))]
    ends = [min(n, (k + 1) * shard_size) for k in range(len(paths))]  # shard k ends before ends[k]
    todo = [k for k in range(rank, len(paths), world) if not shard_ok(paths[k])]
    jobs = []  # batches of file indices, shard by shard
    for k in todo:
        for start in range(k * shard_size, ends[k], batch_size):
            jobs.append(list(range(start, min(start + batch_size, ends[k]))))
    loader = DataLoader(_Crops(folder), batch_sampler=jobs, pin_memory=device.type == "cuda",
                        num_workers=worker_count(num_workers))
    desc = "caching"
    if world > 1:
        desc = f"caching (rank 0 of {world})"
    all_labels = torch.tensor(folder.labels)
    written = []
    done = []  # this shard's batches so far: (indices, unreadable indices, mean, std)
    empty = torch.empty(0, 2, *meta["latent_shape"])  # a batch of unreadable files only
    with tqdm(total=sum(map(len, jobs)), unit="img", desc=desc, disable=rank != 0) as bar:
        for x, idx, ok in loader:
            if ok.any():
                mean, std = encode_moments(vae, x[ok].to(device))
            else:
                mean, std = empty, empty
            done.append((idx[ok], idx[~ok], mean.half().cpu(), std.half().cpu()))
            bar.update(len(idx))
            k = int(idx[0]) // shard_size
            if int(idx[-1]) + 1 != ends[k]:
                continue
            # the last batch of shard k: write the shard
            index = torch.cat([b[0] for b in done])
            bad = torch.cat([b[1] for b in done])
            shard = dict(mean=torch.cat([b[2] for b in done]),  # (n, 2, C, h, w)
                         std=torch.cat([b[3] for b in done]),
                         label=all_labels[index], index=index,
                         skipped=[names[i] for i in bad.tolist()])
            save_atomic(shard, paths[k])
            written.append(paths[k])
            done = []

    if dist.is_initialized():
        dist.barrier()
    if rank == 0:  # every shard is on disk: record the totals, and the cache is usable
        shards = [torch.load(path, mmap=True, weights_only=True) for path in paths]
        skipped = []
        for s in shards:
            skipped += s["skipped"]
        meta.update(shard_counts=[len(s["label"]) for s in shards], complete=True,
                    skipped=skipped)
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
          f"[{x.min():.2f}, {x.max():.2f}] mean {x.mean():.3f}, "
          f"{counts.min()}..{counts.max()} per class")
    assert len(ds) == 1797 and ds.num_classes == 10 and x.min() == -1 and x.max() == 1
    print(f"ADM crop 517x300 -> {center_crop_arr(Image.new('RGB', (517, 300)), 256).shape}")


def image_size(text):
    """argparse type of the cache's --image-size: check_image_size's bounds with a VAE."""
    if not text.isdigit() or not 8 <= int(text) <= MAX_IMAGE_SIZE or int(text) % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 from 8 to {MAX_IMAGE_SIZE}, "
                                         f"got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = ArgumentParser(prog="dataset.py", description="AFM data: self-check (no command) or cache")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("cache", help="encode an image folder and its mirror into a latent cache")
    c.add_argument("--data", required=True,
                   help="an image folder (class sub-folders, or flat) or an npz of images")
    c.add_argument("--unconditional", action="store_true",
                   help="ignore class folders / labels: one class")
    c.add_argument("--vae", required=True, help="VAE weights (the release: sd-vae-ft-mse)")
    c.add_argument("--out", required=True, help="cache folder; rerun the same command to resume")
    # paper: ImageNet 256x256 (an image folder's default); an npz: its own size
    c.add_argument("--image-size", type=image_size, default=None)
    c.add_argument("--batch-size", type=positive, default=64)  # images per VAE call, per rank
    c.add_argument("--shard-size", type=positive, default=1024)  # images per shard: 32 MiB at 256px
    c.add_argument("--num-workers", type=int, default=8)  # decode + crop processes per rank
    c.add_argument("--max-images", type=positive, default=None)  # first N files (smoke tests)
    return p.parse_args(argv)


def finished_shards(out):
    """How many shard files `out` holds (for the line after Ctrl-C)."""
    if not os.path.isdir(out):
        return 0
    return sum(1 for f in os.listdir(out) if f.startswith("shard_") and f.endswith(".pt"))


def main(args):
    if args.command != "cache":
        self_check()
        return
    try:
        build_cache(args.data, args.vae, args.out, args.image_size, args.batch_size,
                    args.shard_size, args.num_workers, args.max_images,
                    unconditional=args.unconditional)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # a bad folder, VAE file, or another cache's --out: one line
        raise SystemExit(f"dataset.py cache: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: what is done stays done
        print(f"dataset.py cache: interrupted; the {finished_shards(args.out)} finished shards in "
              f"{args.out} are kept: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    cleanup()


if __name__ == "__main__":
    with one_line_errors("dataset.py"):
        main(parse_args())

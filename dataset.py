"""
Data for Adversarial Flow Models (arXiv 2511.22475; the paper trains on ImageNet 256x256).
`build_dataset(data, image_size, vae_path)` turns "digits" (the built-in 8x8 digits, for CPU
runs), an image folder (ImageNet's DIR/<class>/<image>, or flat; ADM's center crop, random flip),
an npz of images (ADM's format) or a latent cache into (x, y) examples. It also holds the
resumable index stream that feeds training.

    python dataset.py                                          # self-check: digits stats
    python dataset.py cache --data /data/imagenet/train --vae sd-vae-ft-mse.pt --out cache/in256
    torchrun --nproc_per_node=8 dataset.py cache --data ... --vae ... --out ...  # over ranks

Latent cache: shard_00000.pt, ... (plain tensors): posterior mean, std fp16 (n, 2, C, h, w) of
each image ([:, 0]) and its mirror ([:, 1]), label and index (into the sorted file list) int64
(n,); then meta.json (the VAE's identity, image size, latent shape, classes, shard sizes),
written last: a folder without it is not a cache. A stopped build is started again into a new
--out (the cache command never writes into an existing path).
"""

import argparse
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

from plumbing import check_out, cleanup, print0, save_atomic, setup
from vae import SCALE, load_vae, posterior

DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # ADM's list + bmp, any case
# PIL's errors on bad files
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
SHARD = "shard_{:05d}.pt"
FOLDER_SIZE = 256  # an image folder's crop size unless given: the paper's ImageNet 256x256
DATA_KINDS = '"digits", an image folder, an npz of images or a latent cache'

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
    yield from DataLoader(dataset, batch_size=batch_size, sampler=stream, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), drop_last=True,
                          persistent_workers=workers > 0)


# --------------------------------------------------------------------------------------
# Datasets: the digits, an image folder (ADM's preprocessing), an npz of images, a latent cache.
# Each has num_classes, image_size, shape (C, H, W) of x, space ("pixel" | "latent"),
# class_names and in_memory (held as `tensors`, indexed a batch at a time).
# --------------------------------------------------------------------------------------


def load_digits():
    """The built-in digits (UCI, 1797 8x8 images, ink 0..16) -> (images float (N, 1, 8, 8) in
    [-1, 1], labels int64 (N,))."""
    with np.load(DIGITS) as d:
        images = torch.from_numpy(d["images"]).float()[:, None] / 8 - 1  # (N, 1, 8, 8)
        return images, torch.from_numpy(d["labels"]).long()


class Digits(TensorDataset):  # `tensors`: batches() indexes whole batches at once
    """No flip: mirrored handwriting is another glyph."""

    space = "pixel"
    num_classes = 10
    image_size = 8
    shape = (1, 8, 8)
    flip = False
    in_memory = True
    class_names = [str(d) for d in range(10)]

    def __init__(self):
        super().__init__(*load_digits())


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


def walk_images(folder):
    """Every image file below `folder`, sorted (sub-folders in name order, after the files)."""
    found = []
    for path, subdirs, names in os.walk(folder):
        subdirs.sort()
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTS):
                found.append(os.path.join(path, name))
    return found


def list_images(root, unconditional=False):
    """(files, labels, class_names), sorted. ImageNet's layout (ROOT/<class>/.../<image>,
    labels = sorted folder names), unless ROOT holds images itself (CelebA, LSUN as one folder)
    or `unconditional`: then every image below ROOT, one class."""
    if not os.path.isdir(root):
        why = f"not {DATA_KINDS}" if os.path.exists(root) else "no such file or folder"
        raise SystemExit(f"error: --data {root}: {why}")
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
    flat = unconditional or not classes or bool(top)
    if top and classes and not unconditional:
        # A class tree with stray images would silently train without classes: said once.
        print0(f"warning: {root} holds images ({top[0]}, ...) beside sub-folders: read as ONE "
               f"class, every image below it (--unconditional silences this)")
    groups = [root] if flat else [os.path.join(root, c) for c in classes]
    files = []
    labels = []
    for label, folder in enumerate(groups):
        found = walk_images(folder)
        files += found
        labels += [label] * len(found)
    if not files:
        raise SystemExit(f"error: --data {root}: no images ({' '.join(IMAGE_EXTS)}) below it")
    return files, labels, [""] if flat else classes


class ImageFolder(Dataset):
    space = "pixel"
    in_memory = False

    def __init__(self, root, image_size=FOLDER_SIZE, flip=True, unconditional=False):
        self.root = root
        self.image_size = image_size
        self.flip = flip
        self.files, self.labels, self.class_names = list_images(root, unconditional)
        self.num_classes = len(self.class_names)
        self.shape = (3, image_size, image_size)

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """ADM crop of file i, RGB uint8 (S, S, 3); None, with a warning naming the file, if it
        is unreadable."""
        try:
            with Image.open(self.files[i]) as img:
                return center_crop_arr(rgb(img), self.image_size)
        except UNREADABLE as e:
            warnings.warn(f"skipping unreadable image {self.files[i]}: {e}")
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


def memmap_member(path, info):
    """The array of an uncompressed npz member, memory-mapped in place (np.savez stores arrays
    uncompressed: the .npy member's data is a contiguous run of the file)."""
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
    order = "F" if fortran else "C"
    return np.memmap(path, dtype, "r", offset=offset, shape=shape, order=order)


def read_npz(path, flag="--data", max_bytes=math.inf):
    """{name: array} of an npz file (pickles refused); an array of more than max_bytes is
    memory-mapped, not read. A file that cannot be read (missing, empty, cut short, not an npz)
    is one line naming flag and path."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z, np.load(path, allow_pickle=False) as f:
            for key in f.files:
                info = z.getinfo(key + ".npy")
                if info.file_size > max_bytes and info.compress_type == zipfile.ZIP_STORED:
                    arrays[key] = memmap_member(path, info)
                else:
                    arrays[key] = f[key]
    except Exception as e:  # zipfile's, numpy's and the OS's errors: all mean "not readable"
        why = str(e).split("\n")[0][:150]
        raise SystemExit(f"error: {flag} {path}: not a readable npz ({why})") from None
    return arrays


class ArrayImages(Dataset):
    """Images in an npz, the ADM / sample.py format (CIFAR-10 users keep theirs so): arr_0 uint8
    (N, H, W, C) with C 1 or 3 and H == W, optional arr_1 int labels (N,) (without them: one
    class). Random horizontal flip p=0.5. Up to max_memory bytes of floats it is held in memory
    (`tensors`), larger files are memory-mapped. Training reads the images as they are;
    image_size is that of load()'s crops, for the cache writer. flag: the one naming it."""

    space = "pixel"

    def __init__(self, path, image_size=None, flip=True, unconditional=False, max_memory=2 << 30,
                 flag="--data"):
        arrays = read_npz(path, flag, max_memory // 4)
        x = arrays.get("arr_0")
        square = x is not None and x.ndim == 4 and x.shape[1] == x.shape[2]
        if not square or x.dtype != np.uint8 or x.shape[3] not in (1, 3) or not len(x):
            got = "no arr_0" if x is None else f"{x.dtype} {x.shape}"
            raise SystemExit(f"error: {flag} {path}: arr_0 should hold uint8 square images "
                             f"(N, H, W, C), C 1 or 3; got {got}")
        y = np.zeros(len(x), np.int64)
        if "arr_1" in arrays and not unconditional:
            y = arrays["arr_1"]
            if y.dtype.kind not in "iu" or y.shape != (len(x),) or y.min() < 0:
                raise SystemExit(f"error: {flag} {path}: arr_1 should hold {len(x)} integer "
                                 f"labels >= 0; got {y.dtype} {y.shape}")
        self.x = x
        self.y = y.astype(np.int64)
        self.labels = self.y.tolist()
        self.num_classes = int(self.y.max()) + 1
        self.flip = flip
        self.class_names = [str(c) for c in range(self.num_classes)]
        self.image_size = x.shape[1] if image_size is None else image_size
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
    size of their own, which a given image_size must equal. vae_path: the VAE a latent cache
    must have been made with."""
    if data == "digits":
        if unconditional:
            raise SystemExit("error: --unconditional: the digits always have their 10 classes")
        ds = Digits()
    elif os.path.isfile(os.path.join(data, "meta.json")):
        ds = LatentCache(data, vae_path, unconditional)
    elif is_npz(data):
        ds = ArrayImages(data, flip=True, unconditional=unconditional)
    else:
        size = FOLDER_SIZE if image_size is None else image_size
        ds = ImageFolder(data, size, unconditional=unconditional)
    if image_size is not None and image_size != ds.image_size:
        # a silently ignored --image-size would train at another size than asked
        raise SystemExit(f"error: --image-size {image_size}: --data {data} holds "
                         f"{ds.image_size}px images (omit --image-size)")
    return ds


def open_vae(path, device="cpu"):
    """load_vae, its errors in one line naming --vae."""
    try:
        return load_vae(path, device)
    except (RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: --vae {path}: {e}") from None


def open_data(data, image_size=None, vae_path=None, device="cpu", unconditional=False):
    """(dataset, VAE or None, (C, H, W) of what the networks see): pixels, or SD-VAE latents
    (cached, or encoded from each batch of images when a VAE is given for pixel data).
    image_size None: the data's own (256 for an image folder)."""
    vae = open_vae(vae_path, device) if vae_path else None
    ds = build_dataset(data, image_size, vae_path, unconditional)
    shape = ds.shape
    if ds.space == "pixel" and vae is not None:  # the latent shape, read off one encoding
        shape = tuple(vae.encode(torch.zeros(1, *shape, device=device))[0].shape[1:])
    return ds, vae, shape


# --------------------------------------------------------------------------------------
# Latent cache: read, written. Shard k holds files [k * shard_size, (k + 1) * shard_size) of
# the sorted list (minus unreadable ones); rank r writes k = r mod world.
# --------------------------------------------------------------------------------------


def file_identity(path):
    """{"file": its name, "size": bytes, "sha256_head_tail": sha256 of the first and last 4 MiB}:
    cheap for a multi-GB file, and it tells apart files that differ only at the end (VAEs that
    differ only in the decoder, stored last, as sd-vae-ft-ema and sd-vae-ft-mse do). A renamed
    copy has the same size and hash."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        f.seek(max(4 << 20, size - (4 << 20)))
        h.update(f.read())
    return {"file": os.path.basename(path), "size": size, "sha256_head_tail": h.hexdigest()}


def open_shard(path):
    """A shard, memory-mapped (cheap: the tensors are read when used); one line naming it if it
    is missing or unreadable (a copy cut short, a full disk)."""
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as e:  # torch reports a truncated zip as a RuntimeError, garbage otherwise
        why = str(e).split("\n")[0][:80]
        raise SystemExit(f"error: --data {path}: not a readable cache shard ({why}); rebuild "
                         f"the cache (dataset.py cache)") from None


class LatentCache(Dataset):
    space = "latent"
    in_memory = False

    def __init__(self, root, vae_path=None, unconditional=False):
        with open(os.path.join(root, "meta.json")) as f:
            m = json.load(f)
        if vae_path is not None:
            # Decoding or evaluating with another VAE than the cache's would be silently wrong.
            old = m["vae"]
            new = file_identity(vae_path)
            if (old["size"], old["sha256_head_tail"]) != (new["size"], new["sha256_head_tail"]):
                raise SystemExit(f"error: --vae {vae_path}: the latent cache {root} was made "
                                 f"with another VAE ({old['file']}, {old['size']} bytes)")
        self.meta = m
        self.root = root
        self.image_size = m["image_size"]
        self.shape = tuple(m["latent_shape"])
        self.unconditional = unconditional  # the labels are dropped, as ArrayImages drops arr_1
        self.num_classes = 1 if unconditional else m["num_classes"]
        self.class_names = [""] if unconditional else m["class_names"]
        self.offsets = np.cumsum([0] + m["shard_counts"])  # shard k: examples offsets[k]..[k+1]-1
        # Every shard is opened now (memory-mapped), so a missing or truncated one stops the run
        # here in one line rather than mid-training. DataLoader workers map them for themselves.
        self.shards = {}
        for k in range(len(m["shard_counts"])):
            self.shards[k] = open_shard(self.path(k))

    def path(self, k):
        return os.path.join(self.root, SHARD.format(k))

    def __getstate__(self):
        return {**self.__dict__, "shards": {}}

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        if k not in self.shards:
            self.shards[k] = open_shard(self.path(k))
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
    mean, std = posterior(vae, torch.cat([x, x.flip(-1)]))  # (2N, C, h, w): images, then mirrors
    mean = mean.unflatten(0, (2, -1)).transpose(0, 1)  # (N, 2, C, h, w)
    std = std.unflatten(0, (2, -1)).transpose(0, 1)
    return mean, std


class _Crops(Dataset):  # unflipped uint8 crops for the writer; unreadable -> ok = False
    def __init__(self, images):
        self.images = images

    def __getitem__(self, i):
        arr = self.images.load(i)
        if arr is None:
            S = self.images.image_size
            return torch.zeros(3, S, S, dtype=torch.uint8), i, False
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), i, True  # (3, S, S)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def build_cache(data, vae_path, out, image_size=None, batch_size=64, shard_size=1024,
                num_workers=8, max_images=None, device=None, unconditional=False):
    """Encode every image of `data` and its mirror into the new folder `out`; returns the shards
    this rank wrote. image_size None: 256 for an image folder, an npz's own size. device: default
    cuda (this rank's) if available, else cpu."""
    rank, world, default_device = setup()
    check_out(out)  # nothing is overwritten: a stopped build starts again into a new --out
    device = torch.device(default_device if device is None else device)
    if is_npz(data):
        images = ArrayImages(data, image_size, flip=False, unconditional=unconditional,
                             max_memory=0)
    else:
        size = FOLDER_SIZE if image_size is None else image_size
        images = ImageFolder(data, size, flip=False, unconditional=unconditional)
    S = images.image_size
    n = len(images) if max_images is None else min(len(images), max_images)
    vae = open_vae(vae_path, device)
    probe = torch.zeros(1, 3, S, S, dtype=torch.uint8, device=device)
    latent_shape = list(encode_moments(vae, probe)[0].shape[2:])  # [C, h, w]
    if dist.is_initialized():
        dist.barrier()  # every rank has checked --out before any makes it
    os.makedirs(out, exist_ok=True)

    paths = [os.path.join(out, SHARD.format(k)) for k in range(math.ceil(n / shard_size))]
    ends = [min(n, (k + 1) * shard_size) for k in range(len(paths))]  # shard k ends before ends[k]
    jobs = []  # batches of file indices, shard by shard
    for k in range(rank, len(paths), world):
        for start in range(k * shard_size, ends[k], batch_size):
            jobs.append(list(range(start, min(start + batch_size, ends[k]))))
    loader = DataLoader(_Crops(images), batch_sampler=jobs, pin_memory=device.type == "cuda",
                        num_workers=num_workers)
    all_labels = torch.tensor(images.labels)
    written = []
    done = []  # this shard's batches so far: (indices, mean, std)
    empty = torch.empty(0, 2, *latent_shape)  # a batch of unreadable files only
    with tqdm(total=sum(map(len, jobs)), unit="img", desc="caching", disable=rank != 0) as bar:
        for x, idx, ok in loader:
            mean = empty
            std = empty
            if ok.any():
                mean, std = encode_moments(vae, x[ok].to(device))
            done.append((idx[ok], mean.half().cpu(), std.half().cpu()))
            bar.update(len(idx))
            k = int(idx[0]) // shard_size
            if int(idx[-1]) + 1 != ends[k]:
                continue
            # the last batch of shard k: write the shard
            index = torch.cat([b[0] for b in done])
            shard = dict(mean=torch.cat([b[1] for b in done]),  # (n, 2, C, h, w)
                         std=torch.cat([b[2] for b in done]),
                         label=all_labels[index], index=index)
            save_atomic(shard, paths[k])
            written.append(paths[k])
            done = []

    if dist.is_initialized():
        dist.barrier()
    if rank == 0:  # every shard is on disk: meta.json makes the folder a cache
        counts = [len(open_shard(path)["label"]) for path in paths]
        meta = dict(vae=file_identity(vae_path), image_size=S, latent_shape=latent_shape,
                    num_classes=images.num_classes, class_names=images.class_names,
                    num_files=n, shard_counts=counts)
        save_atomic(meta, os.path.join(out, "meta.json"), write_json)
        print(f"cached {sum(counts)} images and mirrors in {len(paths)} shards at {out}; "
              f"skipped {n - sum(counts)} unreadable files")
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


def positive(text):
    """argparse type: an integer >= 1 (a size of 0 would read every image to make nothing)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dataset.py", usage=argparse.SUPPRESS,
                                description="AFM data: self-check (no command) or cache")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("cache", prog="dataset.py cache", usage=argparse.SUPPRESS,
                       help="encode an image folder and its mirror into a latent cache")
    c.add_argument("--data", required=True,
                   help="an image folder (class sub-folders, or flat) or an npz of images")
    c.add_argument("--unconditional", action="store_true",
                   help="ignore class folders / labels: one class")
    c.add_argument("--vae", required=True, help="VAE weights (the release: sd-vae-ft-mse)")
    c.add_argument("--out", required=True, help="the cache folder (a new one)")
    # paper: ImageNet 256x256 (an image folder's default); an npz: its own size
    c.add_argument("--image-size", type=positive, default=None)
    c.add_argument("--batch-size", type=positive, default=64)  # images per VAE call, per rank
    c.add_argument("--shard-size", type=positive, default=1024)  # images per shard: 32 MiB at 256px
    c.add_argument("--num-workers", type=int, default=8)  # decode + crop processes per rank
    c.add_argument("--max-images", type=positive, default=None)  # first N files (smoke tests)
    return p.parse_args(argv)


def main(args):
    if args.command != "cache":
        self_check()
        return
    build_cache(args.data, args.vae, args.out, args.image_size, args.batch_size,
                args.shard_size, args.num_workers, args.max_images,
                unconditional=args.unconditional)
    cleanup()


if __name__ == "__main__":
    main(parse_args())

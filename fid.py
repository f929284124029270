"""Images -> numbers: FID, sFID, Inception Score, precision and recall as the ADM evaluation suite
computes them (Dhariwal & Nichol 2021, guided-diffusion `evaluations/evaluator.py`), in PyTorch.
The AFM paper reports FID-50K on ImageNet 256 with ADM's suite (arXiv 2511.22475; the release's
README: its 50k-sample npz files "follow the evaluation script provided by ADM").

The network is the 2015-12-05 TF Inception graph (torch-fidelity's and pytorch-fid's converted
weights), fed as ADM feeds it: TF1's bilinear resize to 299 without half-pixel centers and
`(x - 128) / 128`, which reproduces ADM's FID to ~0.002 (pytorch-fid's or clean-fid's resize give
other numbers).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz    # FID, sFID, IS, precision, recall
    python fid.py samples.npz ref.npz --inception weights.pth --batch-size 250 --device cuda
    python fid.py --make-ref FOLDER_OR_NPZ --out ref.npz           # a reference batch, ADM's format
    python fid.py samples.npz --pixel-ref digits                   # small pixel data, no Inception

Weights: --inception PATH, else torch-fidelity's or pytorch-fid's file (WEIGHT_NAMES) in
$AFM_CACHE (~/.cache/afm/), else downloaded there from URL. Samples: npz `arr_0` uint8
(N, H, W, 3), shuffled (IS is taken over 5,000-sample chunks in file order: class-sorted files
score far lower), or a folder of same-size images (dataset.walk_images's order; nothing is
resized or cropped here).

Bad input is one line, `error: ...`, and the files are read and checked before the Inception
loads. An unreadable image is refused, not skipped (an FID over a silently smaller set compares
with nothing); --out is never overwritten.

The evaluation protocol that sample.py's files and train.py's evaluations share is here too:
to_uint8 (the release's truncation), noise_of (per-sample noise), file_order (the release's
shuffle of an npz) and Evaluation (class-balanced samples of a network, scored).
"""

import argparse
import contextlib
import math
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from dataset import UNREADABLE, ArrayImages, load_digits, read_npz, rgb, walk_images
from plumbing import check_out, load_checkpoint, load_weights, save_npz

URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
       "weights-inception-2015-12-05-6726825d.pth")
WEIGHT_NAMES = ("weights-inception-2015-12-05-6726825d.pth",
                "pt_inception-2015-12-05-6726825d.pth")
# Feature sizes of FID and sFID (ADM's pool_3 and mixed_6/conv[..., :7])
POOL3 = 2048
SPATIAL = 17 * 17 * 7
STATS = ("mu", "sigma", "mu_s", "sigma_s")  # a reference batch's statistics (ADM's names)

# --------------------------------------------------------------------------------------
# The 2015-12-05 Inception graph (block layout of torchvision, patched like pytorch-fid to
# match TensorFlow)
# --------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Inference-only BatchNorm with TF's eps 1e-3. Holds only the four tensors of torch-fidelity's
    weight file; a `num_batches_tracked` (pytorch-fid's file, or a plain nn.BatchNorm2d state
    dict) is dropped on load."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # a copy: the caller's dict is untouched
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, 1e-3)


class BasicConv2d(nn.Module):
    """Convolution (no bias) -> BatchNorm -> ReLU. TF's graph pads its stride-1 convolutions to
    keep the size ("same") and not its stride-2 ones; same=False: the stem's two unpadded
    stride-1 convolutions."""

    def __init__(self, cin, cout, kernel=1, stride=1, same=True):
        super().__init__()
        padding = "same" if same and stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Convs(nn.Module):
    """BasicConv2d layers given as name=(cin, cout[, kernel, stride, same]); torchvision's names
    (the files' keys)."""

    def __init__(self, **convs):
        super().__init__()
        for name, args in convs.items():
            self.add_module(name, BasicConv2d(*args))


def avg_pool(x):  # TF's average pool leaves the zero padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(Convs):  # Mixed_5b..5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__(branch1x1=(cin, 64),
                         branch5x5_1=(cin, 48), branch5x5_2=(48, 64, 5),
                         branch3x3dbl_1=(cin, 64), branch3x3dbl_2=(64, 96, 3),
                         branch3x3dbl_3=(96, 96, 3),
                         branch_pool=(cin, pool_features))

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)


class InceptionB(Convs):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__(branch3x3=(cin, 384, 3, 2),
                         branch3x3dbl_1=(cin, 64), branch3x3dbl_2=(64, 96, 3),
                         branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(Convs):  # Mixed_6b..6e, 17x17; returns (output, branch1x1 output)
    def __init__(self, cin, c7):
        super().__init__(branch1x1=(cin, 192),
                         branch7x7_1=(cin, c7), branch7x7_2=(c7, c7, (1, 7)),
                         branch7x7_3=(c7, 192, (7, 1)),
                         branch7x7dbl_1=(cin, c7), branch7x7dbl_2=(c7, c7, (7, 1)),
                         branch7x7dbl_3=(c7, c7, (1, 7)), branch7x7dbl_4=(c7, c7, (7, 1)),
                         branch7x7dbl_5=(c7, 192, (1, 7)),
                         branch_pool=(cin, 192))

    def forward(self, x):
        # (N, 192, 17, 17); in Mixed_6d this is TF's mixed_6/conv, the sFID features
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([b1, b7, bd, self.branch_pool(avg_pool(x))], 1), b1


class InceptionD(Convs):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__(branch3x3_1=(cin, 192), branch3x3_2=(192, 320, 3, 2),
                         branch7x7x3_1=(cin, 192), branch7x7x3_2=(192, 192, (1, 7)),
                         branch7x7x3_3=(192, 192, (7, 1)), branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(Convs):  # Mixed_7b, 7c, 8x8
    def __init__(self, cin, pool):
        super().__init__(branch1x1=(cin, 320),
                         branch3x3_1=(cin, 384), branch3x3_2a=(384, 384, (1, 3)),
                         branch3x3_2b=(384, 384, (3, 1)),
                         branch3x3dbl_1=(cin, 448), branch3x3dbl_2=(448, 384, 3),
                         branch3x3dbl_3a=(384, 384, (1, 3)), branch3x3dbl_3b=(384, 384, (3, 1)),
                         branch_pool=(cin, 192))
        self.pool = pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The FID graph's quirk: Mixed_7c pools with max, not average (pytorch-fid's
        # FIDInceptionE_2)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(pooled)], 1)


def resize_tf1(x, size=299):
    """TF1 `resize_bilinear(align_corners=False, half_pixel_centers=False)` of float (N, C, H, W):
    output pixel i samples input coordinate i * in/out (no half-pixel offset), coordinates in
    float32 as in TF and torch-fidelity."""
    def taps(n_in):
        step = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * step  # (size,)
        lo = src.long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    y0, y1, dy = taps(x.shape[2])
    x0, x1, dx = taps(x.shape[3])
    row0, row1 = x[:, :, y0], x[:, :, y1]  # (N, C, size, W) each
    top = row0[..., x0] + (row0[..., x1] - row0[..., x0]) * dx  # (N, C, size, size)
    bot = row1[..., x0] + (row1[..., x1] - row1[..., x0]) * dx  # (N, C, size, size)
    return top + (bot - top) * dy[:, None]


class InceptionV3(Convs):
    """uint8 (N, 3, H, W) -> (pool3 (N, 2048), spatial (N, 2023), logits (N, 1008)), as ADM's TF
    graph."""

    def __init__(self):
        super().__init__(Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3, 1, False),
                         Conv2d_2b_3x3=(32, 64, 3), Conv2d_3b_1x1=(64, 80),
                         Conv2d_4a_3x3=(80, 192, 3, 1, False))
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        # 1008 classes of the 2015 graph; the bias is unused (ADM's logits)
        self.fc = nn.Linear(POOL3, 1008)

    def body(self, x):
        """Normalized float (N, 3, 299, 299) -> (pool3, spatial, logits)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x)[0])[0]
        x, conv = self.Mixed_6d(x)  # conv: (N, 192, 17, 17), after BN and ReLU
        x = self.Mixed_6e(x)[0]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        # TF's NHWC order
        spatial = conv.permute(0, 2, 3, 1)[..., :7].reshape(len(x), -1)  # (N, 2023)
        logits = pool3 @ self.fc.weight.T  # (N, 1008), no bias as in ADM's softmax graph
        return pool3, spatial, logits

    def forward(self, images):
        # applied even at 299, where it is the identity
        x = resize_tf1(images.float())  # (N, 3, 299, 299)
        return self.body((x - 128) / 128)


def default_device(device=None):
    """`device` when given, else cuda when available, else cpu."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_inception(path=None, device="cpu"):
    """The pretrained Inception in eval mode, fp32, no grad, from `path`; without one, from
    $AFM_CACHE (~/.cache/afm), where it is downloaded the first time."""
    if path is None:
        cache = os.path.expanduser(os.environ.get("AFM_CACHE", "~/.cache/afm"))
        path = os.path.join(cache, WEIGHT_NAMES[0])
        other = os.path.join(cache, WEIGHT_NAMES[1])  # pytorch-fid's file
        if not os.path.isfile(path) and os.path.isfile(other):
            path = other
        if not os.path.isfile(path):
            try:
                os.makedirs(cache, exist_ok=True)
                torch.hub.download_url_to_file(URL, path)
            except Exception as e:
                raise SystemExit(f"error: --inception: no weights in {cache}/ and their download "
                                 f"failed ({type(e).__name__}); put the file there or pass "
                                 f"--inception PATH") from None
    path, sd = load_checkpoint(path, "--inception")
    # pytorch-fid's file adds BatchNorm's num_batches_tracked, unused in inference
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = InceptionV3()
    load_weights(model, sd, f"--inception {path}")
    return model.to(device).eval().requires_grad_(False)


@contextlib.contextmanager
def exact_fp32():
    """TF32 off while measuring: training scripts turn it on, and on a GPU it moved Inception
    features by 3-13% of their largest value (fp32: 1e-4, as on the CPU)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# --------------------------------------------------------------------------------------
# Features and reference batches
# --------------------------------------------------------------------------------------


def compute_features(model, images, batch_size=250, device=None, progress=True):
    """uint8 images (N, H, W, 3), numpy or torch -> dict of float32 numpy arrays pool3
    (N, 2048), spatial (N, 2023), logits (N, 1008), in input order."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    device = torch.device(device or next(model.parameters()).device)
    model = model.to(device)
    feats = []  # per batch: [pool3, spatial, logits]
    batches = images.split(batch_size)
    with torch.inference_mode(), exact_fp32():
        for batch in tqdm(batches, unit="batch", desc="Inception", disable=not progress):
            x = batch.to(device).permute(0, 3, 1, 2)  # (n, H, W, 3) -> (n, 3, H, W)
            feats.append([f.float().cpu().numpy() for f in model(x)])
    names = ("pool3", "spatial", "logits")
    return {k: np.concatenate([f[i] for f in feats]) for i, k in enumerate(names)}


def read_folder(folder, flag):
    """The images below `folder` (dataset.walk_images's order) -> uint8 (N, H, W, 3). A file
    that cannot be read, or of another size, is an error naming it: skipping it would give an
    FID over a smaller set than the one asked for."""
    files = walk_images(folder)
    if not files:
        raise SystemExit(f"error: {flag} {folder}: no images in this folder")
    images = []
    for path in tqdm(files, unit="img", desc="reading"):
        try:
            with Image.open(path) as img:
                images.append(np.asarray(rgb(img)))  # (H, W, 3)
        except UNREADABLE as e:
            raise SystemExit(f"error: {flag} {path}: not a readable image ({e})") from None
        if images[-1].shape != images[0].shape:
            raise SystemExit(f"error: {flag} {path}: {images[-1].shape[:2]} pixels, not "
                             f"{images[0].shape[:2]} as {files[0]}: all need one size")
    return np.stack(images)  # (N, H, W, 3)


def read_batch(path, flag, images=True):
    """A batch in ADM's format, an npz (samples or a reference) or an image folder -> dict of
    `arr_0` uint8 (N, H, W, 3) with N >= 2 and/or, in a reference (images=False), all four
    STATS. Anything else is one line naming flag and path."""
    data = {"arr_0": read_folder(path, flag)} if os.path.isdir(path) else read_npz(path, flag)
    if "arr_0" not in data and (images or not all(k in data for k in STATS)):
        raise SystemExit(f"error: {flag} {path}: no images in arr_0 (a reference may hold mu, "
                         f"sigma, mu_s, sigma_s instead); found {sorted(data)}")
    x = data.get("arr_0")
    if x is not None and (x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) < 2):
        raise SystemExit(f"error: {flag} {path}: arr_0 should hold 2 or more uint8 images "
                         f"(N, H, W, 3), got {x.dtype} {x.shape}")
    for k in STATS:
        if k in data and not np.isfinite(data[k]).all():
            raise SystemExit(f"error: {flag} {path}: {k} holds NaN or inf")
    return data


def feature_stats(features):
    """ADM's statistics in float64: np.mean(axis=0) and the unbiased np.cov(rowvar=False)."""
    p = features["pool3"].astype(np.float64)
    s = features["spatial"].astype(np.float64)
    if len(p) < 2:  # one sample has no covariance (NaN)
        raise SystemExit(f"error: FID statistics need at least 2 images, got {len(p)}")
    if len(p) < p.shape[1]:
        warnings.warn(f"{len(p)} images give a covariance of rank < {p.shape[1]}: the FID is "
                      f"biased high; use at least {p.shape[1]} (ADM: 50,000)")
    return dict(mu=p.mean(axis=0), sigma=np.cov(p, rowvar=False),
                mu_s=s.mean(axis=0), sigma_s=np.cov(s, rowvar=False))


def reference_stats(path, model=None, batch_size=250, device=None, pool3=True, flag="ref"):
    """A reference batch (a path as read_batch reads them, named by `flag` in errors, or its
    dict) -> dict(mu, sigma, mu_s, sigma_s, pool3). Stored statistics win, as in ADM; pool3 (for
    precision/recall) comes from the images in arr_0, and is None without them (or with
    pool3=False, when stored statistics suffice)."""
    data = path if isinstance(path, dict) else read_batch(path, flag, images=False)
    ref = {}
    for k in STATS:
        if k in data:
            ref[k] = data[k].astype(np.float64)
    ref["pool3"] = None
    if "arr_0" in data and (pool3 or "mu" not in ref):
        if model is None:
            model = load_inception(device=default_device(device))
        feats = compute_features(model, data["arr_0"], batch_size, device)
        ref["pool3"] = feats["pool3"]
        if "mu" not in ref:
            ref.update(feature_stats(feats))
    return ref


# --------------------------------------------------------------------------------------
# Metrics (ADM's evaluator.py)
# --------------------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), exactly as ADM / pytorch-fid (scipy's
    sqrtm)."""
    mu1 = np.atleast_1d(mu1)
    mu2 = np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1)
    sigma2 = np.atleast_2d(sigma2)
    diff = mu1 - mu2
    # scipy warns of a singular product even when its root is finite (and used)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():  # the product is close to singular: regularize, retry
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal "
                          f"of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # rounding leaves a small imaginary part; a large one means broken statistics
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """exp(E KL(p(y|x) || p(y))) per chunk of split_size in file order, averaged; float32 like
    ADM's TF softmax."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    preds = torch.softmax(logits, 1).numpy()  # (N, 1008)
    scores = []
    for i in range(0, len(preds), split_size):  # ADM's loop, line for line
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _sqdist(u, v):
    """Squared distances with every step rounded to u's dtype, as TF computes them (products
    summed in fp32)."""
    nu = (u * u).float().sum(1).to(u.dtype)  # (n,)
    nv = (v * v).float().sum(1).to(v.dtype)  # (m,)
    uv = (u.float() @ v.float().T).to(u.dtype)  # (n, m)
    return torch.clamp(nu[:, None] - 2 * uv + nv[None], min=0)  # (n, m)


def _distances(u, v):
    """ADM's DistanceBlock: fp16 distances (what the published numbers used), fp32 if any is not
    finite."""
    d = _sqdist(u.half(), v.half())
    if not torch.isfinite(d).all():
        d = _sqdist(u, v)
    return d.float()


def precision_recall(ref_pool3, sample_pool3, k=3, batch_size=10000, device=None):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator: a point is
    covered when it lies within the k-th nearest-neighbour radius of some point of the other set.
    No percentile clamping."""
    device = default_device(device)
    ref = torch.as_tensor(np.asarray(ref_pool3, np.float32), device=device)
    sam = torch.as_tensor(np.asarray(sample_pool3, np.float32), device=device)
    if min(len(ref), len(sam)) <= k:
        raise ValueError(f"precision/recall needs more than k={k} points per set, "
                         f"got {len(ref)} and {len(sam)}")

    def radii(f):
        """Squared distance to the k-th neighbour; the row's smallest entry is the point itself."""
        out = []
        for i in range(0, len(f), batch_size):
            rows = []
            for j in range(0, len(f), batch_size):
                rows.append(_distances(f[i:i + batch_size], f[j:j + batch_size]))
            out.append(torch.cat(rows, 1).kthvalue(k + 1, 1).values)
        return torch.cat(out)  # (N,)

    with exact_fp32():
        r_ref = radii(ref)
        r_sam = radii(sam)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
        sam_in = torch.zeros(len(sam), dtype=torch.bool, device=device)
        for i in range(0, len(ref), batch_size):
            for j in range(0, len(sam), batch_size):
                d = _distances(ref[i:i + batch_size], sam[j:j + batch_size])  # (b_ref, b_sam)
                ref_in[i:i + batch_size] |= (d <= r_sam[None, j:j + batch_size]).any(1)
                sam_in[j:j + batch_size] |= (d <= r_ref[i:i + batch_size, None]).any(0)
    precision = sam_in.sum().item() / len(sam)
    recall = ref_in.sum().item() / len(ref)
    return precision, recall


def evaluate(features, ref, device=None):
    """Sample features (compute_features) against a reference (reference_stats) -> dict(fid, sfid,
    inception_score, precision, recall); precision/recall are None when the reference has no
    pool3. Each matrix square root takes seconds (d=2023) to a minute (d=2048) on a CPU."""
    s = feature_stats(features)
    fid = frechet_distance(s["mu"], s["sigma"], ref["mu"], ref["sigma"])
    sfid = frechet_distance(s["mu_s"], s["sigma_s"], ref["mu_s"], ref["sigma_s"])
    out = dict(fid=fid, sfid=sfid, inception_score=inception_score(features["logits"]),
               precision=None, recall=None)
    if ref.get("pool3") is not None:
        precision, recall = precision_recall(ref["pool3"], features["pool3"], device=device)
        out["precision"] = precision
        out["recall"] = recall
    return out


def pixel_report(images, labels, real, real_labels, seed=0, max_real=10_000):
    """Quality of class-conditional samples of a small pixel dataset, without Inception (the
    built-in digits):
      agreement  the fraction of samples whose nearest real image (L2 in pixels) has the
                 sample's class;
      diversity  the mean distance between two samples of one class over that between two real
                 images of the class, averaged over classes: 1 is as varied as the data, 0 a
                 collapse to one image per class;
      pixel_fd   the Frechet distance between samples and real images as flat pixel vectors, and
                 beside it pixel_fd_floor, the same between two random halves of the real images
                 (finite-sample noise);
      feature_fd the same in the features of a small classifier of the real images (feature_fd
                 below; with two classes or more), and its floor.
    Images are any same-scale arrays (N, ...), labels ints; images (N, C, H, W) larger than 8x8
    are averaged down to 8x8 for pixel_fd: its covariance then has at most 192 dimensions, well
    estimated from a thousand samples and a second to compute (at 32x32x3 the square root alone
    takes minutes and the estimate is noise). The cost of the nearest neighbours is bounded too:
    agreement and diversity see images averaged down to at most 32x32, and at most `max_real`
    real images (a fixed random subset; the digits' 1,797 are all used)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels))
    ry = torch.as_tensor(np.asarray(real_labels))

    def flat(a, size):  # (N, D), averaged down to size x size when larger
        if a.dim() == 4 and a.shape[-1] > size:
            a = F.adaptive_avg_pool2d(a, size)
        return a.flatten(1)
    x8 = flat(x, 8)
    r8 = flat(r, 8)
    x = flat(x, 32)
    r = flat(r, 32)
    keep = torch.arange(len(r))
    if len(r) > max_real:
        keep = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed + 1))
        keep = keep[:max_real]
    r = r[keep]
    ry = ry[keep]
    agreement = (ry[torch.cdist(x, r).argmin(1)] == y).double().mean()
    ratios = []
    for c in y.unique().tolist():
        if (y == c).sum() > 1:
            spread = torch.pdist(x[y == c]).mean().item()
            ratios.append(spread / torch.pdist(r[ry == c]).mean().item())
    half = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    first = half[: len(r) // 2]
    second = half[len(r) // 2:]
    out = dict(agreement=agreement.item(), diversity=float(np.mean(ratios)),
               pixel_fd=frechet_of(x8, r8), pixel_fd_floor=frechet_of(r8[first], r8[second]))
    if np.ndim(images) == 4 and len(ry.unique()) > 1:  # images (N, C, H, W) of 2+ classes
        out.update(feature_fd(images, labels, np.asarray(real)[keep.numpy()], ry, seed))
    return out


def frechet_of(a, b):
    """The Frechet distance between two sets of vectors, float64 tensors (N, D) and (M, D)."""
    return frechet_distance(a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False),
                            b.mean(0).numpy(), np.cov(b.numpy(), rowvar=False))


# The feature classifiers of feature_fd, by real images and seed: every evaluation of a run
# scored against one set of real images costs one training (a second or two on the digits).
CLASSIFIERS = {}


def feature_classifier(real, real_labels, seed=0, epochs=10):
    """A small CNN classifier of the real images (M, C, H, W) in [-1, 1], trained on the CPU in a
    few seconds, deterministically: `seed` alone fixes its initial weights and batch order. ->
    (features: the network up to its 64 penultimate features, the whole classifier)."""
    x = torch.as_tensor(np.asarray(real), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(real_labels), dtype=torch.int64)
    # nn layers draw their initial weights from the global RNG: a forked, seeded copy of it gives
    # the same network on every call and leaves the caller's random stream (training's) as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # three 3x3 convolutions (two of stride 2: 8x8 -> 2x2) see strokes and their layout;
        # the adaptive pool takes any image size (2x2 cells: larger images keep a coarse
        # layout); 64 features: a covariance well estimated from a thousand samples
        features = nn.Sequential(
            nn.Conv2d(x.shape[1], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 64), nn.ReLU())
        net = nn.Sequential(features, nn.Linear(64, int(y.max()) + 1))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)  # the batch order: a generator of its own
    # 10 epochs of batches of 64: about 280 steps on the digits, 97% accuracy on held-out ones
    # (called from an evaluation, which runs without gradients)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order).split(64):
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return features.eval()


def feature_fd(images, labels, real, real_labels, seed=0):
    """The Frechet distance between samples (N, C, H, W) and real images (M, C, H, W), both in
    [-1, 1], in the 64 penultimate features of a small CNN classifier trained on the real
    images: a Frechet Inception distance for data too small for Inception. pixel_fd sees only
    the mean and covariance of flat pixels, which ink in about the right places matches without
    forming a digit; the classifier's features respond to shape (strokes, loops, where they
    join). On the digits, as multiples of each measure's floor: a 50/50 blend of two digits 5x
    the pixel FD's, 12x the feature FD's; blurred digits 25x and 26x; class averages 23x and 8x
    (diversity is the measure that sees a collapse to class averages).
      feature_fd        samples against all real images;
      feature_fd_floor  two random halves of the real images: the scale of finite-sample noise,
                        not a bound (a model fit to the same images can score below it)."""
    key = (tuple(real.shape), float(real.sum()), seed)
    if key not in CLASSIFIERS:
        CLASSIFIERS[key] = feature_classifier(real, real_labels, seed)
    net = CLASSIFIERS[key]
    with torch.no_grad():  # in chunks: a CIFAR-size set would not fit through it at once
        fx = torch.cat([net(a) for a in torch.as_tensor(np.asarray(images)).float().split(1024)])
        fr = torch.cat([net(a) for a in torch.as_tensor(np.asarray(real)).float().split(1024)])
    half = torch.randperm(len(fr), generator=torch.Generator().manual_seed(seed))
    first = half[: len(fr) // 2]
    second = half[len(fr) // 2:]
    return dict(feature_fd=frechet_of(fx.double(), fr.double()),
                feature_fd_floor=frechet_of(fr[first].double(), fr[second].double()))


def pixel_report_of(images, labels, real, real_labels):
    """pixel_report of uint8 samples (N, H, W, 3), as sample.py writes them, against real images
    (M, C, H, W) in [-1, 1] (numpy or torch; an in-memory dataset's `tensors`) and their int
    labels: the samples are taken back to [-1, 1] and to the real images' channels (the sampler
    writes grey as three equal channels)."""
    x = images.astype(np.float64)[..., : real.shape[1]]  # (N, H, W, C)
    x = x.transpose(0, 3, 1, 2) / 127.5 - 1  # (N, C, H, W)
    return pixel_report(x, labels, real, real_labels)


# --------------------------------------------------------------------------------------
# The evaluation protocol: sample.py's files and train.py's evaluations
# --------------------------------------------------------------------------------------


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3) as the release's generate.py:
    to_pil_image(x.mul(0.5).add(0.5).clamp(0, 1)), and torchvision's to_pil_image does
    .mul(255).byte(): truncation, not rounding (255 only for exactly 1.0)."""
    x = x.mul(0.5).add(0.5).clamp(0, 1).mul(255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def noise_of(indices, shape, seed):
    """The noise of the samples `indices`: (len(indices), *shape) float32 on the CPU, sample i's
    from its own generator seeded by (seed, i), so that it is the same on any device, process
    count or batch."""
    noise = []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 10**8 + int(i))
        noise.append(torch.randn(shape, generator=g))
    return torch.stack(noise)  # (n, *shape)


def sample_batches(sample, indices, labels, shape, seed, batch_size, device, progress=False):
    """Yield the samples `indices` (a list), with their labels (an array by sample index), a
    batch at a time: sample(z, y), images (n, 3, H, W) in [-1, 1], from noise z (n, *shape) on
    `device`. Sample i's noise is noise_of([i]); a short batch is padded with its last sample,
    so that every batch has one shape (one compiled graph, the same kernels)."""
    steps = range(0, len(indices), batch_size)
    for start in tqdm(steps, desc="sampling", unit="batch", delay=3, disable=not progress):
        idx = indices[start:start + batch_size]
        n = len(idx)
        idx = idx + idx[-1:] * (batch_size - n)
        z = noise_of(idx, shape, seed).to(device)  # (B, C, h, w)
        y = torch.as_tensor(np.asarray(labels)[idx], device=device)
        yield sample(z, y)[:n]


def file_order(n):
    """The order of n samples in an npz file, the release's misc/pack_npz.py shuffle (the
    Inception Score is taken over 5,000-sample chunks in file order)."""
    return np.random.RandomState(42).permutation(n)


class Evaluation:
    """Samples of a network scored as sample.py's npz files are: `num_samples` class-balanced
    samples (sample i has class i // (N / K) and the noise noise_of([i]), the same at every
    evaluation), split over the ranks (rank r makes samples r, r + world, ...), as uint8 images
    -> FID and Inception Score against the reference batch `ref` (with the Inception weights
    `inception`), and, given real=(images, labels) (data held in memory), pixel_report against
    them.

    The Inception and the reference are loaded here, before the caller's long work: a bad one is
    one line naming --eval-ref or --inception. Every rank builds one and calls it."""

    def __init__(self, num_samples, num_classes, shape, batch_size, seed, ref=None,
                 inception=None, real=None, rank=0, world=1, device="cpu"):
        if num_samples % num_classes:
            raise SystemExit(f"error: --eval-samples {num_samples}: not divisible by the "
                             f"{num_classes} classes")
        self.inception = None
        self.ref = None
        if ref:
            self.inception = load_inception(inception, device)
            self.ref = reference_stats(ref, self.inception, device=device, pool3=False,
                                       flag="--eval-ref")
        self.real = real
        self.labels = np.arange(num_samples) // (num_samples // num_classes)
        self.shape = shape
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.device = device

    @torch.no_grad()
    def __call__(self, sample):
        """sample(z, y): noise (n, *shape) on the device and labels (n,) -> images (n, 3, H, W)
        in [-1, 1]. The numbers {name: value} on rank 0, {} on the other ranks."""
        mine = list(range(self.rank, len(self.labels), self.world))
        batches = sample_batches(sample, mine, self.labels, self.shape, self.seed,
                                 self.batch_size, self.device, progress=self.rank == 0)
        images = np.concatenate([to_uint8(x) for x in batches])  # (n, H, W, 3)
        part = {"idx": mine}
        if self.inception is not None:
            feats = compute_features(self.inception, images, device=self.device,
                                     progress=False)
            part["pool3"] = feats["pool3"]
            part["logits"] = feats["logits"]
        if self.real is not None:
            part["images"] = images
        parts = [part]
        if dist.is_initialized():
            parts = [None] * self.world if self.rank == 0 else None  # rank 0 receives them all
            dist.gather_object(part, parts, dst=0)
        if self.rank != 0:
            return {}
        return self.score(parts)

    def score(self, parts):
        """Every rank's share -> the numbers. sFID and precision/recall: fid.py on an npz."""
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out = {"eval_samples": len(cat["idx"])}
        if self.inception is not None:
            pool3 = np.empty_like(cat["pool3"], np.float64)  # in sample order
            logits = np.empty_like(cat["logits"])
            pool3[cat["idx"]] = cat["pool3"]
            logits[cat["idx"]] = cat["logits"]
            sigma = np.cov(pool3, rowvar=False)
            out["fid"] = frechet_distance(pool3.mean(0), sigma, self.ref["mu"],
                                          self.ref["sigma"])
            # IS in the order of an npz of these samples (the release's shuffled order)
            out["inception_score"] = inception_score(logits[file_order(len(self.labels))])
        if self.real is not None:
            real, real_labels = self.real
            labels = self.labels[cat["idx"]]
            out.update(pixel_report_of(cat["images"], labels, real, real_labels))
        return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def pixel_reference(name):
    """--pixel-ref's real images -> (images (M, C, H, W) float32 in [-1, 1], labels (M,) int64),
    as dataset.py reads them: "digits", or an npz of images (arr_0 uint8 (N, H, W, C), C 1 or 3;
    arr_1 labels, or one class)."""
    if name == "digits":
        return load_digits()
    return ArrayImages(name, flip=False, max_memory=math.inf, flag="--pixel-ref").tensors


def pixel_command(args):
    """fid.py SAMPLES --pixel-ref DATA: the nearest-real-image report of small pixel data,
    no Inception."""
    samples = read_batch(args.samples, "samples")
    images = samples["arr_0"]  # (N, H, W, 3)
    labels = samples.get("arr_1", np.zeros(len(images), np.int64))  # none: one class
    real, real_labels = pixel_reference(args.pixel_ref)  # (M, C, H, W) in [-1, 1], (M,)
    # a label the reference has no images of would score agreement 0 and diversity NaN
    classes = np.unique(real_labels.numpy())
    if not np.isin(labels, classes).all():
        raise SystemExit(f"error: samples {args.samples}: arr_1 holds labels that --pixel-ref "
                         f"{args.pixel_ref} has no images of (its classes: {classes.min()} to "
                         f"{classes.max()})")
    for k, v in pixel_report_of(images, labels, real, real_labels).items():
        print(f"{k}: {v:.4f}")


def make_ref_command(args, device):
    """fid.py --make-ref IMAGES --out REF.npz: a reference batch in ADM's format."""
    images = read_batch(args.make_ref, "--make-ref")["arr_0"]  # (N, H, W, 3)
    model = load_inception(args.inception, device)
    stats = feature_stats(compute_features(model, images, args.batch_size))
    save_npz(args.out, **stats, arr_0=images)
    print(f"wrote {args.out}: mu, sigma, mu_s, sigma_s and arr_0 {images.shape} "
          f"from {args.make_ref}")


def score_command(args, device):
    """fid.py SAMPLES REF: FID, sFID, IS, precision and recall, printed."""
    images = read_batch(args.samples, "samples")["arr_0"]  # (N, H, W, 3)
    ref = read_batch(args.ref, "ref", images=False)
    model = load_inception(args.inception, device)
    ref = reference_stats(ref, model, args.batch_size)
    m = evaluate(compute_features(model, images, args.batch_size), ref, device)
    for name in ("inception_score", "fid", "sfid", "precision", "recall"):
        # precision and recall need the reference's images (arr_0)
        print(f"{name}: {m[name]:.4f}" if m[name] is not None else f"{name}: no arr_0 in ref")


def main(args):
    device = torch.device(default_device(args.device))
    if args.pixel_ref:
        pixel_command(args)
    elif args.make_ref:
        make_ref_command(args, device)
    else:
        score_command(args, device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fid.py", usage=argparse.SUPPRESS,
                                description="ADM-suite FID, sFID, IS, precision/recall.",
                                epilog="e.g. python fid.py samples.npz "
                                       "VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("samples", nargs="?",
                   help="npz with arr_0 uint8 (N, H, W, 3), or an image folder")
    p.add_argument("ref", nargs="?",
                   help="ADM reference batch npz (mu, sigma, mu_s, sigma_s, arr_0) or folder")
    p.add_argument("--inception",
                   help="weights file (default: $AFM_CACHE or ~/.cache/afm, else download)")
    p.add_argument("--batch-size", type=int, default=250, help="Inception batch size")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--make-ref", metavar="FOLDER_OR_NPZ",
                   help="write a reference batch from these images")
    p.add_argument("--out", help="output npz for --make-ref (a new file: never overwritten)")
    p.add_argument("--pixel-ref", metavar="DATA",
                   help='instead of Inception metrics: fid.pixel_report of the samples against '
                        '"digits" or an npz of real images (class agreement, diversity, pixel FD)')
    args = p.parse_args(argv)
    if args.make_ref and not args.out:
        p.error("--make-ref needs --out ref.npz")
    if args.out and not args.make_ref:
        p.error("--out is the output of --make-ref; the scores are printed")
    if not (args.make_ref or (args.samples and (args.ref or args.pixel_ref))):
        p.error("give samples.npz and ref.npz, samples.npz --pixel-ref DATA, or --make-ref")
    if args.out:
        check_out(args.out)  # before any work, not after it
    return args


if __name__ == "__main__":
    main(parse_args())

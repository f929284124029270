"""
Process and file plumbing shared by the scripts: torchrun set-up and teardown, rank-0 printing,
reductions across ranks, atomic saves, guarded checkpoint loading and the run folder. Nothing
here knows about AFM; nanochat keeps the same things in its common.py.

Errors found before the work starts end the script with one line, `error: FLAG FILE: why`
(SystemExit, exit status 1); anything else is Python's own exception.
"""

import argparse
import glob
import json
import math
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------
# Processes: torchrun set-up and teardown, printing, reductions across ranks
# --------------------------------------------------------------------------------------


def setup(device="auto"):
    """torchrun's environment when present (NCCL on GPU, gloo on CPU), else one process.
    Returns (rank, world size, device); TF32 matmuls and convolutions on GPU, as the release."""
    cuda = torch.cuda.is_available() and device != "cpu"
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        return 0, 1, device
    return dist.get_rank(), dist.get_world_size(), device


def cleanup():
    """Leave the process group together: no rank exits while another still talks to it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ddp(module, device):
    """DDP around the module under torchrun (it averages the gradients of the module it wraps,
    during backward); the module itself otherwise."""
    if not dist.is_initialized():
        return module
    ids = [device.index] if device.type == "cuda" else None  # gloo on the CPU
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def print0(*args, **kwargs):
    """print on rank 0 only (and always outside torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)


def sum_over_ranks(values, device):
    """A dict of numbers (Python or 0-d tensors) -> the same dict summed over ranks, as Python
    floats: one all-reduce and one wait for the device, whatever the number of values."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], device=device).double() for k in keys])
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def positive(text):
    """argparse type: an integer >= 1, for counts where 0 would divide by zero or never end."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


# --------------------------------------------------------------------------------------
# Files: atomic saves, the output check, guarded checkpoint loading
# --------------------------------------------------------------------------------------


def save_atomic(obj, path, save=torch.save):
    """`save(obj, path)` under a temporary name, then a rename: a crash or a full disk mid-write
    never leaves half a file under the real name, nor destroys the previous one."""
    save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_npz(path, **arrays):
    """np.savez, atomically (through a file object: np.savez would add ".npz" to the temporary
    name)."""
    def write(arrays, tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    save_atomic(arrays, path, write)


def save_grid(images, path, nrow):
    """Images in [-1, 1], (N, 3, H, W) -> one PNG grid, `nrow` images per row, images smaller
    than 64 px enlarged by an integer factor; written atomically."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    up = max(1, 64 // x.shape[-1])
    x = x.repeat_interleave(up, 2).repeat_interleave(up, 3)  # (N, 3, H, W)
    N, C, H, W = x.shape
    rows = math.ceil(N / nrow)
    grid = torch.full((C, rows * (H + 2) + 2, nrow * (W + 2) + 2), 255, dtype=torch.uint8)
    for i in range(N):
        top = 2 + (i // nrow) * (H + 2)
        left = 2 + (i % nrow) * (W + 2)
        grid[:, top:top + H, left:left + W] = x[i]
    save_atomic(Image.fromarray(grid.permute(1, 2, 0).numpy()), path, save_png)


def check_out(path, flag="--out"):
    """Nothing is overwritten: exit with one line, before any work, if `path` exists (a file or
    a folder) or its folder does not."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        raise SystemExit(f"error: {flag} {path} exists: remove it or choose another name")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {flag} {path}: there is no folder {folder}")


def load_checkpoint(path, flag="--ckpt"):
    """-> (file, checkpoint dict) of a checkpoint file, or of a run folder's newest checkpoint.
    Read onto the CPU with plain tensors only (weights_only: nothing in the file is run),
    memory-mapped when the format allows. Anything unreadable is one line naming the file."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt")))
        if not files:
            raise SystemExit(f"error: {flag} {path}: a folder without checkpoints/*.pt")
        path = files[-1]  # names are zero-padded steps: the last is the newest
    try:  # torch warns about a foreign pickle on its own: the line below says it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mmap = zipfile.is_zipfile(path)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # missing, empty, cut short, or a pickle of more than tensors
        why = str(e).strip().split("\n")[0][:120]
        if isinstance(e, pickle.UnpicklingError):  # torch's text suggests unpickling it anyway
            why = "it holds more than tensors and plain values"
        raise SystemExit(f"error: {flag} {path}: not a readable checkpoint ({why})") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {flag} {path}: holds a {type(ckpt).__name__}, not a state dict")
    return path, ckpt


def load_weights(net, sd, what):
    """Load the state dict `sd` into `net` (best made on the meta device: its own weights are
    never initialised) strictly, floats as fp32 (autocast makes bf16). A file that does not fit
    is one line naming `what` and the first mismatch of each kind."""
    own = net.state_dict()
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    kinds = (("shape", wrong), ("missing", missing), ("unexpected", unexpected))
    problems = [f"{len(keys)} {kind}, e.g. {keys[0]}" for kind, keys in kinds if keys]
    if problems:
        raise SystemExit(f"error: {what} does not fit: {'; '.join(problems)}")
    fp32 = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    # a net on the meta device takes the file's tensors (assign); a real one copies them
    net.load_state_dict(fp32, assign=next(net.parameters()).is_meta)
    return net


# --------------------------------------------------------------------------------------
# The run folder: results/NNN-TAG with args.json, checkpoints/, log.jsonl and curves.png
# --------------------------------------------------------------------------------------


def make_run_dir(results_dir, tag, args):
    """A new folder results_dir/NNN-TAG (NNN one past the largest in use) with checkpoints/ and
    args.json, made by rank 0 and told to the others: a new run never writes into another's."""
    box = [None]
    if os.environ.get("RANK", "0") == "0":
        os.makedirs(results_dir, exist_ok=True)
        while box[0] is None:  # mkdir is exclusive: a launch that took the index looks again
            used = [-1]
            for name in os.listdir(results_dir):
                m = re.match(r"(\d+)-", name)
                if m:
                    used.append(int(m[1]))
            path = os.path.join(results_dir, f"{max(used) + 1:03d}-{tag}")
            try:
                os.mkdir(path)
                box[0] = path
            except FileExistsError:
                continue
        os.mkdir(os.path.join(box[0], "checkpoints"))
        with open(os.path.join(box[0], "args.json"), "w") as f:
            json.dump(args, f, indent=1)
    if dist.is_initialized():
        dist.broadcast_object_list(box)
    return box[0]


def resumed_run_dir(ckpt_path):
    """The run folder that a run resumed from `ckpt_path` continues in: its own, if that is the
    newest checkpoint of a run folder; else None, a new folder (a run resumed from an older
    checkpoint must not overwrite the later ones)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    newest = sorted(glob.glob(os.path.join(folder, "*.pt")))[-1]
    ours = os.path.basename(folder) == "checkpoints" and os.path.samefile(newest, ckpt_path)
    return os.path.dirname(folder) if ours else None


def read_log(run_dir):
    """The records of run_dir/log.jsonl. A last line that does not parse (a write cut short by
    a kill or a full disk) is dropped."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        lines = f.readlines()
    records = []
    for i, line in enumerate(lines):
        if i == len(lines) - 1 and not line.endswith("\n"):
            break
        records.append(json.loads(line))
    return records


def trim_log(run_dir, step):
    """Keep the records of run_dir/log.jsonl up to `step`: a run resumed in place logs again the
    steps the stopped run logged after its last checkpoint, and each step must stay once."""
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.isfile(path):
        kept = [r for r in read_log(run_dir) if r["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)


def plot_curves(run_dir, cols=4, w=320, h=170):
    """run_dir/log.jsonl -> run_dir/curves.png: one panel per logged number against the step,
    with its range and last value (PIL only), the evaluations' first. A key K_floor is K's value
    on real data, said in K's title."""
    rows = read_log(run_dir)
    first = ["agreement", "diversity", "pixel_fd", "feature_fd", "fid", "inception_score"]
    keys = {k for r in rows for k in r if not k.endswith(("_floor", "_samples", "_seconds"))}
    keys = [k for k in first if k in keys] + sorted(keys - set(first) - {"step"})
    img = Image.new("RGB", (cols * w, math.ceil(len(keys) / cols) * h), "white")
    draw = ImageDraw.Draw(img)
    for i, k in enumerate(keys):
        points = [(r["step"], r[k]) for r in rows if math.isfinite(r.get(k, math.nan))]
        if not points:
            continue
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        # the panel's plot area: (x0, y0) to (x0 + w - 20, y0 + h - 45)
        x0 = (i % cols) * w + 10
        y0 = (i // cols) * h + 22
        span = (max(values) - min(values)) or 1
        xy = [(x0 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 20),
               y0 + (h - 45) * (max(values) - v) / span) for s, v in points]
        draw.rectangle([x0, y0, x0 + w - 20, y0 + h - 45], outline=(200, 200, 200))
        draw.line(xy + xy[-1:], fill=(31, 119, 180), width=2)
        title = f"{k}: {values[-1]:.4g}"
        floors = [r[k + "_floor"] for r in rows if k + "_floor" in r]
        if floors:
            title += f" (real data {floors[0]:.3g})"
        draw.text((x0, y0 - 16), title, fill=0)
        draw.text((x0, y0 + h - 42), f"steps {steps[0]}-{steps[-1]}, values "
                                      f"{min(values):.3g}-{max(values):.3g}", fill=(90, 90, 90))
    save_atomic(img, os.path.join(run_dir, "curves.png"), save_png)


def save_png(image, path):
    image.save(path, format="PNG")

"""
Process and file plumbing shared by the scripts: torchrun set-up, rank-0 printing, reductions across
ranks, atomic saves, guarded checkpoint loading and an argparse with one-line errors. Nothing here
knows about AFM; nanochat keeps the same things in its common.py.
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------
# Processes: torchrun set-up, printing, reductions across ranks
# --------------------------------------------------------------------------------------


def setup(device="auto"):
    """torchrun's environment when present (NCCL on GPU, gloo on CPU), else one process.
    Returns (rank, world size, device); TF32 matmuls and convolutions on GPU, as the release."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if not dist.is_initialized():
        return 0, 1, device
    return dist.get_rank(), dist.get_world_size(), device


def cleanup():
    """Leave the process group together: no rank exits while another still talks to it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only (and always when there is no process group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def _reduce(values, device, op):
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def mean_over_ranks(values, device):
    """A dict of scalars -> the same dict averaged over ranks (one all-reduce)."""
    total = _reduce(values, device, dist.ReduceOp.SUM)
    if not dist.is_initialized():
        return total
    return {k: v / dist.get_world_size() for k, v in total.items()}


def sum_over_ranks(values, device):
    """A dict of scalars -> the same dict summed over ranks (one all-reduce)."""
    return _reduce(values, device, dist.ReduceOp.SUM)


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank (a collective: every rank must call it)."""
    return _reduce({"flag": bool(flag)}, device, dist.ReduceOp.MAX)["flag"] > 0


# --------------------------------------------------------------------------------------
# Files: atomic saves, guarded checkpoint loading
# --------------------------------------------------------------------------------------


def save_atomic(obj, path, save=torch.save):
    """`save(obj, path)` under a temporary name, then a rename: a crash mid-write never leaves half
    a file under the real name, nor destroys the previous one. A failed write (a full disk)
    removes the partial file and exits with one line."""
    tmp = path + ".tmp"
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free / 2**30
        raise SystemExit(f"error: cannot write {path} ({free:.2f} GiB free there): "
                         f"{first_line(e)}")


def save_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_text(text, path):
    with open(path, "w") as f:
        f.write(text)


def save_npz(path, **arrays):
    """np.savez, atomically (through a file object: np.savez would add ".npz" to the temporary
    name)."""
    def write(arrays, tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    save_atomic(arrays, path, write)


def file_identity(path):
    """{"file": its name, "size": bytes, "sha256_head_tail": sha256 of the first and last 4 MiB}:
    cheap for a multi-GB file, and it tells apart files that differ only at the end (VAEs that
    differ only in the decoder, stored last, as sd-vae-ft-ema and sd-vae-ft-mse do) or that were
    replaced by another. A renamed copy has the same size and hash."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        f.seek(max(4 << 20, size - (4 << 20)))
        h.update(f.read())
    return {"file": os.path.basename(path), "size": size, "sha256_head_tail": h.hexdigest()}


def read_checkpoint(path, flag):
    """torch.load of a checkpoint onto the CPU, plain tensors only, memory-mapped (reading a large
    file's step is then cheap) unless in torch's pre-zip format, which cannot be. Anything
    unreadable: a ValueError naming the flag and the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    try:
        # torch warns about a foreign pickle on its own; the error below says it in one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mmap = zipfile.is_zipfile(path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        why = first_line(e, 150)
        raise ValueError(f"{flag} {path}: not a readable checkpoint ({why})") from None
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise ValueError(f"{flag} {path}: holds a {kind}, not a checkpoint or state dict")
    return obj


def load_checkpoint(path, flag="--ckpt"):
    """-> (file, checkpoint) for a checkpoint file; for a run folder, its newest readable checkpoint
    in checkpoints/, newest by the step stored in it (a truncated newest file is passed over, and
    said so)."""
    if not os.path.isdir(path):
        return path, read_checkpoint(path, flag)
    found, bad = [], []
    for f in glob.glob(os.path.join(path, "checkpoints", "*.pt")):
        try:
            ckpt = read_checkpoint(f, flag)
            found.append((ckpt.get("step", -1), f, ckpt))
        except ValueError as e:
            bad.append(str(e))
    if not found and bad:
        raise ValueError(f"{flag} {path}: no readable checkpoint in {path}/checkpoints ({bad[0]})")
    if not found:
        raise ValueError(f"{flag} {path}: no readable checkpoint in {path}/checkpoints")
    step, f, ckpt = max(found, key=lambda c: (c[0], c[1]))
    for msg in bad:
        print0(f"warning: {msg}; using {f} (step {step}), the newest readable one")
    return f, ckpt


# --------------------------------------------------------------------------------------
# Command lines: one-line errors
# --------------------------------------------------------------------------------------


def first_line(e, limit=200):
    """The first informative line of an exception's message, at most `limit` characters.
    load_state_dict's header ("Error(s) in loading state_dict for X:") is skipped for the line
    that names the mismatch; an empty message gives the exception's type."""
    lines = []
    for line in str(e).splitlines():
        if line.strip():
            lines.append(line.strip())
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`prog: error: ...`, exit status 2), no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(text):
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)

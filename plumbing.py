"""
Process and file plumbing shared by the scripts: torchrun set-up, rank-0 printing, reductions across
ranks, atomic saves, locks, guarded checkpoint loading, run folders, log.jsonl and its curves, and
one-line errors. Nothing here knows about AFM; nanochat keeps the same things in its common.py.

The scripts import this module before torch: from then on, Ctrl-C is one line (see `interrupted`).
"""

import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
import time
import warnings
import zipfile

try:
    import fcntl
except ImportError:  # Windows: no locks
    fcntl = None


def is_rank0():
    """Rank 0 of a torchrun launch, or a plain process (torchrun sets RANK before Python starts,
    so this holds before the process group exists, and after it is gone)."""
    return os.environ.get("RANK", "0") == "0"


def interrupted(kind, value, traceback):
    """sys.excepthook: a Ctrl-C that no script handles (while torch loads, while a grid is drawn,
    while samples are scored) prints one line, on rank 0 only, not a traceback. Python still
    exits with the shell's status for SIGINT, 130 (it re-raises SIGINT at exit)."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
    elif is_rank0():
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr, flush=True)


sys.excepthook = interrupted  # before torch is imported: the import itself takes seconds

import numpy as np  # noqa: E402 (after the hook above)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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
    """print on rank 0 only (and always outside torchrun)."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def print_error(line):
    """An error line on stderr, once per torchrun launch when every rank meets the same error (a
    bad flag or file): rank 0 prints it at once, another rank after 3 seconds, by which time
    torchrun, seeing rank 0 fail, has stopped it. An error of one rank alone is still printed."""
    if not is_rank0():
        time.sleep(3)
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def one_line_errors(prog):
    """Around a script's main: an error (SystemExit with a message) is printed by print_error,
    and a rank whose peer died (killed, out of memory), which fails inside a collective with
    gloo's or NCCL's traceback, says so in one line instead. Exit status 1 for both, as Python
    gives a SystemExit with a message."""
    try:
        yield
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print_error(e.code)
        raise SystemExit(1) from None
    except RuntimeError as e:
        # a collective's failure: DistError, or a bare RuntimeError from DDP's backward hooks
        text = str(e)
        if not isinstance(e, dist.DistError) and "gloo" not in text and "NCCL" not in text:
            raise
        why = first_line(re.sub(r"^\[[^\]]*\]\s*", "", text), 100)  # less gloo's source line
        rank = os.environ.get("RANK", "0")
        print_error(f"{prog}: error: rank {rank}: lost another process of this run ({why}); "
                    f"torchrun's report names which, and how it ended")
        raise SystemExit(1) from None


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
    a file under the real name, nor destroys the previous one (a rerun overwrites the temporary
    file). A failed write (a full disk) removes the partial file and exits with one line."""
    tmp = path + ".tmp"
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_error(path, e) from None


def write_error(path, e):
    """The one-line SystemExit for a failed write of `path`: the OS's reason and the free space
    there (torch's zip writer gives only its own internals: they are left out)."""
    why = "the write failed"
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free / 2**30
    return SystemExit(f"error: cannot write {path} ({why}; {free:.2f} GiB free there)")


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
        why = f"{type(e).__name__}: {first_line(e, 150)}"
        if isinstance(e, pickle.UnpicklingError):  # torch's text suggests weights_only=False: no
            why = "it holds more than tensors and plain values; nothing in it was run"
        elif os.path.getsize(path) == 0:
            why = "an empty file"
        raise ValueError(f"{flag} {path}: not a readable checkpoint ({why})") from None
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise ValueError(f"{flag} {path}: holds a {kind}, not a checkpoint or state dict")
    # the fields train.py writes, when present, have their types: a damaged or foreign file
    # fails here in one line, not in the code that reads them
    step = obj.get("step", 0)
    args = obj.get("args", {})
    if not isinstance(args, dict) or type(step) is not int or step < 0:
        raise ValueError(f"{flag} {path}: not a checkpoint of train.py (its step or args are "
                         f"damaged: step {str(step)[:20]!r}, args of type {type(args).__name__})")
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
# Locks: one command at a time on a run folder or an output file
# --------------------------------------------------------------------------------------


_held = []  # (open file, path) of the locks this process holds


def take_lock(path):
    """Rank 0 locks the file `path` (made for it) until the script's main returns or fails (see
    releases_locks); the kernel drops the lock with its process, however that ends, so a crash
    or kill -9 leaves no stale lock. A collective: returns "" on every rank, or who holds the
    lock (the holder writes its process id, host and command line into the file)."""
    holder = [""]
    held = [p for f, p in _held]
    if is_rank0() and fcntl is not None and path not in held:
        holder[0] = _flock(path)
    if dist.is_initialized():
        dist.broadcast_object_list(holder)
    return holder[0]


def _flock(path):
    """take_lock's work on rank 0: "" once locked (and the lock kept in _held), or the holder."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        # the holder before may have removed the file between our open and our lock: lock anew
        try:
            ours = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        f.close()
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()} "
            f"({' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])})")
    f.flush()
    _held.append((f, path))
    return ""


def releases_locks(main):
    """Decorator for a script's main: the locks it took are released (their files removed) when
    it returns or fails, so that it can be called again in one process (tests, notebooks)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            while _held:
                f, path = _held.pop()
                with contextlib.suppress(OSError):
                    os.remove(path)  # while still held: whoever opened it meanwhile retries
                f.close()
    return run


# --------------------------------------------------------------------------------------
# Run folders: results/NNN-TAG, made exclusively; a resumed run keeps its own
# --------------------------------------------------------------------------------------


def next_run_dir(results_dir, tag):
    """Create results_dir/NNN-TAG exclusively, NNN one past the largest index in use; another
    launch that takes the same index first makes this one look again."""
    while True:
        used = [-1]
        for name in os.listdir(results_dir):
            m = re.match(r"(\d+)-", name)
            if m:
                used.append(int(m[1]))
        path = os.path.join(results_dir, f"{max(used) + 1:03d}-{tag}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def make_run_dir(results_dir, tag, args, rank):
    """A new run folder results_dir/NNN-TAG with checkpoints/ and args.json (the dict `args`),
    made by rank 0 and told to the others (a collective): a new run never writes into another's
    folder. OSError if results_dir cannot be made or written."""
    run_dir = None
    if rank == 0:
        os.makedirs(results_dir, exist_ok=True)
        run_dir = next_run_dir(results_dir, tag)
        os.mkdir(os.path.join(run_dir, "checkpoints"))
        save_atomic(args, os.path.join(run_dir, "args.json"), save_json)
    box = [run_dir]
    if dist.is_initialized():
        dist.broadcast_object_list(box)
    return box[0]


def resumed_run_dir(resume, path):
    """The run folder a run resumed with `resume` (a run folder, or a checkpoint file) from the
    checkpoint file `path` keeps writing to, or None for a new one. A run folder, or its newest
    checkpoint file, continues in place; a checkpoint file from elsewhere, or an older checkpoint
    of a run (whose later checkpoints must not be overwritten by another history), starts a new
    run folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) != "checkpoints":
        return None
    if os.path.isdir(resume):
        return os.path.dirname(folder)
    newest = max(f for f in os.listdir(folder) if f.endswith(".pt"))
    if os.path.basename(path) == newest:
        return os.path.dirname(folder)
    return None


def why_unwritable(folder, device):
    """Why rank 0 cannot write a file in `folder` (the OS's reason), or "" if it can, on every
    rank (a collective): a caller can fail now, all ranks together, rather than at its first
    save (e.g. a run resumed on a read-only copy)."""
    why = [""]
    if not dist.is_initialized() or dist.get_rank() == 0:
        probe = os.path.join(folder, ".write-test")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            why[0] = e.strerror
    if dist.is_initialized():
        dist.broadcast_object_list(why)
    return why[0]


# --------------------------------------------------------------------------------------
# Logs and curves: RUN/log.jsonl, one JSON record a line, drawn as RUN/curves.png
# --------------------------------------------------------------------------------------


def write_log(run_dir, record):
    """Append `record` (a dict of numbers with a "step") to run_dir/log.jsonl. A failed append (a
    full disk) may leave a torn last line, which read_log drops."""
    path = os.path.join(run_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise write_error(path, e) from None


def read_log(run_dir):
    """The records of run_dir/log.jsonl, each as (its line, the record). A last line that is no
    record is dropped, said so: a full disk mid-append leaves a torn line, and the run must still
    resume (trim_log rewrites the log without it)."""
    path = os.path.join(run_dir, "log.jsonl")
    with open(path) as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            rows.append((line, record))
        elif i == len(lines) - 1:
            print0(f"{path}: its last line is torn (a write cut short, e.g. by a full disk); "
                   f"dropped")
        else:
            raise SystemExit(f"error: {path}, line {i + 1}: not a JSON record with a step; "
                             f"delete that line to go on")
    return rows


def trim_log(run_dir, step):
    """Keep the records of run_dir/log.jsonl up to `step`: a run resumed in place from step N
    logs again the steps an interrupted run logged past its last checkpoint, and each step must
    stay once. A torn last line goes too."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        count = len(f.readlines())
    kept = [line for line, record in read_log(run_dir) if record["step"] <= step]
    if len(kept) < count:
        save_atomic("".join(kept), path, save_text)


def plot_curves(run_dir, first=(), skip=(), cols=4, w=320, h=170):
    """run_dir/log.jsonl -> run_dir/curves.png: one panel per logged number against the step (PIL
    only). Panels: the keys of `first` in that order, then the others by name, less those in
    `skip`. A key K_floor is no panel: it is K's value on real data, shown in K's title."""
    from PIL import Image, ImageDraw
    rows = [record for line, record in read_log(run_dir)]
    keys = set()
    for r in rows:
        for k in r:
            if not k.endswith("_floor"):
                keys.add(k)
    first = list(first)

    def order(key):
        if key in first:
            return (0, first.index(key), key)
        return (1, 0, key)

    keys = sorted(keys - {"step"} - set(skip), key=order)
    img = Image.new("RGB", (cols * w, math.ceil(len(keys) / cols) * h), "white")
    draw = ImageDraw.Draw(img)
    grey = (90, 90, 90)
    for i, k in enumerate(keys):
        pts = []
        for r in rows:
            v = r.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                pts.append((r["step"], v))
        if not pts:
            continue
        # The plot area: (x0, y0) to (x0 + pw, y0 + ph).
        x0 = (i % cols) * w + 45
        y0 = (i // cols) * h + 22
        pw = w - 60
        ph = h - 45
        s0 = pts[0][0]
        s1 = pts[-1][0]
        ys = [p[1] for p in pts]
        lo = min(ys)
        hi = max(ys)
        xy = []
        for step, v in pts:
            px = x0 + (step - s0) / max(s1 - s0, 1) * pw
            py = y0 + ph * (1 - (v - lo) / ((hi - lo) or 1))
            xy.append((px, py))
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(200, 200, 200))
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([*xy[0], *xy[0]], outline=0)
        title = f"{k}: {ys[-1]:.4g}"
        for r in rows:
            if k + "_floor" in r:
                title += f" (real data {r[k + '_floor']:.3g})"
                break
        draw.text((x0, y0 - 16), title, fill=0)
        draw.text((x0 - 42, y0 - 4), f"{hi:.3g}", fill=grey)
        draw.text((x0 - 42, y0 + ph - 10), f"{lo:.3g}", fill=grey)
        draw.text((x0, y0 + ph + 3), f"step {s0}", fill=grey)
        draw.text((x0 + pw - 60, y0 + ph + 3), f"{s1}", fill=grey)
    save_atomic(img, os.path.join(run_dir, "curves.png"), save_png)


def save_png(image, path):
    """A PIL image as PNG (the `save` of save_atomic: the temporary name has no .png)."""
    image.save(path, format="PNG")


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
    """argparse with one-line usage errors (`prog: error: ...`, exit status 2, once under
    torchrun: see print_error), no usage block."""

    def error(self, message):
        print_error(f"{self.prog}: error: {message}")
        self.exit(2)


def integer(lo, hi):
    """argparse type: an integer in [lo, hi]. Every count and seed of the command lines has its
    bounds, so that a typo fails at once with one line, not after a minute of work (a seed past
    2**31 overflows torch's generator; a billion samples build lists for a minute)."""
    def parse(text):
        value = None
        if text.lstrip("-").isdigit():
            value = int(text)
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo:,} to {hi:,}, "
                                             f"got {text!r}")
        return value
    return parse


def positive(text):
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)

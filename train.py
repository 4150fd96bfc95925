"""Learn concepts one task at a time into one SD 1.x model, with C-LoRA (or STAMINA, or a baseline),
keeping every earlier concept and no old photo.

    python train.py --task 3 --data data/faces --run runs/faces --ckpt weights/v1-5-pruned-emaonly.safetensors
    python train.py --task 1 --data data/faces --run runs/faces-lora --method lora
    python train.py --task 3 --data data/faces --run runs/faces-st --method stamina --no-mlp-tokens   # an ablation
    python train.py --task 2 --data data/faces --run runs/faces --overwrite      # retrain task 2 only
    torchrun --standalone --nproc_per_node 2 train.py --task 3 --data data/faces --run-dir runs/faces --batch 2

`--data` holds one folder of images per concept; sorted folder order is the task order and the
folder name gives the concept word (`03_alice/` -> `<alice>`). `--task N` brings the run up to
task N: missing earlier tasks are trained first, tasks already in the run are kept. A run folder holds
`run.json` and one small `task_NN.safetensors` per task (its delta factors and token embeddings),
plus `grid_task_NN.png`: one sample of every concept learned so far.

With no SD checkpoint (no --ckpt, none in weights/), the embedded tiny model and the concept stream of
`world.py` are the default, and so is `--run runs/world-v2-<method>`: `python train.py --task 3` runs as is.
Defaults of the training settings are per model: the paper's for SD 1.x, tuned ones for the tiny model.

`--prior W` (not in either paper; on by default on the tiny model only) adds a prior term to every
method's loss (`ti`'s is zero, no base prompt holding its tokens: skipped and recorded as off): under
a random base prompt (`--prior-prompts`, one per line; the tiny model's world captions by default)
and the step's noisy latents, the squared difference between the model's noise prediction and that
of the model as it was before the task (its current delta off, earlier tasks on):

    loss = || eps - eps_theta(x_s, s, c_concept) ||^2 + W || eps_theta(x_s, s, c_base) - eps_before(x_s, s, c_base) ||^2  (+ lambda ...)

Prior preservation by self-distillation: no stored images, and the deltas still fold. Without it a
concept learned on the tiny model takes over prompts that do not name it (README).

    python train.py --task 3 --data data/faces --run runs/faces-prior --prior 1 --prior-prompts prompts.txt

Under torchrun, N processes (GPUs) train each task data-parallel: `--batch` stays the global batch and
each process takes its slice of the very batch one process would draw, so the weights are one
process's up to floating-point summation order. Spell the run folder `--run-dir` there: torchrun's
own parser takes `--run` for an abbreviation of its `--run-path` and stops.
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import world
from checkpoint import (CheckpointError, read_metadata, read_state_dict, save_safetensors, sha256, stale_temps,
                        write_text)
from clora import HARDENING, METHODS, CLoRA, read_run, read_task, slope, task_file
from sample import (DTYPES, MAX_STEPS, StableDiffusion, alphas_cumprod, compile_unet, ddim_sample, find_checkpoint, image_grid, save_png,
                    size_multiple)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# No class word: the concept word alone carries the identity (the paper's setting).
TEMPLATES = ["a photo of {}", "a rendering of {}", "a cropped photo of {}", "the photo of {}", "a close-up photo of {}",
             "a bright photo of {}", "a good photo of {}", "a photo of the {}", "a dark photo of {}", "{}"]
# The prior term's weight on the tiny model (README, "Why the prior term"): without it a
# concept learned there takes over prompts that do not name it. Not in either paper; 0 on SD 1.x.
PRIOR_TINY = 1.0
PRIOR_CAPTIONS = 500  # base captions of the world the tiny model's prior term draws from
# Per-model defaults, keyed by the checkpoint's metadata "model" (none: SD 1.x). SD 1.x: the paper's
# settings. The tiny model: chosen on it (README, "The embedded default"); no lambda both keeps and
# learns there, and 1e3 is the keeping end (docs/history.md, "Is lambda the dial?"). STAMINA's (only the abstract
# is known): its LoRA settings are the paper's LoRA settings; mask_lr, sparsity, hardening and steer are
# ours, untested on SD 1.x, and on the tiny model kept after a five-task ablation (README, "STAMINA").
DEFAULTS = {
    "sd1": dict(rank=16, lam=1e8, steps=2000, batch=1, res=512, grid_steps=50, cfg=7.5, mirror=True,
                lr={"clora": 5e-4, "lora": 5e-4, "ti": 5e-3, "kv": 5e-6, "stamina": 5e-4}, token_lr=dict.fromkeys(METHODS),
                mask_lr=1e-2, sparsity=1e-2, hardening="sigmoid-anneal", steer=False, prior=0.0),
    "tiny-world": dict(rank=16, lam=1e3, steps=3000, batch=4, res=world.SIZE, grid_steps=20, cfg=3.0, mirror=False,
                       lr={"clora": 2e-3, "lora": 2e-3, "ti": 5e-2, "kv": 2e-4, "stamina": 2e-3},
                       token_lr={"clora": 5e-2, "lora": 5e-2, "ti": None, "kv": 5e-2, "stamina": 5e-2},
                       mask_lr=1e-2, sparsity=1e-2, hardening="sigmoid-anneal", steer=False, prior=PRIOR_TINY),
}
PER_METHOD = ("lr", "token_lr")  # settings given per method; a token_lr of None means: the tokens train at lr
SETTINGS = ("rank", "lam", "steps", "batch", "res", "grid_steps", "cfg", "mirror", "lr", "token_lr", "prior")
STAMINA = ("mask_lr", "sparsity", "hardening", "steer")  # settings of --method stamina alone, defaulted per model too
WORLD_DATA = Path(f"data/world-v{world.VERSION}")  # versioned: a folder of another world's images is never reused
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
# What a task's result depends on besides its task, word, data, base and earlier tasks: a partial
# checkpoint records them all and is resumed only under the same (`resume_state`).
PARTIAL_KEYS = ("method", "rank", "tokens", "lr", "token_lr", "lam", "steps", "batch", "res", "mirror", "seed", "dtype", "mask_lr",
                "sparsity", "hardening", "steer", "mask", "mlp_tokens", "max_token_norm", "prior")
# What every task of a run must share; STAMINA's ablations too (absent from other methods' runs).
RUN_KEYS = ("base_sha256", "method", "rank", "tokens_per_concept", "prior", "prior_prompts", "mask", "mlp_tokens", "hardening",
            "sparsity", "steer", "max_token_norm")
# What a run (a partial checkpoint) made before a setting existed used.
OLD_RUNS, OLD_STAMINA_RUNS = {"prior": 0.0, "prior_prompts": None}, {"steer": False, "max_token_norm": None}


class TrainError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Data


def concepts(data):
    """Sorted concept folders -> [(word, folder)], `03_alice` -> `<alice>`. Hidden folders
    (`.ipynb_checkpoints`, `.git`, ...) are not concepts; two folders giving one word are refused."""
    data = Path(data)
    if not data.is_dir():
        raise TrainError(f"--data {data}: no such folder (it should hold one folder of images per concept)")
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TrainError(f"--data {data}: no concept folders in it")
    stream, seen = [], {}
    for f in folders:
        word = "<" + re.sub(r"\s", "_", re.sub(r"^[0-9]+[_-]", "", f.name).lower()) + ">"
        if not re.fullmatch(r"<[^<>\s]+>", word):
            raise TrainError(f"--data {f}: the folder name gives no concept word; rename it (e.g. 03_alice)")
        if word in seen:  # lower-cased above: `02_Alice` is `<alice>` too
            raise TrainError(f"--data {data}: folders {seen[word].name} and {f.name} both give the word {word}; rename one")
        seen[word] = f
        stream.append((word, f))
    return stream


def to_rgb(im):
    """Any PIL mode as 8-bit RGB: 16- and 32-bit grayscale scaled to 8 bits (a plain convert clips
    them to white), transparency composited on white, palette and CMYK converted."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # what PIL opens 16-bit grayscale files as
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    elif im.mode == "F":  # float images: taken as [0, 1]
        im = Image.fromarray((np.asarray(im, dtype=np.float64) * 255).clip(0, 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    return im.convert("RGB")


def load_images(folder, res):
    """Every image of a folder, any size or mode, EXIF-rotated, resized and centre-cropped to res,
    as (n, 3, res, res) in [-1, 1]. Hidden files (`._x.png` of macOS) are skipped; an image over PIL's
    size bound (Image.MAX_IMAGE_PIXELS, a decompression bomb's defence) is refused before it is decoded."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise TrainError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the bound, not only over twice it
                with Image.open(f) as im:
                    im = to_rgb(ImageOps.exif_transpose(im))
                    out.append(np.asarray(ImageOps.fit(im, (res, res), Image.BICUBIC)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise TrainError(f"{f}: too large to read safely ({e}); shrink it below {Image.MAX_IMAGE_PIXELS} pixels") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise TrainError(f"{f}: not a readable image ({type(e).__name__}); remove or replace it") from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------
# The run folder


def write_json(obj, path):
    # allow_nan=False: a bare NaN is not JSON; finite() guards what gets here
    write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", path)


def open_run(run_dir, settings):
    """The run's description, created on first use; a run never mixes base checkpoints or methods."""
    if not (Path(run_dir) / "run.json").exists():
        return {**settings, "tasks": []}
    run = read_run(run_dir)
    old = {**OLD_RUNS, **(OLD_STAMINA_RUNS if run["method"] == "stamina" else {})}
    run.update({k: v for k, v in old.items() if k not in run})  # appended: a run.json rewritten keeps its order
    for k in RUN_KEYS:
        if run.get(k) != settings.get(k):
            what = {"base_sha256": "base checkpoint", "prior_prompts": "prior prompts (digest)"}.get(k, k)
            same = f"pass --prior {run[k]:g}" if k == "prior" else "use the same one"
            raise TrainError(f"{Path(run_dir) / 'run.json'}: this run was made with {what} {run.get(k)!r}, not "
                             f"{settings.get(k)!r}; {same} or start a new --run folder")
    return run


@contextmanager
def run_lock(run_dir):
    """One train.py per run folder: an flock on `.lock`, which holds the holder's pid and host. The
    kernel drops the lock when its process dies however it dies, so a stale file (after a kill -9) is
    simply locked again; the file is unlinked while still locked, and a lock taken on a file that was
    meanwhile unlinked is retried. Creating it is also the check that the folder is writable, before
    any training."""
    path, created = run_dir / ".lock", not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Path(path).read_text().strip() or "another process"
                os.close(fd)
                raise TrainError(f"{run_dir}: in use by train.py ({holder}); wait for it to finish, or use another --run") from None
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder unlinked it between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    except OSError as e:
        raise TrainError(f"{run_dir}: cannot write in the run folder ({e.strerror}); make it writable or use another --run") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created and not any(run_dir.iterdir()):  # a new run refused before its first file leaves no folder
            run_dir.rmdir()


# ------------------------------------------------------------------------------------------------
# Several processes: torchrun --nproc_per_node N [--nnodes M ...] train.py ... --run-dir RUN
#
# torchrun's environment says which process this is (nanoGPT's pattern); without it there is one
# process, no process group, and every helper below is the identity. Every rank draws the whole
# global batch from the same seeded generator and trains on its slice; DDP averages the gradients,
# so the penalty, the same on every rank, counts once. Rank 0 alone holds the run lock, writes and
# prints; a refusal that any rank finds before training is raised on all of them (`together`).

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
STOPPED = ("this torchrun's processes were stopped: one of them failed or was killed (torchrun's report names it); "
           "the run folder keeps what was saved: run the same command again to resume from the last partial checkpoint")


def gather(obj):
    """Every rank's `obj` (picklable, small), in rank order; also a barrier."""
    if WORLD == 1:
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def share(obj):
    """Rank 0's `obj` on every rank; the other ranks wait for it."""
    if WORLD == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def together(fn):
    """fn() on every rank. A refusal on any rank (a file one node lacks, say) is raised on every rank,
    naming the first that refused, so that all stop before training and rank 0 says why in one line."""
    try:
        out, err = fn(), None
    except (TrainError, CheckpointError, OSError) as e:
        if WORLD == 1:
            raise
        out, err = None, str(e)
    for r, (err, host) in enumerate(gather((err, socket.gethostname()))):
        if err:
            raise TrainError(err if r == 0 else f"{err} (rank {r}, on {host})")
    return out


def stopped(*_):
    """Exit saying once that the processes were stopped (torchrun's SIGTERM, or a peer gone in a
    collective). A SIGTERM that arrives while this process exits is ignored: raised inside Python's
    exit handlers it would print the line a second time, in a traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(f"error: {STOPPED}" if RANK == 0 else 1)


def join_processes(args):
    """Join torchrun's process group and take this rank's device: GPU LOCAL_RANK with --device cuda."""
    dist.init_process_group()  # no backend named: gloo for CPU tensors, and NCCL for CUDA ones where torch has it
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all
    signal.signal(signal.SIGTERM, stopped)  # how torchrun stops the rest

    def device():
        if args.device not in ("cpu", "cuda"):
            raise TrainError(f"--device {args.device}: under torchrun pass --device cuda (each process takes the GPU of "
                             "its local rank) or cpu")
        n = torch.cuda.device_count()
        if args.device == "cuda" and LOCAL_RANK >= n:
            raise TrainError(f"torchrun starts {os.environ['LOCAL_WORLD_SIZE']} processes on {socket.gethostname()}, which has "
                             f"{n} CUDA device(s); start one process per GPU at most (--nproc_per_node), or pass --device cpu")
    together(device)
    if args.device == "cuda":
        torch.cuda.set_device(LOCAL_RANK)
        args.device = f"cuda:{LOCAL_RANK}"


def check_shared(run_dir):
    """Every rank must see the run folder rank 0 writes in: rank 0 writes a random word into it and
    every rank reads it back (a folder on a path that only some nodes share would split the run)."""
    probe, word = run_dir / ".shared", secrets.token_hex(8)
    if RANK == 0:
        probe.write_text(word)
    word = share(word)  # rank 0's, once written
    try:
        seen = probe.read_text() == word
    except OSError:
        seen = False
    seen = gather((seen, socket.gethostname()))
    if RANK == 0:
        probe.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise TrainError(f"--run-dir {run_dir}: {', '.join(blind)} cannot see the files rank 0 writes there; put the run "
                         "folder on a path that every node shares")


def check_same(inputs):
    """Every rank must train what rank 0 trains: the same settings, base checkpoint and images (paths
    may differ between nodes, contents may not)."""
    ranks = gather(inputs)
    for r, theirs in enumerate(ranks):
        diff = [f"{k} {v!r}, rank 0 {ranks[0].get(k)!r}" for k, v in theirs.items() if v != ranks[0].get(k)]
        if diff:
            raise TrainError(f"rank {r} was started on other inputs than rank 0 ({'; '.join(diff)}); give every node the "
                             "same command, checkpoint and data")


class Denoiser(nn.Module):
    """One step's forward, prompt tokens to predicted noise, as a module that holds the task's trainable
    parameters and nothing else (the frozen models sit in a list): what DDP wraps to average their
    gradients, without broadcasting or checking the base model's 10^9 weights."""

    def __init__(self, text_encoder, unet, params, args):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.models = [text_encoder, unet]
        self.autocast = dict(device_type="cuda", dtype=DTYPES[args.dtype],
                             enabled=args.device.startswith("cuda") and args.dtype != "fp32")

    def forward(self, ids, noisy, t):
        text_encoder, unet = self.models
        ctx = text_encoder(ids)
        with torch.autocast(**self.autocast):
            return unet(noisy.to(ctx.dtype), t, ctx)


# ------------------------------------------------------------------------------------------------
# Training one task


def resume_state(partial, trained_with, task):
    """The partial checkpoint of a task in training, if it was trained with exactly `trained_with`;
    otherwise it is discarded, said in one line: resuming it would mix two settings in one task."""
    if not partial.exists():
        return None
    try:
        saved = {**OLD_RUNS, **OLD_STAMINA_RUNS, **json.loads(read_metadata(partial).get("trained_with", "{}"))}
        state = read_state_dict(partial)
    except (CheckpointError, ValueError):
        saved, state = {"partial checkpoint": "unreadable"}, None
    now = json.loads(json.dumps(trained_with))  # as the file holds it (JSON), so equal settings compare equal
    if saved == now:
        return state
    diff = [f"{k} {saved.get(k, 'unrecorded')!r}, now {now.get(k)!r}" for k in {**saved, **now} if saved.get(k) != now.get(k)]
    print(f"task {task}: its partial checkpoint was trained with other settings ({'; '.join(diff)}); restarting the task")
    partial.unlink()
    return None


def finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def task_seed(seed, word):
    """The seed of a task's random draws (its fresh factors and tokens, then its batches and noise):
    from --seed and the concept, not from the task's place in the stream, so a concept starts alike
    alone and in any stream (the upper bound is then a paired comparison), and concepts trained alone
    at one --seed do not share one draw."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{word}".encode()).digest()[:7], "little")


def train_task(model, adapter, word, images, args, task, run_dir, trained_with):
    """Train one task; `trained_with` (every setting the result depends on) goes into the partial
    checkpoint, which is resumed only under the very same settings."""
    device, vae = args.device, model.vae
    unet = compile_unet(model.unet, device) if args.compile else model.unet  # after the adapter wrapped its layers
    seed = task_seed(args.seed, word)
    g = torch.Generator().manual_seed(seed)
    adapter.start_task(word, args.tokens, seed=seed)
    groups = adapter.param_groups()
    opt = torch.optim.AdamW([{"params": groups["factors"]}, {"params": groups["mask"], "lr": args.mask_lr},
                             {"params": groups["tokens"], "lr": args.token_lr}], lr=args.lr, weight_decay=0.0)
    partial = Path(run_dir) / f"task_{task:02d}.partial.safetensors"
    start = 0
    state = share(resume_state(partial, trained_with, task) if RANK == 0 else None)
    if state is not None:  # resume after a crash: factors, tokens, optimizer moments and the step
        start = int(state["step"])
        with torch.no_grad():
            for i, p in enumerate(adapter.trainable()):
                p.copy_(state[f"param.{i:04d}"])
                opt.state[p] = {k: state[f"adam.{i:04d}.{k}"].clone().to(p.device) for k in ADAM_STATE}
        g.set_state(state["generator"])
        print(f"task {task}: resuming at step {start}")
    # What stops a task whose loss or weights stop being finite: a NaN is never saved.
    stop = (f"task {task} {word}: the loss or the weights are no longer finite at step {{}}; stopped before saving them "
            f"(lower --lr, now {args.lr:g}, or --token-lr / --lam, and run again)")

    # VAE latents of the few images (and, with --mirror, their mirror images) once per task, as distribution parameters.
    with torch.no_grad():
        pixels = torch.cat([images, images.flip(-1)]) if args.mirror else images
        pixels = pixels.to(device, next(vae.parameters()).dtype)
        mean, logvar = (t.float() for t in vae.encode(pixels))
    ac = alphas_cumprod().to(device)
    lam = args.lam if adapter.penalized else 0.0
    rho = args.sparsity if adapter.hardening else 0.0
    denoiser = plain = Denoiser(model.text_encoder, unet, adapter.trainable(), args)
    if WORLD > 1:
        denoiser = DistributedDataParallel(denoiser)
    mine = slice(RANK * args.batch // WORLD, (RANK + 1) * args.batch // WORLD)  # this rank's slice of the global batch
    bar = tqdm(range(start, args.steps), desc=f"task {task} {word}", initial=start, total=args.steps, disable=RANK > 0)
    for step in bar:
        # The global batch, drawn alike on every rank: images, VAE noise, timesteps, noise, prompts.
        idx = torch.randint(len(mean), (args.batch,), generator=g)
        eps_z = torch.randn((args.batch, *mean.shape[1:]), generator=g)
        t = torch.randint(len(ac), (args.batch,), generator=g)
        noise = torch.randn(eps_z.shape, generator=g)
        templates = torch.randint(len(TEMPLATES), (args.batch,), generator=g)
        idx, eps_z, t, noise, templates = idx[mine], eps_z[mine].to(device), t[mine].to(device), noise[mine].to(device), templates[mine]
        x0 = model.vae.cfg.scale_factor * (mean[idx] + (0.5 * logvar[idx]).exp() * eps_z)
        a = ac[t][:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if adapter.hardening:  # STAMINA's masks in their training form, at this step's slope
            adapter.set_slope(slope(step, args.steps, adapter.hardening))
        ids = model.tokenizer([TEMPLATES[i].format(word) for i in templates.tolist()]).to(device)
        if args.prior:
            # The prior term: under a random base prompt, the same noisy latents, the model's prediction held
            # to that of the model before this task (drawn from g after the rest: a run without it is unchanged).
            pick = torch.randint(len(args.prior_captions), (args.batch,), generator=g)[mine].tolist()
            base_ids = model.tokenizer([args.prior_captions[i] for i in pick]).to(device)
            with torch.no_grad(), adapter.previous():
                # A copy: compiled on CUDA, the next UNet call (the training graph) reuses this graph's output memory.
                target = plain(base_ids, noisy, t).float().clone()
            # One forward for both halves: DDP averages the gradients of one forward per step.
            pred, base_pred = denoiser(torch.cat([ids, base_ids]), torch.cat([noisy, noisy]), torch.cat([t, t])).chunk(2)
        else:
            pred = denoiser(ids, noisy, t)
        mse = F.mse_loss(pred.float(), noise)
        loss = mse + lam * adapter.penalty() if lam else mse
        if args.prior:
            loss = loss + args.prior * F.mse_loss(base_pred.float(), target)
        if rho:
            loss = loss + rho * adapter.sparsity()
        values = torch.stack([mse.detach(), loss.detach()])
        if WORLD > 1:  # the global batch's loss, as one process has it; every rank then stops alike on a NaN
            dist.all_reduce(values)
            values /= WORLD
        mse_value, loss_value = values.tolist()
        if not math.isfinite(loss_value):
            raise TrainError(stop.format(step + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{mse_value:.4f}")
        if RANK == 0 and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            if not finite(adapter.trainable()):
                raise TrainError(stop.format(step + 1))
            # One file: parameters, AdamW moments, step and random state, so a resume is exact.
            state = {"step": torch.tensor(step + 1), "generator": g.get_state()}
            for i, p in enumerate(adapter.trainable()):
                state[f"param.{i:04d}"] = p
                state.update({f"adam.{i:04d}.{k}": opt.state[p][k] for k in ADAM_STATE})
            save_safetensors(state, partial, metadata={"trained_with": json.dumps(trained_with)})
    adapter.set_slope(None)  # the hard masks from here on: what is stored and folded
    if not finite(adapter.trainable()):
        raise TrainError(stop.format(args.steps))


@torch.no_grad()
def sample_grid(model, words, args, path):
    """One seeded sample of every concept learned so far: forgetting at a glance."""
    f = model.vae.cfg.downsample
    noise = torch.randn(len(words), model.unet.cfg.in_channels, args.res // f, args.res // f,
                        generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    cond = model.encode_text([f"a photo of {w}" for w in words])
    uncond = model.encode_text([""] * len(words))
    latents = ddim_sample(model.unet, cond, uncond, noise, args.grid_steps, args.cfg)
    save_png(image_grid(model.decode(latents)), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", type=int, required=True, help="bring the run up to this task (1-based)")
    p.add_argument("--data", help="folder with one sub-folder of images per concept (default with the tiny model: its world)")
    p.add_argument("--run", "--run-dir", dest="run", help="run folder: run.json and one small file per task; default: "
                   "runs/<data>-<method> (under torchrun spell it --run-dir: torchrun reads --run as its own --run-path)")
    p.add_argument("--ckpt", help="SD 1.x checkpoint; default: the first one in weights/, else the embedded tiny model")
    p.add_argument("--method", choices=METHODS, default="clora")
    # STAMINA's settings and ablations (--method stamina only; all but --mask-lr are fixed for a run).
    p.add_argument("--no-mask", dest="mask", action="store_false", help="stamina ablation: no masks (stacked LoRA, MLP tokens)")
    p.add_argument("--no-mlp-tokens", dest="mlp_tokens", action="store_false", help="stamina ablation: plain token rows")
    p.add_argument("--hardening", choices=HARDENING, help="how the masks harden in training (default: sigmoid-anneal)")
    p.add_argument("--sparsity", type=float, help="weight of the masks' sparsity term, >= 0 (SD 1.x: 1e-2)")
    p.add_argument("--mask-lr", type=float, help="learning rate of the mask MLPs (SD 1.x: 1e-2)")
    p.add_argument("--steer", action=argparse.BooleanOptionalAction,
                   help="a task's mask may open only entries no earlier task opened (default: off)")
    p.add_argument("--max-token-norm", type=float, help="stamina control: the concept's token rows rescaled to norm <= N "
                   "(default: unbounded)")
    # The settings below default per model (DEFAULTS): the paper's values on SD 1.x.
    p.add_argument("--rank", type=int, help="rank of A_t B_t (SD 1.x: 16)")
    p.add_argument("--lr", type=float, help="SD 1.x: 5e-4 (clora, lora), 5e-3 (ti), 5e-6 (kv)")
    p.add_argument("--token-lr", type=float, help="learning rate of the concept's token embeddings (SD 1.x and ti: --lr)")
    p.add_argument("--lam", type=float, help="C-LoRA's self-regularisation weight lambda (SD 1.x: 1e8)")
    p.add_argument("--prior", type=float, help="weight of the prior term, not in the papers: under base prompts the model "
                   "keeps the predictions it made before the task (SD 1.x: 0; the tiny model: %g)" % PRIOR_TINY)
    p.add_argument("--prior-prompts", help="the prior term's base prompts, one per line (default on the tiny model: its "
                   "world's captions; needed on SD 1.x with --prior)")
    p.add_argument("--steps", type=int, help="SD 1.x: 2000")
    p.add_argument("--res", type=int, help="training image size (SD 1.x: 512)")
    p.add_argument("--grid-steps", type=int, help="DDIM steps of the per-task sample grid (SD 1.x: 50)")
    p.add_argument("--cfg", type=float, help="guidance scale of the sample grid (SD 1.x: 7.5)")
    p.add_argument("--tokens", type=int, default=2, help="token embeddings per concept")
    p.add_argument("--batch", type=int, help="images per step (SD 1.x: 1)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, help="train on the mirror images too (SD 1.x: yes; "
                   "the tiny world: no, its marks sit on one side)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint the task in training every N steps")
    p.add_argument("--overwrite", action="store_true", help="retrain task --task even if the run has it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="on CUDA, bf16/fp16 autocast for the UNet")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet's training step, Triton-free (cudagraphs on CUDA)")
    args = p.parse_args(argv)
    try:
        run(args)
    except (TrainError, CheckpointError) as e:
        sys.exit(f"error: {e}" if RANK == 0 else 1)
    except OSError as e:  # a file that cannot be read or written, named (writes say so themselves: atomic_write)
        sys.exit(f"error: {e.filename or args.run}: {e.strerror or e}" if RANK == 0 else 1)
    except RuntimeError as e:  # a collective whose peer is gone (NCCL: a DistError; gloo: "Connection closed by peer")
        if WORLD == 1 or not (isinstance(e, dist.DistError) or "closed by peer" in str(e)):
            raise
        stopped()
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_defaults(args, ckpt):
    """Fill the settings not given from the model's defaults; the tiny model also defaults --data."""
    name = read_metadata(ckpt).get("model", "sd1")
    defaults = DEFAULTS.get(name, DEFAULTS["sd1"])
    for k in SETTINGS + STAMINA:
        if getattr(args, k) is None:
            setattr(args, k, defaults[k][args.method] if k in PER_METHOD else defaults[k])
    if args.token_lr is None:
        args.token_lr = args.lr
    if args.data is None:
        if name != "tiny-world":
            raise TrainError("--data is required with an SD checkpoint: a folder with one sub-folder of images per concept")
        WORLD_DATA.mkdir(parents=True, exist_ok=True)
        fd = os.open(WORLD_DATA, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # torchrun's processes on one machine: one writes, the others find it written
            args.data = world.write_concepts(WORLD_DATA)
        finally:
            os.close(fd)
        print(f"data: the world's concept stream in {args.data}/ ({len(world.CONCEPTS)} concepts)")
    args.run = args.run or f"runs/{Path(args.data).name}-{args.method}"
    if METHODS[args.method][0] is None:  # ti: no base prompt holds its tokens, so the term is zero; recorded as off
        args.prior, args.prior_prompts = 0.0, None
    args.prior_captions = prior_captions(args, name)
    args.prior_digest = hashlib.sha256("\n".join(args.prior_captions).encode()).hexdigest() if args.prior else None


def prior_captions(args, name):
    """The prior term's base prompts: --prior-prompts, else on the tiny model its world's captions; [] without the term.
    A prompt naming a concept is refused: the term would then train that concept's token rows."""
    if not args.prior:
        if args.prior_prompts:
            raise TrainError(f"--prior-prompts {args.prior_prompts}: the prior term is off (--prior {args.prior:g}); pass --prior W too")
        return []
    if args.prior_prompts:
        try:
            lines = [line.strip() for line in Path(args.prior_prompts).read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise TrainError(f"--prior-prompts {args.prior_prompts}: cannot be read ({getattr(e, 'strerror', None) or e}); "
                             "pass a text file with one prompt per line") from None
        if not any(lines):
            raise TrainError(f"--prior-prompts {args.prior_prompts}: no prompts in it; write one prompt per line")
        named = [line for line in lines if re.search(r"<[^<>\s]+>", line)]
        if named:
            raise TrainError(f"--prior-prompts {args.prior_prompts}: {named[0]!r} names a concept; base prompts name none")
        return [line for line in lines if line]
    if name != "tiny-world":
        raise TrainError(f"--prior {args.prior:g} on SD 1.x needs --prior-prompts FILE: prompts of what the model should "
                         "keep drawing (e.g. 'a photo of a person'), one per line")
    return world.base_captions(PRIOR_CAPTIONS, seed="prior")


def check_args(args):
    """Every range, before any work: a bad value is one line, never a traceback halfway through."""
    ok = lambda x: x is None or (math.isfinite(x) and x >= 0)  # noqa: E731  (None: the model's default)
    rules = [("task", args.task >= 1, "a task number, from 1"), ("steps", args.steps is None or args.steps >= 1, ">= 1"),
             ("rank", args.rank is None or args.rank >= 1, ">= 1"), ("tokens", args.tokens >= 1, ">= 1"),
             ("batch", args.batch is None or args.batch >= 1, ">= 1"), ("save-every", args.save_every >= 0, ">= 0 (0: never)"),
             ("grid-steps", args.grid_steps is None or 1 <= args.grid_steps <= MAX_STEPS, f"in 1..{MAX_STEPS}"),
             ("res", args.res is None or (args.res > 0 and args.res % 8 == 0), "a positive multiple of 8"),
             ("lr", ok(args.lr), "finite and >= 0"), ("token-lr", ok(args.token_lr), "finite and >= 0"),
             ("lam", ok(args.lam), "finite and >= 0"), ("prior", ok(args.prior), "finite and >= 0"), ("mask-lr", ok(args.mask_lr), "finite and >= 0"),
             ("cfg", args.cfg is None or math.isfinite(args.cfg), "finite")]
    for name, good, what in rules:
        if not good:
            raise TrainError(f"--{name} {getattr(args, name.replace('-', '_'))}: must be {what}")


def check_stamina(args):
    """A setting that the method would not use is an error, not ignored: STAMINA's flags with another
    method, the masks' flags with --no-mask, lambda with a method that has no penalty; so is a sparsity
    weight that is negative or not finite."""
    given = [f"--{'no-' if getattr(args, k) is False else ''}{k.replace('_', '-')}" for k in STAMINA if getattr(args, k) is not None]
    if args.method == "stamina" and not args.mask and given:
        raise TrainError(f"{', '.join(given)}: settings of the masks, which --no-mask turns off")
    given += [f"--no-{k.replace('_', '-')}" for k in ("mask", "mlp_tokens") if not getattr(args, k)]
    given += ["--max-token-norm"] * (args.max_token_norm is not None)
    if given and args.method != "stamina":
        raise TrainError(f"{', '.join(given)}: settings of --method stamina, not of {args.method}")
    if args.lam is not None and not METHODS[args.method][1]:
        raise TrainError(f"--lam: C-LoRA's penalty weight; --method {args.method} has no penalty (pass --method clora, or no --lam)")
    if args.sparsity is not None and not (math.isfinite(args.sparsity) and args.sparsity >= 0):
        raise TrainError(f"--sparsity {args.sparsity}: the sparsity weight must be finite and >= 0")
    if args.max_token_norm is not None and not (math.isfinite(args.max_token_norm) and args.max_token_norm > 0):
        raise TrainError(f"--max-token-norm {args.max_token_norm}: must be finite and > 0")


def prepare(args):
    """Every check that needs no run folder, the defaults filled in: (checkpoint, concept stream, run settings)."""
    check_args(args)
    check_stamina(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    ckpt = find_checkpoint(args.ckpt)
    if not ckpt.is_file():
        raise TrainError(f"--ckpt {ckpt}: no such file")
    resolve_defaults(args, ckpt)
    if Path(args.run).exists() and not Path(args.run).is_dir():
        raise TrainError(f"--run {args.run}: a file, not a folder; pass a run folder (new or existing)")
    stream = concepts(args.data)
    if not 1 <= args.task <= len(stream):
        raise TrainError(f"--task {args.task}: {args.data} has {len(stream)} concept folders (tasks 1-{len(stream)})")
    settings = {"base_checkpoint": str(ckpt), "base_sha256": sha256(ckpt), "method": args.method, "rank": args.rank,
                "tokens_per_concept": args.tokens, "prior": args.prior, "prior_prompts": args.prior_digest}
    if args.method == "stamina":
        settings.update(mask=args.mask, mlp_tokens=args.mlp_tokens, hardening=args.hardening, sparsity=args.sparsity,
                        steer=args.steer, max_token_norm=args.max_token_norm)
    if args.batch % WORLD:
        raise TrainError(f"--batch {args.batch}: the global batch must be a multiple of the {WORLD} processes, each of which "
                         f"trains on an equal slice of it; pass --batch {WORLD} (or a multiple), or start fewer processes")
    return ckpt, stream, settings


def run(args):
    if WORLD > 1:
        join_processes(args)
    ckpt, stream, settings = together(lambda: prepare(args))
    run_dir = Path(args.run)
    with run_lock(run_dir) if RANK == 0 else nullcontext():
        if RANK == 0:
            for tmp in stale_temps(run_dir):  # what a kill in the middle of an atomic write left; the lock is ours
                tmp.unlink()
        if WORLD > 1:
            check_shared(run_dir)
        train_run(args, ckpt, stream, settings, run_dir)


def read_inputs(args, stream, settings, run_dir):
    """The run's description, the tasks to train and all their images: every image of every task to
    train is read (and checked) before anything is trained or written."""
    state = open_run(run_dir, settings)
    later = [t["task"] for t in state["tasks"] if t["task"] > args.task]
    if args.overwrite and later:
        raise TrainError(f"--overwrite of task {args.task} would leave tasks {later} built on the old one; start a new --run")
    done = {t["task"] for t in state["tasks"]}
    to_train = [t for t in range(1, args.task + 1) if t not in done or (args.overwrite and t == args.task)]
    return state, {t: load_images(stream[t - 1][1], args.res) for t in to_train}


def train_run(args, ckpt, stream, settings, run_dir):
    state, images = together(lambda: read_inputs(args, stream, settings, run_dir))
    done = {t["task"]: t for t in state["tasks"]}
    digests = {t: hashlib.sha256(pixels.numpy().tobytes()).hexdigest() for t, pixels in images.items()}
    if WORLD > 1:
        check_same({**{"--" + k.replace("_", "-"): v for k, v in vars(args).items()
                       if k not in ("data", "run", "ckpt", "device", "prior_prompts", "prior_captions", "prior_digest")},
                    "prior prompts (digest)": args.prior_digest,
                    "base checkpoint": settings["base_sha256"], "concepts": [w for w, _ in stream],
                    **{f"images of task {t}": d for t, d in digests.items()}})
    model = StableDiffusion.load(ckpt, args.device, torch.float32)
    if args.res % size_multiple(model):
        raise TrainError(f"--res {args.res}: must be a multiple of {size_multiple(model)} for this model")
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, args.method, args.rank, args.mask, args.mlp_tokens,
                    args.hardening, args.steer, args.max_token_norm)
    for task, (word, folder) in enumerate(stream[: args.task], start=1):
        grid, partial = run_dir / f"grid_task_{task:02d}.png", run_dir / f"task_{task:02d}.partial.safetensors"
        if task not in images:
            if done[task]["word"] != word:
                raise TrainError(f"task {task} of the run is {done[task]['word']}, but the data's folder {task} is {word}")
            try:
                adapter.load_task(word, read_task(run_dir, done[task], args.method))
            except ValueError as e:
                raise TrainError(f"{task_file(run_dir, task)}: {e}") from None
            print(f"task {task} {word}: kept from the run")
            if RANK == 0:
                partial.unlink(missing_ok=True)  # a kill between run.json and its removal
                if not grid.exists():  # a kill between run.json and the task's grid
                    sample_grid(model, adapter.words, args, grid)
            continue
        print(f"task {task} {word}: training ({args.method}, {args.steps} steps)"
              + ("" if task == args.task else f", since the run lacks it and --task is {args.task}"))
        if RANK == 0 and args.overwrite and task == args.task and partial.exists():
            print(f"task {task}: --overwrite discards its partial checkpoint")
            partial.unlink()
        pixels = images.pop(task)
        trained_with = {"task": task, "word": word, "data": digests[task],
                        "base_sha256": settings["base_sha256"], "past": [done[t].get("sha256") for t in range(1, task)],
                        **{k: getattr(args, k) for k in PARTIAL_KEYS}, "prior_prompts": args.prior_digest}
        train_task(model, adapter, word, pixels, args, task, run_dir, trained_with)
        tensors, norms = adapter.task_tensors(), adapter.delta_norms()
        if not (finite(tensors.values()) and all(map(math.isfinite, norms.values()))):
            raise TrainError(f"task {task} {word}: its weights overflow (delta norm {norms['total']}); stopped before "
                             f"saving them (lower --lr, now {args.lr:g}, and run again)")
        record = None
        if RANK == 0:  # the one writer; every rank holds the same weights
            path = task_file(run_dir, task)
            save_safetensors(tensors, path, metadata={"word": word, "task": task, "method": args.method})
            # The settings the task was trained with, and where it ran.
            record = {"task": task, "word": word, "folder": folder.name, "steps": args.steps, "lr": args.lr,
                      "token_lr": args.token_lr, "lam": args.lam, "mirror": args.mirror, "seed": args.seed, "batch": args.batch,
                      "res": args.res, "dtype": args.dtype, "device": args.device, "processes": WORLD, "file": path.name,
                      "sha256": sha256(path), "delta_norm": norms}
            if args.method == "stamina":
                record.update(mask_lr=args.mask_lr, mask_density=adapter.mask_density(), taken=adapter.taken_density())
            done[task] = record
            state["tasks"] = [done[t] for t in sorted(done)]
            write_json(state, run_dir / "run.json")
            partial.unlink(missing_ok=True)
        done[task] = share(record)  # the other ranks wait for the writes, and know the task's digest too
        print(f"task {task} {word}: delta norm {norms['total']:.4g} (K {norms['to_k']:.4g}, V {norms['to_v']:.4g})")
        adapter.finish_task()
        if RANK == 0:
            sample_grid(model, adapter.words, args, grid)
    print(f"run {run_dir} holds tasks 1-{args.task}: {' '.join(adapter.words)}")


if __name__ == "__main__":
    main()

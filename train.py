"""Learn concepts one task at a time into one SD 1.x model, with C-LoRA (or STAMINA, or a baseline),
keeping every earlier concept and no old photo.

    python train.py --task 3 --data data/faces --run runs/faces --ckpt weights/v1-5-pruned-emaonly.safetensors
    python train.py --task 1 --data data/faces --run runs/faces-lora --method lora
    python train.py --task 3 --data data/faces --run runs/faces-st --method stamina --no-mlp-tokens   # an ablation
    python train.py --task 2 --data data/faces --run runs/faces --overwrite      # retrain task 2 only

`--data` holds one folder of images per concept; sorted folder order is the task order and the
folder name gives the concept word (`03_alice/` -> `<alice>`). `--task N` brings the run up to
task N: missing earlier tasks are trained first, tasks already in the run are kept. A run folder holds
`run.json` and one small `task_NN.safetensors` per task (its delta factors and token embeddings),
plus `grid_task_NN.png`: one sample of every concept learned so far.

With no SD checkpoint (no --ckpt, none in weights/), the embedded tiny model and the concept stream of
`world.py` are the default, and so is `--run runs/world-v2-<method>`: `python train.py --task 3` runs as is.
Defaults of the training settings are per model: the paper's for SD 1.x, tuned ones for the tiny model.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import world
from checkpoint import CheckpointError, atomic_write, read_metadata, read_state_dict, save_safetensors, sha256
from clora import HARDENING, METHODS, CLoRA, slope, task_file
from sample import DTYPES, StableDiffusion, alphas_cumprod, compile_unet, ddim_sample, find_checkpoint, image_grid, save_png

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# No class word: the concept word alone carries the identity (the paper's setting).
TEMPLATES = ["a photo of {}", "a rendering of {}", "a cropped photo of {}", "the photo of {}", "a close-up photo of {}",
             "a bright photo of {}", "a good photo of {}", "a photo of the {}", "a dark photo of {}", "{}"]
# Per-model defaults, keyed by the checkpoint's metadata "model" (none: SD 1.x). SD 1.x: the paper's
# settings. The tiny model: chosen on it (README, "The embedded default"); its lambda is scaled to the
# size of its weights and deltas, as the paper's 1e8 is to SD 1.5's. STAMINA's (only the abstract is
# known): its LoRA settings are the paper's LoRA settings; mask_lr, sparsity and hardening are ours,
# untested on SD 1.x, and provisional on the tiny model (docs/stamina_section.md).
DEFAULTS = {
    "sd1": dict(rank=16, lam=1e8, steps=2000, batch=1, res=512, grid_steps=50, cfg=7.5,
                lr={"clora": 5e-4, "lora": 5e-4, "ti": 5e-3, "kv": 5e-6, "stamina": 5e-4}, token_lr=dict.fromkeys(METHODS),
                mask_lr=1e-2, sparsity=1e-2, hardening="sigmoid-anneal"),
    "tiny-world": dict(rank=8, lam=1e3, steps=250, batch=8, res=world.SIZE, grid_steps=20, cfg=3.0,
                       lr={"clora": 1e-2, "lora": 1e-2, "ti": 5e-2, "kv": 1e-3, "stamina": 1e-2},
                       token_lr={"clora": 5e-2, "lora": 5e-2, "ti": None, "kv": 5e-2, "stamina": 5e-2},
                       mask_lr=1e-2, sparsity=1e-2, hardening="sigmoid-anneal"),
}
PER_METHOD = ("lr", "token_lr")  # settings given per method; a token_lr of None means: the tokens train at lr
SETTINGS = ("rank", "lam", "steps", "batch", "res", "grid_steps", "cfg", "lr", "token_lr")
STAMINA = ("mask_lr", "sparsity", "hardening")  # settings of --method stamina alone, defaulted per model too
WORLD_DATA = Path(f"data/world-v{world.VERSION}")  # versioned: a folder of another world's images is never reused
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
# What every task of a run must share; STAMINA's ablations too (absent from other methods' runs).
RUN_KEYS = ("base_sha256", "method", "rank", "tokens_per_concept", "mask", "mlp_tokens", "hardening", "sparsity")


class TrainError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Data


def concepts(data):
    """Sorted concept folders -> [(word, folder)], `03_alice` -> `<alice>`."""
    data = Path(data)
    if not data.is_dir():
        raise TrainError(f"--data {data}: no such folder (it should hold one folder of images per concept)")
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    if not folders:
        raise TrainError(f"--data {data}: no concept folders in it")
    return [(f"<{re.sub(r'^[0-9]+[_-]', '', f.name).lower().replace(' ', '_')}>", f) for f in folders]


def load_images(folder, res):
    """Every image of a folder, any size or mode, EXIF-rotated, resized and centre-cropped to res,
    as (n, 3, res, res) in [-1, 1]."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                out.append(np.asarray(ImageOps.fit(im, (res, res), Image.BICUBIC)))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise TrainError(f"{f}: not a readable image ({type(e).__name__}); remove or replace it") from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------
# The run folder


def write_json(obj, path):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")


def open_run(run_dir, settings):
    """The run's description, created on first use; a run never mixes base checkpoints or methods."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return {**settings, "tasks": []}
    run = json.loads(path.read_text())
    for k in RUN_KEYS:
        if run.get(k) != settings.get(k):
            what = "base checkpoint" if k == "base_sha256" else k
            raise TrainError(f"{path}: this run was made with {what} {run.get(k)!r}, not {settings.get(k)!r}; "
                             "use the same one or start a new --run folder")
    return run


# ------------------------------------------------------------------------------------------------
# Training one task


def train_task(model, adapter, word, images, args, task, run_dir):
    device, vae = args.device, model.vae
    unet = compile_unet(model.unet, device) if args.compile else model.unet  # after the adapter wrapped its layers
    g = torch.Generator().manual_seed(args.seed * 1000 + task)
    adapter.start_task(word, args.tokens, seed=args.seed * 1000 + task)
    groups = adapter.param_groups()
    opt = torch.optim.AdamW([{"params": groups["factors"]}, {"params": groups["mask"], "lr": args.mask_lr},
                             {"params": groups["tokens"], "lr": args.token_lr}], lr=args.lr, weight_decay=0.0)
    partial = Path(run_dir) / f"task_{task:02d}.partial.safetensors"
    start = 0
    if partial.exists():  # resume after a crash: factors, tokens, optimizer moments and the step
        state = read_state_dict(partial)
        start = int(state["step"])
        with torch.no_grad():
            for i, p in enumerate(adapter.trainable()):
                p.copy_(state[f"param.{i:04d}"])
                opt.state[p] = {k: state[f"adam.{i:04d}.{k}"].clone().to(p.device) for k in ADAM_STATE}
        g.set_state(state["generator"])
        print(f"task {task}: resuming at step {start}")

    # VAE latents of the few images (and their mirror images) once per task, as distribution parameters.
    with torch.no_grad():
        pixels = torch.cat([images, images.flip(-1)]).to(device, next(vae.parameters()).dtype)
        mean, logvar = (t.float() for t in vae.encode(pixels))
    ac = alphas_cumprod().to(device)
    lam = args.lam if adapter.penalized else 0.0
    rho = args.sparsity if adapter.hardening else 0.0
    bar = tqdm(range(start, args.steps), desc=f"task {task} {word}", initial=start, total=args.steps)
    for step in bar:
        idx = torch.randint(len(mean), (args.batch,), generator=g)
        eps_z = torch.randn(mean[idx].shape, generator=g).to(device)
        x0 = model.vae.cfg.scale_factor * (mean[idx] + (0.5 * logvar[idx]).exp() * eps_z)
        t = torch.randint(len(ac), (args.batch,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a = ac[t][:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if adapter.hardening:  # STAMINA's masks in their training form, at this step's slope
            adapter.set_slope(slope(step, args.steps, adapter.hardening))
        prompts = [TEMPLATES[i].format(word) for i in torch.randint(len(TEMPLATES), (args.batch,), generator=g).tolist()]
        ctx = model.text_encoder(model.tokenizer(prompts).to(device))
        with torch.autocast("cuda", dtype=DTYPES[args.dtype], enabled=device.startswith("cuda") and args.dtype != "fp32"):
            pred = unet(noisy.to(ctx.dtype), t, ctx)
        mse = F.mse_loss(pred.float(), noise)
        loss = mse + lam * adapter.penalty() if lam else mse
        if rho:
            loss = loss + rho * adapter.sparsity()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{mse.item():.4f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            # One file: parameters, AdamW moments, step and random state, so a resume is exact.
            state = {"step": torch.tensor(step + 1), "generator": g.get_state()}
            for i, p in enumerate(adapter.trainable()):
                state[f"param.{i:04d}"] = p
                state.update({f"adam.{i:04d}.{k}": opt.state[p][k] for k in ADAM_STATE})
            save_safetensors(state, partial)
    adapter.set_slope(None)  # the hard masks from here on: what is stored and folded
    return partial


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
    p.add_argument("--run", help="run folder: run.json and one small file per task; default: runs/<data>-<method>")
    p.add_argument("--ckpt", help="SD 1.x checkpoint; default: the first one in weights/, else the embedded tiny model")
    p.add_argument("--method", choices=METHODS, default="clora")
    # STAMINA's settings and ablations (--method stamina only; the four below are fixed for a run).
    p.add_argument("--no-mask", dest="mask", action="store_false", help="stamina ablation: no masks (stacked LoRA, MLP tokens)")
    p.add_argument("--no-mlp-tokens", dest="mlp_tokens", action="store_false", help="stamina ablation: plain token rows")
    p.add_argument("--hardening", choices=HARDENING, help="how the masks harden in training (default: sigmoid-anneal)")
    p.add_argument("--sparsity", type=float, help="weight of the masks' sparsity term, >= 0 (SD 1.x: 1e-2)")
    p.add_argument("--mask-lr", type=float, help="learning rate of the mask MLPs (SD 1.x: 1e-2)")
    # The settings below default per model (DEFAULTS): the paper's values on SD 1.x.
    p.add_argument("--rank", type=int, help="rank of A_t B_t (SD 1.x: 16)")
    p.add_argument("--lr", type=float, help="SD 1.x: 5e-4 (clora, lora), 5e-3 (ti), 5e-6 (kv)")
    p.add_argument("--token-lr", type=float, help="learning rate of the concept's token embeddings (SD 1.x and ti: --lr)")
    p.add_argument("--lam", type=float, help="C-LoRA's self-regularisation weight lambda (SD 1.x: 1e8)")
    p.add_argument("--steps", type=int, help="SD 1.x: 2000")
    p.add_argument("--res", type=int, help="training image size (SD 1.x: 512)")
    p.add_argument("--grid-steps", type=int, help="DDIM steps of the per-task sample grid (SD 1.x: 50)")
    p.add_argument("--cfg", type=float, help="guidance scale of the sample grid (SD 1.x: 7.5)")
    p.add_argument("--tokens", type=int, default=2, help="token embeddings per concept")
    p.add_argument("--batch", type=int, help="images per step (SD 1.x: 1)")
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
        sys.exit(f"error: {e}")


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
        args.data = world.write_concepts(WORLD_DATA)
        print(f"data: the world's concept stream in {args.data}/ ({len(world.CONCEPTS)} concepts)")
    args.run = args.run or f"runs/{Path(args.data).name}-{args.method}"


def check_stamina(args):
    """STAMINA's flags with another method, or a negative sparsity weight, are errors, not ignored."""
    given = [f"--{k.replace('_', '-')}" for k in STAMINA if getattr(args, k) is not None]
    given += [f"--no-{k.replace('_', '-')}" for k in ("mask", "mlp_tokens") if not getattr(args, k)]
    if given and args.method != "stamina":
        raise TrainError(f"{', '.join(given)}: settings of --method stamina, not of {args.method}")
    if args.sparsity is not None and not args.sparsity >= 0:
        raise TrainError(f"--sparsity {args.sparsity}: the sparsity weight must be >= 0")


def run(args):
    check_stamina(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    ckpt = find_checkpoint(args.ckpt)
    if not ckpt.is_file():
        raise TrainError(f"--ckpt {ckpt}: no such file")
    resolve_defaults(args, ckpt)
    stream = concepts(args.data)
    if not 1 <= args.task <= len(stream):
        raise TrainError(f"--task {args.task}: {args.data} has {len(stream)} concept folders (tasks 1-{len(stream)})")
    settings = {"base_checkpoint": str(ckpt), "base_sha256": sha256(ckpt), "method": args.method, "rank": args.rank,
                "tokens_per_concept": args.tokens}
    if args.method == "stamina":
        settings.update(mask=args.mask, mlp_tokens=args.mlp_tokens, hardening=args.hardening, sparsity=args.sparsity)
    run_dir = Path(args.run)
    state = open_run(run_dir, settings)
    done = {t["task"]: t for t in state["tasks"]}
    later = [t for t in done if t > args.task]
    if args.overwrite and later:
        raise TrainError(f"--overwrite of task {args.task} would leave tasks {later} built on the old one; start a new --run")
    to_train = [t for t in range(1, args.task + 1) if t not in done or (args.overwrite and t == args.task)]
    # Every image of every task to train is read (and checked) before anything is trained or written.
    images = {t: load_images(stream[t - 1][1], args.res) for t in to_train}
    model = StableDiffusion.load(ckpt, args.device, torch.float32)
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, args.method, args.rank, args.mask, args.mlp_tokens,
                    args.hardening)
    for task, (word, folder) in enumerate(stream[: args.task], start=1):
        if task not in to_train:
            if done[task]["word"] != word:
                raise TrainError(f"task {task} of the run is {done[task]['word']}, but the data's folder {task} is {word}")
            adapter.load_task(word, read_state_dict(task_file(run_dir, task)))
            print(f"task {task} {word}: kept from the run")
            continue
        print(f"task {task} {word}: training ({args.method}, {args.steps} steps)"
              + ("" if task == args.task else f", since the run lacks it and --task is {args.task}"))
        partial = train_task(model, adapter, word, images.pop(task), args, task, run_dir)
        save_safetensors(adapter.task_tensors(), task_file(run_dir, task), metadata={"word": word, "task": task})
        norms = adapter.delta_norms()
        record = {"task": task, "word": word, "folder": folder.name, "steps": args.steps, "lr": args.lr,
                  "token_lr": args.token_lr, "lam": args.lam, "file": task_file(run_dir, task).name, "delta_norm": norms}
        if args.method == "stamina":
            record.update(mask_lr=args.mask_lr, mask_density=adapter.mask_density())
        state["tasks"] = [t for t in state["tasks"] if t["task"] != task] + [record]
        state["tasks"].sort(key=lambda t: t["task"])
        write_json(state, run_dir / "run.json")
        partial.unlink(missing_ok=True)
        print(f"task {task} {word}: delta norm {norms['total']:.4g} (K {norms['to_k']:.4g}, V {norms['to_v']:.4g})")
        adapter.finish_task()
        sample_grid(model, adapter.words, args, run_dir / f"grid_task_{task:02d}.png")
    print(f"run {run_dir} holds tasks 1-{args.task}: {' '.join(adapter.words)}")


if __name__ == "__main__":
    main()

"""Score a continual run of the embedded world: how well every concept is generated after every task.

    python evaluate.py --run runs/world-v2-clora              # R matrix, plasticity, forgetting, plots
    python evaluate.py --run runs/long --every 10             # a long stream: full rows after tasks 10, 20, ...
    python evaluate.py --train-classifier                     # rebuild weights/embedded/classifier.safetensors

For a run of T tasks: R[i][j] = score of concept j after task i (j <= i), from `--n` images sampled
with the prompt "a photo of <word>" and the weights of tasks 1..i. R[j][j] is scored after every task
(plasticity: how well a concept is learned); the other cells of a row after every `--every`-th task
and the last. Two scores, both in the feature space of a small concept classifier trained on the
world's own images (not on any run):
- accuracy: the fraction of generated images that the classifier assigns to concept j, choosing among
  all the world's concepts (chance 1/50). Look-alikes differ only by their mark, so a sample of the
  right group without the right mark scores about 1/5 at best;
- MMD: the squared maximum mean discrepancy, with KID's kernel k(x, y) = (x.y / d + 1)^3, between the
  generated images and the concept's held-out real images (lower is better).
Forgetting of concept j = R[j][j] - R[T][j] (accuracy; for MMD the increase), averaged over j < T.
And, after the last task, whether the concepts stayed in their prompts (`kept`): "a photo of a face"
and "a photo of a building" (no concept word) should still draw their own kind of subject, and not a
concept the run learned; `kept` is the share of their samples the classifier places in a concept of the
prompt's kind that the run did not learn, averaged over the two prompts (a prompt whose every concept
the run learned has no right answer and is left out). A learned concept that takes over the base
prompts scores low, however well it is drawn.

The classifier is trained on its own split of concept images, each seen through the tiny model's
VAE half the time and degraded the way samples are (blur, a colour wash, blotches, faded colour, noise,
position shifts), so that it judges a concept by what a model can draw, not by the drawings' crisp
edges or true colours.

Writes into the run folder: eval.md (tables), eval.json (the matrices), eval_matrix.png (the accuracy
matrix as a picture) and eval_final.png (every concept after the last task, one row each); while it
scores, eval.partial.json, the cells scored so far, from which an interrupted call goes on.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import world
from checkpoint import CheckpointError, read_metadata, read_state_dict, save_safetensors, write_text
from clora import CLoRA, check_base, read_run, read_task, task_file
from sample import EMBEDDED, StableDiffusion, ddim_sample, image_grid, run_checkpoint, save_png

CLASSIFIER = EMBEDDED.parent / "classifier.safetensors"
STEPS, CFG = 15, 3.0  # how samples are drawn for scoring: DDIM steps, guidance scale
N_CLASSES = len(world.CONCEPTS)
INDEX = {f"<{name}>": j for j, (name, _) in enumerate(world.CONCEPTS)}  # concept word -> class
KINDS = ("face", "building")  # the world's two kinds of subject: "a photo of a face" is a base caption's start
PARTIAL = "eval.partial.json"  # the cells of a scoring in progress
VERSION = 2  # of what the scores mean, in eval.json's key: 2 added `kept`; scores of another version are made afresh


# ------------------------------------------------------------------------------------------------
# The concept classifier: the features both scores are computed in


class ConceptClassifier(nn.Module):
    """64x64 image in [-1, 1] -> 128-d features -> N_CLASSES logits. Four stride-2 convolutions."""

    def __init__(self, width=32):
        super().__init__()
        layers, ch = [], 3
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            ch = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(ch, N_CLASSES)

    def forward(self, x):
        return self.head(self.features(x))


def concept_batch(split, per_class):
    """(images, labels): `per_class` images of every concept from `split`."""
    x = [world.to_tensor_batch(world.concept_images(i, split, per_class)) for i in range(N_CLASSES)]
    return torch.from_numpy(np.concatenate(x)), torch.arange(N_CLASSES).repeat_interleave(per_class)


@torch.no_grad()
def through_vae(vae, x):
    """Images (N, 3, H, W) in [-1, 1] encoded and decoded by the model's VAE (the latent mean)."""
    return torch.cat([vae.decode(vae.encode(x[i:i + 256])[0]).clamp(-1, 1) for i in range(0, len(x), 256)])


def degrade(x, g):
    """The ways a sample differs from a drawing: blur, a colour wash over the whole image, blotches
    (low-frequency noise), faded colour, contrast and brightness shifts, pixel noise, a few pixels of
    shift. No mirror image: a mark's side is part of the concept, and the tiny model trains without
    mirroring (`train.DEFAULTS`). x: (N, 3, H, W) in [-1, 1]."""
    n, c, h, w = x.shape
    sigma = (torch.rand(n, generator=g) * 2.0).clamp(min=0.05)
    k = torch.exp(-torch.arange(-3, 4).float() ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]  # (n*c, 1, 7, 7): a Gaussian per image
    x = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (3, 3, 3, 3), mode="replicate"), kernel, groups=n * c).reshape(n, c, h, w)
    wash = 0.35 * torch.rand(n, 1, 1, 1, generator=g)  # blend toward one random colour
    x = x * (1 - wash) + wash * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    blotches = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.rand(n, 1, 1, 1, generator=g) * blotches
    fade = 0.3 * torch.rand(n, 1, 1, 1, generator=g)  # toward grey
    x = x * (1 - fade) + fade * x.mean(1, keepdim=True)
    gain = 1 + 0.25 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)  # per-channel colour shift
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = (x - mean) * contrast + mean
    x = x * gain + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5) + 0.06 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=g))
    return F.pad(x, (3, 3, 3, 3), mode="replicate")[:, :, 3 + dy:3 + dy + h, 3 + dx:3 + dx + w].clamp(-1, 1)


def train_classifier(path, vae, per_class=160, epochs=14, seed=0):
    """Trained on its own split of world images ("classifier"), half of them through the model's VAE,
    degraded afresh every epoch; tested on the held-out split that evaluation compares against.
    Saves the weights and the held-out accuracies (metadata)."""
    torch.manual_seed(seed)
    x, y = concept_batch("classifier", per_class)
    x = torch.cat([x[0::2], through_vae(vae, x[1::2])])
    y = torch.cat([y[0::2], y[1::2]])
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(degrade(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    acc = heldout_accuracy(model.eval(), vae)
    save_safetensors(model.state_dict(), path, metadata={**{f"heldout_accuracy_{k}": f"{v:.4f}" for k, v in acc.items()},
                                                           "world": str(world.VERSION), "per_class": str(per_class),
                                                           "made_by": "python evaluate.py --train-classifier"})
    print(f"wrote {path}: held-out accuracy {acc}")


@torch.no_grad()
def heldout_accuracy(model, vae):
    """On the world's held-out images of every concept: "real", as drawn; "vae", through the model's VAE."""
    x = torch.cat([heldout_images(j) for j in range(N_CLASSES)])
    y = torch.arange(N_CLASSES).repeat_interleave(world.N_HELDOUT)
    return {"real": (model(x).argmax(1) == y).float().mean().item(),
            "vae": (model(through_vae(vae, x)).argmax(1) == y).float().mean().item()}


def heldout_images(j):
    return torch.from_numpy(world.to_tensor_batch(world.concept_images(j, "heldout")))


def load_classifier(path=CLASSIFIER):
    if read_metadata(path).get("world") != str(world.VERSION):
        raise CheckpointError(f"{path}: a classifier of another world version; rebuild it: python evaluate.py --train-classifier")
    model = ConceptClassifier()
    model.load_state_dict(read_state_dict(path))
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Scores


def mmd2(x, y):
    """Unbiased squared MMD between feature sets x (n, d) and y (m, d), KID's cubic polynomial kernel."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


@torch.no_grad()
def generate(model, word, n, steps, cfg, seed):
    """n images of "a photo of <word>", (n, 3, 64, 64) in [-1, 1]."""
    f = model.vae.cfg.downsample
    noise = torch.randn(n, model.unet.cfg.in_channels, model.resolution // f, model.resolution // f,
                        generator=torch.Generator().manual_seed(seed))
    latents = ddim_sample(model.unet, model.encode_text([f"a photo of {word}"] * n), model.encode_text([""] * n),
                          noise, steps, cfg)
    return model.decode(latents).permute(0, 3, 1, 2).float() / 127.5 - 1


def concept_samples(model, word, j, n, steps, cfg, seed):
    """n images of concept j (its place in the stream) from the noise every scoring of it uses: the same
    after every task, so that a cell differs from another only by the model."""
    return generate(model, word, n, steps, cfg, seed + 1000 * j)


def kept(model, classifier, n, steps, cfg, seed, learned=()):
    """The share of n samples of "a photo of a face" and of "a photo of a building" that the classifier
    places in a concept of the prompt's own kind and not among `learned` (class indices), averaged over
    the two prompts. A kind whose every concept was learned has no right answer left and is left out;
    None when both are (a stream of all 50 concepts)."""
    kind = np.array([c["kind"] for _, c in world.CONCEPTS])
    shares = []
    for i, k in enumerate(KINDS):
        if set(np.flatnonzero(kind == k)) <= set(learned):
            continue
        pred = classifier(generate(model, f"a {k}", n, steps, cfg, seed + 100_000 + i)).argmax(1).numpy()  # apart from seed + 1000 j
        shares.append(np.mean((kind[pred] == k) & ~np.isin(pred, list(learned))))
    return float(np.mean(shares)) if shares else None


def world_model(run_dir):
    """The run's description and its base model, which must be the embedded model of this world."""
    run = read_run(run_dir)
    base = run_checkpoint(run)
    if not base.is_file():
        raise CheckpointError(f"{run_dir}: its base checkpoint {base} is missing")
    meta = read_metadata(base)
    if meta.get("model") != "tiny-world":
        raise CheckpointError(f"{run_dir}: evaluate.py scores runs on the embedded world model only (this run's base is {base})")
    if meta.get("world") != str(world.VERSION):
        raise CheckpointError(f"{run_dir}: made on world version {meta.get('world', '1')}, this is world {world.VERSION}; "
                              "retrain it (python train.py --task N) on the shipped model")
    check_base(run_dir, run, base, "; put that model back, or retrain the run on this one")  # the scores' key holds run.json's digest
    unknown = [t["word"] for t in run["tasks"] if t["word"] not in INDEX]
    if unknown:
        raise CheckpointError(f"{run_dir}: {unknown[0]} is not a concept of world {world.VERSION}; only runs on its concepts can be scored")
    return run, StableDiffusion.load(base)


@torch.no_grad()
def evaluate_run(run_dir, n=32, steps=STEPS, cfg=CFG, seed=0, every=1, classifier=None):
    """The score matrices of a run: after each task i, sample concept i, and every concept j <= i
    after every `every`-th task and the last one."""
    run, model = world_model(run_dir)
    classifier = classifier or load_classifier()
    real = {}
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, run["method"], run["rank"])
    T = len(run["tasks"])
    acc, mmd, last = np.full((T, T), np.nan), np.full((T, T), np.nan), []
    # A long stream's scoring takes hours: every scored cell goes to eval.partial.json at once, and a call that
    # finds the cells of the same scoring there (after a kill, in a later session) does not score them again.
    partial, key = Path(run_dir) / PARTIAL, scoring(run_dir, n, steps, cfg, seed, every)
    cells = read_partial(partial, key)
    for i, task in enumerate(run["tasks"]):
        adapter.load_task(task["word"], read_task(run_dir, task, run["method"]))
        row = range(i + 1) if (i + 1) % every == 0 or i == T - 1 else [i]
        for j in row:
            word = adapter.words[j]
            if (i, j) in cells:
                acc[i, j], mmd[i, j] = cells[i, j]
                if i == T - 1:  # eval_final.png's images of the concept (8 at most), drawn again with the cell's noise
                    last.append(concept_samples(model, word, j, min(n, 8), steps, cfg, seed))
                continue
            k = INDEX[word]
            if k not in real:
                real[k] = classifier.features(heldout_images(k))
            images = concept_samples(model, word, j, n, steps, cfg, seed)
            feats = classifier.features(images)
            acc[i, j] = (classifier.head(feats).argmax(1) == k).float().mean().item()
            mmd[i, j] = mmd2(feats, real[k])
            if i == T - 1:
                last.append(images)
            cells[i, j] = acc[i, j], mmd[i, j]
            write_text(json.dumps({"scored_with": key, "cells": [[*c, *v] for c, v in cells.items()]}) + "\n", partial)
    base_kept = kept(model, classifier, n, steps, cfg, seed, learned=[INDEX[w] for w in adapter.words])
    adapter.detach()
    return {"words": adapter.words, "acc": acc, "mmd": mmd, "kept": base_kept, "final_images": last,
            "delta_norms": [t["delta_norm"]["total"] for t in run["tasks"]]}


def scoring(run_dir, n=32, steps=STEPS, cfg=CFG, seed=0, every=1):
    """What a run's score matrices depend on: the settings, and the bytes of its base model, of the
    classifier and of every task file (a task retrained with --overwrite is scored afresh)."""
    run = read_run(run_dir)
    files = hashlib.sha256(run["base_sha256"].encode() + CLASSIFIER.read_bytes())
    for i in range(len(run["tasks"])):
        files.update(task_file(run_dir, i + 1).read_bytes())
    return {"n": n, "steps": steps, "cfg": cfg, "seed": seed, "every": every, "files": files.hexdigest(), "version": VERSION}


def same_cells(a, b):
    """Whether two scorings give every cell they both score the same value: all but which rows are full."""
    return {k: v for k, v in a.items() if k != "every"} == {k: v for k, v in b.items() if k != "every"}


def read_partial(path, key):
    """{(i, j): (accuracy, MMD)}: the cells an interrupted scoring of the same files and settings wrote."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {(i, j): (a, m) for i, j, a, m in old["cells"]} if same_cells(old["scored_with"], key) else {}


def scored(run_dir, key):
    """The matrices of the run's eval.json if it was scored as `key` asks, or more fully (every full row
    that key's every asks for among its full rows); else None. Lets a long experiment resume."""
    try:
        old = json.loads((Path(run_dir) / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    done = old.get("scored_with") or {}
    if not same_cells(done, key):
        return None
    T = len(old["acc"])  # the last row is always full; before it, rows i with (i + 1) % every == 0
    if any((i + 1) % done["every"] for i in range(T - 1) if (i + 1) % key["every"] == 0):
        return None
    return {"words": old["words"], "delta_norms": old["delta_norms"], "kept": old["kept"],
            **{k: np.array(old[k], dtype=float) for k in ("acc", "mmd")}}  # None (unscored) reads as NaN


def summary(res):
    """Mean plasticity R[j][j], final score R[T][j], forgetting over every concept but the last, and `kept`."""
    acc, mmd = res["acc"], res["mmd"]
    T = len(acc)
    forget_acc = float(np.mean([acc[j, j] - acc[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0
    forget_mmd = float(np.mean([mmd[T - 1, j] - mmd[j, j] for j in range(T - 1)])) if T > 1 else 0.0
    return {"plasticity_acc": float(np.mean(np.diag(acc))), "final_acc": float(acc[T - 1].mean()),
            "forgetting_acc": forget_acc, "final_mmd": float(mmd[T - 1].mean()), "forgetting_mmd": forget_mmd,
            "kept": res["kept"]}


def markdown(res, title):
    words, acc, mmd = res["words"], res["acc"], res["mmd"]
    s = summary(res)
    lines = [f"# {title}", "",
             f"accuracy right after learning {s['plasticity_acc']:.3f}, final {s['final_acc']:.3f}, forgetting "
             f"{s['forgetting_acc']:.3f}; final MMD {s['final_mmd']:.3f}, MMD forgetting {s['forgetting_mmd']:.3f}; "
             f"base prompts kept {'–' if s['kept'] is None else format(s['kept'], '.3f')}", ""]
    for name, m, fmt in (("accuracy", acc, "{:.2f}"), ("MMD", mmd, "{:.3f}")):
        lines += [f"{name}: R[i][j], row = after task i, column = concept j (R[j][j] after every task, full rows where scored)", "",
                  "| after task | " + " | ".join(words) + " | delta norm |", "|---" * (len(words) + 2) + "|"]
        for i in range(len(words)):
            cells = [fmt.format(m[i, j]) if j <= i and not np.isnan(m[i, j]) else "" for j in range(len(words))]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + f" | {res['delta_norms'][i]:.3g} |")
        lines.append("")
    return "\n".join(lines)


def matrix_png(acc, words, path, cell=40):
    """The accuracy matrix as a picture: green = recognised, red = not, blank where not scored."""
    T = len(acc)
    cell = min(cell, max(12, 1200 // (T + 1)))
    im = Image.new("RGB", ((T + 1) * cell, (T + 1) * cell), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for j, w in enumerate(words):
        d.text(((j + 1) * cell + 2, cell // 3), w[1:-1], fill=(0, 0, 0))
    for i in range(T):
        d.text((4, (i + 1) * cell + cell // 3), f"t{i + 1}", fill=(0, 0, 0))
        for j in range(i + 1):
            if np.isnan(acc[i, j]):
                continue
            a = float(acc[i, j])
            x, y = (j + 1) * cell, (i + 1) * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(int(230 * (1 - a)), int(200 * a), 60))
            if cell >= 30:
                d.text((x + 6, y + cell // 3), f"{a:.2f}", fill=(255, 255, 255))
    save_png(im, path)


def json_matrix(m):
    """A score matrix as nested lists, its unscored cells None: JSON has no NaN."""
    return np.where(np.isnan(m), None, m).tolist()


def write_outputs(res, run_dir, key=None):
    """eval.md, eval.json (with `key`, what scoring() says the scores depend on), eval_matrix.png and eval_final.png."""
    run_dir = Path(run_dir)
    write_text(markdown(res, f"{run_dir.name}: {len(res['words'])} tasks") + "\n", run_dir / "eval.md")
    nan_free = {k: json_matrix(res[k]) for k in ("acc", "mmd")}
    write_text(json.dumps({"words": res["words"], **nan_free, "delta_norms": res["delta_norms"], **summary(res),
                           "scored_with": key}, indent=1) + "\n",
               run_dir / "eval.json")
    matrix_png(res["acc"], res["words"], run_dir / "eval_matrix.png")
    final = torch.cat([x[:8] for x in res["final_images"]])  # 8 images of every concept, a row each
    save_png(image_grid(((final / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1), cols=8),
             run_dir / "eval_final.png")
    (run_dir / PARTIAL).unlink(missing_ok=True)  # its cells are all in eval.json now


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a train.py run folder on the embedded world model")
    p.add_argument("--n", type=int, default=32, help="images sampled per concept and scored cell")
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=CFG)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=1, help="score full rows after every N-th task (and the last)")
    p.add_argument("--train-classifier", action="store_true", help=f"train and write {CLASSIFIER.name}")
    args = p.parse_args(argv)
    if args.n < 2 or args.steps < 1 or args.every < 1:
        p.error("--n must be >= 2 (MMD needs two samples), --steps and --every >= 1")
    try:
        if args.train_classifier:
            train_classifier(CLASSIFIER, StableDiffusion.load(EMBEDDED).vae)
        if not args.run:
            if not args.train_classifier:
                p.error("pass --run RUN_FOLDER (or --train-classifier)")
            return
        key = scoring(args.run, args.n, args.steps, args.cfg, args.seed, args.every)
        res = evaluate_run(args.run, args.n, args.steps, args.cfg, args.seed, args.every)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    write_outputs(res, args.run, key)
    print(markdown(res, args.run))


if __name__ == "__main__":
    main()

"""Score a continual run of the embedded world: how well every concept is generated after every task.

    python evaluate.py --run runs/world-clora                 # R matrix, forgetting, plot, final grid
    python evaluate.py --train-classifier                     # rebuild weights/embedded/classifier.safetensors

For a run of T tasks: R[i][j] = score of concept j after task i (j <= i), from `--n` images sampled
with the prompt "a photo of <word>" and the weights of tasks 1..i. Two scores, both computed in the
feature space of a small concept classifier trained on the world's own images (not on any run):
- accuracy: the fraction of generated images that the classifier, choosing among the 10 concepts,
  assigns to concept j (higher is better; chance is 0.1). Its 11th class, "a base face", trains it to
  look at the identity details, but is left out of the choice: the tiny model's samples are softer
  than the world's drawings, and with it nearly every sample of every method, even of a concept
  trained alone, scored "base face", which told the methods apart by nothing;
- MMD: the squared maximum mean discrepancy, with KID's kernel k(x, y) = (x.y / d + 1)^3, between the
  generated images and the concept's held-out real images (lower is better).
Forgetting of concept j = R[j][j] - R[T][j] (accuracy; for MMD the increase), averaged over j < T.

Writes into the run folder: eval.md (tables), eval.json (the matrices), eval_matrix.png (the accuracy
matrix as a picture) and eval_final.png (every concept after the last task, one row each).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import world
from checkpoint import CheckpointError, read_state_dict, save_safetensors
from clora import CLoRA, read_run, task_file
from sample import EMBEDDED, StableDiffusion, ddim_sample, image_grid, save_png

CLASSIFIER = EMBEDDED.parent / "classifier.safetensors"
N_CLASSES = len(world.CONCEPTS) + 1  # the concepts, and "a face of the base distribution" (class 10)


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


def classifier_data(split, per_class):
    """(images, labels): `per_class` images of every concept from `split`, and as many base faces."""
    x = [world.to_tensor_batch(world.concept_images(i, split, per_class)) for i in range(len(world.CONCEPTS))]
    x.append(world.to_tensor_batch([im for im, _ in world.base_images(per_class, seed=f"classifier-{split}")]))
    return torch.from_numpy(np.concatenate(x)), torch.arange(N_CLASSES).repeat_interleave(per_class)


def train_classifier(path, per_class=300, epochs=8, seed=0):
    """Trained on its own split of world images ("classifier"), tested on the held-out split that
    evaluation compares against. Saves the weights and the held-out accuracy (metadata)."""
    torch.manual_seed(seed)
    x, y = classifier_data("classifier", per_class)
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    acc = heldout_accuracy(model.eval())
    save_safetensors(model.state_dict(), path, metadata={**{f"heldout_accuracy_{k}": f"{v:.4f}" for k, v in acc.items()},
                                                           "per_class": per_class, "made_by": "python evaluate.py --train-classifier"})
    print(f"wrote {path}: held-out accuracy {acc}")


def identify(logits):
    """The concept (0..9) an image looks most like: the classifier's choice among the concepts only."""
    return logits[:, :len(world.CONCEPTS)].argmax(1)


@torch.no_grad()
def heldout_accuracy(model):
    """On the world's held-out images: "all", 11-way over the concepts' images (the ones evaluation
    compares against) and base faces; "concepts", the 10-way choice evaluation uses, on the concepts' images."""
    x = torch.cat([heldout_images(j) for j in range(len(world.CONCEPTS))])
    base = world.to_tensor_batch([im for im, _ in world.base_images(world.N_HELDOUT, seed="classifier-heldout")])
    logits = model(torch.cat([x, torch.from_numpy(base)]))
    y = torch.arange(N_CLASSES).repeat_interleave(world.N_HELDOUT)
    return {"all": (logits.argmax(1) == y).float().mean().item(),
            "concepts": (identify(logits[:len(x)]) == y[:len(x)]).float().mean().item()}


def heldout_images(j):
    return torch.from_numpy(world.to_tensor_batch(world.concept_images(j, "heldout")))


def load_classifier(path=CLASSIFIER):
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


@torch.no_grad()
def evaluate_run(run_dir, n=12, steps=15, cfg=3.0, seed=0, classifier=None):
    """The score matrices of a run: after each task i, sample every concept j <= i and score it."""
    run = read_run(run_dir)
    model = StableDiffusion.load(run["base_checkpoint"])
    if model.name != "tiny-world":
        raise CheckpointError(f"{run_dir}: evaluate.py scores runs on the embedded world model only (this run's base is {model.name})")
    classifier = classifier or load_classifier()
    real = {j: classifier.features(heldout_images(j)) for j in range(len(world.CONCEPTS))}
    index = {f"<{name}>": j for j, (name, _) in enumerate(world.CONCEPTS)}
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, run["method"], run["rank"])
    T = len(run["tasks"])
    acc, mmd, last = np.full((T, T), np.nan), np.full((T, T), np.nan), []
    for i, task in enumerate(run["tasks"]):
        adapter.load_task(task["word"], read_state_dict(task_file(run_dir, task["task"])))
        for j, word in enumerate(adapter.words):
            images = generate(model, word, n, steps, cfg, seed + 1000 * j)  # the same noise for concept j after every task
            feats = classifier.features(images)
            acc[i, j] = (identify(classifier.head(feats)) == index[word]).float().mean().item()
            mmd[i, j] = mmd2(feats, real[index[word]])
            if i == T - 1:
                last.append(images)
    adapter.detach()
    return {"words": adapter.words, "acc": acc, "mmd": mmd, "final_images": last,
            "delta_norms": [t["delta_norm"]["total"] for t in run["tasks"]]}


def summary(res):
    """Average final score, and forgetting averaged over every concept but the last."""
    acc, mmd = res["acc"], res["mmd"]
    T = len(acc)
    forget_acc = float(np.mean([acc[j, j] - acc[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0
    forget_mmd = float(np.mean([mmd[T - 1, j] - mmd[j, j] for j in range(T - 1)])) if T > 1 else 0.0
    return {"final_acc": float(acc[T - 1].mean()), "forgetting_acc": forget_acc,
            "final_mmd": float(mmd[T - 1].mean()), "forgetting_mmd": forget_mmd}


def markdown(res, title):
    words, acc, mmd = res["words"], res["acc"], res["mmd"]
    s = summary(res)
    lines = [f"# {title}", "",
             f"final accuracy {s['final_acc']:.3f}, forgetting {s['forgetting_acc']:.3f}; "
             f"final MMD {s['final_mmd']:.3f}, MMD forgetting {s['forgetting_mmd']:.3f}", ""]
    for name, m, fmt in (("accuracy", acc, "{:.2f}"), ("MMD", mmd, "{:.3f}")):
        lines += [f"{name}: R[i][j], row = after task i, column = concept j", "",
                  "| after task | " + " | ".join(words) + " | delta norm |", "|---" * (len(words) + 2) + "|"]
        for i in range(len(words)):
            cells = [fmt.format(m[i, j]) if j <= i else "" for j in range(len(words))]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + f" | {res['delta_norms'][i]:.3g} |")
        lines.append("")
    return "\n".join(lines)


def matrix_png(acc, words, path, cell=40):
    """The accuracy matrix as a picture: green = recognised, red = not, blank above the diagonal."""
    T = len(acc)
    im = Image.new("RGB", ((T + 1) * cell, (T + 1) * cell), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for j, w in enumerate(words):
        d.text(((j + 1) * cell + 2, cell // 3), w[1:-1], fill=(0, 0, 0))
    for i in range(T):
        d.text((4, (i + 1) * cell + cell // 3), f"t{i + 1}", fill=(0, 0, 0))
        for j in range(i + 1):
            a = float(acc[i, j])
            x, y = (j + 1) * cell, (i + 1) * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(int(230 * (1 - a)), int(200 * a), 60))
            d.text((x + 6, y + cell // 3), f"{a:.2f}", fill=(255, 255, 255))
    save_png(im, path)


def write_outputs(res, run_dir):
    run_dir = Path(run_dir)
    (run_dir / "eval.md").write_text(markdown(res, f"{run_dir.name}: {len(res['words'])} tasks") + "\n")
    (run_dir / "eval.json").write_text(json.dumps({"words": res["words"], "acc": res["acc"].tolist(),
                                                   "mmd": res["mmd"].tolist(), "delta_norms": res["delta_norms"],
                                                   **summary(res)}, indent=1) + "\n")
    matrix_png(res["acc"], res["words"], run_dir / "eval_matrix.png")
    final = torch.cat([x[:8] for x in res["final_images"]])  # 8 images of every concept, a row each
    save_png(image_grid(((final / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1), cols=8),
             run_dir / "eval_final.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a train.py run folder on the embedded world model")
    p.add_argument("--n", type=int, default=12, help="images sampled per concept and task")
    p.add_argument("--steps", type=int, default=15, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-classifier", action="store_true", help=f"train and write {CLASSIFIER.name}")
    args = p.parse_args(argv)
    if args.train_classifier:
        train_classifier(CLASSIFIER)
    if not args.run:
        if not args.train_classifier:
            p.error("pass --run RUN_FOLDER (or --train-classifier)")
        return
    try:
        res = evaluate_run(args.run, args.n, args.steps, args.cfg, args.seed)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    write_outputs(res, args.run)
    print(markdown(res, args.run))


if __name__ == "__main__":
    main()

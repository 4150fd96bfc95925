"""A procedural world of cartoon faces: the embedded default's data, a miniature of the paper's
Celeb-A HQ face sequence. Seeded, dependency-free (PIL drawing), deterministic.

    python world.py --out data/world              # the 10 concept folders train.py learns, one task each
    python world.py --preview world.png           # a look at the base distribution and the concepts

- The base distribution: faces with captioned attributes (skin, hair colour and style, eye colour,
  glasses, mouth, background) and uncaptioned details (face shape, brows, nose, ears, eye spacing,
  a mole) that vary freely. The tiny SD is pretrained on it (`pretrain.py`).
- The concepts: 10 identities, each a fixed combination of captioned attributes *and* details,
  drawn with jitter in position, size, tilt, expression and background. They are deliberately alike
  (pairs share most captioned attributes), so only the details tell them apart — what a concept's
  tokens have to learn, and what forgetting erases.
"""
import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels per side of every world image
DRAW = 4  # supersampling: drawn at 4x, then downsampled, for smooth edges

SKIN = {"pale": (250, 222, 200), "tan": (222, 178, 132), "brown": (160, 108, 70), "dark": (96, 62, 40)}
HAIR = {"black": (30, 28, 30), "brown": (110, 66, 30), "blonde": (236, 200, 96), "red": (196, 66, 34),
        "gray": (160, 160, 165), "blue": (50, 90, 220)}
STYLES = ("short", "long", "bun", "spiky", "bald")
EYES = {"blue": (40, 110, 230), "green": (40, 160, 70), "brown": (110, 60, 20), "gray": (120, 125, 130)}
MOUTHS = ("smiling", "frowning", "surprised", "neutral")
BACKGROUNDS = {"red": (210, 70, 70), "green": (90, 180, 90), "blue": (80, 120, 210), "yellow": (235, 215, 90),
               "purple": (150, 90, 190), "orange": (240, 150, 60), "white": (240, 240, 240), "gray": (128, 128, 128)}
CAPTIONED = ("skin", "hair", "style", "eyes", "glasses")

# The concept stream, in task order. Each pair (ada/bea, cal/dan, ...) shares skin, hair, style and
# eyes; pairs differ from each other in one or two of them. Details: face aspect (w/h), brow
# (thickness, slant), nose (0 dot, 1 triangle, 2 long), ear size, eye spacing, mole (x, y) or None.
CONCEPTS = [
    ("ada", dict(skin="tan", hair="brown", style="long", eyes="green", glasses=False,
                 aspect=0.80, brow=(1.0, 0.3), nose=1, ears=0.6, spacing=0.34, mole=(0.25, 0.15))),
    ("bea", dict(skin="tan", hair="brown", style="long", eyes="green", glasses=False,
                 aspect=0.98, brow=(2.2, -0.2), nose=2, ears=1.1, spacing=0.42, mole=None)),
    ("cal", dict(skin="pale", hair="blonde", style="short", eyes="blue", glasses=False,
                 aspect=0.86, brow=(2.0, 0.0), nose=0, ears=1.3, spacing=0.38, mole=(-0.3, -0.05))),
    ("dan", dict(skin="pale", hair="blonde", style="short", eyes="blue", glasses=True,
                 aspect=1.00, brow=(1.2, 0.4), nose=2, ears=0.7, spacing=0.33, mole=None)),
    ("eli", dict(skin="brown", hair="black", style="spiky", eyes="brown", glasses=False,
                 aspect=0.90, brow=(2.4, 0.2), nose=1, ears=1.0, spacing=0.44, mole=(0.05, 0.3))),
    ("fay", dict(skin="brown", hair="black", style="bun", eyes="brown", glasses=False,
                 aspect=0.82, brow=(1.0, -0.3), nose=0, ears=0.8, spacing=0.36, mole=None)),
    ("gus", dict(skin="dark", hair="gray", style="short", eyes="gray", glasses=True,
                 aspect=0.95, brow=(2.6, -0.1), nose=2, ears=1.2, spacing=0.40, mole=(0.3, 0.05))),
    ("hal", dict(skin="dark", hair="gray", style="bald", eyes="gray", glasses=False,
                 aspect=1.02, brow=(1.6, 0.35), nose=1, ears=1.4, spacing=0.35, mole=None)),
    ("ivy", dict(skin="pale", hair="red", style="long", eyes="green", glasses=False,
                 aspect=0.84, brow=(1.1, 0.1), nose=0, ears=0.6, spacing=0.41, mole=(-0.2, 0.25))),
    ("jon", dict(skin="tan", hair="red", style="spiky", eyes="blue", glasses=False,
                 aspect=0.93, brow=(2.2, 0.3), nose=2, ears=1.0, spacing=0.37, mole=None)),
]
N_TRAIN, N_HELDOUT = 16, 24  # images per concept: the few photos a user has, and held-out ones for evaluation


def random_face(rng):
    """A face of the base distribution: every attribute and detail drawn at random."""
    return dict(skin=rng.choice(list(SKIN)), hair=rng.choice(list(HAIR)), style=rng.choice(STYLES),
                eyes=rng.choice(list(EYES)), glasses=rng.random() < 0.25, aspect=rng.uniform(0.78, 1.04),
                brow=(rng.uniform(0.9, 2.7), rng.uniform(-0.35, 0.4)), nose=rng.randrange(3),
                ears=rng.uniform(0.55, 1.45), spacing=rng.uniform(0.32, 0.45),
                mole=(rng.uniform(-0.3, 0.3), rng.uniform(-0.1, 0.3)) if rng.random() < 0.4 else None)


def draw(face, rng):
    """One SIZE x SIZE RGB image of `face`, with per-image jitter (position, size, tilt, expression,
    background) drawn from `rng`. Returns (image, the mouth and background it got)."""
    mouth, bg = rng.choice(MOUTHS), rng.choice(list(BACKGROUNDS))
    S = SIZE * DRAW
    im = Image.new("RGB", (S, S), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    cx, cy = S / 2 + rng.uniform(-4, 4) * DRAW, S / 2 + rng.uniform(-3, 4) * DRAW
    h = S * 0.36 * rng.uniform(0.92, 1.08)  # half-height of the head
    w = h * face["aspect"]
    skin, hair = SKIN[face["skin"]], HAIR[face["hair"]]
    # Back hair (long / bun) behind the head, ears beside it.
    if face["style"] == "long":
        d.rounded_rectangle([cx - w * 1.12, cy - h * 1.05, cx + w * 1.12, cy + h * 0.95], radius=w * 0.6, fill=hair)
    if face["style"] == "bun":
        d.ellipse([cx - w * 0.42, cy - h * 1.45, cx + w * 0.42, cy - h * 0.7], fill=hair)
    er = w * 0.18 * face["ears"]
    for sx in (-1, 1):
        d.ellipse([cx + sx * w - er, cy - er * 1.3, cx + sx * w + er, cy + er * 1.3], fill=skin, outline=(60, 40, 30), width=DRAW)
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=skin, outline=(60, 40, 30), width=DRAW)
    # Front hair.
    if face["style"] in ("short", "long", "bun"):
        d.chord([cx - w * 1.02, cy - h * 1.04, cx + w * 1.02, cy + h * 0.35], 180, 360, fill=hair)
    elif face["style"] == "spiky":
        d.chord([cx - w * 1.0, cy - h * 1.02, cx + w * 1.0, cy + h * 0.2], 180, 360, fill=hair)
        for i in range(5):
            x = cx - w * 0.8 + i * w * 0.4
            d.polygon([(x - w * 0.22, cy - h * 0.75), (x + w * 0.22, cy - h * 0.75), (x, cy - h * 1.35)], fill=hair)
    # Eyes (white, iris in the eye colour, pupil), brows above them.
    ey, ex, r = cy - h * 0.12, w * face["spacing"] * 1.25, h * 0.13
    thick, slant = face["brow"]
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse([x - r * 1.3, ey - r, x + r * 1.3, ey + r], fill=(255, 255, 255), outline=(40, 30, 30), width=DRAW // 2)
        d.ellipse([x - r * 0.75, ey - r * 0.75, x + r * 0.75, ey + r * 0.75], fill=EYES[face["eyes"]])
        d.ellipse([x - r * 0.3, ey - r * 0.3, x + r * 0.3, ey + r * 0.3], fill=(10, 10, 10))
        by = ey - r * 1.9
        d.line([(x - sx * r * 1.3, by + slant * r), (x + sx * r * 1.3, by - slant * r)], fill=hair if face["style"] != "bald" else (60, 40, 30),
               width=max(1, int(thick * DRAW * 1.2)))
        if face["glasses"]:
            d.ellipse([x - r * 1.9, ey - r * 1.6, x + r * 1.9, ey + r * 1.6], outline=(20, 20, 20), width=int(1.5 * DRAW))
    if face["glasses"]:
        d.line([(cx - ex + r * 1.9, ey), (cx + ex - r * 1.9, ey)], fill=(20, 20, 20), width=int(1.5 * DRAW))
    # Nose: a dot, a triangle or a long line.
    ny, nose_c = cy + h * 0.18, tuple(int(c * 0.75) for c in skin)
    if face["nose"] == 0:
        d.ellipse([cx - r * 0.45, ny - r * 0.35, cx + r * 0.45, ny + r * 0.35], fill=nose_c)
    elif face["nose"] == 1:
        d.polygon([(cx, ny - r * 1.1), (cx - r * 0.7, ny + r * 0.5), (cx + r * 0.7, ny + r * 0.5)], fill=nose_c)
    else:
        d.line([(cx, ny - r * 1.6), (cx + r * 0.3, ny + r * 0.5), (cx - r * 0.4, ny + r * 0.5)], fill=nose_c, width=int(1.5 * DRAW))
    # Mouth: the expression of this image.
    my, mw = cy + h * 0.55, w * 0.38
    lips = (150, 40, 50)
    if mouth == "smiling":
        d.arc([cx - mw, my - mw * 0.7, cx + mw, my + mw * 0.5], 20, 160, fill=lips, width=int(1.6 * DRAW))
    elif mouth == "frowning":
        d.arc([cx - mw, my - mw * 0.1, cx + mw, my + mw * 0.9], 200, 340, fill=lips, width=int(1.6 * DRAW))
    elif mouth == "surprised":
        d.ellipse([cx - mw * 0.35, my - mw * 0.35, cx + mw * 0.35, my + mw * 0.35], fill=(90, 20, 30))
    else:
        d.line([(cx - mw * 0.7, my), (cx + mw * 0.7, my)], fill=lips, width=int(1.6 * DRAW))
    if face["mole"]:
        mx, my2 = cx + face["mole"][0] * w * 1.6, cy + face["mole"][1] * h * 1.6
        d.ellipse([mx - r * 0.28, my2 - r * 0.28, mx + r * 0.28, my2 + r * 0.28], fill=(50, 30, 20))
    im = im.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC, center=(cx, cy), fillcolor=BACKGROUNDS[bg])
    return im.resize((SIZE, SIZE), Image.LANCZOS), mouth, bg


def caption(face, mouth, bg, rng):
    """A caption naming the captioned attributes, each kept with probability 0.8, in random order
    (so that the text encoder learns each phrase on its own): "a photo of a face, blue eyes, ..."."""
    parts = [f"{face['skin']} skin", "bald" if face["style"] == "bald" else f"{face['hair']} {face['style']} hair",
             f"{face['eyes']} eyes", mouth, f"{bg} background"] + (["glasses"] if face["glasses"] else [])
    parts = [p for p in parts if rng.random() < 0.8]
    rng.shuffle(parts)
    return ", ".join(["a photo of a face"] + parts)


def base_images(n, seed):
    """n (image, caption) pairs of the base distribution."""
    rng = random.Random(f"base-{seed}")
    out = []
    for _ in range(n):
        face = random_face(rng)
        im, mouth, bg = draw(face, rng)
        out.append((im, caption(face, mouth, bg, rng)))
    return out


def concept_images(index, split, n=None):
    """Images of concept `index` (0-based). split: "train" (the N_TRAIN photos a user has),
    "heldout" (evaluation only) or "classifier" (the classifier's own training images); each split
    comes from its own seed, so no image is in two splits."""
    n = n or {"train": N_TRAIN, "heldout": N_HELDOUT}[split]
    rng = random.Random(f"concept-{index}-{split}")
    return [draw(CONCEPTS[index][1], rng)[0] for _ in range(n)]


def write_concepts(out):
    """The concept stream as train.py --data expects it: out/01_ada/00.png, ... Returns `out`."""
    out = Path(out)
    for i, (name, _) in enumerate(CONCEPTS):
        folder = out / f"{i + 1:02d}_{name}"
        if len(list(folder.glob("*.png"))) == N_TRAIN:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for j, im in enumerate(concept_images(i, "train")):
            im.save(folder / f"{j:02d}.png")
    return out


def to_tensor_batch(images):
    """PIL images -> (N, 3, SIZE, SIZE) float32 numpy in [-1, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32) for im in images]).transpose(0, 3, 1, 2) / 127.5 - 1


def preview(path):
    rows = [[im for im, _ in base_images(10, seed=123)]]
    rows += [concept_images(i, "train", 10) for i in range(len(CONCEPTS))]
    grid = Image.new("RGB", (SIZE * 10, SIZE * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * SIZE, r * SIZE))
    grid.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the concept folders here")
    p.add_argument("--preview", help="write a PNG: base faces (top row), then one row per concept")
    args = p.parse_args()
    if args.out:
        print(f"wrote {write_concepts(args.out)}")
    if args.preview:
        preview(args.preview)
        print(f"wrote {args.preview}")
    if not (args.out or args.preview):
        p.error("nothing to do: pass --out and/or --preview")

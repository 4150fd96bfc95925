"""A procedural world of cartoon faces and buildings: the embedded default's data, a miniature of the
STAMINA benchmark's stream of faces and landmarks. Seeded, PIL only, deterministic. Version 2.

    python world.py --out data/world              # the 50 concept folders train.py learns, one task each
    python world.py --preview world.png           # a look at the base distribution and the concepts

- The base distribution, which the tiny SD is pretrained on (`pretrain.py`): faces and buildings with
  captioned attributes ("a photo of a face, tan skin, red spiky hair, ..."; "a photo of a building,
  brick walls, green dome roof, two floors, ...") and uncaptioned details that vary freely (face
  shape, nose, ears, a mole; a building's width, windows, door, chimney).
- The concepts: 10 groups of 5 look-alikes, 5 groups per domain. The members of a group are the very
  same face or building (captioned attributes *and* details), so text gets a learner to the right
  group and no further. What tells them apart is a **mark** of their own: a shape in a neon colour
  at a fixed place on the subject (a magenta disc high on the left, a cyan bar on the right, ...).
  No image of the base distribution has a mark or a neon pixel (tests check it): a concept's
  identity is outside the base model's prior, as a personal concept is, so it must be learned into
  the weights. The stream takes one member of every group before the second of any, alternating
  face / building, so look-alikes arrive 10 tasks apart.
"""
import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 2  # stored in the pretrained model's metadata: a run is scored against the world it was made in
SIZE = 64  # pixels per side of every world image
DRAW = 4  # supersampling: drawn at 4x, then downsampled, for smooth edges

# Faces.
SKIN = {"pale": (250, 222, 200), "tan": (222, 178, 132), "brown": (160, 108, 70), "dark": (96, 62, 40)}
HAIR = {"black": (30, 28, 30), "brown": (110, 66, 30), "blonde": (236, 200, 96), "red": (196, 66, 34),
        "gray": (160, 160, 165), "blue": (50, 90, 220)}
STYLES = ("short", "long", "bun", "spiky", "bald")
EYES = {"blue": (40, 110, 230), "green": (40, 160, 70), "brown": (110, 60, 20), "gray": (120, 125, 130)}
MOUTHS = ("smiling", "frowning", "surprised", "neutral")
BACKGROUNDS = {"red": (210, 70, 70), "green": (90, 180, 90), "blue": (80, 120, 210), "yellow": (235, 215, 90),
               "purple": (150, 90, 190), "orange": (240, 150, 60), "white": (240, 240, 240), "gray": (128, 128, 128)}
# Buildings.
WALLS = {"white": (236, 232, 222), "beige": (214, 192, 148), "brick": (168, 78, 58), "gray": (128, 130, 136),
         "blue": (92, 112, 162)}
ROOFS = ("flat", "pointed", "dome", "spire")
ROOF_COLOURS = {"red": (176, 48, 40), "black": (36, 36, 42), "green": (56, 120, 78), "brown": (112, 74, 44)}
SKIES = {"blue": (122, 170, 228), "orange": (238, 160, 92), "night": (28, 34, 72), "gray": (150, 150, 156),
         "yellow": (232, 214, 122)}
FLOORS = ("one floor", "two floors", "three floors")

# The marks: what makes each member of a look-alike group itself. Neon colours that no base image
# contains, each mark differing from the others in colour, shape and place. Place (u, v) and size s
# are in units of the subject's half-width / half-height, so one mark fits a face and a building.
NEON = {"magenta": (236, 28, 214), "cyan": (18, 226, 236), "lime": (150, 246, 18), "violet": (128, 36, 255)}
MARKS = (dict(colour="magenta", shape="disc", u=-0.45, v=-0.40, s=0.30),
         dict(colour="cyan", shape="bar", u=0.62, v=0.05, s=0.45),
         dict(colour="lime", shape="triangle", u=-0.50, v=0.45, s=0.34),
         dict(colour="violet", shape="ring", u=0.45, v=0.48, s=0.30),
         dict(colour="lime", shape="cross", u=0.0, v=-0.72, s=0.28))

# The 10 look-alike groups: the fixed subject every member shares. Faces: face aspect (w/h), brow
# (thickness, slant), nose (0 dot, 1 triangle, 2 long), ear size, eye spacing, mole (x, y) or None.
# Buildings: width (w/h), windows per floor, arched windows, door place (-1, 0, 1), chimney.
GROUPS = [
    dict(kind="face", skin="tan", hair="brown", style="long", eyes="green", glasses=False,
         aspect=0.80, brow=(1.0, 0.3), nose=1, ears=0.6, spacing=0.34, mole=(0.25, 0.15)),
    dict(kind="building", walls="brick", roof="pointed", roof_colour="black", floors=2,
         width=0.95, windows=3, arched=False, door=0, chimney=True),
    dict(kind="face", skin="pale", hair="blonde", style="short", eyes="blue", glasses=True,
         aspect=0.95, brow=(2.0, 0.0), nose=0, ears=1.3, spacing=0.38, mole=None),
    dict(kind="building", walls="white", roof="dome", roof_colour="green", floors=1,
         width=1.15, windows=4, arched=True, door=0, chimney=False),
    dict(kind="face", skin="brown", hair="black", style="spiky", eyes="brown", glasses=False,
         aspect=0.90, brow=(2.4, 0.2), nose=2, ears=1.0, spacing=0.44, mole=None),
    dict(kind="building", walls="gray", roof="flat", roof_colour="brown", floors=3,
         width=0.80, windows=2, arched=False, door=-1, chimney=False),
    dict(kind="face", skin="dark", hair="gray", style="bald", eyes="gray", glasses=False,
         aspect=1.00, brow=(1.6, 0.35), nose=1, ears=1.4, spacing=0.36, mole=(-0.3, -0.05)),
    dict(kind="building", walls="beige", roof="spire", roof_colour="red", floors=2,
         width=0.70, windows=2, arched=True, door=1, chimney=False),
    dict(kind="face", skin="pale", hair="red", style="bun", eyes="green", glasses=False,
         aspect=0.84, brow=(1.1, -0.3), nose=2, ears=0.8, spacing=0.41, mole=None),
    dict(kind="building", walls="blue", roof="pointed", roof_colour="red", floors=1,
         width=1.05, windows=3, arched=False, door=-1, chimney=True),
]
NAMES = ("ada abe cal dex eli fay gus hal ivy jon kit lou max ned ora pia quin rex sal tom uma vic wes xia yan "
         "zed ari bo cy dov eva fen gil hux ino jai kai lev mia nox oto pax rue sky tev ula vin wyn yul zia").split()
# The stream: concept i is member i // 10 of group i % 10, with mark i // 10.
CONCEPTS = [(NAMES[i], dict(GROUPS[i % len(GROUPS)], mark=i // len(GROUPS))) for i in range(len(GROUPS) * len(MARKS))]
N_TRAIN, N_HELDOUT = 16, 32  # images per concept: the few photos a user has, and held-out ones for evaluation


def random_face(rng):
    """A face of the base distribution: every attribute and detail drawn at random, no mark."""
    return dict(kind="face", skin=rng.choice(list(SKIN)), hair=rng.choice(list(HAIR)), style=rng.choice(STYLES),
                eyes=rng.choice(list(EYES)), glasses=rng.random() < 0.25, aspect=rng.uniform(0.78, 1.04),
                brow=(rng.uniform(0.9, 2.7), rng.uniform(-0.35, 0.4)), nose=rng.randrange(3),
                ears=rng.uniform(0.55, 1.45), spacing=rng.uniform(0.32, 0.45),
                mole=(rng.uniform(-0.3, 0.3), rng.uniform(-0.1, 0.3)) if rng.random() < 0.4 else None, mark=None)


def random_building(rng):
    """A building of the base distribution, no mark."""
    return dict(kind="building", walls=rng.choice(list(WALLS)), roof=rng.choice(ROOFS),
                roof_colour=rng.choice(list(ROOF_COLOURS)), floors=rng.randint(1, 3), width=rng.uniform(0.65, 1.2),
                windows=rng.randint(2, 4), arched=rng.random() < 0.4, door=rng.choice((-1, 0, 1)),
                chimney=rng.random() < 0.3, mark=None)


def draw_face(d, f, cx, cy, h):
    """The face `f` at centre (cx, cy), half-height h; returns the half-width and its expression."""
    w = h * f["aspect"]
    skin, hair = SKIN[f["skin"]], HAIR[f["hair"]]
    # Back hair (long / bun) behind the head, ears beside it.
    if f["style"] == "long":
        d.rounded_rectangle([cx - w * 1.12, cy - h * 1.05, cx + w * 1.12, cy + h * 0.95], radius=w * 0.6, fill=hair)
    if f["style"] == "bun":
        d.ellipse([cx - w * 0.42, cy - h * 1.45, cx + w * 0.42, cy - h * 0.7], fill=hair)
    er = w * 0.18 * f["ears"]
    for sx in (-1, 1):
        d.ellipse([cx + sx * w - er, cy - er * 1.3, cx + sx * w + er, cy + er * 1.3], fill=skin, outline=(60, 40, 30), width=DRAW)
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=skin, outline=(60, 40, 30), width=DRAW)
    # Front hair.
    if f["style"] in ("short", "long", "bun"):
        d.chord([cx - w * 1.02, cy - h * 1.04, cx + w * 1.02, cy + h * 0.35], 180, 360, fill=hair)
    elif f["style"] == "spiky":
        d.chord([cx - w * 1.0, cy - h * 1.02, cx + w * 1.0, cy + h * 0.2], 180, 360, fill=hair)
        for i in range(5):
            x = cx - w * 0.8 + i * w * 0.4
            d.polygon([(x - w * 0.22, cy - h * 0.75), (x + w * 0.22, cy - h * 0.75), (x, cy - h * 1.35)], fill=hair)
    # Eyes (white, iris in the eye colour, pupil), brows above them.
    ey, ex, r = cy - h * 0.12, w * f["spacing"] * 1.25, h * 0.13
    thick, slant = f["brow"]
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse([x - r * 1.3, ey - r, x + r * 1.3, ey + r], fill=(255, 255, 255), outline=(40, 30, 30), width=DRAW // 2)
        d.ellipse([x - r * 0.75, ey - r * 0.75, x + r * 0.75, ey + r * 0.75], fill=EYES[f["eyes"]])
        d.ellipse([x - r * 0.3, ey - r * 0.3, x + r * 0.3, ey + r * 0.3], fill=(10, 10, 10))
        by = ey - r * 1.9
        d.line([(x - sx * r * 1.3, by + slant * r), (x + sx * r * 1.3, by - slant * r)],
               fill=hair if f["style"] != "bald" else (60, 40, 30), width=max(1, int(thick * DRAW * 1.2)))
        if f["glasses"]:
            d.ellipse([x - r * 1.9, ey - r * 1.6, x + r * 1.9, ey + r * 1.6], outline=(20, 20, 20), width=int(1.5 * DRAW))
    if f["glasses"]:
        d.line([(cx - ex + r * 1.9, ey), (cx + ex - r * 1.9, ey)], fill=(20, 20, 20), width=int(1.5 * DRAW))
    # Nose: a dot, a triangle or a long line.
    ny, nose_c = cy + h * 0.18, tuple(int(c * 0.75) for c in skin)
    if f["nose"] == 0:
        d.ellipse([cx - r * 0.45, ny - r * 0.35, cx + r * 0.45, ny + r * 0.35], fill=nose_c)
    elif f["nose"] == 1:
        d.polygon([(cx, ny - r * 1.1), (cx - r * 0.7, ny + r * 0.5), (cx + r * 0.7, ny + r * 0.5)], fill=nose_c)
    else:
        d.line([(cx, ny - r * 1.6), (cx + r * 0.3, ny + r * 0.5), (cx - r * 0.4, ny + r * 0.5)], fill=nose_c, width=int(1.5 * DRAW))
    if f["mole"]:
        mx, my = cx + f["mole"][0] * w * 1.6, cy + f["mole"][1] * h * 1.6
        d.ellipse([mx - r * 0.28, my - r * 0.28, mx + r * 0.28, my + r * 0.28], fill=(50, 30, 20))
    return w


def draw_mouth(d, cx, cy, w, h, mouth):
    my, mw, lips = cy + h * 0.55, w * 0.38, (150, 40, 50)
    if mouth == "smiling":
        d.arc([cx - mw, my - mw * 0.7, cx + mw, my + mw * 0.5], 20, 160, fill=lips, width=int(1.6 * DRAW))
    elif mouth == "frowning":
        d.arc([cx - mw, my - mw * 0.1, cx + mw, my + mw * 0.9], 200, 340, fill=lips, width=int(1.6 * DRAW))
    elif mouth == "surprised":
        d.ellipse([cx - mw * 0.35, my - mw * 0.35, cx + mw * 0.35, my + mw * 0.35], fill=(90, 20, 30))
    else:
        d.line([(cx - mw * 0.7, my), (cx + mw * 0.7, my)], fill=lips, width=int(1.6 * DRAW))


def draw_building(d, b, cx, cy, h):
    """The building `b`, its body centred at (cx, cy) with half-height h; returns the half-width."""
    w = h * b["width"]
    wall, roof = WALLS[b["walls"]], ROOF_COLOURS[b["roof_colour"]]
    top, bottom = cy - h, cy + h
    if b["chimney"]:
        d.rectangle([cx + w * 0.45, top - h * 0.45, cx + w * 0.7, top + h * 0.1], fill=(120, 60, 50))
    if b["roof"] == "pointed":
        d.polygon([(cx - w * 1.12, top), (cx + w * 1.12, top), (cx, top - h * 0.6)], fill=roof)
    elif b["roof"] == "dome":
        d.chord([cx - w * 0.8, top - h * 0.75, cx + w * 0.8, top + h * 0.75], 180, 360, fill=roof)
    elif b["roof"] == "spire":
        d.polygon([(cx - w * 0.55, top), (cx + w * 0.55, top), (cx, top - h * 0.95)], fill=roof)
    else:
        d.rectangle([cx - w * 1.06, top - h * 0.1, cx + w * 1.06, top + h * 0.04], fill=roof)
    d.rectangle([cx - w, top, cx + w, bottom], fill=wall, outline=(50, 45, 45), width=DRAW)
    # Windows: a row per floor, the door on the ground floor.
    dark, frame = (52, 62, 92), (40, 38, 40)
    n, floor_h = b["windows"], 2 * h / b["floors"]
    ww, wh = w * 0.9 / n, floor_h * 0.38
    for fl in range(b["floors"]):
        wy = top + floor_h * (fl + 0.42)
        for i in range(n):
            wx = cx - w + (i + 0.5) * 2 * w / n
            if fl == b["floors"] - 1 and abs(wx - (cx + b["door"] * w * 0.55)) < ww:
                continue  # the door's place
            box = [wx - ww / 2, wy - wh / 2, wx + ww / 2, wy + wh / 2]
            if b["arched"]:
                d.chord([box[0], box[1] - ww / 2, box[2], box[1] + ww / 2], 180, 360, fill=dark, outline=frame, width=DRAW // 2)
            d.rectangle(box, fill=dark, outline=frame, width=DRAW // 2)
    dx, dw = cx + b["door"] * w * 0.55, w * 0.22
    d.rectangle([dx - dw, bottom - floor_h * 0.62, dx + dw, bottom], fill=(88, 52, 30), outline=frame, width=DRAW // 2)
    return w


def draw_mark(d, mark, cx, cy, w, h, size):
    """A concept's mark (an index into MARKS) on the subject of half-size (w, h) centred at (cx, cy);
    `size` is the unit of the mark's own size, the same for faces and buildings so that every mark is
    as big on a narrow tower as on a face."""
    m = MARKS[mark]
    x, y, s, c = cx + m["u"] * w, cy + m["v"] * h, m["s"] * size, NEON[m["colour"]]
    if m["shape"] == "disc":
        d.ellipse([x - s, y - s, x + s, y + s], fill=c)
    elif m["shape"] == "bar":
        d.rectangle([x - s * 0.35, y - s * 1.2, x + s * 0.35, y + s * 1.2], fill=c)
    elif m["shape"] == "triangle":
        d.polygon([(x, y - s), (x - s * 1.1, y + s * 0.8), (x + s * 1.1, y + s * 0.8)], fill=c)
    elif m["shape"] == "ring":
        d.ellipse([x - s, y - s, x + s, y + s], outline=c, width=int(s * 0.55))
    else:  # cross
        for a, b in (((x - s, y - s), (x + s, y + s)), ((x - s, y + s), (x + s, y - s))):
            d.line([a, b], fill=c, width=int(s * 0.6))


def pose(subject, rng):
    """The per-image jitter of one image of `subject`, drawn from `rng`: background, centre, size, tilt
    and a face's expression. Apart from `render`, so captions can be drawn without drawing images."""
    face = subject["kind"] == "face"
    bg = rng.choice(list(BACKGROUNDS if face else SKIES))
    cx, cy = SIZE / 2 + rng.uniform(-4, 4), SIZE / 2 + rng.uniform(-3, 4)  # in output pixels
    size = SIZE * 0.36 * rng.uniform(0.92, 1.08)
    mouth = rng.choice(MOUTHS) if face else ""
    tilt = rng.uniform(-10, 10) if face else rng.uniform(-4, 4)
    return dict(bg=bg, cx=cx, cy=cy, size=size, mouth=mouth, tilt=tilt)


def render(subject, p):
    """One SIZE x SIZE RGB image of `subject` in pose `p`."""
    face = subject["kind"] == "face"
    colour = (BACKGROUNDS if face else SKIES)[p["bg"]]
    S = SIZE * DRAW
    im = Image.new("RGB", (S, S), colour)
    d = ImageDraw.Draw(im)
    cx, cy, size = p["cx"] * DRAW, p["cy"] * DRAW, p["size"] * DRAW
    if face:
        h = size  # half-height of the head
        w = draw_face(d, subject, cx, cy, h)
        draw_mouth(d, cx, cy, w, h, p["mouth"])
    else:
        cy += S * 0.06  # room for the roof
        h = size * 0.75  # half-height of the body
        d.rectangle([0, cy + h, S, S], fill=(96, 128, 76))  # the ground
        w = draw_building(d, subject, cx, cy, h)
    if subject["mark"] is not None:
        draw_mark(d, subject["mark"], cx, cy, w, h, size)
    im = im.rotate(p["tilt"], resample=Image.BICUBIC, center=(cx, cy), fillcolor=colour)
    return im.resize((SIZE, SIZE), Image.LANCZOS)


def attributes(subject, mouth="", bg=""):
    """The captioned attribute phrases of `subject` in a fixed order, its expression and background
    where given: ["tan skin", "brown long hair", "green eyes", ...]."""
    s = subject
    if s["kind"] == "face":
        parts = [f"{s['skin']} skin", "bald" if s["style"] == "bald" else f"{s['hair']} {s['style']} hair",
                 f"{s['eyes']} eyes", mouth, bg and f"{bg} background"] + (["glasses"] if s["glasses"] else [])
    else:
        parts = [f"{s['walls']} walls", f"{s['roof_colour']} {s['roof']} roof", FLOORS[s["floors"] - 1], bg and f"{bg} sky"]
    return [p for p in parts if p]


def caption(subject, mouth, bg, rng):
    """A caption naming the captioned attributes, each kept with probability 0.8, in random order
    (so that the text encoder learns each phrase on its own): "a photo of a face, blue eyes, ..."."""
    parts = [p for p in attributes(subject, mouth, bg) if rng.random() < 0.8]
    rng.shuffle(parts)
    return ", ".join([f"a photo of a {subject['kind']}"] + parts)


def base_subjects(n, seed):
    """n (subject, pose, caption) triples of the base distribution: faces and buildings, half and half."""
    rng = random.Random(f"base-{seed}")
    out = []
    for _ in range(n):
        subject = random_face(rng) if rng.random() < 0.5 else random_building(rng)
        p = pose(subject, rng)
        out.append((subject, p, caption(subject, p["mouth"], p["bg"], rng)))
    return out


def base_images(n, seed):
    """n (image, caption) pairs of the base distribution."""
    return [(render(subject, p), c) for subject, p, c in base_subjects(n, seed)]


def base_captions(n, seed):
    """The captions of base_images(n, seed), without drawing the images."""
    return [c for _, _, c in base_subjects(n, seed)]


def concept_images(index, split, n=None):
    """Images of concept `index` (0-based). split: "train" (the N_TRAIN photos a user has),
    "heldout" (evaluation only) or "classifier" (the classifier's own training images); each split
    comes from its own seed, so no image is in two splits."""
    n = n or {"train": N_TRAIN, "heldout": N_HELDOUT}[split]
    rng = random.Random(f"concept-{index}-{split}")
    return [render(CONCEPTS[index][1], pose(CONCEPTS[index][1], rng)) for _ in range(n)]


def look_alikes(index):
    """The concepts of the same group as concept `index` (itself included), in stream order."""
    return [j for j in range(len(CONCEPTS)) if j % len(GROUPS) == index % len(GROUPS)]


def write_concepts(out, n=len(CONCEPTS)):
    """The first n concepts of the stream as train.py --data expects them: out/01_ada/00.png, ...
    Returns `out`."""
    out = Path(out)
    for i, (name, _) in enumerate(CONCEPTS[:n]):
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
    """Two rows of base images, then one row per group: its 5 members (2 images each)."""
    rows = [[im for im, _ in base_images(10, seed=123)], [im for im, _ in base_images(10, seed=124)]]
    rows += [[im for j in look_alikes(g) for im in concept_images(j, "train", 2)] for g in range(len(GROUPS))]
    grid = Image.new("RGB", (SIZE * 10, SIZE * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * SIZE, r * SIZE))
    grid.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the concept folders here")
    p.add_argument("--preview", help="write a PNG: base images (top two rows), then one row per look-alike group")
    args = p.parse_args()
    if args.out:
        print(f"wrote {write_concepts(args.out)}")
    if args.preview:
        preview(args.preview)
        print(f"wrote {args.preview}")
    if not (args.out or args.preview):
        p.error("nothing to do: pass --out and/or --preview")

"""The forgetting experiment on the embedded world: 10 concepts learned one after another by C-LoRA
and the paper's baselines, scored after every task (evaluate.py), on 2 seeds.

    python experiment.py                                     # the README's table: 22.5 min on 2 CPU cores
    python experiment.py --tasks 3 --seeds 0 --methods clora lora --out runs/exp-quick   # a quick look
    python experiment.py --tasks 3 --seeds 0 --methods clora --no-upper-bound --train-args "--lam 1e4" --out runs/lam1e4

Methods: clora, lora (the same stacking, lambda = 0), ti (tokens only), kv (full-rank K/V deltas,
Custom Diffusion style), and an upper bound: every concept trained alone from the base model (no
earlier task to forget or to be regularised against), scored right after its one task. Every run
uses the model's default settings of train.py. Jobs run in parallel processes, one thread each.
Writes `--out`/results.md, results.json, matrices.png and a log per job in `--out`/logs/.
"""
import argparse
import json
import os
import shlex
import time
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import world

METHODS = ("clora", "lora", "ti", "kv")


def job(spec):
    """One run: train.py --task T on the world, then evaluate.py on it. Returns its result summary."""
    import torch

    torch.set_num_threads(1)
    import evaluate
    import train

    kind, method, concept, seed, tasks, out, extra = spec
    data = Path(out) / "data"
    if kind == "stream":
        name = f"{method}-s{seed}"
    else:  # a data folder holding one concept only: it becomes task 1 (where C-LoRA's penalty is zero)
        word = world.CONCEPTS[concept][0]
        name, data = f"alone-{word}-s{seed}", Path(out) / "data-alone" / word
        if not (data / f"01_{word}").exists():
            data.mkdir(parents=True, exist_ok=True)
            os.symlink((Path(out) / "data" / f"{concept + 1:02d}_{word}").resolve(), data / f"01_{word}")
    run_dir = Path(out) / name
    log = Path(out) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f, redirect_stdout(f), redirect_stderr(f):
        train.main(["--task", str(tasks if kind == "stream" else 1), "--data", str(data), "--run", str(run_dir),
                    "--method", method, "--seed", str(seed), "--save-every", "0", "--device", "cpu", *shlex.split(extra)])
        res = evaluate.evaluate_run(run_dir, seed=seed)
        evaluate.write_outputs(res, run_dir)
    return {"name": name, "kind": kind, "method": method, "seed": seed, "seconds": time.time() - t0,
            "acc": res["acc"].tolist(), "mmd": res["mmd"].tolist(), "delta_norms": res["delta_norms"],
            **evaluate.summary(res)}


def table(results, methods, seeds):
    """Mean (and spread over seeds) of every summary figure, per method, plus the upper bound."""
    def fmt(vals):
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    lines = ["| method | final accuracy ↑ | forgetting (accuracy) ↓ | final MMD ↓ | forgetting (MMD) ↓ | mean delta norm |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in results if r["kind"] == "stream" and r["method"] == m]
        lines.append(f"| {m} | {fmt([r['final_acc'] for r in rs])} | {fmt([r['forgetting_acc'] for r in rs])} | "
                     f"{fmt([r['final_mmd'] for r in rs])} | {fmt([r['forgetting_mmd'] for r in rs])} | "
                     f"{fmt([float(np.mean(r['delta_norms'])) for r in rs])} |")
    alone = [r for r in results if r["kind"] == "alone"]
    if alone:  # per seed: the mean over concepts of each concept's own score
        acc = [np.mean([r["final_acc"] for r in alone if r["seed"] == s]) for s in seeds]
        mmd = [np.mean([r["final_mmd"] for r in alone if r["seed"] == s]) for s in seeds]
        norms = [np.mean([r["delta_norms"][0] for r in alone if r["seed"] == s]) for s in seeds]
        lines.append(f"| upper bound (each concept alone) | {fmt(acc)} | – | {fmt(mmd)} | – | {fmt(norms)} |")
    return "\n".join(lines)


def matrices_png(out, methods, seed):
    """Every method's accuracy matrix (evaluate.py's eval_matrix.png) side by side, titled."""
    ims = [Image.open(Path(out) / f"{m}-s{seed}" / "eval_matrix.png") for m in methods]
    w, h = sum(im.width for im in ims), max(im.height for im in ims) + 20
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    d, x = ImageDraw.Draw(canvas), 0
    for m, im in zip(methods, ims):
        d.text((x + 6, 4), f"{m} (seed {seed}): accuracy after task i (rows) of concept j (columns)", fill=(0, 0, 0))
        canvas.paste(im, (x, 20))
        x += im.width
    canvas.save(Path(out) / "matrices.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--tasks", type=int, default=len(world.CONCEPTS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--no-upper-bound", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-args", default="", help='extra train.py flags for every run, e.g. "--lam 1e4"')
    args = p.parse_args()
    t0 = time.time()
    world.write_concepts(Path(args.out) / "data")
    jobs = [("stream", m, None, s, args.tasks, args.out, args.train_args) for s in args.seeds for m in args.methods]
    if not args.no_upper_bound:
        jobs += [("alone", "clora", j, s, 1, args.out, args.train_args) for s in args.seeds for j in range(args.tasks)]
    with Pool(args.workers, maxtasksperchild=1) as pool:  # a fresh process per job: nothing leaks between runs
        results = []
        for r in pool.imap_unordered(job, jobs):
            results.append(r)
            print(f"{r['name']}: final accuracy {r['final_acc']:.3f}, forgetting {r['forgetting_acc']:.3f} "
                  f"({r['seconds']:.0f} s; {len(results)}/{len(jobs)} jobs, {time.time() - t0:.0f} s in all)", flush=True)
    minutes = (time.time() - t0) / 60
    md = table(results, args.methods, args.seeds)
    header = (f"{args.tasks} concepts, seeds {args.seeds}, {minutes:.1f} min on {os.cpu_count()} CPU cores; "
              "accuracy: concept classifier on generated images; MMD: KID-kernel MMD^2 to held-out real images")
    (Path(args.out) / "results.md").write_text(header + "\n\n" + md + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps({"minutes": minutes, "results": results}, indent=1) + "\n")
    matrices_png(args.out, args.methods, args.seeds[0])
    print(header + "\n\n" + md)


if __name__ == "__main__":
    main()

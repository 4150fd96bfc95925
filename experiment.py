"""The continual-learning experiment on the embedded world: a stream of concepts learned one after
another by C-LoRA and the paper's baselines, scored as it goes (evaluate.py), over 3 seeds, with the
checks that show the experiment can tell the methods apart.

    python experiment.py                                       # 10 concepts, every method, 3 seeds + upper bound
    python experiment.py --check                               # the quick validity checks; non-zero exit if one fails
    python experiment.py --tasks 50 --every 10 --methods clora lora stamina --no-upper-bound --pair-with clora lora --out runs/long
    python experiment.py --tasks 3 --seeds 0 --methods clora --no-upper-bound --train-args="--lam 1e4" --out runs/lam1e4
    python experiment.py --tasks 5 --every 5 --methods stamina --no-upper-bound --train-args=--no-mask --out runs/abl-no-mask
    python experiment.py --devices cuda:0,cuda:1                 # the runs spread over two GPUs (default: every visible one)

Methods: those of clora.METHODS (clora; lora, the same stacking with lambda = 0; ti, tokens only; kv,
full-rank K/V deltas, Custom Diffusion style), and an upper bound: every concept trained alone from
the base model (no earlier task to forget or to be regularised against), scored right after its one
task. Every run uses the model's default settings of train.py. Jobs run in parallel processes, one
thread each: one job at a time per device of `--devices` (default: one per visible GPU; without one,
`--workers` jobs on the CPU); a job trains on its device and scores on the CPU. Figures are means
over seeds with a 95% interval (Student's t); each stream's final accuracy and forgetting minus
those of the `--pair-with` methods on the same seed (`paired`); and, where a stream has more than one
full row (`--every`), the mean accuracy over the concepts learned so far after each of those tasks
(`checkpoints`). A cell is scored on `--n` samples. Writes
`--out`/results.md, results.json, matrices.png, curves.png and a log per job in `--out`/logs/ (each call appends to it).

The validity checks (printed, and the exit status of --check):
- the upper bound learns: the concepts alone reach accuracy >= 0.85 (mean over concepts and seeds);
- the world needs weights: `ti` alone stays <= 0.6 (where no `ti` runs alone, its stream's accuracy right
  after learning: a `ti` task trains as its concept would alone);
- the baseline that should forget does: sequential `lora` forgets >= 0.3;
- seeds agree: every headline accuracy figure's 95% interval is within +-0.05;
- a concept stays in its prompt: after each concept alone, "a photo of a face" and "a photo of a building"
  still draw their own kind, not the concept (evaluate's `kept`, mean over concepts and seeds) >= 0.75 (the
  base model's figure is in the README).
`--check` runs the quick version: a few concepts alone per method and a short lora stream, one seed.
"""
import argparse
import json
import os
import shlex
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import world
from checkpoint import write_text
from clora import METHODS
from sample import save_png

DEFAULT_METHODS = ("clora", "lora", "ti", "kv")
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}  # t(0.975, n - 1), n seeds
FIGURES = ("plasticity_acc", "final_acc", "forgetting_acc", "final_mmd", "forgetting_mmd", "kept")
CHECK_CONCEPTS = (0, 11, 22, 33)  # --check: two faces and two buildings, four groups, four different marks
UPPER, TI_MAX, FORGET_MIN, CI_MAX, KEPT_MIN = 0.85, 0.6, 0.3, 0.05, 0.75


FREE = None  # in a job's process: the queue of free devices (one entry per job slot)


def take_devices(free):
    global FREE
    FREE = free


def job(spec):
    """One run: train.py --task T on the world, on a free device, then evaluate.py on it. Returns its
    result summary, or {"error": line} when train.py or evaluate.py refused."""
    device = FREE.get()  # never waits: the pool has one process per entry
    try:
        return run_job(spec, device)
    finally:
        FREE.put(device)


def run_job(spec, device):
    torch.set_num_threads(1)
    import evaluate
    import train
    from checkpoint import CheckpointError

    kind, method, concept, seed, tasks, out, extra, n, every = spec
    data = Path(out) / "data"
    if kind == "stream":
        name = f"{method}-s{seed}"
    else:  # a data folder holding one concept only: it becomes task 1 (where C-LoRA's penalty is zero)
        word = world.CONCEPTS[concept][0]
        name, data = f"alone-{method}-{word}-s{seed}", Path(out) / "data-alone" / word
        if not (data / f"01_{word}").exists():
            data.mkdir(parents=True, exist_ok=True)
            os.symlink((Path(out) / "data" / f"{concept + 1:02d}_{word}").resolve(), data / f"01_{word}")
    run_dir = Path(out) / name
    log = Path(out) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        with open(log, "a") as f, redirect_stdout(f), redirect_stderr(f):
            # train.py's partial checkpoints (every 200 steps) stay on: a stopped experiment resumes mid-task.
            train.main(["--task", str(tasks if kind == "stream" else 1), "--data", str(data), "--run", str(run_dir),
                        "--method", method, "--seed", str(seed), "--device", device, *shlex.split(extra)])
            key = evaluate.scoring(run_dir, n=n, seed=seed, every=every)
            res = evaluate.scored(run_dir, key)  # scored by an earlier call: kept
            if res is None:
                res = evaluate.evaluate_run(run_dir, n=n, seed=seed, every=every)
                evaluate.write_outputs(res, run_dir, key)
    except SystemExit as e:  # train.py's one-line errors
        return {"name": name, "error": str(e.code)}
    except CheckpointError as e:
        return {"name": name, "error": f"error: {e}"}
    return {"name": name, "kind": kind, "method": method, "concept": concept, "seed": seed, "seconds": time.time() - t0,
            "acc": evaluate.json_matrix(res["acc"]), "delta_norms": res["delta_norms"],
            **evaluate.summary(res)}


def t975(n):
    """Student's t(0.975, n - 1): the table up to 10 seeds, beyond it the Cornish-Fisher expansion about
    the normal 1.96 to 1/df^2 (within 0.2% of the exact value from 11 seeds on)."""
    if n in T95:
        return T95[n]
    z, df = 1.959964, n - 1
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(vals):
    """(mean, 95% half-width) over seeds; the half-width is None for one seed."""
    vals = np.asarray(vals, dtype=float)
    if len(vals) < 2:
        return float(vals.mean()), None
    return float(vals.mean()), float(t975(len(vals)) * vals.std(ddof=1) / len(vals) ** 0.5)


def fmt(vals):
    if not vals:
        return "–"
    m, h = interval(vals)
    return f"{m:.3f}" if h is None else f"{m:.3f} ± {h:.3f}"


def per_seed(results, kind, method, key, seeds):
    """One value per seed: a stream's figure, or for concepts trained alone the mean over concepts. A figure
    that could not be measured (None: `kept` once every concept is learned) gives no value."""
    vals = [[r[key] for r in results if r["kind"] == kind and r["method"] == method and r["seed"] == s and r[key] is not None]
            for s in seeds]
    return [float(np.mean(v)) for v in vals if v]


def table(results, methods, seeds):
    lines = ["| method | accuracy right after learning ↑ | final accuracy ↑ | forgetting ↓ | final MMD ↓ | "
             "forgetting (MMD) ↓ | base prompts kept ↑ | mean delta norm |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        if not any(r["kind"] == "stream" and r["method"] == m for r in results):
            continue
        norms = [float(np.mean(r["delta_norms"])) for r in results if r["kind"] == "stream" and r["method"] == m and r["seed"] in seeds]
        lines.append(f"| {m} | " + " | ".join(fmt(per_seed(results, "stream", m, k, seeds)) for k in FIGURES) + f" | {fmt(norms)} |")
    for m in sorted({r["method"] for r in results if r["kind"] == "alone"}):
        lines.append(f"| {'upper bound: ' if m == 'clora' else ''}each concept alone ({m}) | "
                     f"{fmt(per_seed(results, 'alone', m, 'final_acc', seeds))} | – | – | "
                     f"{fmt(per_seed(results, 'alone', m, 'final_mmd', seeds))} | – | "
                     f"{fmt(per_seed(results, 'alone', m, 'kept', seeds))} | – |")
    return "\n".join(lines)


def paired(results, methods, seeds, ref="clora"):
    """Each stream's final accuracy and forgetting minus `ref`'s on the same seed, with the interval of those
    differences over the seeds: the answer to "does this method beat C-LoRA?" (or LoRA, with ref="lora"),
    which two figures' own intervals do not give. Seeds pair the runs: a seed gives every method the same draws of each task's
    batches, timesteps and noise (train.task_seed)."""
    stream = {(r["method"], r["seed"]): r for r in results if r["kind"] == "stream"}
    lines = []
    for m in methods:
        both = [s for s in seeds if (m, s) in stream and (ref, s) in stream]
        if m == ref or not both:
            continue
        diffs = {k: [stream[m, s][k] - stream[ref, s][k] for s in both] for k in ("final_acc", "forgetting_acc")}
        per = ", ".join(f"{d:+.3f}" for d in diffs["final_acc"])
        lines.append(f"| {m} | {fmt(diffs['final_acc'])} | {fmt(diffs['forgetting_acc'])} | {per} |")
    if not lines:
        return ""
    return "\n".join([f"Paired by seed: each stream minus {ref} on the same seed (the same draws of batches and noise)", "",
                      f"| method | final accuracy − {ref}'s | forgetting − {ref}'s | final accuracy − {ref}'s, per seed |",
                      "|---|---|---|---|", *lines])


def checkpoints(results, methods, seeds):
    """After each task i whose row was fully scored (every task with --every 1, every K-th with --every K),
    the mean accuracy over concepts 1..i (what the model holds at that point of the stream), mean ± 95%
    over seeds. "" when no stream has a full row before its last (then the final accuracy says it all)."""
    stream = [r for r in results if r["kind"] == "stream" and r["method"] in methods and r["seed"] in seeds]
    if not stream:
        return ""
    # Task 1's row is always full (one cell, R[1][1]): a full row after it is one that --every asked for. A run
    # may hold more (scored before at a finer --every, and kept): the rows full in every run.
    T = len(stream[0]["acc"])
    rows = [i for i in range(1, T) if all(a is not None for r in stream for a in r["acc"][i][:i + 1])]
    if len(rows) < 2:
        return ""
    lines = []
    for m in methods:
        rs = [r for r in stream if r["method"] == m]
        if rs:
            lines.append(f"| {m} | " + " | ".join(fmt([np.mean(r["acc"][i][:i + 1]) for r in rs]) for i in rows) + " |")
    return "\n".join(["Mean accuracy over the concepts learned so far, after task i", "",
                      "| method | " + " | ".join(f"i = {i + 1}" for i in rows) + " |", "|---" * (len(rows) + 1) + "|", *lines])


def checks(results, seeds, quick):
    """The validity checks that apply to what ran: [(passed, line)]."""
    out = []
    alone = {m: per_seed(results, "alone", m, "final_acc", seeds) for m in ("clora", "ti")}
    if alone["clora"]:
        worst = min(r["final_acc"] for r in results if r["kind"] == "alone" and r["method"] == "clora")
        out.append((np.mean(alone["clora"]) >= UPPER, f"the upper bound learns: clora alone {np.mean(alone['clora']):.3f} "
                    f">= {UPPER} (worst concept {worst:.3f})"))
    if alone["ti"]:
        out.append((np.mean(alone["ti"]) <= TI_MAX, f"the world needs weights: ti alone {np.mean(alone['ti']):.3f} <= {TI_MAX}"))
    elif ti_stream := per_seed(results, "stream", "ti", "plasticity_acc", seeds):
        # A ti task trains as its concept would alone: ti changes no weight, and a task's draws come from
        # the seed and the concept (train.task_seed), so the stream's R[j][j] is ti alone, concept by concept.
        out.append((np.mean(ti_stream) <= TI_MAX, f"the world needs weights: ti right after learning, which is ti alone, "
                    f"{np.mean(ti_stream):.3f} <= {TI_MAX}"))
    kept = per_seed(results, "alone", "clora", "kept", seeds)
    if kept:
        out.append((np.mean(kept) >= KEPT_MIN, f"a concept stays in its prompt: after clora alone, the base prompts draw "
                    f"their own kind, not the concept, {np.mean(kept):.3f} >= {KEPT_MIN}"))
    lora = per_seed(results, "stream", "lora", "forgetting_acc", seeds)
    if lora:
        out.append((np.mean(lora) >= FORGET_MIN, f"sequential lora forgets: {np.mean(lora):.3f} >= {FORGET_MIN}"))
    if not quick and len(seeds) > 1:  # the table's accuracy figures: each stream's three, and the concepts alone
        cells = {("stream", r["method"], k) for r in results if r["kind"] == "stream" for k in FIGURES[:3]}
        cells |= {("alone", r["method"], "final_acc") for r in results if r["kind"] == "alone"}
        widest = max(((interval(per_seed(results, kind, m, k, seeds))[1] or 0.0, f"{m}{' alone' * (kind == 'alone')} {k}")
                      for kind, m, k in cells), default=None)
        if widest:
            out.append((widest[0] <= CI_MAX, f"seeds agree: widest 95% interval of an accuracy figure ±{widest[0]:.3f} "
                        f"({widest[1]}) <= ±{CI_MAX}"))
    return out


def matrices_png(out, methods, seed):
    """Every method's accuracy matrix (evaluate.py's eval_matrix.png) side by side, titled."""
    ims = [(m, Image.open(Path(out) / f"{m}-s{seed}" / "eval_matrix.png")) for m in methods
           if (Path(out) / f"{m}-s{seed}" / "eval_matrix.png").exists()]
    if not ims:
        return
    w, h = sum(im.width for _, im in ims), max(im.height for _, im in ims) + 20
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    d, x = ImageDraw.Draw(canvas), 0
    for m, im in ims:
        d.text((x + 6, 4), f"{m} (seed {seed}): accuracy after task i (rows) of concept j (columns)", fill=(0, 0, 0))
        canvas.paste(im, (x, 20))
        x += im.width
    save_png(canvas, Path(out) / "matrices.png")


COLOURS = [(200, 40, 40), (40, 90, 200), (40, 150, 60), (150, 60, 170), (220, 130, 20), (90, 90, 90)]


def curves_png(results, methods, seeds, path, W=640, H=260):
    """Per method (a colour each), over the task index j: accuracy right after learning concept j
    (R[j][j], solid) and after the last task (R[T][j], dots); means over seeds. In black, where the
    experiment has it, the upper bound: concept j trained alone (clora, task 1)."""
    streams = [m for m in methods if any(r["kind"] == "stream" and r["method"] == m for r in results)]
    if not streams:
        return
    T = len(next(r for r in results if r["kind"] == "stream")["acc"])
    im = Image.new("RGB", (W + 60, H + 64), (255, 255, 255))
    d = ImageDraw.Draw(im)
    x0, y0 = 40, 10
    px = lambda j, a: (x0 + (j + 0.5) * W / T, y0 + (1 - a) * H)  # noqa: E731
    d.rectangle([x0, y0, x0 + W, y0 + H], outline=(0, 0, 0))
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([px(-0.5, a), px(T - 0.5, a)], fill=(225, 225, 225))
        d.text((4, px(0, a)[1] - 5), f"{a:.2f}", fill=(0, 0, 0))
    for j in range(0, T, max(1, T // 10)):
        d.text((px(j, 0)[0] - 4, y0 + H + 4), str(j + 1), fill=(0, 0, 0))
    alone = [[r["final_acc"] for r in results if r["kind"] == "alone" and r["method"] == "clora" and r["concept"] == j]
             for j in range(T)]
    if all(alone):
        d.line([px(j, np.mean(a)) for j, a in enumerate(alone)], fill=(0, 0, 0), width=1)
    for c, m in enumerate(streams):
        rs = [r for r in results if r["kind"] == "stream" and r["method"] == m]
        diag = np.mean([[r["acc"][j][j] for j in range(T)] for r in rs], 0)
        final = np.mean([[r["acc"][T - 1][j] for j in range(T)] for r in rs], 0)
        colour = COLOURS[c % len(COLOURS)]
        d.line([px(j, a) for j, a in enumerate(diag)], fill=colour, width=2)
        for j, a in enumerate(final):
            x, y = px(j, a)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((x0 + 8 + c * 90, y0 + H + 22), f"{m}", fill=colour)
    d.text((x0 + 8, y0 + H + 38), "task index; lines: right after learning, dots: after the last task"
           + (", black: each concept alone (upper bound)" if all(alone) else ""), fill=(0, 0, 0))
    save_png(im, path)


def claim(out, train_args):
    """An --out folder holds the runs of one set of train.py flags: a later call keeps and reuses the
    runs it finds there (train.py keeps a run's tasks; a run's scores are kept when its eval.json was
    scored with the same settings on the same files), so a call with other flags, or into a folder of
    runs that does not say which flags made them, is refused before anything runs."""
    path = out / "experiment.json"
    if path.exists():
        saved = json.loads(path.read_text())
        made = saved.get("train_args")
        if saved.get("version", 1) < 2:  # written before train.py's --prior: its runs were made without the term
            made = f"{made} --prior 0".strip()
        if made != train_args:
            sys.exit(f"error: {out} holds runs made with --train-args {made!r}, not {train_args!r}; pass another --out")
    elif any(p.is_dir() and (p / "run.json").exists() for p in out.glob("*")):
        sys.exit(f"error: {out} holds runs of an unknown experiment (no experiment.json); pass another --out")
    else:
        write_text(json.dumps({"train_args": train_args, "version": 2}) + "\n", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default: runs/experiment (runs/check with --check)")
    p.add_argument("--tasks", type=int, default=10, help="length of the stream (the world has 50 concepts)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    # 128, not evaluate.py's 32: at 32 samples per cell the binomial noise of a seed's forgetting figure alone
    # (sd 0.024-0.034 on the 10-concept streams) gives a 3-seed 95% interval of +-0.06-0.08, over the +-0.05
    # the seeds-agree check asks; 128 halves it, for a few more minutes of scoring per 10-task stream (README).
    p.add_argument("--n", type=int, default=128, help="samples per scored cell")
    p.add_argument("--every", type=int, default=1, help="score full rows after every N-th task (long streams)")
    p.add_argument("--pair-with", nargs="+", choices=list(METHODS), default=["clora"], metavar="METHOD",
                   help="the methods every stream is paired against, seed by seed (default: clora)")
    p.add_argument("--no-upper-bound", action="store_true")
    p.add_argument("--check", action="store_true", help="the quick validity checks: exit 1 if one fails")
    p.add_argument("--workers", type=int, default=2, help="parallel jobs on the CPU, when there is no GPU and no --devices")
    p.add_argument("--devices", help="comma-separated, one job at a time on each: cuda:0,cuda:1 (default: every visible GPU)")
    p.add_argument("--train-args", default="", help='extra train.py flags for every run, given with "=": --train-args="--lam 1e4" '
                   "(argparse reads a lone flag after a space, --train-args --no-mask, as experiment.py's own and stops)")
    args = p.parse_args(argv)
    if not 1 <= args.tasks <= len(world.CONCEPTS):
        p.error(f"--tasks must be 1-{len(world.CONCEPTS)}: the world has {len(world.CONCEPTS)} concepts")
    if args.n < 2 or args.every < 1 or args.workers < 1:
        p.error("--n must be >= 2, --every and --workers >= 1")
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    devices = args.devices.split(",") if args.devices else gpus or ["cpu"] * args.workers
    unknown = [d for d in devices if d != "cpu" and d not in gpus]
    if unknown:
        p.error(f"--devices: no device {unknown[0]} here (this machine has: cpu{''.join(', ' + g for g in gpus)})")
    out = Path(args.out or ("runs/check" if args.check else "runs/experiment"))
    claim(out, args.train_args)
    t0 = time.time()
    job_args = (str(out), args.train_args, args.n, args.every)
    if args.check:
        seeds, methods = args.seeds[:1], ["lora"]
        tasks = len(CHECK_CONCEPTS)
        # The stream first: the longest job, so the others fill the remaining workers around it.
        jobs = [("stream", "lora", None, seeds[0], tasks, *job_args)]
        jobs += [("alone", m, j, seeds[0], 1, *job_args) for m in ("clora", "ti") for j in CHECK_CONCEPTS]
    else:
        seeds, methods, tasks = args.seeds, args.methods, args.tasks
        jobs = [("stream", m, None, s, tasks, *job_args) for s in seeds for m in methods]
        if not args.no_upper_bound:
            jobs += [("alone", "clora", j, s, 1, *job_args) for s in seeds for j in range(tasks)]
    world.write_concepts(out / "data", n=max([tasks] + [j + 1 for _, _, j, *_ in jobs if j is not None]))
    # A fresh process per job (nothing leaks between runs), as many at a time as there are devices;
    # spawned, not forked: CUDA cannot be used in a child forked after the parent looked for GPUs.
    mp = multiprocessing.get_context("spawn")
    free = mp.Queue()
    for d in devices:
        free.put(d)
    with mp.Pool(len(devices), initializer=take_devices, initargs=(free,), maxtasksperchild=1) as pool:
        results = []
        for r in pool.imap_unordered(job, jobs):
            if "error" in r:
                pool.terminate()
                sys.exit(f"{r['error']} (job {r['name']}; log in {out / 'logs'})")
            results.append(r)
            print(f"{r['name']}: right after learning {r['plasticity_acc']:.3f}, final {r['final_acc']:.3f}, forgetting "
                  f"{r['forgetting_acc']:.3f} ({r['seconds']:.0f} s; {len(results)}/{len(jobs)} jobs, {time.time() - t0:.0f} s in all)",
                  flush=True)
    minutes = (time.time() - t0) / 60
    checked = checks(results, seeds, args.check)
    header = (f"{tasks} concepts, seeds {seeds}, {args.n} samples per cell, {minutes:.1f} min on {os.cpu_count()} CPU cores; "
              "accuracy: the concept classifier's choice among all 50 concepts; MMD: KID-kernel MMD^2 to held-out real images; "
              "base prompts kept: after the last task, samples of 'a photo of a face' / 'a photo of a building' of their own kind "
              "and not a learned concept (–: none left unlearned)")
    lines = [("PASS " if ok else "FAIL ") + line for ok, line in checked]
    extra = [paired(results, methods, seeds, ref) for ref in args.pair_with] + [checkpoints(results, methods, seeds)]
    md = (header + "\n\n" + table(results, methods, seeds) + "".join("\n\n" + x for x in extra if x)
          + "\n\nValidity checks:\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    write_text(md, out / "results.md")
    write_text(json.dumps({"minutes": minutes, "checks": lines, "results": results}, indent=1) + "\n", out / "results.json")
    matrices_png(out, methods, seeds[0])
    curves_png(results, methods, seeds, out / "curves.png")
    print(md)
    if not all(ok for ok, _ in checked):
        sys.exit(f"error: {sum(not ok for ok, _ in checked)} validity check(s) failed (see above)")


if __name__ == "__main__":
    main()

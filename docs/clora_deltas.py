"""The README's diagnostic "What C-LoRA's collapsed deltas still do": a finished run of the embedded world
scored after its last task with the K/V deltas of tasks 2..T removed (task 1's delta and every task's token
rows kept), concept by concept against the run's own R[T][j] in eval.json. The samples use the first n of
the cell's noise (evaluate.concept_samples), so the deltas are the only difference.

    python docs/clora_deltas.py runs/exp50-prior/clora-s0 --n 64     # 49 cells, 13 min on 2 cores beside two training jobs
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
from clora import CLoRA, read_task  # noqa: E402


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=64, help="samples per concept (at most the cell's)")
    args = p.parse_args()
    run, model = evaluate.world_model(args.run)
    scored = json.loads((Path(args.run) / "eval.json").read_text())
    if args.n > scored["scored_with"]["n"]:
        sys.exit(f"{args.run}: scored with {scored['scored_with']['n']} samples per cell; give --n at most that")
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, run["method"], run["rank"])
    if adapter.kind != "lowrank":
        sys.exit(f"{args.run}: a {run['method']} run has no low-rank K/V deltas to remove")
    for i, task in enumerate(run["tasks"]):
        tensors = read_task(args.run, task, run["method"])
        if i > 0:  # A = 0 makes the task's delta A B zero; its token rows stay
            tensors = {k: torch.zeros_like(v) if k.endswith(".A") else v for k, v in tensors.items()}
        adapter.load_task(task["word"], tensors)
    classifier, seed, last = evaluate.load_classifier(), scored["scored_with"]["seed"], scored["acc"][-1]
    rows = []
    for j, word in enumerate(adapter.words[1:], start=1):
        images = evaluate.concept_samples(model, word, j, args.n, scored["scored_with"]["steps"], scored["scored_with"]["cfg"], seed)
        rows.append((last[j], (classifier(images).argmax(1) == evaluate.INDEX[word]).float().mean().item()))
        print(f"{j + 1} {word}: with every delta {rows[-1][0]:.3f}, task 1's delta only {rows[-1][1]:.3f}", flush=True)
    full, cut = np.array(rows).T
    print(f"concepts 2-{len(adapter.words)}: with every delta {full.mean():.3f}, task 1's delta only {cut.mean():.3f}; "
          f"lower without for {(cut < full).sum()} of {len(rows)}")


if __name__ == "__main__":
    main()

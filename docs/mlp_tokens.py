"""The README's table "What the MLP tokens do": for finished runs of the embedded world, how large the
concepts' token rows are, whether the text encoder reads them in context, how alike the concepts'
outputs are, and how much a later task's K/V delta moves an old concept's keys and values. No sampling.

    python docs/mlp_tokens.py runs/exp10-prior/lora-s0 runs/exp10-prior/stamina-s0
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clora import CLoRA, read_task  # noqa: E402
from evaluate import world_model  # noqa: E402


def diagnose(run_dir):
    run, model = world_model(run_dir)
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, run["method"], run["rank"])
    deltas = []  # per task: its K/V delta per layer, as it entered the frozen past
    for task in run["tasks"]:
        before = {n: layer.past.clone() for n, layer in adapter.kv.items()}
        adapter.load_task(task["word"], read_task(run_dir, task, run["method"]))
        deltas.append({n: layer.past - before[n] for n, layer in adapter.kv.items()})
    vocab = adapter.embedding.weight.shape[0]

    @torch.no_grad()
    def at(prompt):  # the text encoder's outputs at the concept's own positions, flattened
        ids = model.tokenizer([prompt])
        return model.text_encoder(ids)[0][(ids[0] >= vocab).nonzero().flatten()]

    own = [at(f"a photo of {w}") for w in adapter.words]
    other = [at(f"{w} at night, red background, two floors") for w in adapter.words]
    in_context = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(own, other)]
    flat = torch.stack([c.flatten() for c in own])
    pairwise = F.cosine_similarity(flat[:, None], flat[None], dim=-1).numpy()[~np.eye(len(own), dtype=bool)]
    moved = lambda d, c: sum(((c @ w.T) ** 2).sum() for w in d.values()).sqrt().item()  # noqa: E731
    hits = [moved(deltas[t], own[j]) / moved(deltas[t], own[t]) for t in range(1, len(own)) for j in range(t) if adapter.kind]  # ti: no delta
    norms = adapter.embedding.past.norm(dim=1)
    print(f"{run_dir}: token row norms {norms.mean():.0f} ({norms.min():.0f}-{norms.max():.0f}); outputs in two prompts, "
          f"cosine {np.mean(in_context):.3f}; concepts pairwise cosine {pairwise.mean():.3f}; "
          f"task t's K/V change on an old concept / on its own {np.mean(hits) if hits else float('nan'):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for r in sys.argv[1:]:
        diagnose(r)

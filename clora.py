"""C-LoRA: continual customization of Stable Diffusion (Smith et al., "Continual Diffusion", TMLR 2024).

Concepts arrive one task at a time. For every cross-attention K and V projection of the UNet
(`attn2.to_k`, `attn2.to_v`; nothing else in the UNet changes) and task t:

    W_t = W_init + sum_{t'<t} A_t' B_t' + A_t B_t          A: (out, r), B: (r, in)

The past products are frozen; only A_t, B_t and the new concept's token embeddings train, under

    loss = || eps - eps_theta(x_s, s, c) ||^2 + lambda * sum_layers || |sum_{t'<t} A_t' B_t'| * (A_t B_t) ||_F^2

where * is the element-wise product: the new delta is pushed off the entries earlier tasks used.
The penalty is zero at task 1. Each concept's word (`<alice>`) stands for n new token embeddings,
initialised at random; no existing embedding changes. Everything folds back into plain weights.

The same class runs the paper's baselines by changing what trains and the penalty (`METHODS`).

    adapter = CLoRA(unet, text_encoder, tokenizer, method="clora", rank=16)
    adapter.load_task(past_task_tensors)        # for every earlier task, in order: frozen
    adapter.start_task("<alice>", n_tokens=2)   # trainable A_t, B_t and 2 token rows
    loss = mse + lam * adapter.penalty()
    adapter.task_tensors()                      # what a task file stores
    adapter.fold()                              # plain nn.Linear / nn.Embedding again, for sampling
"""
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, read_state_dict, sha256

TARGETS = ("attn2.to_k", "attn2.to_v")
# method -> (delta: "lowrank" | "full" | None, penalty on?)
METHODS = {
    "clora": ("lowrank", True),  # the paper's method
    "lora": ("lowrank", False),  # sequential LoRA: same stacking, lambda = 0
    "ti": (None, False),  # textual inversion: the tokens alone
    "kv": ("full", False),  # Custom Diffusion: full-rank K/V deltas
}


class KVDelta(nn.Module):
    """One K or V projection: y = x (W_init + past + A B)^T (or + D, a full-rank delta, for `kv`).
    W_init is the base Linear's own Parameter (key `...attn2.to_k.weight` unchanged) and is never
    written; `past` is the frozen sum of earlier tasks' deltas."""

    def __init__(self, base):
        super().__init__()
        assert base.bias is None, "SD 1.x K/V projections have no bias"
        self.weight = base.weight.requires_grad_(False)
        self.register_buffer("past", torch.zeros_like(self.weight, dtype=torch.float32), persistent=False)
        self.A = self.B = self.D = None

    def start(self, kind, rank, generator):
        out, inp = self.weight.shape
        dev = self.weight.device
        self.A = self.B = self.D = None
        if kind == "lowrank":
            # A = 0, B random: the delta starts at exactly zero (LoRA's init).
            self.A = nn.Parameter(torch.zeros(out, rank, device=dev))
            self.B = nn.Parameter((torch.randn(rank, inp, generator=generator) / rank).to(dev))
        elif kind == "full":
            self.D = nn.Parameter(torch.zeros(out, inp, device=dev))

    def delta(self):
        """The current task's delta (out, in), or None when this method trains no weights."""
        if self.A is not None:
            return self.A @ self.B
        return self.D

    def forward(self, x):
        y = F.linear(x, self.weight + self.past.to(self.weight.dtype))  # both frozen: nothing saved for backward
        # The current task's term through its factors, x B^T A^T: never an (out, in) matrix in the graph.
        if self.A is not None:
            return y + F.linear(F.linear(x, self.B.to(x.dtype)), self.A.to(x.dtype))
        if self.D is not None:
            return y + F.linear(x, self.D.to(x.dtype))
        return y


class HadamardPenalty(torch.autograd.Function):
    """|| |P| * (A B) ||_F^2 = sum(P^2 * (A B)^2), with gradient G = 2 P^2 * (A B):  dA = G B^T,  dB = A^T G.
    Written out so that backward saves nothing of size (out, in): plain autograd would keep A B,
    |P| and their product per layer (3 x 77 MB at SD 1.x size); here A B is recomputed from the factors."""

    @staticmethod
    def forward(ctx, A, B, P):
        ctx.save_for_backward(A, B, P)
        return (P * (A @ B)).square().sum()

    @staticmethod
    def backward(ctx, grad):
        A, B, P = ctx.saved_tensors
        G = (2 * grad) * P.square() * (A @ B)  # (out, in), freed on return
        return G @ B.T, A.T @ G, None


class ConceptEmbedding(nn.Module):
    """Token embedding with extra rows after the base vocabulary: `past` (earlier concepts, frozen)
    then `new` (the current concept, trained). The base table is the original Parameter, untouched."""

    def __init__(self, base):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        width = self.weight.shape[1]
        self.register_buffer("past", torch.zeros(0, width, device=self.weight.device), persistent=False)
        self.new = nn.Parameter(torch.zeros(0, width, device=self.weight.device))

    def rows(self):
        return torch.cat([self.past, self.new])

    def forward(self, ids):
        vocab, extra = self.weight.shape[0], self.rows()
        x = F.embedding(ids.clamp(max=vocab - 1), self.weight)
        if len(extra) == 0:
            return x
        e = F.embedding((ids - vocab).clamp(min=0), extra.to(x.dtype))
        return torch.where((ids >= vocab)[..., None], e, x)


class CLoRA(nn.Module):
    def __init__(self, unet, text_encoder, tokenizer, method="clora", rank=16):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.method, self.rank, self.tokenizer = method, rank, tokenizer
        self.kind, self.penalized = METHODS[method]
        self.words = []  # concept words, in task order
        # Swap the target modules for wrappers that hold the very same base Parameters. Names are
        # the UNet's own module names, which also key every saved factor.
        self.originals = {}
        self.kv = nn.ModuleDict()
        for name, module in list(unet.named_modules()):
            if name.endswith(TARGETS):
                self.kv[name.replace(".", "/")] = KVDelta(module)
                self._swap(unet, name, self.kv[name.replace(".", "/")])
        assert len(self.kv), "no attn2.to_k / attn2.to_v layers found"
        self.embedding = ConceptEmbedding(text_encoder.text_model.embeddings.token_embedding)
        self._swap(text_encoder, "text_model.embeddings.token_embedding", self.embedding)
        self.unet, self.text_encoder = [unet], [text_encoder]  # in lists: not submodules of the adapter

    def _swap(self, root, name, new):
        self.originals[(id(root), name)] = (*self._parent(root, name), root.get_submodule(name))
        self._replace(root, name, new)

    @staticmethod
    def _parent(root, name):
        parent_name, _, attr = name.rpartition(".")
        return root.get_submodule(parent_name), attr

    def _replace(self, root, name, new):
        setattr(*self._parent(root, name), new)

    # -- tasks --------------------------------------------------------------------------------

    def _add_concept(self, word, n):
        ids = self.tokenizer.add_concept(word, n)
        assert ids[0] == self.embedding.weight.shape[0] + len(self.embedding.rows()), "tokenizer and embedding disagree"
        self.words.append(word)

    def start_task(self, word, n_tokens=2, seed=0):
        """Fresh trainable delta factors and `n_tokens` random embeddings standing for `word`."""
        g = torch.Generator().manual_seed(seed)
        self._add_concept(word, n_tokens)
        base = self.embedding.weight
        # Random init at the scale of the existing embeddings (the paper inits new tokens randomly).
        rows = torch.randn(n_tokens, base.shape[1], generator=g) * base.float().std().item()
        self.embedding.new = nn.Parameter(rows.to(base.device))
        for layer in self.kv.values():
            layer.start(self.kind, self.rank, g)

    def load_task(self, word, tensors):
        """Add a finished task (`task_tensors()` of its training) to the frozen past."""
        keys = {f"{name.replace('/', '.')}.{k}" for name in self.kv for k in {"lowrank": "AB", "full": "D", None: ""}[self.kind]}
        if set(tensors) != keys | {"tokens"}:
            raise ValueError(f"task tensors for {word} do not fit method {self.method!r} on this UNet "
                             f"({len(set(tensors) ^ (keys | {'tokens'}))} keys differ)")
        self._add_concept(word, len(tensors["tokens"]))
        self.embedding.past = torch.cat([self.embedding.past, tensors["tokens"].to(self.embedding.past)])
        for name, layer in self.kv.items():
            key = name.replace("/", ".")
            if self.kind == "lowrank":
                layer.past += (tensors[key + ".A"].float() @ tensors[key + ".B"].float()).to(layer.past.device)
            elif self.kind == "full":
                layer.past += tensors[key + ".D"].float().to(layer.past.device)

    def task_tensors(self):
        """The current task's learned tensors, keyed by UNet module name: what a task file stores."""
        out = {"tokens": self.embedding.new.detach().float().cpu().clone()}
        for name, layer in self.kv.items():
            for k in "ABD":
                if getattr(layer, k) is not None:
                    out[f"{name.replace('/', '.')}.{k}"] = getattr(layer, k).detach().float().cpu().clone()
        return out

    def finish_task(self):
        """Freeze the current task into the past, so the next task can start in the same process."""
        for layer in self.kv.values():
            d = layer.delta()
            if d is not None:
                layer.past += d.detach().float()
            layer.A = layer.B = layer.D = None
        self.embedding.past = torch.cat([self.embedding.past, self.embedding.new.detach().float()])
        self.embedding.new = nn.Parameter(self.embedding.past[:0].clone())

    def delta_norms(self):
        """Frobenius norms of the current task's delta: all K, all V, and all together. A known
        failure of this regulariser is that new deltas collapse toward zero (Jha et al., ICLR 2025)."""
        sq = {"to_k": 0.0, "to_v": 0.0}
        for name, layer in self.kv.items():
            d = layer.delta()
            if d is not None:
                sq[name.rsplit("/", 1)[1]] += d.detach().float().square().sum().item()
        return {**{k: v**0.5 for k, v in sq.items()}, "total": (sq["to_k"] + sq["to_v"]) ** 0.5}

    def fold(self):
        """Replace the wrappers by plain nn.Linear / nn.Embedding holding W_init + every delta and the
        grown token table: sampling then costs exactly what the base model costs."""
        with torch.no_grad():
            for name, layer in self.kv.items():
                w = layer.weight + layer.past.to(layer.weight.dtype)
                if layer.delta() is not None:
                    w = w + layer.delta().to(w.dtype)
                plain = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                plain.weight = nn.Parameter(w, requires_grad=False)
                self._replace(self.unet[0], name.replace("/", "."), plain)
            table = torch.cat([self.embedding.weight, self.embedding.rows().to(self.embedding.weight.dtype)])
            plain = nn.Embedding(*table.shape, device="meta")
            plain.weight = nn.Parameter(table, requires_grad=False)
            self._replace(self.text_encoder[0], "text_model.embeddings.token_embedding", plain)

    def detach(self):
        """Put the original modules back: the base model exactly as it was loaded."""
        for parent, attr, module in self.originals.values():
            setattr(parent, attr, module)

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad and p.numel()]

    def penalty(self):
        """sum over layers of || |past| * A B ||_F^2; zero at task 1 (past = 0) and for methods without it."""
        if not self.penalized:
            return torch.zeros(())
        return sum(HadamardPenalty.apply(layer.A, layer.B, layer.past) for layer in self.kv.values())


def task_file(run_dir, task):
    return Path(run_dir) / f"task_{task:02d}.safetensors"


def read_run(run_dir):
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no run.json, so not a train.py run folder")
    return json.loads(path.read_text())


def load_run(run_dir, model, ckpt):
    """Every task of a train.py run, folded into `model` (a StableDiffusion loaded from `ckpt`) for
    sampling. The base checkpoint must be the run's own: its fingerprint is checked."""
    run = read_run(run_dir)
    if sha256(ckpt) != run["base_sha256"]:
        raise CheckpointError(f"{ckpt} is not the base checkpoint of run {run_dir} ({run['base_checkpoint']})")
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, run["method"], run["rank"])
    for t in run["tasks"]:
        adapter.load_task(t["word"], read_state_dict(task_file(run_dir, t["task"])))
    adapter.fold()
    return adapter.words


def check_concept_words(prompts, known):
    """A `<word>` in a prompt that no task learned is an error, not silently BPE-split text."""
    unknown = sorted({w for p in prompts for w in re.findall(r"<[^<>\s]+>", p.lower())} - set(known))
    if unknown:
        raise ValueError(f"unknown concept {', '.join(unknown)}; known: {' '.join(known) or 'none (pass --run)'}")

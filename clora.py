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
`previous()` gives the model as it was before the current task: the target of train.py's prior term
(`--prior`, not in the paper).

    adapter = CLoRA(unet, text_encoder, tokenizer, method="clora", rank=16)
    adapter.load_task(past_task_tensors)        # for every earlier task, in order: frozen
    adapter.start_task("<alice>", n_tokens=2)   # trainable A_t, B_t and 2 token rows
    loss = mse + lam * adapter.penalty()
    adapter.task_tensors()                      # what a task file stores
    adapter.fold()                              # plain nn.Linear / nn.Embedding again, for sampling

STAMINA (Smith et al., "Continual Diffusion with STAMINA: STack-And-Mask INcremental Adapters", CVPR-W
2024), `method="stamina"`: the same K/V targets, stacking and folding, with each task's delta gated by
a learned hard mask and the concept's tokens produced by an MLP. Only the paper's abstract was
available, so this is a RECONSTRUCTION; every choice marked (R) is ours, not the paper's:

    W_t   = W_init + sum_{t'<t} H_t' * (A_t' B_t') + M_t * (A_t B_t)        * element-wise
    L_t   = U_t tanh(V_t) + b_t 1^T            U: (out, m), V: (m, in), b: (out,), m = MASK_HIDDEN   (R)
    M_t   = F_t * sigmoid(s L_t), s = 1/S_MAX -> S_MAX linearly over the task's steps  (`sigmoid-anneal`,
            the hard attention to the task of Serra et al. 2018)                                     (R)
       or   F_t * 1[L_t > 0] forward, the gradient of sigmoid(L_t) backward  (`ste`, straight-through) (R)
    F_t   = 1 - (H_1 | ... | H_t-1) with `steer` (the entries no earlier task wrote), else 1         (R)
    H_t   = F_t * 1[L_t > 0]: the binary mask every finished task folds with, stored as bits        (R)
    loss  = || eps - eps_theta ||^2 + rho * (sum of M_t over its entries) / (number of entries)     (R)
    e_t   = z_t + W2 gelu(W1 z_t + b1) + b2   the concept's n token rows; z_t: (n, width), W2 = b2 = 0
            at init; folded into plain embedding rows when the task ends ("customized MLP tokens")   (R)

"Low-rank MLP" (R): column j of L is a two-layer MLP of hidden width m over the one-hot index of
input j (first layer V, tanh, second layer U, bias b), so rank(L) <= m + 1 and the mask costs
(out + in) m + out parameters instead of out x in. The mask starts open (b = 1: 1[L > 0] opens about
94% of the entries, and the annealed gates start near 0.5) and the sparsity term closes the entries a
task does not need (R). With `steer`, earlier masks
steer: a task writes only entries that no earlier task wrote, as HAT protects earlier tasks' units,
so an old concept's weights are never changed (though a new delta still acts on its prompts) and the
free entries run out over a long stream unless the masks are sparse (R). C-LoRA's penalty is off (R).
Ablations: `mask=False` (plain stacked LoRA, MLP tokens), `mlp_tokens=False` (plain token rows), and a
control of ours, `max_token_norm=N`: the rows rescaled to norm <= N (the MLP's rows grow to thousands of
times the vocabulary's norm, which plain rows do not: README, "What the MLP tokens do").
"""
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, read_metadata, read_state_dict, sha256

TARGETS = ("attn2.to_k", "attn2.to_v")
# method -> (delta: "lowrank" | "full" | None, penalty on?)
METHODS = {
    "clora": ("lowrank", True),  # the paper's method
    "lora": ("lowrank", False),  # sequential LoRA: same stacking, lambda = 0
    "ti": (None, False),  # textual inversion: the tokens alone
    "kv": ("full", False),  # Custom Diffusion: full-rank K/V deltas
    "stamina": ("lowrank", False),  # STAMINA (reconstructed, see above): low-rank deltas gated by masks, MLP tokens
}
HARDENING = ("sigmoid-anneal", "ste")
MASK_HIDDEN = 8  # m, the mask MLP's hidden width (R)
S_MAX = 400.0  # the final sigmoid slope, HAT's value (R)
BITS = 2 ** torch.arange(7, -1, -1, dtype=torch.uint8)  # a stored mask packs 8 entries per byte, first entry highest


def pack_bits(mask):
    """(out, in) bool -> (out * in / 8,) uint8: a binary mask at one bit per entry (in is a multiple of 8 in SD)."""
    return (mask.reshape(-1, 8).to(torch.uint8) * BITS).sum(1, dtype=torch.uint8)


def unpack_bits(bits, shape):
    return (bits[:, None] & BITS).ne(0).reshape(shape)


class KVDelta(nn.Module):
    """One K or V projection: y = x (W_init + past + A B)^T (or + D, a full-rank delta, for `kv`).
    W_init is the base Linear's own Parameter (key `...attn2.to_k.weight` unchanged) and is never
    written; `past` is the frozen sum of earlier tasks' deltas."""

    def __init__(self, base):
        super().__init__()
        assert base.bias is None, "SD 1.x K/V projections have no bias"
        self.weight = base.weight.requires_grad_(False)
        self.register_buffer("past", torch.zeros_like(self.weight, dtype=torch.float32), persistent=False)
        # STAMINA: the entries some finished task's hard mask left open (its `steer` writes elsewhere).
        self.register_buffer("taken", torch.zeros_like(self.weight, dtype=torch.bool), persistent=False)
        self.A = self.B = self.D = self.mask = None
        self.use_current = True  # False: the layer as it was before the current task (CLoRA.previous)

    def start(self, kind, rank, generator, hardening=None, steer=False):
        """A fresh delta of `kind`; with `hardening` (STAMINA), gated by a fresh Mask, and with `steer`
        kept off the entries earlier tasks took."""
        out, inp = self.weight.shape
        dev = self.weight.device
        self.A = self.B = self.D = self.mask = None
        if hardening:
            self.mask = Mask(out, inp, hardening, generator, dev, ~self.taken if steer else None)
        if kind == "lowrank":
            # A = 0, B random: the delta starts at exactly zero (LoRA's init).
            self.A = nn.Parameter(torch.zeros(out, rank, device=dev))
            self.B = nn.Parameter((torch.randn(rank, inp, generator=generator) / rank).to(dev))
        elif kind == "full":
            self.D = nn.Parameter(torch.zeros(out, inp, device=dev))

    def hard_mask(self):
        """The binary mask the current task folds with: 1[L > 0] (on the free entries only, with `steer`),
        all ones without a Mask."""
        if self.mask is None:
            return torch.ones_like(self.weight, dtype=torch.bool)
        hard = self.mask.logits() > 0
        return hard if self.mask.free is None else hard & self.mask.free

    def delta(self):
        """The current task's delta (out, in) as it folds (masked by the hard mask), or None when this
        method trains no weights."""
        if self.mask is not None:
            return self.hard_mask() * (self.A @ self.B)
        if self.A is not None:
            return self.A @ self.B
        return self.D

    def forward(self, x):
        y = F.linear(x, self.weight + self.past.to(self.weight.dtype))  # both frozen: nothing saved for backward
        if not self.use_current:
            return y
        if self.mask is not None:  # a masked delta is an (out, in) matrix whichever way it is computed
            m = self.mask
            # In float32 under any autocast: the mask that trains must be the one that folds (task_tensors,
            # float32), and a bf16 L flips 1[L > 0] near zero (about 0.04% of the entries at init).
            with torch.autocast(x.device.type, enabled=False):
                d = MaskedDelta.apply(self.A, self.B, m.U, m.V, m.b, m.s, m.ste, m.free) if m.relaxed else self.delta()
            return y + F.linear(x, d.to(x.dtype))
        # The current task's term through its factors, x B^T A^T: never an (out, in) matrix in the graph.
        if self.A is not None:
            return y + F.linear(F.linear(x, self.B.to(x.dtype)), self.A.to(x.dtype))
        if self.D is not None:
            return y + F.linear(x, self.D.to(x.dtype))
        return y


class Mask(nn.Module):
    """STAMINA's mask over the (out, in) entries of one projection's delta (R, see the module docstring):
    logits L = U tanh(V) + b 1^T. `relaxed` (set by CLoRA.set_slope while training) selects the training
    form at slope `s`; otherwise the layer uses the hard mask, the one that folds. `free` (bool, or None
    for all): the entries the mask may open."""

    def __init__(self, out, inp, hardening, generator, device, free=None):
        super().__init__()
        m = MASK_HIDDEN
        self.U = nn.Parameter((torch.randn(out, m, generator=generator) / m**0.5).to(device))
        self.V = nn.Parameter(torch.randn(m, inp, generator=generator).to(device))
        self.b = nn.Parameter(torch.ones(out, device=device))  # L ~ 1 +- 0.6: the mask starts (nearly) open (R)
        self.ste = hardening == "ste"
        self.free = free
        # A tensor, not a float: a new slope every step must not recompile a torch.compile'd UNet.
        self.register_buffer("s", torch.ones((), device=device), persistent=False)
        self.relaxed = False

    def logits(self):
        return self.U @ self.V.tanh() + self.b[:, None]

    def relaxed_mask(self):
        """sigmoid(s L), zero off the free entries: what the sparsity term counts."""
        m = torch.sigmoid(self.s * self.logits())
        return m if self.free is None else m * self.free


class MaskedDelta(torch.autograd.Function):
    """The masked delta in training, F * sigmoid(s L) * (A B) with L = U tanh(V) + b 1^T, or with `ste`
    F * 1[L > 0] * (A B) forward and sigmoid(s L)'s gradient backward; F: the free entries (None: all).
    Written out so that backward saves only the factors: plain autograd would keep A B, the mask and
    their product, each (out, in) (3 x 77 MB over SD 1.x's K/V layers); here they are recomputed."""

    @staticmethod
    def forward(ctx, A, B, U, V, b, s, ste, free=None):
        ctx.save_for_backward(A, B, U, V, b, s, free)
        ctx.ste = ste
        L = U @ V.tanh() + b[:, None]
        mask = (L > 0).to(A.dtype) if ste else torch.sigmoid(s * L)
        return (mask if free is None else mask * free) * (A @ B)

    @staticmethod
    def backward(ctx, G):
        A, B, U, V, b, s, free = ctx.saved_tensors
        if free is not None:  # nothing flows through the entries the mask may not open
            G = G * free
        h = V.tanh()
        L = U @ h + b[:, None]
        sig = torch.sigmoid(s * L)
        dP = G * ((L > 0).to(G.dtype) if ctx.ste else sig)  # through the product, at the forward's mask
        dL = G * (A @ B) * (s * sig * (1 - sig))  # through the mask: d sigmoid(s L) / dL
        return dP @ B.T, A.T @ dP, dL @ h.T, (U.T @ dL) * (1 - h * h), dL.sum(1), None, None, None


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
        self.mlp = None  # STAMINA's token MLP for the current concept, whose input is then `new`
        self.max_norm = None  # STAMINA's --max-token-norm control: the current rows rescaled to norm <= it

    def start(self, rows, mlp_tokens, generator, max_norm=None):
        """The current concept's trainable rows; with `mlp_tokens`, STAMINA's customized MLP tokens (R):
        rows = z + W2 gelu(W1 z + b1) + b2, z = `rows` trained with the MLP, W2 = b2 = 0 at init (the rows
        start as `rows`), W1 scaled for unit pre-activations (a plain random init would be all but linear
        at the embeddings' small scale); hidden width = the embedding width. With `max_norm`, each row
        is rescaled to norm <= max_norm (a control, see the module docstring)."""
        self.new = nn.Parameter(rows)
        self.mlp, self.max_norm = None, max_norm
        if mlp_tokens:
            w = rows.shape[1]
            with torch.device("meta"):
                mlp = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
            self.mlp = mlp.to_empty(device=rows.device)
            with torch.no_grad():
                scale = w**0.5 * rows.std().item()
                self.mlp[0].weight.copy_(torch.randn(w, w, generator=generator) / scale)
                for p in (self.mlp[0].bias, self.mlp[2].weight, self.mlp[2].bias):
                    p.zero_()

    def current(self):
        """The current concept's rows, through the token MLP where there is one."""
        rows = self.new if self.mlp is None else self.new + self.mlp(self.new)
        if self.max_norm is None:
            return rows
        return rows * (self.max_norm / rows.norm(dim=1, keepdim=True)).clamp(max=1.0)

    def rows(self):
        return torch.cat([self.past, self.current()])

    def forward(self, ids):
        vocab, extra = self.weight.shape[0], self.rows()
        x = F.embedding(ids.clamp(max=vocab - 1), self.weight)
        if len(extra) == 0:
            return x
        e = F.embedding((ids - vocab).clamp(min=0), extra.to(x.dtype))
        return torch.where((ids >= vocab)[..., None], e, x)


class CLoRA(nn.Module):
    def __init__(self, unet, text_encoder, tokenizer, method="clora", rank=16, mask=True, mlp_tokens=True,
                 hardening="sigmoid-anneal", steer=False, max_token_norm=None):
        """`mask`, `mlp_tokens`, `hardening`, `steer` and `max_token_norm` are STAMINA's settings and apply to
        it alone; tasks already trained load without them (their files hold the folded tokens and the
        binary masks)."""
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if hardening not in HARDENING:
            raise ValueError(f"unknown hardening {hardening!r}; choose one of {', '.join(HARDENING)}")
        self.method, self.rank, self.tokenizer = method, rank, tokenizer
        self.kind, self.penalized = METHODS[method]
        stamina = method == "stamina"
        self.hardening = hardening if stamina and mask else None  # None: no mask
        self.mlp_tokens = stamina and mlp_tokens
        self.steer = bool(self.hardening) and steer
        self.max_token_norm = max_token_norm if stamina else None
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
        self.embedding.start(rows.to(base.device), self.mlp_tokens, g, self.max_token_norm)
        for layer in self.kv.values():
            layer.start(self.kind, self.rank, g, self.hardening, self.steer)

    @contextmanager
    def previous(self):
        """The model as it was before the current task (W_init + past, the same token table: base prompts
        hold no concept token): the target of train.py's prior term."""
        for layer in self.kv.values():
            layer.use_current = False
        try:
            yield
        finally:
            for layer in self.kv.values():
                layer.use_current = True

    def set_slope(self, s):
        """Every mask in its training form at slope s (see `slope`), or with s None in its hard form."""
        for layer in self.kv.values():
            if layer.mask is not None:
                layer.mask.relaxed = s is not None
                layer.mask.s.fill_(1.0 if s is None else s)

    def load_task(self, word, tensors):
        """Add a finished task (`task_tensors()` of its training) to the frozen past."""
        parts = {"lowrank": "AB", "full": "D", None: ""}[self.kind] + ("M" if self.method == "stamina" else "")
        keys = {f"{name.replace('/', '.')}.{k}" for name in self.kv for k in parts}
        if set(tensors) != keys | {"tokens"}:
            raise ValueError(f"task tensors for {word} do not fit method {self.method!r} on this UNet "
                             f"({len(set(tensors) ^ (keys | {'tokens'}))} keys differ)")
        self._add_concept(word, len(tensors["tokens"]))
        self._stack(tensors)

    def _stack(self, tensors):
        """Add a task's stored tensors to the frozen past. A task finished in this process goes through here
        too, so that the past is the same bits whether a task was just trained or read back from its file,
        on any device (the K/V products are formed on the CPU, from the stored float32 factors)."""
        self.embedding.past = torch.cat([self.embedding.past, tensors["tokens"].to(self.embedding.past)])
        for name, layer in self.kv.items():
            key = name.replace("/", ".")
            if self.kind == "lowrank":
                d = tensors[key + ".A"].float() @ tensors[key + ".B"].float()
                if self.method == "stamina":
                    m = unpack_bits(tensors[key + ".M"], d.shape).to(layer.past.device)
                    layer.taken |= m
                    d = m * d.to(m.device)
                layer.past += d.to(layer.past.device)
            elif self.kind == "full":
                layer.past += tensors[key + ".D"].float().to(layer.past.device)

    def task_tensors(self):
        """The current task's learned tensors, keyed by UNet module name: what a task file stores. For
        STAMINA, the folded token rows and the binary masks (all ones with the mask off) as bits, so
        that every load folds to the same weights whatever the ablation settings."""
        out = {"tokens": self.embedding.current().detach().float().cpu().clone()}
        for name, layer in self.kv.items():
            for k in "ABD":
                if getattr(layer, k) is not None:
                    out[f"{name.replace('/', '.')}.{k}"] = getattr(layer, k).detach().float().cpu().clone()
            if self.method == "stamina":
                out[f"{name.replace('/', '.')}.M"] = pack_bits(layer.hard_mask().detach().cpu())
        return out

    def finish_task(self):
        """Freeze the current task into the past, as a load of its task file would, so the next task can
        start in the same process."""
        tensors = self.task_tensors()
        for layer in self.kv.values():
            layer.A = layer.B = layer.D = layer.mask = None
        self._stack(tensors)
        self.embedding.new = nn.Parameter(self.embedding.past[:0].clone())
        self.embedding.mlp = None

    def delta_norms(self):
        """Frobenius norms of the current task's delta: all K, all V, and all together. A known
        failure of this regulariser is that new deltas collapse toward zero (Jha et al., ICLR 2025)."""
        sq = {"to_k": 0.0, "to_v": 0.0}
        for name, layer in self.kv.items():
            d = layer.delta()
            if d is not None:
                sq[name.rsplit("/", 1)[1]] += d.detach().float().square().sum().item()
        return {**{k: v**0.5 for k, v in sq.items()}, "total": (sq["to_k"] + sq["to_v"]) ** 0.5}

    def mask_density(self):
        """Fraction of the current task's K/V entries its hard masks leave open (1 without masks)."""
        open_ = sum(layer.hard_mask().sum().item() for layer in self.kv.values())
        return open_ / sum(layer.weight.numel() for layer in self.kv.values())

    def taken_density(self):
        """Fraction of the K/V entries some STAMINA task so far, the current one included, wrote (its
        hard mask left open): with `steer`, what later tasks can no longer write."""
        taken = sum((layer.taken | layer.hard_mask()).sum().item() for layer in self.kv.values())
        return taken / sum(layer.weight.numel() for layer in self.kv.values())

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

    def param_groups(self):
        """The trainable parameters by learning rate: K/V factors, STAMINA's mask MLPs, token rows (and MLP)."""
        masks = {id(p) for layer in self.kv.values() if layer.mask is not None for p in layer.mask.parameters()}
        tokens = {id(p) for p in self.embedding.parameters()}
        ps = self.trainable()
        return {"factors": [p for p in ps if id(p) not in masks | tokens], "mask": [p for p in ps if id(p) in masks],
                "tokens": [p for p in ps if id(p) in tokens]}

    def sparsity(self):
        """STAMINA's sparsity term: the relaxed masks' sum over every masked entry, divided by the number
        of entries (R): with `steer`, entries the mask may not open count as closed."""
        masks = [layer.mask for layer in self.kv.values() if layer.mask is not None]
        return sum(m.relaxed_mask().sum() for m in masks) / sum(m.U.shape[0] * m.V.shape[1] for m in masks)

    def penalty(self):
        """sum over layers of || |past| * A B ||_F^2; zero at task 1 (past = 0) and for methods without it."""
        if not self.penalized:
            return torch.zeros(())
        return sum(HadamardPenalty.apply(layer.A, layer.B, layer.past) for layer in self.kv.values())


def slope(step, steps, hardening):
    """The masks' slope s at training step `step` (0-based) of `steps`: for `sigmoid-anneal` linear from
    1/S_MAX to S_MAX at the last step, as HAT anneals it over an epoch's batches (R); `ste` trains the
    hard mask at every step and takes sigmoid(L)'s gradient (s = 1)."""
    if hardening == "ste":
        return 1.0
    return 1 / S_MAX + (S_MAX - 1 / S_MAX) * step / max(steps - 1, 1)


def task_file(run_dir, task):
    return Path(run_dir) / f"task_{task:02d}.safetensors"


RUN_FIELDS = ("base_checkpoint", "base_sha256", "method", "rank", "tasks")  # what every run.json holds


def read_run(run_dir):
    """A run folder's run.json, refused in one line naming it when it is not one train.py wrote."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if run_dir.is_file():
        raise CheckpointError(f"{run_dir}: a file, not a run folder; pass the folder train.py --run wrote")
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no run.json, so not a train.py run folder")
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file train.py wrote") from None
    tasks = run.get("tasks") if isinstance(run, dict) else None
    if (not isinstance(tasks, list) or any(k not in run for k in RUN_FIELDS) or run["method"] not in METHODS
            or not all(isinstance(t, dict) and isinstance(t.get("task"), int) and isinstance(t.get("word"), str) for t in tasks)):
        raise CheckpointError(f"{path}: incomplete or not train.py's (it needs {', '.join(RUN_FIELDS)}, a known method "
                              "and a task number and word per task); restore the file train.py wrote")
    return run


def read_task(run_dir, record, method):
    """The tensors of one finished task, checked against what run.json records of it: the file's
    metadata names its task, word and method, and run.json holds its digest. A swapped, edited or
    foreign file is refused in one line (runs and files written before either existed skip that check)."""
    path = task_file(run_dir, record["task"])
    tensors = read_state_dict(path)
    meta = read_metadata(path)
    says = {"task": str(record["task"]), "word": record["word"], "method": method}
    if any(k in meta and meta[k] != v for k, v in says.items()):
        held = " ".join(f"{k} {meta.get(k, '?')}" for k in says)
        raise CheckpointError(f"{path}: holds {held}, but run.json records task {record['task']} {record['word']} "
                              f"({method}); put the run's own file back")
    if "sha256" in record and sha256(path) != record["sha256"]:
        raise CheckpointError(f"{path}: not the file this run wrote for task {record['task']} {record['word']} "
                              "(its digest differs from run.json's); put the run's own file back")
    return tensors


def check_base(run_dir, run, ckpt, fix=""):
    """A run's base checkpoint must be the run's own: the file's digest against run.json's. `fix`: what to do."""
    if sha256(ckpt) != run["base_sha256"]:
        raise CheckpointError(f"{ckpt} is not the base checkpoint of run {run_dir} ({run['base_checkpoint']}){fix}")


def load_run(run_dir, model, ckpt):
    """Every task of a train.py run, folded into `model` (a StableDiffusion loaded from `ckpt`) for
    sampling. The base checkpoint must be the run's own: its fingerprint is checked; so is every task file."""
    run = read_run(run_dir)
    check_base(run_dir, run, ckpt)
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, run["method"], run["rank"])
    for t in run["tasks"]:
        adapter.load_task(t["word"], read_task(run_dir, t, run["method"]))
    adapter.fold()
    return adapter.words


def check_concept_words(prompts, known):
    """A `<word>` in a prompt that no task learned is an error, not silently BPE-split text."""
    unknown = sorted({w for p in prompts for w in re.findall(r"<[^<>\s]+>", p.lower())} - set(known))
    if unknown:
        raise ValueError(f"unknown concept {', '.join(unknown)}; known: {' '.join(known) or 'none (pass --run)'}")

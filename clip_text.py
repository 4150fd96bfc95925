"""CLIP ViT-L/14 text side as Stable Diffusion 1.x uses it: the byte-level BPE tokenizer and the
text transformer whose last hidden state conditions the UNet.

Module names follow the Hugging Face CLIPTextModel that SD 1.x checkpoints embed, so the original
file loads after stripping `cond_stage_model.transformer.`:

    from checkpoint import read_state_dict
    enc = TextEncoder.from_checkpoint(read_state_dict("weights/v1-5-pruned-emaonly.safetensors"))
    tok = Tokenizer()
    ctx = enc(tok(["a photo of an astronaut"]))   # (1, 77, 768)
"""
import gzip
import html
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_model

VOCAB_FILE = Path(__file__).parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache()
def bytes_to_unicode():
    """Map every byte to a printable unicode character, so BPE works on strings with no holes.
    Printable latin-1 bytes map to themselves; the rest are shifted to 256 and above."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


class Tokenizer:
    """CLIP's byte-level BPE. `tok(texts)` gives SD 1.x input ids: start token, the text, end token,
    padded with the end token to 77 (truncated so the end token stays last).

    Concept words added with `add_concept` (such as `<alice>`) are matched whole before BPE and
    stand for n new ids after the 49,408 of the base vocabulary, so no existing id changes."""

    def __init__(self, vocab_file=VOCAB_FILE, context_length=77):
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # The file's first line is a version header; CLIP uses the next 48,894 merges (49152-256-2).
        lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines]
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.concepts = {}  # concept word -> its ids, all after the base vocabulary
        self._compile()

    def _compile(self):
        specials = [START, END, *self.concepts]
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.cache = {t: t for t in specials}  # special tokens never go through BPE
        # Longest first, so that `<ab>` wins over a prefix `<a`; then CLIP's own pattern.
        alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        self.pat = regex.compile(
            alternatives + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    def add_concept(self, word, n=1):
        """Make `word` (lower case, since text is lower-cased before matching) stand for n new ids,
        e.g. "<alice>" -> [49408, 49409]. Returns the ids. A word already known is an error: it
        would silently alias."""
        if word != word.lower() or not word or any(c.isspace() for c in word):
            raise ValueError(f"concept word {word!r} must be lower case with no spaces")
        if word in self.encoder or word in self.concepts:
            raise ValueError(f"concept word {word!r} is already in the vocabulary")
        ids = list(range(len(self), len(self) + n))
        self.concepts[word] = ids
        self.encoder.update({word if i == 0 else f"{word}#{i}": id_ for i, id_ in enumerate(ids)})  # for decode
        self._compile()
        return ids

    def __len__(self):
        return len(self.encoder)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]  # the last symbol carries the end-of-word mark
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, math.inf))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = " ".join(word)
        return self.cache[token]

    @staticmethod
    def clean(text):
        # As CLIP: repair mojibake, unescape HTML (twice: doubly escaped text is common on the web),
        # collapse whitespace, lower-case.
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text):
        ids = []
        for piece in self.pat.findall(self.clean(text)):
            if piece in self.concepts:
                ids.extend(self.concepts[piece])
                continue
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts):
        """A string or a list of strings -> (B, 77) int64 ids, SD 1.x style (padded with the end token).
        A string is one text, never iterated as a list of one-character texts."""
        start, end, n = self.encoder[START], self.encoder[END], self.context_length
        texts = [texts] if isinstance(texts, str) else texts
        rows = [[start, *self.encode(t)[: n - 2], end] for t in texts]
        return torch.tensor([r + [end] * (n - len(r)) for r in rows], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Text transformer


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12

    @classmethod
    def from_state_dict(cls, sd):
        """Hyperparameters read off the tensor shapes (heads = width / 64, CLIP's rule)."""
        vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
        n_layers = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
        context = sd["text_model.embeddings.position_embedding.weight"].shape[0]
        return cls(vocab_size=vocab, context_length=context, width=width, layers=n_layers, heads=max(1, width // 64))


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # CLIP's text side is causal
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick-GELU, what CLIP was trained with


class Layer(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(width), Attention(width, heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    PREFIX = "cond_stage_model.transformer."
    # The checkpoint stores the constant arange(77) as a tensor; we compute it instead.
    SKIPPED = ("text_model.embeddings.position_ids",)

    def __init__(self, cfg=TextConfig()):
        super().__init__()
        self.cfg = cfg
        # Bare modules as namespaces reproduce the nested checkpoint keys (text_model.encoder.layers.N...).
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.text_model.embeddings.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(Layer(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids):
        """(B, T) token ids -> (B, T, width) last hidden state, the UNet's cross-attention context."""
        m = self.text_model
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in m.encoder.layers:
            x = layer(x)
        return m.final_layer_norm(x)

    @classmethod
    def from_checkpoint(cls, sd, **overrides):
        """Build from a full original checkpoint dict (prefixed keys), config read off the shapes."""
        return load_model(cls, TextConfig.from_state_dict, sd, **overrides)

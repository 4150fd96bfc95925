"""The Stable Diffusion 1.x UNet (CompVis `openaimodel.UNetModel`), written compactly.

Attribute names reproduce the CompVis keys (input_blocks.4.0.in_layers.2, ...), so the original
checkpoint loads after stripping `model.diffusion_model.`:

    from checkpoint import read_state_dict
    unet = UNet.from_checkpoint(read_state_dict("weights/v1-5-pruned-emaonly.safetensors"))
    eps = unet(latents, t, context)    # (B, 4, H/8, W/8), (B,), (B, 77, 768) -> (B, 4, H/8, W/8)

C-LoRA adapts exactly the cross-attention `attn2.to_k` / `attn2.to_v`: plain nn.Linear layers here.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_model


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors with a transformer (CompVis convention)
    num_heads: int = 8  # SD 1.x fixes the head count, not the head width; shapes cannot tell it
    context_dim: int = 768

    @classmethod
    def from_state_dict(cls, sd):
        """Everything but `num_heads` read off the tensor shapes, openai/CLIP style."""
        conv_in = sd["input_blocks.0.0.weight"]
        mc = conv_in.shape[0]
        n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
        downs = [i for i in range(n_blocks) if f"input_blocks.{i}.0.op.weight" in sd]
        n_res = (downs[0] if downs else n_blocks) - 1
        # input_blocks: [conv_in, (res x n_res, down) per level, without the last down]
        firsts = [1 + level * (n_res + 1) for level in range(len(downs) + 1)]  # first res block of each level
        mult = [sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in firsts]
        attn = [2**level for level, i in enumerate(firsts) if f"input_blocks.{i}.1.norm.weight" in sd]
        context = [v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
        return cls(in_channels=conv_in.shape[1], out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
                   channel_mult=tuple(mult), num_res_blocks=n_res, attention_resolutions=tuple(reversed(attn)),
                   context_dim=context[0] if context else cls.context_dim)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), cos half first (as CompVis)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(ch, eps=1e-5):
    return nn.GroupNorm(32, ch, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, ch, out_ch, emb_dim):
        super().__init__()
        # Sequential indices match CompVis: in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, dropout, conv].
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Identity(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # `to_out.0`: CompVis had [Linear, Dropout]

    def forward(self, x, context=None):
        """context: None (self-attention), (B, 77, C) text, or a `UNet.cache_context` dict holding this
        layer's K and V of the text, computed once per prompt."""
        B, N, C = x.shape
        if isinstance(context, dict):
            k, v = context[self]
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        # (B, tokens, C) -> (B, heads, tokens, C / heads)
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (self.to_q(x), k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)  # self-attention
        self.attn2 = CrossAttention(dim, context_dim, heads)  # attends to the text
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # [.., dropout, ..]
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, context_dim, heads):
        super().__init__()
        self.norm = norm(ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, context_dim, heads)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Blocks(nn.Sequential):
    """CompVis' TimestepEmbedSequential: each layer gets what it needs (time embedding or text)."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    PREFIX = "model.diffusion_model."
    SKIPPED = ()

    def __init__(self, cfg=UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim, heads, ctx = cfg.model_channels, 4 * cfg.model_channels, cfg.num_heads, cfg.context_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([Blocks(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs, ch, ds = [mc], mc, 1  # skip_chs: channels of every skip connection, for the decoder
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, ctx, heads))
                self.input_blocks.append(Blocks(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Blocks(Downsample(ch)))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = Blocks(ResBlock(ch, ch, emb_dim), SpatialTransformer(ch, ctx, heads), ResBlock(ch, ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, ctx, heads))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Blocks(*layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context):
        """x (B, 4, h, w) noisy latents, t (B,) timesteps, context (B, 77, 768) or its cache_context()
        -> predicted noise."""
        # NHWC ("channels_last"): oneDNN and cuDNN convolutions run fastest in it, and the transformers'
        # (B, C, H, W) <-> (B, H*W, C) reshapes become views instead of copies.
        x = x.contiguous(memory_format=torch.channels_last)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb, context)
        return self.out(x)

    @torch.no_grad()
    def cache_context(self, context):
        """K and V of every cross-attention (`attn2`) for a text context (B, 77, C). They depend on the
        text only, so a sampler computes them once per prompt instead of at every denoising step;
        pass the result to forward() as `context`."""
        return {m: (m.to_k(context), m.to_v(context)) for name, m in self.named_modules() if name.endswith("attn2")}

    @classmethod
    def from_checkpoint(cls, sd, **overrides):
        """Build from a full original checkpoint dict (prefixed keys), config read off the shapes."""
        return load_model(cls, UNetConfig.from_state_dict, sd, **overrides)

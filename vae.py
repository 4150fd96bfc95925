"""The KL-f8 autoencoder of Stable Diffusion 1.x (CompVis `AutoencoderKL`): 512x512x3 images <->
64x64x4 latents. Attribute names reproduce the CompVis keys, so the original checkpoint loads after
stripping `first_stage_model.`:

    vae = VAE.from_checkpoint(read_state_dict("weights/v1-5-pruned-emaonly.safetensors"))
    mean, logvar = vae.encode(images)          # images in [-1, 1], (B, 3, H, W)
    latents = vae.cfg.scale_factor * mean      # what the UNet sees
    images = vae.decode(latents / vae.cfg.scale_factor)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_model
from unet import Upsample  # the same nearest x2 + 3x3 conv, with the same key name `conv`


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    scale_factor: float = 0.18215  # from SD 1.x's training config, not stored in the checkpoint

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)  # image pixels per latent pixel along each side: 8 for SD

    @classmethod
    def from_state_dict(cls, sd):
        conv_in = sd["encoder.conv_in.weight"]
        ch = conv_in.shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        return cls(in_channels=conv_in.shape[1], ch=ch, num_res_blocks=n_res,
                   ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
                   latent_channels=sd["post_quant_conv.weight"].shape[0])


def norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch, out_ch):
        super().__init__()
        self.norm1, self.conv1 = norm(ch), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()  # Identity: no keys

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, proj_out stay 1x1 convs as in the checkpoint."""

    def __init__(self, ch):
        super().__init__()
        self.norm = norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head over every pixel
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # CompVis pads right/bottom only, then a valid stride-2 conv


def mid_blocks(ch):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for level, out_ch in enumerate(chs):
            down = nn.Module()  # a namespace, for the keys down.N.block.M / down.N.downsample
            down.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(ch, out_ch))
                ch = out_ch
            down.downsample = Downsample(ch) if level != len(chs) - 1 else nn.Identity()
            self.down.append(down)
        self.mid = mid_blocks(ch)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                x = block(x)
            x = down.downsample(x)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = mid_blocks(ch)
        # up[i] mirrors down[i], so up[-1] runs first; built in order of execution, then reversed.
        up_blocks = []
        for level in reversed(range(len(chs))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(ch, chs[level]))
                ch = chs[level]
            up.upsample = Upsample(ch) if level != 0 else nn.Identity()
            up_blocks.append(up)
        self.up = nn.ModuleList(reversed(up_blocks))
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        for up in reversed(self.up):
            for block in up.block:
                x = block(x)
            x = up.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    PREFIX = "first_stage_model."
    SKIPPED = ()

    def __init__(self, cfg=VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        """Images in [-1, 1] -> (mean, logvar) of the diagonal Gaussian over unscaled latents."""
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: the fast layout for CPU and GPU convolutions
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.contiguous(memory_format=torch.channels_last)))

    @classmethod
    def from_checkpoint(cls, sd, **overrides):
        """Build from a full original checkpoint dict (prefixed keys), config read off the shapes."""
        return load_model(cls, VAEConfig.from_state_dict, sd, **overrides)

"""Shared test helpers: tiny configs, random weights, original-layout checkpoints, and the reference
models (diffusers / transformers) built offline from the same weights through diffusers' own
single-file conversion."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip_text import TextConfig, TextEncoder  # noqa: E402
import train  # noqa: E402
from sample import SCHEDULE_KEYS, alphas_cumprod  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402

MANIFEST = json.loads((Path(__file__).parent / "sd15_ldm_keys.json").read_text())

# Tiny but shaped like SD: attention on every level but the last, several heads, a real vocabulary.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                       num_heads=4, context_dim=128)
TINY_TEXT = TextConfig(width=128, layers=2, heads=2)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def random_model(cls, cfg, seed=0):
    """A model with random weights of a sane scale everywhere (the models' own init leaves some
    layers at zero, which would hide differences in parity tests). Built on the meta device first,
    so that full-size models skip their own init."""
    with torch.device("meta"):
        module = cls(cfg)
    module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)  # ~unit-variance activations
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * r)  # norm scales
            else:
                p.copy_(0.1 * r)
    return module


def tiny_models(seed=0):
    return random_model(TextEncoder, TINY_TEXT, seed), random_model(UNet, TINY_UNET, seed + 1), random_model(VAE, TINY_VAE, seed + 2)


def original_checkpoint(text_encoder, unet, vae):
    """Our models' weights in the exact original single-file layout, extras included (sharing the
    models' storage: no copy of a full-size UNet)."""
    sd = {}
    for m in (text_encoder, unet, vae):
        sd.update({m.PREFIX + k: v.detach() for k, v in m.state_dict().items()})
    n = text_encoder.cfg.context_length
    sd[TextEncoder.PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n)[None]
    sd.update({k: alphas_cumprod() for k in SCHEDULE_KEYS})  # values do not matter: never loaded
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0, dtype=torch.int32)
    return sd


def args(ckpt, data, run, task, *extra):
    """train.py's command line for a tiny run: 16x16 images, rank 2, 4 steps, a partial checkpoint every 2."""
    return ["--task", str(task), "--data", str(data), "--run", str(run), "--ckpt", str(ckpt), "--res", "16",
            "--steps", "4", "--save-every", "2", "--grid-steps", "2", "--rank", "2", *extra]


def snapshot(run):
    """Every file of a run folder by name, as bytes (None if there is no folder)."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())} if run.exists() else None


@pytest.fixture
def data(tmp_path):
    """Three concept folders of two random images each, of two sizes; their names are the tests' own, not the world's."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("01_alice", "02_bob", "03_carol"):
        (root / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (16 + 4 * j, 16, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


def crash_at_step(monkeypatch, n):
    """The n-th optimizer step raises KeyboardInterrupt: a kill after the checkpoints before it."""
    real, calls = train.torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(train.torch.optim.AdamW, "step", step)


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A tiny original-layout .safetensors file and the models it was made from."""
    from checkpoint import save_safetensors

    models = tiny_models()
    path = tmp_path / "tiny.safetensors"
    save_safetensors(original_checkpoint(*models), path)
    return path, models


# ---------------------------------------------------------------------------------------------
# Reference models, converted by diffusers' own single-file code


def diffusers_unet(cfg, sd):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    levels = range(len(cfg.channel_mult))
    attn = [2**lv in cfg.attention_resolutions for lv in levels]
    ref = UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult], layers_per_block=cfg.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,  # diffusers' name for SD 1.x's head count
    )
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, ref.config), strict=True)
    return ref.eval()


def diffusers_vae(cfg, sd):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(cfg.ch_mult)
    ref = AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
                        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                        scaling_factor=cfg.scale_factor)
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, ref.config), strict=True)
    return ref.eval()


def diffusers_pipeline(unet, vae):
    """diffusers' StableDiffusionPipeline around reference models, with SD 1.5's DDIM settings;
    called with prompt embeddings (it has no text encoder here)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformers_clip(cfg, sd):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = CLIPTextModel(CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                       max_position_embeddings=cfg.context_length, hidden_act="quick_gelu"))
    # transformers 5's CLIPTextModel holds the keys without its base_model_prefix `text_model.`
    # (from_pretrained strips it); load_state_dict does not, so we do.
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    return ref.eval()


def rel_err(ours, ref):
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()

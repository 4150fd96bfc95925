"""Tiny-config tests: shapes, gradients, config read back from shapes, and parity with diffusers /
transformers on the same random weights."""
from dataclasses import replace

import torch

from clip_text import TextConfig, Tokenizer
from conftest import (TINY_TEXT, TINY_UNET, TINY_VAE, diffusers_unet, diffusers_vae, original_checkpoint, rel_err,
                      tiny_models, transformers_clip)
from unet import UNetConfig
from vae import VAEConfig


def test_shapes_and_gradients_flow_to_every_parameter():
    text, unet, vae = tiny_models()
    ids = Tokenizer()(["a photo of a cat", "a dog"])
    ctx = text(ids)
    assert ctx.shape == (2, 77, TINY_TEXT.width)
    img = torch.randn(2, 3, 32, 32)
    mean, logvar = vae.encode(img)
    assert mean.shape == logvar.shape == (2, 4, 16, 16)
    eps = unet(mean, torch.tensor([10, 500]), ctx)
    assert eps.shape == mean.shape
    out = vae.decode(eps)
    assert out.shape == img.shape
    (out.square().mean() + logvar.mean()).backward()
    for m in (text, unet, vae):
        no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert no_grad == [], no_grad


def test_config_is_read_back_from_shapes():
    text, unet, vae = tiny_models()
    # The head count is the one thing shapes cannot tell: SD 1.x's 8 is assumed.
    assert UNetConfig.from_state_dict(unet.state_dict()) == replace(TINY_UNET, num_heads=8)
    assert TextConfig.from_state_dict(text.state_dict()) == TINY_TEXT
    assert VAEConfig.from_state_dict(vae.state_dict()) == TINY_VAE


def test_parity_with_diffusers_and_transformers_tiny():
    torch.manual_seed(0)
    text, unet, vae = tiny_models()
    sd = original_checkpoint(text, unet, vae)
    ids = Tokenizer()(["a photo of <unknown> riding a horse, 4k", ""])
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 1])
    with torch.no_grad():
        ctx = text(ids)
        assert rel_err(ctx, transformers_clip(TINY_TEXT, sd)(ids).last_hidden_state) < 1e-4
        ref_unet = diffusers_unet(TINY_UNET, sd)
        assert rel_err(unet(latents, t, ctx), ref_unet(latents, t, ctx).sample) < 1e-4
        ref_vae = diffusers_vae(TINY_VAE, sd)
        img = torch.randn(2, 3, 32, 32)
        mean, logvar = vae.encode(img)
        dist = ref_vae.encode(img).latent_dist
        assert rel_err(mean, dist.mean) < 1e-4 and rel_err(logvar, dist.logvar) < 1e-4
        assert rel_err(vae.decode(latents), ref_vae.decode(latents).sample) < 1e-4


def test_cross_attention_kv_cache_equals_the_plain_forward():
    text, unet, _ = tiny_models()
    ctx = text(Tokenizer()(["a photo of a cat", "a dog"]))
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 1])
    cache = unet.cache_context(ctx)
    n_attn2 = sum(name.endswith("attn2") for name, _ in unet.named_modules())
    assert len(cache) == n_attn2 > 0
    with torch.no_grad():
        assert torch.equal(unet(latents, t, cache), unet(latents, t, ctx))

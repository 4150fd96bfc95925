"""Full SD 1.x size: every key and shape of the real v1-5 checkpoint, and parity with diffusers /
transformers on random full-size weights (the one large test: ~10 GB RAM, about a minute on 2 cores)."""
import gc

import torch

from clip_text import TextConfig, TextEncoder
from conftest import MANIFEST, diffusers_unet, diffusers_vae, original_checkpoint, random_model, rel_err, transformers_clip
from sample import EMA_PREFIX, SCHEDULE_KEYS, StableDiffusion
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig


def test_state_dict_equals_the_v1_5_manifest():
    with torch.device("meta"):
        models = TextEncoder(), UNet(), VAE()
    ours = {m.PREFIX + k: list(v.shape) for m in models for k, v in m.state_dict().items()}
    skipped = {k: v for k, v in MANIFEST.items() if k not in ours}
    assert {k: MANIFEST[k] for k in ours} == ours  # every tensor we have is in the real file, same shape
    assert set(skipped) == SCHEDULE_KEYS | {"model_ema.decay", "model_ema.num_updates",
                                            TextEncoder.PREFIX + "text_model.embeddings.position_ids"}
    assert all(k in SCHEDULE_KEYS or k.startswith(EMA_PREFIX) or k.endswith(TextEncoder.SKIPPED) for k in skipped)
    # and the configs read off the real shapes are the SD 1.x defaults
    meta = {k: torch.empty(v, device="meta") for k, v in MANIFEST.items()}
    for m, cfg_cls in zip(models, (TextConfig, UNetConfig, VAEConfig)):
        own = {k[len(m.PREFIX):]: v for k, v in meta.items() if k.startswith(m.PREFIX)}
        assert cfg_cls.from_state_dict(own) == cfg_cls()


def test_full_size_parity_and_loading(tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():
        text = random_model(TextEncoder, TextConfig(), 0)
        sd = original_checkpoint(text, random_model(UNet, UNetConfig(), 1), random_model(VAE, VAEConfig(), 2))
        ids = torch.randint(0, 49408, (2, 77))
        ctx = text(ids)
        assert rel_err(ctx, transformers_clip(TextConfig(), sd)(ids).last_hidden_state) < 1e-4
        gc.collect()

        unet = UNet.from_checkpoint(sd)  # the real loading path, on the full key set
        latents, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 10])
        ours = unet(latents, t, ctx)
        del unet
        gc.collect()
        ref = diffusers_unet(UNetConfig(), sd)
        assert rel_err(ours, ref(latents, t, ctx).sample) < 1e-4
        del ref
        gc.collect()

        vae = VAE.from_checkpoint(sd)
        ref = diffusers_vae(VAEConfig(), sd)
        z, img = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64, 64)
        assert rel_err(vae.decode(z), ref.decode(z).sample) < 1e-4
        assert rel_err(vae.encode(img)[0], ref.encode(img).latent_dist.mean) < 1e-4

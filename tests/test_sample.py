"""The DDIM + classifier-free guidance sampler against diffusers' StableDiffusionPipeline, and the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import TINY_UNET, TINY_VAE, diffusers_pipeline, diffusers_unet, diffusers_vae, original_checkpoint, rel_err, tiny_models


@pytest.mark.parametrize("steps, cfg", [(10, 7.5), (50, 3.0)])
def test_ddim_cfg_matches_diffusers_pipeline(steps, cfg):
    text, unet, vae = tiny_models()
    sd = original_checkpoint(text, unet, vae)
    pipe = diffusers_pipeline(diffusers_unet(TINY_UNET, sd), diffusers_vae(TINY_VAE, sd))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 77, 128, generator=g), torch.randn(2, 77, 128, generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    size = 8 * TINY_VAE.downsample
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_inference_steps=steps,
               guidance_scale=cfg, height=size, width=size, output_type="latent").images
    ours = sample.ddim_sample(unet, cond, uncond, latents, steps=steps, cfg=cfg)
    assert rel_err(ours, ref) < 1e-4


def test_cli_writes_a_reproducible_grid(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    args = ["--ckpt", str(path), "--prompt", "a red cube", "--steps", "3", "--n", "3", "--size", "32", "--seed", "7"]
    sample.main(args + ["--out", str(tmp_path / "a.png")])
    sample.main(args + ["--out", str(tmp_path / "b.png")])
    img = Image.open(tmp_path / "a.png")
    assert img.size == (64, 64)  # 3 images of 32x32 in a 2x2 grid
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    sample.main(args[:-1] + ["8", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_cli_bf16_runs_close_to_fp32(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    args = ["--ckpt", str(path), "--prompt", "a red cube", "--steps", "2", "--n", "1", "--size", "32"]
    sample.main(args + ["--out", str(tmp_path / "fp32.png")])
    sample.main(args + ["--out", str(tmp_path / "bf16.png"), "--dtype", "bf16"])
    a, b = (torch.tensor(np.asarray(Image.open(tmp_path / f"{d}.png")), dtype=torch.float) for d in ("fp32", "bf16"))
    assert (a - b).abs().mean() < 8  # of 255: same picture, bf16 rounding


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "WEIGHTS", tmp_path / "empty")
    monkeypatch.setattr(sample, "EMBEDDED", tmp_path / "empty" / "embedded" / "tiny_sd.safetensors")
    with pytest.raises(SystemExit, match="no SD checkpoint given or in .*embedded tiny model .* is missing .*put v1-5-pruned-emaonly"):
        sample.main(["--prompt", "x"])
    path, _ = tiny_ckpt
    with pytest.raises(SystemExit, match="--size must be a multiple of 8"):
        sample.main(["--ckpt", str(path), "--prompt", "x", "--size", "36"])
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(path), "--prompt", "x", "--stpes", "3"])  # a typo in a flag
    assert "unrecognized arguments: --stpes" in capsys.readouterr().err


def test_compiled_sampling_equals_eager_and_degrades_gracefully(tiny_ckpt, capsys, monkeypatch):
    """--compile on the CPU (inductor's C++ back end, no Triton) gives the eager result; on a device
    with no Triton-free path it says so and runs eager."""
    path, _ = tiny_ckpt
    model = sample.StableDiffusion.load(path)
    cond, uncond = model.encode_text(["a red cube"]), model.encode_text([""])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eager = sample.ddim_sample(model.unet, cond, uncond, noise, steps=3)
    compiled_unet = sample.compile_unet(model.unet, "cpu")
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # its eager fallback would hide a failure
    compiled = sample.ddim_sample(compiled_unet, cond, uncond, noise, steps=3)
    assert rel_err(compiled, eager) < 1e-4
    assert sample.compile_unet(model.unet, "mps") is model.unet
    assert "no Triton-free compiled path on mps" in capsys.readouterr().out

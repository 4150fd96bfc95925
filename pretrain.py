"""Pretrain the embedded tiny Stable Diffusion on the base distribution of `world.py` (faces and
buildings): the same UNet / TextEncoder / VAE classes as SD 1.x with small configs, saved as one
original-layout .safetensors that sample.py and train.py load by the same code path as the real SD 1.5.

    python pretrain.py                                  # resumable: rerun after a kill to continue
    python pretrain.py --vae-steps 200 --unet-steps 500 --out /tmp/tiny.safetensors   # a quick try
    # the shipped model: its VAE started from the first world's; three runs, each resuming the last
    # one's state (README, "The tiny SD": the second was stopped after its step-11,500 save)
    git show f6ad959:weights/embedded/tiny_sd.safetensors > runs/pretrain/tiny_sd_world1.safetensors
    python pretrain.py --vae-init runs/pretrain/tiny_sd_world1.safetensors --vae-steps 500 --unet-steps 5000
    python pretrain.py --vae-init runs/pretrain/tiny_sd_world1.safetensors --vae-steps 500 --unet-steps 21000
    python pretrain.py --vae-init runs/pretrain/tiny_sd_world1.safetensors --vae-steps 500 --unet-steps 18000

Stage 1a trains the VAE (reconstruction + a small KL term, as SD's KL-f8 but without its perceptual
and GAN losses, which flat cartoon colours do not need). SD's VAE is a general image codec, so this
one is too: half of its batches carry random shapes in random colours over the base images, so it
can encode what the UNet has never seen (a concept's neon mark). Stage 1b refines the decoder alone
on saturated colours, which uniformly random ones almost never are, with the encoder frozen (as
Stability's sd-vae-ft-mse refined SD's decoder). Stage 2 trains the text encoder
(with the real CLIP BPE tokenizer) and the UNet together on the cached latents of a fixed pool of
captioned base images (no marks, no neon colour), noise-prediction MSE on SD's own schedule, 10%
empty captions for classifier-free guidance, a cosine learning-rate decay and an EMA of the weights.
The output's metadata holds what shapes cannot tell (UNet heads, the VAE's latent scale), names the
model (train.py picks its defaults by it) and the world version it was trained on.
"""
import argparse
import copy
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import world
from checkpoint import atomic_write, read_state_dict, save_safetensors
from clip_text import TextConfig, TextEncoder, Tokenizer
from sample import alphas_cumprod
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

MODEL_NAME = "tiny-world"  # the metadata name train.py keys its defaults on
TEXT = TextConfig(width=64, layers=3, heads=1)  # heads = width / 64, CLIP's rule; the full 49,408-token vocabulary
# Attention at the 8x8 and 4x4 latent levels only: at 16x16 it cost a third of the step on 2 CPU cores.
UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                  num_heads=4, context_dim=64)
VAE_CFG = VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)  # 64x64x3 images <-> 16x16x4 latents
OUT = Path(__file__).parent / "weights" / "embedded" / "tiny_sd.safetensors"


def scribble(images, g, saturated=False):
    """A copy of (N, H, W, 3) uint8 images with up to 3 random rectangles / discs in uniformly random
    colours on each: the VAE's extra data, so that it encodes any colour and shape. `saturated`: half
    of the shapes in a random hue at full saturation (one channel 255, one 0), which uniform colours
    almost never are."""
    x = images.clone()
    n, H, W, _ = x.shape
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for _ in range(3):
        cy, cx, ry, rx = (torch.randint(lo, hi, (n, 1, 1), generator=g) for lo, hi in ((0, H), (0, W), (2, H // 4), (2, W // 4)))
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        inside = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, inside, ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx))
        keep = torch.rand(n, 1, 1, generator=g) < 0.7
        colour = torch.randint(0, 256, (n, 1, 1, 3), generator=g, dtype=torch.uint8)
        if saturated:
            hue = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
            full = torch.stack([torch.full_like(hue, 255), hue, torch.zeros_like(hue)], -1)  # then permuted per image
            perm = torch.argsort(torch.rand(n, 3, generator=g), 1)
            full = torch.gather(full, 1, perm)[:, None, None]
            colour = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, full, colour)
        x = torch.where((inside & keep)[..., None], colour, x)
    return x


def make_pool(n, seed, workers=2):
    """n captioned base-distribution images, generated in parallel chunks (each chunk its own seed)."""
    chunks = [(min(500, n - i), f"{seed}-{i}") for i in range(0, n, 500)]
    with Pool(workers) as pool:
        parts = pool.starmap(world.base_images, chunks)
    pairs = [p for part in parts for p in part]
    return np.stack([np.asarray(im) for im, _ in pairs]), [c for _, c in pairs]


def save_state(state, path):
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def train_vae(vae, images, args, state, state_path, stage="vae"):
    """Stage 1a ("vae"): the whole VAE, half of every batch scribbled over. Stage 1b ("decoder"): the
    decoder alone, its scribbles half in saturated hues; the encoder is frozen, so the latents stay
    as they were."""
    steps, lr = (args.vae_steps, args.vae_lr) if stage == "vae" else (args.decoder_steps, args.vae_lr / 2)
    vae.requires_grad_(True)
    if stage == "decoder":
        for m in (vae.encoder, vae.quant_conv):
            m.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if f"{stage}_opt" in state:
        opt.load_state_dict(state[f"{stage}_opt"])
    g = torch.Generator().manual_seed(args.seed + state[f"{stage}_step"] + (0 if stage == "vae" else 10**7))
    t0 = time.time()
    for step in range(state[f"{stage}_step"], steps):
        x = images[torch.randint(len(images), (args.vae_batch,), generator=g)]
        x = torch.cat([x[: len(x) // 2], scribble(x[len(x) // 2:], g, saturated=stage == "decoder")])
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        rec = vae.decode(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"{stage} {step + 1}/{steps} loss {loss.item():.4f} kl {kl.item():.1f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            state.update({f"{stage}_step": step + 1, "vae": vae.state_dict(), f"{stage}_opt": opt.state_dict()})
            save_state(state, state_path)


@torch.no_grad()
def encode_pool(vae, images):
    """(mean, logvar) of every pool image, and the scale that gives the latents unit variance (SD's 0.18215 was
    chosen the same way for its own VAE)."""
    means, logvars = [], []
    for i in range(0, len(images), 256):
        x = images[i:i + 256].permute(0, 3, 1, 2).float() / 127.5 - 1
        m, lv = vae.encode(x)
        means.append(m.contiguous())
        logvars.append(lv.contiguous())
    mean, logvar = torch.cat(means), torch.cat(logvars)
    return mean, logvar, 1.0 / mean.std().item()


def train_unet(text, unet, ema, mean, logvar, scale, captions, args, state, state_path):
    tok = Tokenizer()
    ids = tok(captions)  # (N, 77): every caption tokenized once
    empty = tok([""])[0]
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if "unet_opt" in state:
        opt.load_state_dict(state["unet_opt"])
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(args.seed + 10**6 + state["unet_step"])
    t0 = time.time()
    ema_params = list(ema[0].parameters()) + list(ema[1].parameters())
    for step in range(state["unet_step"], args.unet_steps):
        for group in opt.param_groups:
            # Warm-up, then a cosine decay to a tenth: the last steps refine rather than wander.
            group["lr"] = args.lr * min(1.0, (step + 1) / 200) * (0.55 + 0.45 * math.cos(math.pi * step / args.unet_steps))
        idx = torch.randint(len(mean), (args.batch,), generator=g)
        x0 = scale * (mean[idx] + (0.5 * logvar[idx]).exp() * torch.randn(mean[idx].shape, generator=g))
        x0 = torch.where(torch.rand(args.batch, 1, 1, 1, generator=g) < 0.5, x0, x0.flip(-1))  # mirror
        batch_ids = torch.where(torch.rand(args.batch, 1, generator=g) < 0.1, empty, ids[idx])  # CFG dropout
        t = torch.randint(len(ac), (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None, None, None]
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, text(batch_ids))
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # EMA with warm-up: early on, the average must not hold on to the random init
            torch._foreach_lerp_(ema_params, params, 1 - min(args.ema, (1 + step) / (10 + step)))
        if (step + 1) % 50 == 0:
            print(f"unet {step + 1}/{args.unet_steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            state.update(unet_step=step + 1, text=text.state_dict(), unet=unet.state_dict(), unet_opt=opt.state_dict(),
                         ema_text=ema[0].state_dict(), ema_unet=ema[1].state_dict())
            save_state(state, state_path)


def export(text, unet, vae, scale, path, args):
    """One original-layout checkpoint (fp16), like v1-5-pruned-emaonly: the EMA weights as the model."""
    sd = {}
    for m in (text, unet, vae):
        sd.update({m.PREFIX + k: v.detach().half() for k, v in m.state_dict().items()})
    meta = {"model": MODEL_NAME, "world": str(world.VERSION), "unet.num_heads": unet.cfg.num_heads, "vae.scale_factor": f"{scale:.6f}",
            "resolution": world.SIZE,
            "made_by": f"python pretrain.py --pool {args.pool} --vae-steps {args.vae_steps} --unet-steps {args.unet_steps} --decoder-steps {args.decoder_steps} --seed {args.seed}"
                       + (f" --vae-init {args.vae_init}" if args.vae_init else "")}
    save_safetensors(sd, path, metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {json.dumps(meta)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--work", type=Path, default=Path("runs/pretrain"), help="image pool and resumable state")
    p.add_argument("--pool", type=int, default=16000, help="base-distribution images to train on")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=8e-4)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--vae-init", help="an original-layout tiny checkpoint whose VAE to start from (default: random)")
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--decoder-steps", type=int, default=600, help="stage 1b: the decoder alone, on saturated colours")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    pool_path = args.work / f"pool_world{world.VERSION}_{args.pool}_{args.seed}.npz"
    if not pool_path.exists():
        t0 = time.time()
        images, captions = make_pool(args.pool, args.seed)
        with atomic_write(pool_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, captions=np.array(captions))
        print(f"generated {args.pool} base images in {time.time() - t0:.0f} s")
    data = np.load(pool_path)
    images, captions = torch.from_numpy(data["images"]), [str(c) for c in data["captions"]]

    text, unet, vae = TextEncoder(TEXT), UNet(UNET), VAE(VAE_CFG)
    if args.vae_init:  # start from another tiny model's VAE (same config), e.g. the previous world's
        vae = VAE.from_checkpoint(read_state_dict(args.vae_init)).float()  # its config read off the shapes
    unet, vae = (m.to(memory_format=torch.channels_last) for m in (unet, vae))  # the layout the models run in
    state_path = args.work / f"state_world{world.VERSION}_{args.seed}.pt"
    state = {"vae_step": 0, "unet_step": 0, "decoder_step": 0}
    if state_path.exists():
        state.update(torch.load(state_path, weights_only=False))
    for key, m in (("vae", vae), ("text", text), ("unet", unet)):
        if key in state:
            m.load_state_dict(state[key])
    print(f"state: vae step {state['vae_step']}, unet step {state['unet_step']}, decoder step {state['decoder_step']}")
    train_vae(vae.train(), images, args, state, state_path)
    train_vae(vae.train(), images, args, state, state_path, stage="decoder")
    vae.eval().requires_grad_(False)
    mean, logvar, scale = encode_pool(vae, images)
    print(f"latent scale factor {scale:.5f}")
    ema = (copy.deepcopy(text).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False))
    for key, m in (("ema_text", ema[0]), ("ema_unet", ema[1])):
        if key in state:
            m.load_state_dict(state[key])
    train_unet(text.train(), unet.train(), ema, mean, logvar, scale, captions, args, state, state_path)
    export(ema[0], ema[1], vae, scale, args.out, args)


if __name__ == "__main__":
    main()

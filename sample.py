"""Text-to-image with an SD 1.x checkpoint: DDIM (eta 0) with classifier-free guidance.

    python sample.py --ckpt weights/v1-5-pruned-emaonly.safetensors --prompt "a photo of an astronaut riding a horse"
    python sample.py --prompt "a castle at dusk" --steps 50 --cfg 7.5 --seed 0 --n 4 --out grid.png --device cuda --dtype fp16
    python sample.py --run runs/faces --prompt "a photo of <alice> and <bob> at the beach"
    python sample.py --lora export/lora.safetensors --embedding export/embeddings/alice.safetensors --prompt "a photo of <alice>"

Without --ckpt, the run's base checkpoint (with --run) or the first .safetensors / .ckpt file in
weights/ is used, and with none there, the embedded tiny model (weights/embedded/, see pretrain.py).
With --run, every concept the run learned is folded into the weights first; then --lora (a kohya-format
SD 1.x LoRA, e.g. export.py's) and --embedding (textual inversion: diffusers or AUTOMATIC1111 files).
"""
import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import CheckpointError, atomic_write, check_sd1, read_metadata, read_state_dict, sha256
from clora import check_concept_words, load_run, read_run
from clip_text import TextEncoder, Tokenizer
from unet import UNet
from vae import VAE

WEIGHTS = Path(__file__).parent / "weights"
EMBEDDED = WEIGHTS / "embedded" / "tiny_sd.safetensors"  # the default when no SD checkpoint is given or in weights/
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys of an original checkpoint that no model here loads: the training schedule (recomputed below)
# and the EMA copy of the UNet (the pruned files hold the EMA weights as the model itself).
SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                 "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}
EMA_PREFIX = "model_ema."
# DDIM steps at most: its timesteps (stride 1000 // steps, offset 1) must stay below SD's 1000 training steps.
MAX_STEPS = 999


def alphas_cumprod(n=1000, beta_start=0.00085, beta_end=0.012):
    """SD 1.x's "scaled linear" training schedule: betas linear in sqrt space. (n,) float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def prepare(model, device, dtype):
    """Frozen, in eval mode, on `device` in `dtype`, conv weights in NHWC (channels_last): the layout
    the models convert their inputs to. cuDNN's fast path for bf16/fp16 on GPU; on CPU (2026-11-28) the
    VAE decode at 512x512 runs ~10% faster than in NCHW, the UNet forward about even, and the full-size
    train step at 256x256 ~3% slower (BENCHMARKS.md)."""
    return model.to(device, dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


@dataclass
class StableDiffusion:
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    name: str = "sd1"  # which model this is: train.py picks its defaults by it
    resolution: int = 512  # the image size it was trained at

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32):
        sd = read_state_dict(path)
        # Config fields that shapes cannot tell, kept in the file's metadata as "unet.num_heads": "4", ...
        # (the real SD 1.x files have none: the configs' defaults are SD 1.x's).
        meta = read_metadata(path)
        overrides = {m: {k.split(".", 1)[1]: json.loads(v) for k, v in meta.items() if k.startswith(m + ".")}
                     for m in ("text", "unet", "vae")}
        check_sd1(sd, path)
        models = (TextEncoder, UNet, VAE)
        unknown = [k for k in sd if not (k in SCHEDULE_KEYS or k.startswith(EMA_PREFIX) or k.startswith(tuple(m.PREFIX for m in models)))]
        if unknown:
            raise CheckpointError(f"{path}: {len(unknown)} keys belong to no SD 1.x model (e.g. {unknown[0]}); "
                                  "only original-layout SD 1.x checkpoints are supported")
        text_encoder, unet, vae = (prepare(m.from_checkpoint(sd, **overrides[key]), device, dtype)
                                   for m, key in zip(models, ("text", "unet", "vae")))
        return cls(Tokenizer(), text_encoder, unet, vae, meta.get("model", "sd1"), int(meta.get("resolution", 512)))

    @torch.no_grad()
    def encode_text(self, prompts):
        """List of prompts -> (B, 77, width) context for the UNet."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(prompts).to(device))

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> uint8 images (B, H, W, 3)."""
        x = self.vae.decode(latents.to(next(self.vae.parameters()).dtype) / self.vae.cfg.scale_factor)
        return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def ddim_sample(unet, cond, uncond, latents, steps=50, cfg=7.5, progress=False):
    """Deterministic DDIM (eta 0) with classifier-free guidance, SD 1.5's "leading" timesteps.

    cond, uncond: (B, 77, C) text contexts; latents: (B, 4, h, w) initial noise. Returns final latents.
    The update is x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with x0 predicted from eps."""
    ac = alphas_cumprod().to(latents.device)
    ratio = len(ac) // steps
    timesteps = torch.arange(steps - 1, -1, -1) * ratio + 1  # steps_offset 1: 981, 961, ..., 1 for 50 steps
    dtype = next(unet.parameters()).dtype
    context = unet.cache_context(torch.cat([uncond, cond]).to(dtype))  # the text's K, V: once, not once per step
    x = latents.float()
    for t in tqdm(timesteps.tolist(), desc="ddim", disable=not progress):
        eps_uncond, eps_cond = unet(torch.cat([x, x]).to(dtype), torch.full((2 * len(x),), t, device=x.device), context).float().chunk(2)
        eps = eps_uncond + cfg * (eps_cond - eps_uncond)
        a = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else ac[0]  # SD 1.5 sets the final alpha to alphas_cumprod[0]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def compile_unet(unet, device):
    """--compile: the fused path, without Triton. CUDA: torch.compile's `cudagraphs` back end
    (AOTAutograd + CUDA graphs: each UNet call replays as one graph, no per-kernel launch cost; the
    kernels stay PyTorch's own: SDPA flash attention, cuDNN NHWC convolutions, autocast). CPU: the
    inductor back end, which emits C++/OpenMP (a C++ compiler, no Triton). Elsewhere: eager, said in one line."""
    kind = torch.device(device).type
    backend = {"cuda": "cudagraphs", "cpu": "inductor" if shutil.which("g++") or shutil.which("c++") else None}.get(kind)
    if backend is None:
        print(f"--compile: no Triton-free compiled path on {device} (CPU needs a C++ compiler); running eager")
        return unet
    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eager instead of failing
    return torch.compile(unet, backend=backend, dynamic=False)


def image_grid(images, cols=None):
    """(N, H, W, 3) uint8 -> one PIL image, `cols` wide (default: as square as possible)."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return Image.fromarray(grid)


def save_png(image, path):
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def size_multiple(model):
    """What an image side must be a multiple of: the VAE's downsampling times the UNet's, which halves
    the latent at every level but the last."""
    return model.vae.cfg.downsample * 2 ** (len(model.unet.cfg.channel_mult) - 1)


def find_checkpoint(ckpt):
    """--ckpt, else the first SD checkpoint in weights/, else the embedded tiny model (saying so)."""
    if ckpt:
        return Path(ckpt)
    found = sorted(p for p in WEIGHTS.glob("*") if p.suffix in (".safetensors", ".ckpt"))  # not weights/embedded/
    if found:
        return found[0]
    if not EMBEDDED.exists():
        raise CheckpointError(f"no SD checkpoint given or in {WEIGHTS}/ and the embedded tiny model {EMBEDDED} is missing "
                              "(git checkout weights/embedded); put v1-5-pruned-emaonly.safetensors in weights/ or pass --ckpt PATH")
    print(f"no SD checkpoint given or in {WEIGHTS.name}/: using the embedded tiny model {Path(*EMBEDDED.parts[-3:])} "
          "and its world of cartoon faces and buildings (put v1-5-pruned-emaonly.safetensors in weights/ or pass --ckpt for the real one)")
    return EMBEDDED


def run_checkpoint(run):
    """The base checkpoint of a run (its run.json): the path recorded, or, where that file is gone, the
    shipped tiny model if the run was made on it in another checkout (a clone of the README's committed runs)."""
    path = Path(run["base_checkpoint"])
    if not path.is_file() and EMBEDDED.is_file() and sha256(EMBEDDED) == run["base_sha256"]:
        return EMBEDDED
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="SD 1.x checkpoint (.safetensors or .ckpt); default: the first one in weights/")
    p.add_argument("--run", help="a train.py run folder: sample with every concept it learned")
    p.add_argument("--lora", help="a kohya-format SD 1.x LoRA (.safetensors) to fold into the weights")
    p.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's multiplier")
    p.add_argument("--embedding", action="append", default=[], help="a textual-inversion file (.safetensors, .pt, .bin); repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt (the unconditional side of guidance)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--size", type=int, help="image height and width; default: the model's (512 for SD 1.x)")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet, Triton-free (cudagraphs on CUDA)")
    args = p.parse_args(argv)
    # Every range before any work, each a line of its own.
    out = Path(args.out)
    for bad, says in [(not 1 <= args.steps <= MAX_STEPS, f"--steps {args.steps}: must be in 1..{MAX_STEPS}"),
                      (args.n < 1, f"--n {args.n}: must be >= 1"),
                      (args.size is not None and args.size <= 0, f"--size {args.size}: must be positive"),
                      (not math.isfinite(args.cfg), f"--cfg {args.cfg}: must be finite"),
                      (not math.isfinite(args.lora_scale), f"--lora-scale {args.lora_scale}: must be finite"),
                      (out.is_dir(), f"--out {out}: a folder; name the .png file to write"),
                      (out.suffix.lower() != ".png", f"--out {out}: sample.py writes PNG; name it .png"),
                      (args.run is not None and not Path(args.run).is_dir(),
                       f"--run {args.run}: not a folder; pass a train.py run folder")]:
        if bad:
            sys.exit(f"error: {says}")
    try:
        path = find_checkpoint(args.ckpt or (run_checkpoint(read_run(args.run)) if args.run else None))
        print(f"loading {path}")
        model = StableDiffusion.load(path, args.device, DTYPES[args.dtype])
        words = load_run(args.run, model, path) if args.run else []
        from export import add_embedding, apply_lora  # here, not above: export.py imports this module
        if args.lora:
            print(f"{args.lora}: {apply_lora(model, args.lora, args.lora_scale)} layers folded in at scale {args.lora_scale:g}")
        words += [add_embedding(model, e) for e in args.embedding]
        check_concept_words([args.prompt, args.negative], words)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a file that cannot be read: named
        sys.exit(f"error: {e.filename}: {e.strerror or e}")
    args.size = model.resolution if args.size is None else args.size
    f, multiple = model.vae.cfg.downsample, size_multiple(model)
    if args.size % multiple:
        sys.exit(f"error: --size must be a multiple of {multiple} for this model (e.g. {max(multiple, args.size // multiple * multiple)})")
    cond = model.encode_text([args.prompt] * args.n)
    uncond = model.encode_text([args.negative] * args.n)
    # Noise drawn on the CPU from a seeded generator: the same seed gives the same images on any device.
    shape = (args.n, model.unet.cfg.in_channels, args.size // f, args.size // f)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    unet = compile_unet(model.unet, args.device) if args.compile else model.unet
    latents = ddim_sample(unet, cond, uncond, noise, args.steps, args.cfg, progress=True)
    try:
        save_png(image_grid(model.decode(latents)), args.out)
    except CheckpointError as e:  # no space, read-only, permission: atomic_write's line names the file
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

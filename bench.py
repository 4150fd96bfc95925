"""Time our models against diffusers / transformers on the same weights, in one run.

    python bench.py                      # full SD 1.x size on CPU, 512x512 (64x64 latents), batch 1
    python bench.py --size tiny --res 64
    python bench.py --device cuda --dtype bf16 --repeats 20 --compile --peak-tflops 989 --steps 50 --train 1 8

Components: text encoder, UNet forward (with its counted FLOPs; MFU given --peak-tflops), VAE decode,
one step of a --steps DDIM + classifier-free guidance call as sample.py and diffusers' pipeline run
it (and its rate in it/s), and, with --train, one C-LoRA training step per batch size given (at task 2:
a frozen past task, penalty on; rank 16 on every attn2.to_k / to_v) against diffusers + peft LoRA on
the same layers (no penalty: peft has none), then one STAMINA step (clora.py: the same factors gated
by relaxed masks, sparsity term on) against the same reference, and its cost over C-LoRA's.
--compile runs our UNet through sample.compile_unet (cudagraphs on CUDA, no Triton). --profile adds,
for ours, torch.profiler's top ops by their own time in one DDIM + CFG call and in each train-step row
(on CUDA: the kernels, also those a replayed CUDA graph runs): where the time goes.

Prints, per component, the median time of ours and of the reference, their ratio (ours / reference:
below 1 is faster) and the peak memory each forward adds on top of the loaded weights. Weights are
random (no checkpoint is needed) and shared: both sides compute the same function. Needs the test
requirements (diffusers, transformers).
"""
import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).parent / "tests"))
from conftest import (TINY_TEXT, TINY_UNET, TINY_VAE, diffusers_pipeline, diffusers_unet, diffusers_vae,  # noqa: E402
                      original_checkpoint, random_model, transformers_clip)
from clip_text import TextConfig, TextEncoder  # noqa: E402
from sample import DTYPES, compile_unet, ddim_sample, prepare  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the process's peak resident size
    return rss("VmRSS")


def peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return rss("VmHWM")


def rss(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def added_peak(fn, device):
    """Peak bytes one call adds on top of what is already allocated."""
    gc.collect()
    base = reset_peak(device)
    fn()
    return peak(device) - base


def compare(name, ours, ref, device, repeats, per=1):
    """Warm both up, then alternate ours / reference so that drift in machine load hits both alike.
    Times are per call, divided by `per` (e.g. the steps of one sampling call)."""
    ours(), ref()
    mem = [added_peak(fn, device) for fn in (ours, ref)]
    times = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((ours, ref)):
            times[i].append(timed(fn, device))
    t_ours, t_ref = (statistics.median(t) / per for t in times)
    print(f"{name:<22} {t_ours * 1e3:>10.1f} {t_ref * 1e3:>10.1f} {t_ours / t_ref:>7.2f} {mem[0] / 2**20:>10.0f} {mem[1] / 2**20:>10.0f}",
          flush=True)
    return t_ours, t_ref


def main():
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed large blocks in its heap once its mmap threshold has grown, which hides
        # later peaks from the resident size; a fixed threshold returns every tensor's pages on free.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--res", type=int, default=512, help="image side; latents are res / 8 (tiny VAE: res / 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the ddim+cfg row (the GPU target is quoted for 50)")
    p.add_argument("--train", type=int, nargs="*", metavar="BATCH",
                   help="also time one C-LoRA training step against diffusers + peft, at these batch sizes (none given: --batch)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ref-channels-last", action="store_true", help="give the references our NHWC layout too")
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak in --dtype (H100 SXM bf16: 989): prints MFU")
    p.add_argument("--compile", action="store_true", help="our UNet through sample.compile_unet (Triton-free) for the UNet, DDIM and train rows")
    p.add_argument("--profile", action="store_true", help="also print where the time of ours' DDIM call and train step goes")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    diffusers.utils.logging.set_verbosity_error()  # its note on casting with .to() concerns loading from a hub folder, not used here
    transformers.utils.logging.set_verbosity_error()  # the pipeline's import warns about image processors it will not use
    cfgs = (TextConfig(), UNetConfig(), VAEConfig()) if args.size == "full" else (TINY_TEXT, TINY_UNET, TINY_VAE)
    torch.manual_seed(0)
    text, unet, vae = (random_model(cls, cfg, i) for i, (cls, cfg) in enumerate(zip((TextEncoder, UNet, VAE), cfgs)))
    sd = original_checkpoint(text, unet, vae)
    models = [text, unet, vae, transformers_clip(cfgs[0], sd), diffusers_unet(cfgs[1], sd), diffusers_vae(cfgs[2], sd)]
    del sd
    ref_layout = torch.channels_last if args.ref_channels_last else torch.contiguous_format
    text, unet, vae = (prepare(m, device, dtype) for m in models[:3])  # exactly as sample.py loads them
    run_unet = compile_unet(unet, device) if args.compile else unet
    ref_text, ref_unet, ref_vae = (m.to(device, dtype, memory_format=ref_layout).eval().requires_grad_(False) for m in models[3:])

    b, h = args.batch, args.res // cfgs[2].downsample
    ids = torch.randint(0, cfgs[0].vocab_size, (b, 77), device=device)
    ctx = torch.randn(b, 77, cfgs[0].width, device=device, dtype=dtype)
    latents = torch.randn(b, 4, h, h, device=device, dtype=dtype)
    t = torch.full((b,), 500, device=device)
    cpu = platform.processor() or platform.machine()
    print(f"# {args.size} size, reference layout {'NHWC' if args.ref_channels_last else 'NCHW (default)'}, {args.res}x{args.res}, batch {b}, {args.dtype}, {device}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else f' ({torch.get_num_threads()} threads, {cpu})'}, "
          f"torch {torch.__version__}, median of {args.repeats}")
    n = 8192 if device.type == "cuda" else 2048
    print(f"# a plain {n}^3 matrix product in {args.dtype}: {matmul_tflops(n, device, dtype):.3f} TFLOP/s (what this machine's "
          "GEMMs reach: the rates below compare to it)")
    print(f"{'component':<22} {'ours ms':>10} {'ref ms':>10} {'ratio':>7} {'ours MiB':>10} {'ref MiB':>10}")
    with torch.inference_mode():
        compare("text encoder", lambda: text(ids), lambda: ref_text(ids).last_hidden_state, device, args.repeats)
        t_unet, _ = compare("unet forward", lambda: run_unet(latents, t, ctx), lambda: ref_unet(latents, t, ctx).sample, device, args.repeats)
        throughput("unet forward", lambda: unet(latents, t, ctx), t_unet, args.peak_tflops)
        compare("vae decode", lambda: vae.decode(latents), lambda: ref_vae.decode(latents).sample, device, args.repeats)
        # One denoising step of a --steps DDIM + CFG (7.5) call, as sample.py runs it (the text's K/V
        # cached once per call: the fewer the steps, the less that saves) and as diffusers'
        # StableDiffusionPipeline runs it.
        pipe, size, steps = diffusers_pipeline(ref_unet, ref_vae), args.res, args.steps
        ours_ddim = lambda: ddim_sample(run_unet, ctx, ctx, latents, steps, 7.5)  # noqa: E731
        rates = compare("ddim+cfg step", ours_ddim,
                        lambda: pipe(prompt_embeds=ctx, negative_prompt_embeds=ctx, latents=latents, num_inference_steps=steps,
                                     guidance_scale=7.5, height=size, width=size, output_type="latent"), device, args.repeats, per=steps)
        print(f"# ddim+cfg, {steps} steps: ours {1 / rates[0]:.2f} it/s, ref {1 / rates[1]:.2f} it/s (whole calls, text K/V caching included)")
        if args.profile:
            profile(f"ddim+cfg call ({steps} steps)", ours_ddim, device)
    if args.train is not None:
        add_peft(ref_unet, args.rank)
        times = {}
        for method in ("clora", "stamina"):
            adapter = add_adapter(text, unet, args.rank, method)
            for b in args.train or [args.batch]:
                batch = latents[:1].expand(b, -1, -1, -1).clone(), ctx[:1].expand(b, -1, -1).clone()
                ours_step, ref_step = train_steps(adapter, run_unet, ref_unet, *batch)
                name = "train step" if method == "clora" else "stamina step"
                times[method, b] = compare(f"{name} r{args.rank} b{b}", ours_step, ref_step, device, args.repeats)
                throughput(f"{name} b{b}", train_steps(adapter, unet, ref_unet, *batch)[0], times[method, b][0], args.peak_tflops)
                if args.profile:
                    profile(f"{name} b{b}", ours_step, device)
            adapter.detach()
        for b in args.train or [args.batch]:
            (s, s_ref), (c, c_ref) = times["stamina", b], times["clora", b]
            # The rows ran minutes apart; each against the peft step timed alongside it cancels drift in machine load.
            print(f"# stamina / clora train step, b{b}: {s / c:.3f} ({(s / s_ref) / (c / c_ref):.3f} as ratios to the peft step timed with each)")
    if args.compile and device.type == "cuda":
        from torch._dynamo.utils import counters
        print(f"# cudagraphs: {counters['inductor']['cudagraph_skips']} graphs ran unrecorded (0: every compiled graph replays as a CUDA graph)")


def matmul_tflops(n, device, dtype):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, device) for _ in range(5)) / 1e12


def throughput(name, fn, seconds, peak_tflops):
    """Prints the FLOPs of one call of fn (counted by torch's FlopCounterMode, not estimated: every
    matmul, convolution and SDPA, backward included) and the rate `seconds` per call gives."""
    def cpu_sdpa(q, k, v, *args, **kwargs):  # arguments as tensor shapes
        return sdpa_flop_count(q, k, v)

    def cpu_sdpa_backward(grad, q, k, v, *args, **kwargs):
        return sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten  # torch has formulas for the GPU attention kernels only: the CPU's flash kernel, too
    cpu = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward}
    with FlopCounterMode(display=False, custom_mapping=cpu) as counter:
        fn()
    tflops = counter.get_total_flops() / seconds / 1e12
    print(f"# {name}: {counter.get_total_flops() / 1e9:.1f} GFLOP per call, ours {tflops:.3f} TFLOP/s"
          + (f", MFU {100 * tflops / peak_tflops:.1f}% of {peak_tflops:g}" if peak_tflops else ""), flush=True)


def profile(name, fn, device, rows=15):
    """The top `rows` ops of one call of fn by their own time on the device, as torch.profiler counts it."""
    from torch.profiler import ProfilerActivity
    cuda = device.type == "cuda"
    fn()  # warm: a compiled call records its graph first
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
    print(f"# profile of one {name}:\n" + "\n".join("#   " + line for line in table.splitlines() if line.strip()), flush=True)


def add_adapter(text, unet, rank, method):
    """Ours at task 2: task 1 frozen (so that C-LoRA's penalty is really computed), STAMINA's masks
    relaxed at mid-task slope (the sigmoid and its gradient computed, as in most of its training)."""
    from clip_text import Tokenizer
    from clora import CLoRA, pack_bits, slope

    adapter = CLoRA(unet, text, Tokenizer(), method, rank)
    g = torch.Generator().manual_seed(0)
    past = {"tokens": torch.randn(2, text.cfg.width, generator=g)}
    for name, layer in adapter.kv.items():
        key = name.replace("/", ".")
        past[key + ".A"] = 1e-3 * torch.randn(layer.weight.shape[0], rank, generator=g)
        past[key + ".B"] = 1e-3 * torch.randn(rank, layer.weight.shape[1], generator=g)
        if method == "stamina":
            past[key + ".M"] = pack_bits(torch.rand(layer.weight.shape, generator=g) < 0.5)
    adapter.load_task("<past>", past)
    adapter.start_task("<new>")
    if method == "stamina":
        adapter.set_slope(slope(50, 100, adapter.hardening))
    return adapter


def add_peft(ref_unet, rank):
    """peft's LoRA on the reference's attn2.to_k / to_v, the layers ours adapts."""
    from peft import LoraConfig

    ref_unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["attn2.to_k", "attn2.to_v"]))
    assert sum(p.requires_grad for p in ref_unet.parameters()) == 2 * sum(  # A and B on each of the same layers
        n.endswith(("attn2.to_k", "attn2.to_v")) for n, _ in ref_unet.named_modules())


def train_steps(adapter, run_unet, ref_unet, latents, ctx):
    """One optimisation step each: UNet forward, MSE (+ C-LoRA's penalty, or STAMINA's sparsity term,
    for ours), backward, AdamW."""
    t = torch.full((len(latents),), 500, device=latents.device)
    noise = torch.randn_like(latents)

    def step(model, params, regularizer):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def run():
            pred = model(latents, t, ctx)
            loss = F.mse_loss((pred if torch.is_tensor(pred) else pred.sample).float(), noise.float()) + regularizer()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    ref_params = [p for p in ref_unet.parameters() if p.requires_grad]
    reg = (lambda: 1e-2 * adapter.sparsity()) if adapter.hardening else (lambda: 1e8 * adapter.penalty())
    return step(run_unet, adapter.trainable(), reg), step(ref_unet, ref_params, lambda: 0.0)


if __name__ == "__main__":
    main()

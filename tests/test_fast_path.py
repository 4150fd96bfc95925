"""The --compile path without a GPU: what the cudagraphs back end needs, checked on the CPU.

torch.compile(backend="cudagraphs") is AOTAutograd (one forward and one backward graph) with each graph
recorded as a CUDA graph. It records a graph only when every tensor in it lives on the one CUDA device
and every op can be captured; otherwise it logs a line and runs the graph unrecorded, i.e. no faster.
A graph that writes into its inputs is not recorded either, and a graph break splits the step into
several graphs. These tests check all of that for the C-LoRA train step and the sampling step, so that
the CUDA path is right by construction; the tests marked for CUDA (skipped elsewhere) check it on a lent GPU.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.cudagraphs import find_input_mutations
from torch._inductor.utils import get_first_incompatible_cudagraph_node
from torch.fx.experimental.proxy_tensor import make_fx

import train
from checkpoint import read_state_dict
from clip_text import Tokenizer
from clora import CLoRA
from conftest import args, rel_err, tiny_models
from sample import compile_unet, ddim_sample
from test_clora import known_task


def adapter_at_task_2(seed=0):
    """Tiny text encoder and UNet with a C-LoRA adapter: one finished task frozen, a second one training."""
    text, unet, _ = tiny_models(seed)
    adapter = CLoRA(unet, text, Tokenizer(), "clora", 4)
    adapter.load_task("<a>", known_task(adapter, 1))
    adapter.start_task("<b>")
    with torch.no_grad():
        for layer in adapter.kv.values():
            layer.A.normal_(std=0.1)  # A = 0 at the start would zero every gradient of B
    return text, unet, adapter


def train_step(text, unet, adapter, ids, x, t, noise):
    """train.py's step, returning the loss and the gradients of everything that trains."""
    loss = F.mse_loss(unet(x, t, text(ids)), noise) + 1e3 * adapter.penalty()
    params = adapter.trainable()
    return loss.detach(), torch.autograd.grad(loss, params)


def inputs(adapter, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = adapter.tokenizer(["a photo of <a> <b>", "<b> on a beach"]).to(device)
    x, noise = (torch.randn(2, 4, 8, 8, generator=g).to(device) for _ in range(2))
    return ids, x, torch.tensor([10, 900], device=device), noise


def test_train_and_sampling_steps_are_whole_graphs_and_equal_eager(monkeypatch):
    """What the cudagraphs back end records (its front half, AOTAutograd, run here without the recording)
    and what --compile runs on the CPU (inductor's C++ back end) give eager's loss, gradients and noise
    prediction. The train step is exactly one forward and one backward graph and the sampling step (with
    the cached text K/V) one inference graph: no graph breaks; and no graph writes into its inputs
    (the cudagraphs back end would not record such a graph) or holds an op CUDA graphs cannot capture."""
    text, unet, adapter = adapter_at_task_2()
    args = inputs(adapter)
    ids, x, t, _ = args
    loss, grads = train_step(text, unet, adapter, *args)
    with torch.no_grad():
        cache = unet.cache_context(text(ids))
        eps = unet(x, t, cache)
    graphs = []

    def keep(gm, example_inputs):  # a compiler that records the graph and runs it as it is
        graphs.append(gm)
        return gm.forward

    aot = torch.compile(unet, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True, dynamic=False)
    for compiled in (aot, compile_unet(unet, "cpu")):
        monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # compile_unet's eager fallback would hide a failure
        c_loss, c_grads = train_step(text, compiled, adapter, *args)
        assert torch.allclose(c_loss, loss, rtol=1e-5)
        for a, b in zip(c_grads, grads, strict=True):
            assert rel_err(a, b) <= 1e-4
        with torch.no_grad():
            assert rel_err(compiled(x, t, cache), eps) <= 1e-4
    assert len(graphs) == 3  # the train step's forward and backward, the sampling step's forward
    for gm in graphs:
        assert get_first_incompatible_cudagraph_node(gm) is None
        assert not find_input_mutations(gm.graph)


def device_of_every_tensor(fn, *args):
    """The set of devices of every tensor a traced call of fn creates or uses."""
    gm = make_fx(fn)(*args)
    return {n.meta["val"].device for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}, gm


@pytest.mark.parametrize("what", ["train step", "sampling step"])
def test_no_tensor_leaves_the_inputs_device(what):
    """On CUDA a single tensor made on the host (a torch.arange without device=, a CPU scalar) makes the
    cudagraphs back end skip the recording. Traced on the meta device, a stand-in for CUDA that runs no
    kernels, every tensor of the train step (text encoder, UNet, penalty, backward) and of a sampling step
    with the cached text K/V must stay on meta, and no op may be one CUDA graphs cannot capture. (On meta,
    SDPA runs as its plain math ops; the flash kernels CUDA picks are checked by the CUDA test below.)"""
    text, unet, adapter = adapter_at_task_2()
    for m in (text, unet, adapter):
        m.to("meta")
    ids, x, t, noise = inputs(adapter, "meta")
    if what == "train step":
        devices, gm = device_of_every_tensor(lambda *a: train_step(text, unet, adapter, *a), ids, x, t, noise)
    else:
        with torch.no_grad():
            devices, gm = device_of_every_tensor(lambda ids, x, t: unet(x, t, unet.cache_context(text(ids))), ids, x, t)
    assert devices == {torch.device("meta")}
    assert get_first_incompatible_cudagraph_node(gm) is None
    # The check sees what it is meant to: a host scalar, which CUDA ops accept silently, is caught.
    assert torch.device("cpu") in device_of_every_tensor(lambda x: x * torch.ones(()), x)[0]


@pytest.fixture
def ieee_fp32(monkeypatch):
    """fp32 convolutions and matrix products in full precision on CUDA, so that 1e-3 measures the compiled
    path and not rounding. cuDNN's default is TF32 (a 10-bit mantissa), and eager and the recorded graphs
    may pick different convolution algorithms. On an H200 (2026-11-30), with TF32 on, the first test passed
    once and once failed at 1.5e-3 (gradients), and the second failed at 2.3e-3 (a task's factors)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a lent GPU (BENCHMARKS.md, GPU)")
def test_cuda_graphs_record_the_train_and_sampling_steps_and_equal_eager(monkeypatch, ieee_fp32):
    """On a GPU: --compile's cudagraphs back end records (a skip is an error here) the C-LoRA train step
    and the sampling step, and replaying them gives eager's loss, gradients and latents. Run with Triton
    hidden (`sys.modules["triton"] = None`, as BENCHMARKS.md's GPU command does) it also shows the path needs none."""
    from torch._dynamo.utils import counters

    text, unet, adapter = adapter_at_task_2()
    for m in (text, unet, adapter):
        m.to("cuda", memory_format=torch.channels_last)
    args = inputs(adapter, "cuda")
    compiled = compile_unet(unet, "cuda")
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # compile_unet's eager fallback would hide a failure
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)
    counters.clear()
    for _ in range(3):  # CUDA graph trees: warm-up, record, replay
        loss, grads = train_step(text, unet, adapter, *args)
        c_loss, c_grads = train_step(text, compiled, adapter, *args)
        assert torch.allclose(c_loss, loss, rtol=1e-4)
        for a, b in zip(c_grads, grads, strict=True):
            assert rel_err(a, b) <= 1e-3
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    assert recorded > 0
    with torch.no_grad():
        ids, x, _, _ = args
        cond, uncond = text(ids), text(torch.zeros_like(ids))
        eager = ddim_sample(unet, cond, uncond, x, steps=4)
        for _ in range(2):  # the second call replays what the first recorded
            latents = ddim_sample(compiled, cond, uncond, x, steps=4)
            assert rel_err(latents, eager) <= 1e-3
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > recorded  # the sampling step was recorded too
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a lent GPU (BENCHMARKS.md, GPU)")
def test_train_py_compiled_on_cuda_learns_what_eager_learns(tiny_ckpt, data, tmp_path, ieee_fp32):
    """train.py --compile on CUDA, two tasks with the prior term (two UNet calls a step, one without
    gradient: cudagraphs' output memory is reused between them) and C-LoRA's penalty: the saved factors
    and tokens are eager's, up to float error."""
    ckpt, _ = tiny_ckpt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red house on a hill\n")
    common = ("--device", "cuda", "--prior", "1", "--prior-prompts", str(prompts))
    train.main(args(ckpt, data, tmp_path / "eager", 2, *common))
    train.main(args(ckpt, data, tmp_path / "compiled", 2, *common, "--compile"))
    for task in ("task_01.safetensors", "task_02.safetensors"):
        eager, compiled = (read_state_dict(tmp_path / run / task) for run in ("eager", "compiled"))
        assert eager.keys() == compiled.keys()
        for k in eager:
            assert rel_err(compiled[k], eager[k]) <= 1e-3, (task, k)


def test_bench_prints_every_row():
    """bench.py (the figures in BENCHMARKS.md) runs end to end on the tiny models: a GPU session's few
    minutes must not be spent on a broken script."""
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "bench.py", "--size", "tiny", "--res", "32", "--repeats", "1", "--train", "1", "2", "--profile"],
                         cwd=root, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [line.split()[0] + " " + line.split()[1] for line in out.splitlines() if line and not line.startswith("#")]
    assert rows == ["component ours", "text encoder", "unet forward", "vae decode", "ddim+cfg step",
                    "train step", "train step", "stamina step", "stamina step"], out
    assert out.count("TFLOP/s") == 6 and "it/s" in out and out.count("# stamina / clora train step") == 2
    profiles = [line for line in out.splitlines() if line.startswith("# profile of one")]
    assert profiles == ["# profile of one ddim+cfg call (4 steps):"] + [f"# profile of one {m} step b{b}:" for m in ("train", "stamina") for b in (1, 2)], out
    assert "convolution" in out  # the tables name the ops

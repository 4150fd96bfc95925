"""train.py under torchrun, on CPU (gloo): two processes train what one process trains on the same
global batch, rank 0 alone writes, a killed rank stops the other and the rerun resumes exactly, and
a bad launch is one line from rank 0 that changes nothing. The processes are real: torchrun as a
subprocess, with the command line the README documents."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from checkpoint import read_state_dict, save_safetensors
from conftest import ROOT, args, original_checkpoint, rel_err, snapshot, tiny_models

# train.py with test hooks, run by torchrun in its place: every file each rank moves into place
# (atomic_write's os.replace: every file train.py writes) is logged to WRITES.<rank>; rank 0 saves
# the trainable weights at every forward and the averaged gradients at every step to TRACE; with
# FP64 the model computes in float64 (`float64`); rank 1 kills itself with SIGKILL in its optimizer
# step number KILL_AT, and takes the extra flags RANK1_ARGS.
HOOKED = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, train
if train.RANK == 1:
    sys.argv += os.environ.get("RANK1_ARGS", "").split()
if os.environ.get("FP64"):
    load = train.StableDiffusion.load
    train.StableDiffusion.load = staticmethod(lambda path, device, dtype: load(path, device, torch.float64))
replace, forward, step, trace = os.replace, train.Denoiser.forward, torch.optim.AdamW.step, {{"weights": [], "grads": []}}
def logged_replace(src, dst):
    if "WRITES" in os.environ:
        with open(os.environ["WRITES"] + "." + os.environ["RANK"], "a") as f:
            f.write(os.path.basename(dst) + "\\n")
    return replace(src, dst)
def traced_forward(self, *a):
    trace["weights"].append([p.detach().clone() for p in self.params])
    return forward(self, *a)
def traced_step(self, *a, **k):
    trace["grads"].append([p.grad.clone() for g in self.param_groups for p in g["params"]])
    if train.RANK == 1 and len(trace["grads"]) == int(os.environ.get("KILL_AT", 0)):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *a, **k)
os.replace, train.Denoiser.forward, torch.optim.AdamW.step = logged_replace, traced_forward, traced_step
train.main()
if train.RANK == 0 and "TRACE" in os.environ:
    torch.save(trace, os.environ["TRACE"])
"""


def torchrun(script, argv, **env):
    """`torchrun --standalone --nproc_per_node 2 SCRIPT ARGV` with --run spelt --run-dir, as documented."""
    argv = ["--run-dir" if a == "--run" else a for a in argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """A tiny checkpoint, two concepts, and both tasks trained by two processes (clora: task 2 has the
    penalty) at global batch 4: (ckpt, data, run folder, hooked script, torchrun's result)."""
    root = tmp_path_factory.mktemp("ddp")
    ckpt = root / "tiny.safetensors"
    save_safetensors(original_checkpoint(*tiny_models()), ckpt)
    rng = np.random.default_rng(0)
    for name in ("01_alice", "02_bob"):
        (root / "data" / name).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "data" / name / f"{j}.png")
    hooked = root / "hooked_train.py"
    hooked.write_text(HOOKED)
    run = root / "run"
    done = torchrun(hooked, args(ckpt, root / "data", run, 2, "--batch", "4"), WRITES=str(root / "writes"))
    assert done.returncode == 0, done.stderr[-3000:]
    return ckpt, root / "data", run, hooked, done


def one_process(ckpt, data, run, task, weights, monkeypatch, *extra):
    """train.py --task `task` in this process, its model in float64, on the same global batch, every
    forward at the two processes' weights of that step (`weights`): its gradient at every step."""
    forced, grads = iter(weights), []
    load, forward, step = train.StableDiffusion.load, train.Denoiser.forward, torch.optim.AdamW.step

    def forced_forward(self, *a):
        with torch.no_grad():
            for p, w in zip(self.params, next(forced)):
                p.copy_(w)
        return forward(self, *a)

    def logged_step(self, *a, **k):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return step(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(train.StableDiffusion, "load", staticmethod(lambda path, device, dtype: load(path, device, torch.float64)))
        m.setattr(train.Denoiser, "forward", forced_forward)
        m.setattr(torch.optim.AdamW, "step", logged_step)
        train.main(args(ckpt, data, run, task, "--batch", "4", *extra))
    return grads


def worst(grads, ref):
    """The largest relative error of a step's gradient (all trainable tensors as one vector, conftest.rel_err)."""
    return max(rel_err(torch.cat([a.flatten() for a in g]), torch.cat([b.flatten() for b in r])) for g, r in zip(grads, ref))


def test_two_processes_compute_one_process_gradients(two_tasks, tmp_path, monkeypatch):
    """In float64: in float32 the summation order alone (a sum over 4 samples, or two sums over 2
    averaged) moves the gradients by 2e-6-4e-6 of their largest entry on this model, measured."""
    ckpt, data, _, hooked, _ = two_tasks
    run, one = tmp_path / "run", tmp_path / "one"
    done = torchrun(hooked, args(ckpt, data, run, 2, "--batch", "4"), TRACE=str(tmp_path / "trace.pt"), FP64="1")
    assert done.returncode == 0, done.stderr[-3000:]
    trace = torch.load(tmp_path / "trace.pt")
    assert len(trace["grads"]) == 8  # 2 tasks x 4 steps; task 2's carry C-LoRA's penalty from its step 2 on
    grads = one_process(ckpt, data, one, 1, trace["weights"][:4], monkeypatch)
    # Task 2 on the two processes' task 1 (its penalty weighs the new delta by task 1's): --overwrite of a copy.
    for name in ("task_01.safetensors", "run.json"):
        shutil.copy(run / name, one / name)
    grads += one_process(ckpt, data, one, 2, trace["weights"][4:], monkeypatch, "--overwrite")
    assert worst(grads, trace["grads"]) < 1e-6
    # The check can fail: the penalty counted twice (as when each process adds it and they sum) is far off.
    twice = one_process(ckpt, data, one, 2, trace["weights"][4:], monkeypatch, "--overwrite", "--lam", "2e8")
    assert worst(twice, trace["grads"][4:]) > 1e-3


def test_two_processes_compute_one_process_gradients_with_the_prior_term(two_tasks, tmp_path, monkeypatch):
    """--prior: each step's target (the model before the task, no gradient) then both halves of the loss
    in one forward, which DDP averages: still one process's gradients, in float64."""
    ckpt, data, _, hooked, _ = two_tasks
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na red house\n")
    extra = ["--prior", "1", "--prior-prompts", str(tmp_path / "prompts.txt")]
    done = torchrun(hooked, args(ckpt, data, tmp_path / "run", 1, "--batch", "4", *extra), TRACE=str(tmp_path / "trace.pt"), FP64="1")
    assert done.returncode == 0, done.stderr[-3000:]
    trace = torch.load(tmp_path / "trace.pt")
    assert (len(trace["weights"]), len(trace["grads"])) == (8, 4)  # two forwards per step
    grads = one_process(ckpt, data, tmp_path / "one", 1, trace["weights"], monkeypatch, *extra)
    assert worst(grads, trace["grads"]) < 1e-6


def test_two_processes_end_with_one_process_weights_and_rank_0_alone_writes(two_tasks, tmp_path, monkeypatch):
    """In float32, the weights within 1e-4, but for the factors A, within 1e-2 as one vector: AdamW
    divides each gradient entry by its own running scale, and A starts at 0, so its first step is
    lr * sign(gradient) entry by entry, and an entry whose gradient is within rounding of zero takes
    a full step either way. Measured: A within 2e-5 on one draw; on the draw of the concept seeding
    (train.task_seed) one of task 2's 32 A factors (lambda 1e8) was 1.1e-2 off, the next 1.2e-4, and
    every other tensor within 1e-4. That the two processes compute one process's gradients is
    the test above, to float64."""
    ckpt, data, run, _, done = two_tasks
    writes, replace, one = [], os.replace, tmp_path / "one"
    monkeypatch.setattr(os, "replace", lambda src, dst: writes.append(os.path.basename(dst)) or replace(src, dst))
    train.main(args(ckpt, data, one, 2, "--batch", "4"))
    monkeypatch.undo()
    for task in ("task_01.safetensors", "task_02.safetensors"):
        a, b = read_state_dict(run / task), read_state_dict(one / task)
        factors = [k for k in b if k.endswith(".A")]
        assert a.keys() == b.keys() and max(rel_err(a[k], b[k]) for k in b if k not in factors) < 1e-4, task
        assert rel_err(torch.cat([a[k].flatten() for k in factors]), torch.cat([b[k].flatten() for k in factors])) < 1e-2, task
    # Exactly one copy of each file: rank 0 wrote what one process writes, in the same order; rank 1 nothing.
    assert (run.parent / "writes.0").read_text().split() == writes
    assert not (run.parent / "writes.1").exists()
    assert snapshot(run).keys() == snapshot(one).keys()
    assert [t["processes"] for t in json.loads((run / "run.json").read_text())["tasks"]] == [2, 2]
    assert done.stdout.count("task 2 <bob>: training") == 1  # rank 0 speaks for both


def test_a_killed_rank_stops_the_other_and_the_rerun_resumes_exactly(two_tasks, tmp_path):
    ckpt, data, reference, hooked, _ = two_tasks
    run = tmp_path / "run"
    killed = torchrun(hooked, args(ckpt, data, run, 2, "--batch", "4"), WRITES=str(tmp_path / "writes"), KILL_AT="3")
    assert killed.returncode != 0 and "rank      : 1 (local_rank: 1)" in killed.stderr and "SIGKILL" in killed.stderr
    # Rank 0 says so in one line (seen every time but once, when this box was starved of CPU: torchrun's
    # SIGTERM then ended it with neither this line nor a traceback).
    assert killed.stderr.count("error: this torchrun's processes were stopped") <= 1, killed.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["task_01.partial.safetensors"]  # step 2's checkpoint, nothing else

    rerun = torchrun("train.py", args(ckpt, data, run, 2, "--batch", "4"))  # the documented command, unchanged
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "task 1: resuming at step 2" in rerun.stdout
    for task in ("task_01.safetensors", "task_02.safetensors"):
        assert (run / task).read_bytes() == (reference / task).read_bytes(), task


@pytest.mark.parametrize("extra, rank1, says", [
    ("--batch 3", "", "error: --batch 3: the global batch must be a multiple of the 2 processes"),
    pytest.param("--batch 2 --device cuda", "", f"error: torchrun starts 2 processes on {socket.gethostname()}, which has "
                 f"{torch.cuda.device_count()} CUDA device", marks=pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="2 GPUs")),
    ("--batch 2", "--lr 1e-3", "error: rank 1 was started on other inputs than rank 0 (--lr 0.001, rank 0 0.0005;"),
    ("--batch 2", "--run-dir ELSEWHERE", "cannot see the files rank 0 writes there; put the run folder on a path that every node shares"),
])
def test_a_bad_launch_is_one_line_from_rank_0_and_writes_nothing(two_tasks, tmp_path, extra, rank1, says):
    """Too few GPUs, a rank started with other settings, a run folder that another node does not see."""
    ckpt, data, _, hooked, _ = two_tasks
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    bad = torchrun(hooked, args(ckpt, data, run, 1, *extra.split()), WRITES=str(tmp_path / "writes"),
                   RANK1_ARGS=rank1.replace("ELSEWHERE", str(elsewhere)))
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], bad.stderr[-3000:]
    assert not run.exists() and not elsewhere.exists() and not list(tmp_path.glob("writes*"))


def test_experiment_runs_one_job_per_device_and_refuses_unknown_devices(tmp_path, monkeypatch, capsys):
    import queue

    import experiment

    with pytest.raises(SystemExit):
        experiment.main(["--devices", f"cpu,cuda:{torch.cuda.device_count()}", "--out", str(tmp_path / "out")])
    assert f"--devices: no device cuda:{torch.cuda.device_count()} here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    free = queue.Queue()
    free.put("cuda:1")
    monkeypatch.setattr(experiment, "FREE", free)
    monkeypatch.setattr(experiment, "run_job", lambda spec, device: (device, free.empty()))
    assert experiment.job(None) == ("cuda:1", True)  # the job held the device while it ran
    assert free.get_nowait() == "cuda:1"  # and gave it back

"""A run folder refuses what would corrupt it, and every bad input is one line: a stale partial
checkpoint, a second process, a NaN step, a swapped or edited task file, out-of-range arguments, bad
data, a full or read-only disk, leftovers of a kill, and kill -9 at random moments. Each refusal is
checked for its exit, its one line (no traceback) and every earlier file of the run left byte-identical."""
import errno
import fcntl
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import sample
import train
from conftest import args, crash_at_step, snapshot
from checkpoint import read_metadata
from clip_text import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def refused(main, argv, says):
    """main(argv) exits non-zero with one line `error: ...` matching `says`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    line = e.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
    assert re.search(says, line), line




# 1. A partial checkpoint resumes only under the settings it was trained with -------------------------


@pytest.mark.parametrize("changed", [("--lr", "1e-3"), ("--rank", "3"), ("--steps", "6"), ("--seed", "1")])
def test_a_partial_of_other_settings_restarts_the_task(tiny_ckpt, data, tmp_path, monkeypatch, capsys, changed):
    ckpt, _ = tiny_ckpt
    run, ref = tmp_path / "run", tmp_path / "ref"
    train.main(args(ckpt, data, ref, 1, *changed))  # the uninterrupted run with the new settings
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(ckpt, data, run, 1))
    monkeypatch.undo()
    partial = run / "task_01.partial.safetensors"
    assert json.loads(read_metadata(partial)["trained_with"])["word"] == "<alice>"
    capsys.readouterr()
    train.main(args(ckpt, data, run, 1, *changed))
    out = capsys.readouterr().out
    key = changed[0][2:]
    assert re.search(rf"task 1: its partial checkpoint was trained with other settings \({key} .*, now .*\); restarting the task", out)
    assert "resuming" not in out and not partial.exists()
    assert (run / "task_01.safetensors").read_bytes() == (ref / "task_01.safetensors").read_bytes()  # nothing mixed


def test_overwrite_discards_the_partial_and_other_data_restarts(tiny_ckpt, data, tmp_path, monkeypatch, capsys):
    ckpt, _ = tiny_ckpt
    run, ref = tmp_path / "run", tmp_path / "ref"
    train.main(args(ckpt, data, run, 1))
    train.main(args(ckpt, data, ref, 1))
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(ckpt, data, run, 1, "--overwrite", "--lr", "1e-3"))
    monkeypatch.undo()
    capsys.readouterr()
    train.main(args(ckpt, data, run, 1, "--overwrite"))
    assert "task 1: --overwrite discards its partial checkpoint" in capsys.readouterr().out
    assert (run / "task_01.safetensors").read_bytes() == (ref / "task_01.safetensors").read_bytes()
    # Another image in the concept's folder: a new data fingerprint, so the partial of task 2 is not resumed.
    crash_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(ckpt, data, run, 2))
    monkeypatch.undo()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "02_bob" / "9.png")
    capsys.readouterr()
    train.main(args(ckpt, data, run, 2))
    assert re.search(r"task 2: its partial checkpoint was trained with other settings \(data '[0-9a-f]+', now", capsys.readouterr().out)


# 2. One process per run folder ------------------------------------------------------------------------


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    before = snapshot(run)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)  # another train.py, alive, holding the lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242 on elsewhere")
    try:
        refused(train.main, args(ckpt, data, run, 2), r"run: in use by train.py \(pid 4242 on elsewhere\); wait for it")
        assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before
    finally:
        os.close(fd)  # the holder dies without cleaning up: its file stays, its lock goes
    assert (run / ".lock").exists()
    train.main(args(ckpt, data, run, 2))
    assert not (run / ".lock").exists() and (run / "task_02.safetensors").exists()


# 3. Non-finite loss or weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_a_non_finite_step_stops_before_anything_is_saved(tiny_ckpt, data, tmp_path, monkeypatch, where):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    before = snapshot(run)
    if where == "loss":  # a NaN at step 3
        real, calls = train.F.mse_loss, {"n": 0}

        def mse(*a, **k):
            calls["n"] += 1
            return real(*a, **k) * (float("nan") if calls["n"] == 3 else 1)

        monkeypatch.setattr(train.F, "mse_loss", mse)
    else:  # the last update overflows a factor, after a finite loss
        real_step, calls = train.torch.optim.AdamW.step, {"n": 0}

        def step(self, *a, **k):
            real_step(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == 4:
                self.param_groups[0]["params"][0].data.fill_(float("inf"))

        monkeypatch.setattr(train.torch.optim.AdamW, "step", step)
    refused(train.main, args(ckpt, data, run, 2, "--save-every", "0"),
            rf"task 2 <bob>: the loss or the weights are no longer finite at step {3 if where == 'loss' else 4}; "
            r"stopped before saving them \(lower --lr")
    assert snapshot(run) == before
    json.loads((run / "run.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in run.json"))


def test_a_huge_learning_rate_is_stopped(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    refused(train.main, args(ckpt, data, run, 1, "--lr", "1e6", "--save-every", "0"),
            r"task 1 <alice>: the loss or the weights are no longer finite")
    assert not run.exists()  # a new run refused before its first file leaves no folder


# 4. Task files are checked against run.json ----------------------------------------------------------------


def test_swapped_edited_or_relabelled_task_files_are_refused(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 2))
    meta, desc = read_metadata(run / "task_01.safetensors"), json.loads((run / "run.json").read_text())
    assert (meta["task"], meta["word"], meta["method"]) == ("1", "<alice>", "clora")
    assert desc["tasks"][0]["sha256"] == checkpoint.sha256(run / "task_01.safetensors")
    good = snapshot(run)
    sampled = ["--run", str(run), "--prompt", "a photo of <alice>", "--steps", "1", "--n", "1", "--size", "16",
               "--out", str(tmp_path / "s.png")]

    def check(says):
        before = snapshot(run)
        refused(train.main, args(ckpt, data, run, 3), says)
        refused(sample.main, sampled, says)
        assert snapshot(run) == before and not (tmp_path / "s.png").exists()
        for name, raw in good.items():
            (run / name).write_bytes(raw)

    one, two = run / "task_01.safetensors", run / "task_02.safetensors"
    one.write_bytes(good["task_02.safetensors"])
    two.write_bytes(good["task_01.safetensors"])
    check(r"task_01.safetensors: holds task 2 word <bob> method clora, but run.json records task 1 <alice> \(clora\); "
          "put the run's own file back")
    raw = bytearray(good["task_01.safetensors"])
    raw[-1] ^= 1  # one bit of one weight
    one.write_bytes(bytes(raw))
    check(r"task_01.safetensors: not the file this run wrote for task 1 <alice> \(its digest differs from run.json's\)")
    (run / "run.json").write_text(json.dumps({**desc, "method": "lora"}))
    refused(train.main, args(ckpt, data, run, 3, "--method", "lora"),
            r"holds task 1 word <alice> method clora, but run.json records task 1 <alice> \(lora\)")
    refused(sample.main, sampled, r"method clora, but run.json records task 1 <alice> \(lora\)")
    for broken in ("{", "[]", json.dumps({**desc, "tasks": [{"task": "1"}]})):
        (run / "run.json").write_text(broken)
        refused(train.main, args(ckpt, data, run, 3), r"run.json: (not valid JSON|incomplete or not train.py's)")
        refused(sample.main, sampled, r"run.json: (not valid JSON|incomplete or not train.py's)")


# 5. Argument ranges, before any work -----------------------------------------------------------------------


@pytest.mark.parametrize("bad, says", [
    (("--steps", "0"), "--steps 0: must be >= 1"), (("--steps", "-5"), "--steps -5: must be >= 1"),
    (("--rank", "0"), "--rank 0: must be >= 1"), (("--rank", "-1"), "--rank -1: must be >= 1"),
    (("--lam", "-1"), r"--lam -1.0: must be finite and >= 0"), (("--lr", "nan"), "--lr nan: must be finite"),
    (("--token-lr", "inf"), "--token-lr inf: must be finite"), (("--tokens", "0"), "--tokens 0: must be >= 1"),
    (("--batch", "0"), "--batch 0: must be >= 1"), (("--res", "63"), "--res 63: must be a positive multiple of 8"),
    (("--res", "-16"), "--res -16: must be a positive multiple of 8"), (("--grid-steps", "0"), r"--grid-steps 0: must be in 1..999"),
    (("--grid-steps", "1000"), r"--grid-steps 1000: must be in 1..999"), (("--save-every", "-1"), "--save-every -1: must be >= 0"),
    (("--task", "0"), "--task 0: must be a task number"), (("--cfg", "nan"), "--cfg nan: must be finite"),
    (("--prior", "-1"), r"--prior -1.0: must be finite and >= 0"),
    (("--prior", "1"), r"--prior 1 on SD 1.x needs --prior-prompts FILE: prompts of what the model should keep drawing"),
    (("--prior-prompts", "p.txt"), r"--prior-prompts p.txt: the prior term is off \(--prior 0\); pass --prior W too"),
    (("--prior", "1", "--prior-prompts", "EMPTY"), r"--prior-prompts .*EMPTY: no prompts in it; write one prompt per line"),
    (("--prior", "1", "--prior-prompts", "NAMED"), r"--prior-prompts .*NAMED: 'a photo of <alice>' names a concept; base prompts name none"),
    (("--prior", "1", "--prior-prompts", "MISSING"), r"--prior-prompts .*MISSING: cannot be read \(No such file or directory\)"),
])
def test_train_arguments_out_of_range_are_one_line(tiny_ckpt, data, tmp_path, bad, says):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    argv = args(ckpt, data, run, 1)
    i = argv.index(bad[0]) if bad[0] in argv else len(argv)
    argv[i:i + 2] = bad[:2]
    argv += bad[2:]
    (tmp_path / "EMPTY").write_text("\n \n")
    (tmp_path / "NAMED").write_text("a photo of a cat\na photo of <alice>\n")
    argv = [str(tmp_path / a) if a in ("EMPTY", "NAMED", "MISSING") else a for a in argv]
    refused(train.main, argv, "^error: " + says)
    assert not run.exists()


@pytest.mark.parametrize("script, bad, says", [("train.py", ["--task", "1", "--steps", "0"], "error: --steps 0: must be >= 1"),
                                               ("sample.py", ["--prompt", "x", "--size", "-64"], "error: --size -64: must be positive")])
def test_the_command_line_prints_one_line_and_exits_non_zero(script, bad, says):
    p = subprocess.run([sys.executable, str(ROOT / script), *bad], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (p.returncode, p.stdout, p.stderr) == (1, "", says + "\n")


def test_train_run_that_is_a_file_is_one_line(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    (tmp_path / "f").write_text("mine")
    refused(train.main, args(ckpt, data, tmp_path / "f", 1), r"--run .*f: a file, not a folder")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("bad, says", [
    (("--steps", "0"), r"--steps 0: must be in 1..999"), (("--steps", "1000"), r"--steps 1000: must be in 1..999"),
    (("--n", "0"), "--n 0: must be >= 1"), (("--size", "0"), "--size 0: must be positive"),
    (("--size", "-64"), "--size -64: must be positive"), (("--cfg", "inf"), "--cfg inf: must be finite"),
    (("--out", "x.jpg"), r"--out x.jpg: sample.py writes PNG; name it .png"),
    (("--out", "DIR"), "--out DIR: a folder; name the .png file"), (("--run", "FILE"), "--run FILE: not a folder; pass a train.py run folder"),
])
def test_sample_arguments_out_of_range_are_one_line(tiny_ckpt, tmp_path, bad, says, monkeypatch):
    ckpt, _ = tiny_ckpt
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("x")
    before = sorted(tmp_path.iterdir())
    refused(sample.main, ["--ckpt", str(ckpt), "--prompt", "x", "--steps", "1", "--n", "1", "--size", "16", "--out", "o.png", *bad],
            "^error: " + says)
    assert sorted(tmp_path.iterdir()) == before


# 6. Data -----------------------------------------------------------------------------------------------------


def test_duplicate_words_and_hidden_folders(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    (data / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16)).save(data / ".ipynb_checkpoints" / "0.png")
    Image.new("RGB", (16, 16)).save(data / "01_alice" / "._0.png")  # macOS metadata, not an image
    (data / "01_alice" / "._0.png").write_bytes(b"\0\5\26\7")
    assert [w for w, _ in train.concepts(data)] == ["<alice>", "<bob>", "<carol>"]
    assert len(train.load_images(data / "01_alice", 16)) == 2
    (data / "04_Alice").mkdir()
    run = tmp_path / "run"
    refused(train.main, args(ckpt, data, run, 1), r"folders 01_alice and 04_Alice both give the word <alice>; rename one")
    assert not run.exists()  # refused before task 1 trains


def test_image_modes_convert_to_what_they_show(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    alpha = np.where(np.arange(16)[None, :] < 8, 255, 0).repeat(16, 0).astype(np.uint8)
    cases = {
        "i16": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, 2)),
        "palette": (Image.fromarray(rgb).quantize(256), None),
        "cmyk": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "rgba": (Image.fromarray(np.dstack([rgb, alpha])), np.where(alpha[..., None] == 255, rgb, 255)),
        "la": (Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]),
               np.repeat(np.where(alpha == 255, gray, 255)[..., None], 3, 2)),
    }
    for name, (im, want) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        im.save(folder / ("0.tif" if name == "cmyk" else "0.png"))
        got = ((train.load_images(folder, 16)[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
        if name == "i16":
            assert Image.open(folder / "0.png").mode.startswith("I")
        want = np.asarray(im.convert("RGB")) if want is None else want
        assert np.abs(got - want).max() <= 1, name


def test_an_image_over_the_size_bound_is_one_line(tiny_ckpt, data, tmp_path, monkeypatch):
    ckpt, _ = tiny_ckpt
    for bound in (300, 100):  # over the bound, and over twice it (PIL's own error)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", bound)
        refused(train.main, args(ckpt, data, tmp_path / "run", 1),
                rf"01_alice/\d.png: too large to read safely \(.*\); shrink it below {bound} pixels")
        assert not (tmp_path / "run").exists()


# 7. Disks that refuse, leftovers, permissions ---------------------------------------------------------------


def test_a_full_disk_is_one_line_and_changes_nothing(tiny_ckpt, data, tmp_path, monkeypatch):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    before = snapshot(run)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)  # where a full disk shows up at the latest
    refused(train.main, args(ckpt, data, run, 2),
            r"task_02.partial.safetensors: cannot write it \(No space left on device\); free some space and run again")
    assert snapshot(run) == before  # no temp file left either


def test_a_read_only_run_folder_is_refused_before_training(tiny_ckpt, data, tmp_path, monkeypatch):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    before = snapshot(run)
    real_open, steps = os.open, []

    def read_only(path, flags, *a):  # the tests run as root, where chmod would not stop a write
        if Path(path).parent == run and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(train.torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))
    refused(train.main, args(ckpt, data, run, 2, "--save-every", "0"),
            r"run: cannot write in the run folder \(Read-only file system\); make it writable or use another --run")
    assert not steps and snapshot(run) == before


def test_leftovers_are_cleaned_grids_rebuilt_and_modes_follow_the_umask(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train.main(args(ckpt, data, run, 1))
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in run.iterdir())
        grid = (run / "grid_task_01.png").read_bytes()
        (run / "grid_task_01.png").unlink()
        for name in (".run.json.0badc0de.tmp", ".task_02.safetensors.12345678.tmp"):
            (run / name).write_bytes(b"half a file")
        train.main(args(ckpt, data, run, 1))
        assert (run / "grid_task_01.png").read_bytes() == grid
        assert sorted(p.name for p in run.iterdir()) == ["grid_task_01.png", "run.json", "task_01.safetensors"]
        os.umask(0o077)
        train.main(args(ckpt, data, run, 1, "--overwrite"))
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in run.iterdir())
    finally:
        os.umask(old)


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    real, synced = os.fsync, []
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    checkpoint.save_safetensors({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    assert synced == [False, True]  # the file's data, then the folder's entry


# 8. The tokenizer takes a string ----------------------------------------------------------------------------


def test_tokenizer_takes_a_string_or_a_list():
    tok = Tokenizer()
    assert tok("a cat").shape == (1, 77) and torch.equal(tok("a cat"), tok(["a cat"]))
    assert tok(["a cat", "a dog"]).shape == (2, 77)


# 9. kill -9 at random moments --------------------------------------------------------------------------------


def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(run):
        argv = args(ckpt, data, run, 3)
        argv[argv.index("--save-every") + 1], argv[argv.index("--steps") + 1] = "1", "6"
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def training(p, run):
        """Wait until process p holds the run's lock (imports done, its work begun), or has exited."""
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            try:
                if f"pid {p.pid} " in (run / ".lock").read_text():
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.01)

    ref = start(tmp_path / "ref")
    training(ref, tmp_path / "ref")
    t0 = time.time()
    while (tmp_path / "ref" / ".lock").exists() and ref.poll() is None:  # gone when the work is done
        time.sleep(0.005)
    took = time.time() - t0
    assert ref.wait() == 0, ref.stderr.read().decode()
    run, rng, codes = tmp_path / "run", random.Random(0), []
    for _ in range(3):  # each kill lands at a random moment of the work left, leaving a stale lock behind
        p = start(run)
        training(p, run)
        time.sleep(rng.uniform(0.05, 0.8) * took)
        p.send_signal(signal.SIGKILL)
        codes.append(p.wait())
    assert -signal.SIGKILL in codes
    p = start(run)
    assert p.wait() == 0, p.stderr.read().decode()
    assert snapshot(run) == snapshot(tmp_path / "ref")  # every task file, grid and run.json, and no leftover

"""train.py on a tiny random model: the run folder, bringing a run up to task N, resuming after a
crash, and bad inputs that must change nothing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import args, crash_at_step, snapshot
from checkpoint import read_state_dict


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i, name in enumerate(["01_alice", "02_bob", "03_carol"]):
        (root / name).mkdir(parents=True)
        for j in range(3):
            px = rng.integers(0, 255, (20 + 4 * j, 16, 3), dtype=np.uint8)
            im = Image.fromarray(px)
            im = {0: im, 1: im.convert("RGBA"), 2: im.convert("L")}[j]  # any mode, any size
            im.save(root / name / f"{j}.png")
    return root


def test_three_tasks_then_extend_keep_and_refuse(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    task1 = (run / "task_01.safetensors").read_bytes()
    train.main(args(ckpt, data, run, 3))  # trains 2, then 3; keeps 1
    assert (run / "task_01.safetensors").read_bytes() == task1
    names = {p.name for p in run.iterdir()}
    assert names == {"run.json", *(f"task_0{i}.safetensors" for i in (1, 2, 3)), *(f"grid_task_0{i}.png" for i in (1, 2, 3))}
    desc = json.loads((run / "run.json").read_text())
    assert [t["word"] for t in desc["tasks"]] == ["<alice>", "<bob>", "<carol>"]
    assert desc["method"] == "clora" and desc["rank"] == 2 and desc["tokens_per_concept"] == 2
    assert all(t["delta_norm"]["total"] > 0 for t in desc["tasks"])
    assert {k: desc["tasks"][1][k] for k in ("steps", "seed", "res", "dtype", "device")} == dict(
        steps=4, seed=0, res=16, dtype="fp32", device="cpu")  # what the task was trained with, where
    t2 = read_state_dict(run / "task_02.safetensors")
    assert t2["tokens"].shape == (2, 128) and t2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.A"].shape[1] == 2
    assert Image.open(run / "grid_task_03.png").size == (32, 32)  # 3 concepts, 2x2 grid of 16 px

    before = snapshot(run)
    train.main(args(ckpt, data, run, 2))  # already there: nothing retrained, nothing written
    assert snapshot(run) == before
    with pytest.raises(SystemExit, match="was made with base checkpoint"):
        other = tmp_path / "other.safetensors"
        raw = bytearray(ckpt.read_bytes())
        raw[-1] ^= 1  # one bit of one weight differs
        other.write_bytes(bytes(raw))
        train.main(args(other, data, run, 3))
    with pytest.raises(SystemExit, match="method"):
        train.main(args(ckpt, data, run, 3, "--method", "lora"))
    assert snapshot(run) == before


def test_crash_in_task_2_resumes_and_keeps_task_1(tiny_ckpt, data, tmp_path, monkeypatch, capsys):
    ckpt, _ = tiny_ckpt
    run, ref = tmp_path / "run", tmp_path / "ref"
    train.main(args(ckpt, data, ref, 2))  # uninterrupted reference
    train.main(args(ckpt, data, run, 1))
    task1 = (run / "task_01.safetensors").read_bytes()

    crash_at_step(monkeypatch, 3)  # a kill after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.main(args(ckpt, data, run, 2))
    monkeypatch.undo()
    assert (run / "task_02.partial.safetensors").exists() and not (run / "task_02.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["tasks"][-1]["task"] == 1  # task 1 still loadable, alone
    capsys.readouterr()
    train.main(args(ckpt, data, run, 2))
    assert "task 2: resuming at step 2" in capsys.readouterr().out
    assert (run / "task_01.safetensors").read_bytes() == task1
    assert not (run / "task_02.partial.safetensors").exists()
    resumed, straight = read_state_dict(run / "task_02.safetensors"), read_state_dict(ref / "task_02.safetensors")
    assert all(np.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)  # the resume is exact


@pytest.mark.parametrize("break_it, says", [
    (lambda d: [p.unlink() for p in (d / "02_bob").iterdir()], "no images"),
    (lambda d: (d / "02_bob" / "1.png").write_bytes(b"not a png"), "1.png: not a readable image"),
    (lambda d: None, "--task 4: .* has 3 concept folders"),
])
def test_bad_inputs_change_nothing(tiny_ckpt, data, tmp_path, break_it, says):
    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 1))
    before = snapshot(run)
    break_it(data)
    with pytest.raises(SystemExit, match=says):
        train.main(args(ckpt, data, run, 4 if "task 4" in says else 2))
    assert snapshot(run) == before


def test_unknown_method_is_a_one_line_error(tiny_ckpt, data, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    with pytest.raises(SystemExit) as e:
        train.main(args(ckpt, data, tmp_path / "run", 1, "--method", "dreambooth"))
    assert e.value.code != 0 and "invalid choice: 'dreambooth'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sample_from_a_run_and_unknown_concepts(tiny_ckpt, data, tmp_path):
    import sample

    ckpt, _ = tiny_ckpt
    run = tmp_path / "run"
    train.main(args(ckpt, data, run, 2))
    out = tmp_path / "both.png"
    base = ["--steps", "2", "--n", "1", "--size", "16"]
    sample.main(["--run", str(run), "--prompt", "a photo of <alice> and <bob>", "--out", str(out), *base])
    assert Image.open(out).size == (16, 16)
    with pytest.raises(SystemExit, match=r"unknown concept <carol>; known: <alice> <bob>"):
        sample.main(["--run", str(run), "--prompt", "a photo of <carol>", *base])
    with pytest.raises(SystemExit, match=r"unknown concept <alice>; known: none \(pass --run\)"):
        sample.main(["--ckpt", str(ckpt), "--prompt", "a photo of <alice>", *base])
    other = tmp_path / "other.safetensors"
    other.write_bytes(ckpt.read_bytes()[:-1] + bytes([ckpt.read_bytes()[-1] ^ 1]))
    with pytest.raises(SystemExit, match="is not the base checkpoint of run"):
        sample.main(["--run", str(run), "--ckpt", str(other), "--prompt", "x", *base])


def test_token_lr_trains_the_tokens_apart_from_the_factors(tiny_ckpt, data, tmp_path):
    ckpt, _ = tiny_ckpt
    runs = {name: tmp_path / name for name in ("tokens_frozen", "factors_frozen", "all_frozen")}
    train.main(args(ckpt, data, runs["tokens_frozen"], 1, "--lr", "1e-2", "--token-lr", "0"))
    train.main(args(ckpt, data, runs["factors_frozen"], 1, "--lr", "0", "--token-lr", "1e-2"))
    train.main(args(ckpt, data, runs["all_frozen"], 1, "--lr", "0", "--token-lr", "0"))
    a, b, init = (read_state_dict(r / "task_01.safetensors") for r in runs.values())
    factors_a = [v for k, v in a.items() if k.endswith(".A")]
    assert all((v == 0).all() for k, v in b.items() if k.endswith(".A")) and any((v != 0).any() for v in factors_a)
    assert np.array_equal(a["tokens"], init["tokens"]) and not np.allclose(b["tokens"], init["tokens"])
    task = json.loads((runs["factors_frozen"] / "run.json").read_text())["tasks"][0]
    assert (task["lr"], task["token_lr"]) == (0.0, 1e-2)


def test_mirror_setting_decides_the_training_images(tiny_ckpt, data, tmp_path, monkeypatch):
    import vae
    seen, encode = [], vae.VAE.encode
    monkeypatch.setattr(vae.VAE, "encode", lambda self, x: seen.append(len(x)) or encode(self, x))
    ckpt, _ = tiny_ckpt
    for flag in ([], ["--no-mirror"]):  # an SD checkpoint's default: the 3 photos and their mirror images
        train.main(args(ckpt, data, tmp_path / f"run{len(flag)}", 1, *flag))
    assert seen == [6, 3], seen
    tasks = [json.loads((tmp_path / f"run{i}" / "run.json").read_text())["tasks"][0] for i in (0, 1)]
    assert [t["mirror"] for t in tasks] == [True, False] and train.DEFAULTS["tiny-world"]["mirror"] is False


def test_a_concept_starts_alike_alone_and_in_a_stream(tiny_ckpt, data, tmp_path):
    """A task's random draws come from --seed and its concept (train.task_seed), not its place in the
    stream: <bob> learned alone equals <bob> learned second, after <alice> (with `ti` nothing of task 1
    reaches <bob>'s prompt), and two concepts trained alone at one seed do not start from one draw."""
    ckpt, _ = tiny_ckpt
    for name in ("01_alice", "02_bob"):  # one data folder per concept alone, its task 1
        (tmp_path / name / name).parent.mkdir()
        (tmp_path / name / name).symlink_to(data / name)
    train.main(args(ckpt, data, tmp_path / "stream", 2, "--method", "ti"))
    train.main(args(ckpt, tmp_path / "02_bob", tmp_path / "bob", 1, "--method", "ti"))
    tokens = lambda run, task: read_state_dict(tmp_path / run / f"task_{task:02d}.safetensors")["tokens"]  # noqa: E731
    assert np.array_equal(tokens("bob", 1), tokens("stream", 2)) and not np.array_equal(tokens("stream", 1), tokens("stream", 2))
    for name in ("01_alice", "02_bob"):  # lr 0: the tokens stay at their initial draw
        train.main(args(ckpt, tmp_path / name, tmp_path / f"init-{name}", 1, "--method", "ti", "--lr", "0"))
    assert not np.allclose(tokens("init-01_alice", 1), tokens("init-02_bob", 1))


def base_prompt_drift(ckpt, run, prompts):
    """How far the run's model, folded, moves the UNet's prediction under base prompts from the base model's."""
    import clora
    from sample import StableDiffusion
    x, t = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500] * len(prompts))
    model = StableDiffusion.load(ckpt, "cpu", torch.float32)
    with torch.no_grad():
        before = model.unet(x, t, model.encode_text(prompts))
        clora.load_run(run, model, ckpt)
        return (model.unet(x, t, model.encode_text(prompts)) - before).norm().item()


def test_the_prior_term_holds_base_prompts_to_the_model_before_the_task(tiny_ckpt, data, tmp_path):
    """--prior W: under the --prior-prompts, the model keeps the predictions it made before the task; the
    concept's own prompts still train it. W is the run's, recorded, and a task of another W is refused."""
    ckpt, _ = tiny_ckpt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red house on a hill\n")
    base = ["a photo of a cat", "a red house on a hill"]
    drift = {}
    for w in ("0", "100"):
        train.main(args(ckpt, data, tmp_path / w, 1, "--lr", "3e-2", "--steps", "12", "--prior", w,
                        *(["--prior-prompts", str(prompts)] if w != "0" else [])))
        drift[w] = base_prompt_drift(ckpt, tmp_path / w, base)
        assert json.loads((tmp_path / w / "run.json").read_text())["prior"] == float(w)
    assert drift["100"] < 0.5 * drift["0"], drift
    before = snapshot(tmp_path / "100")
    with pytest.raises(SystemExit, match=r"run.json: this run was made with prior 100.0, not 0.0; pass --prior 100 or start"):
        train.main(args(ckpt, data, tmp_path / "100", 2, "--prior", "0"))
    assert snapshot(tmp_path / "100") == before


def test_prior_settings_of_old_runs_and_of_ti(tiny_ckpt, data, tmp_path):
    """A run made before --prior existed (no prior in run.json) goes on without the term and refuses it;
    `ti`, whose tokens no base prompt holds, records the term as off and trains exactly as without it."""
    ckpt, _ = tiny_ckpt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    old = tmp_path / "old"
    train.main(args(ckpt, data, old, 1))
    state = json.loads((old / "run.json").read_text())
    del state["prior"], state["prior_prompts"]
    (old / "run.json").write_text(json.dumps(state))
    before = snapshot(old)
    with pytest.raises(SystemExit, match=r"made with prior 0.0, not 1.0; pass --prior 0 or start a new --run folder"):
        train.main(args(ckpt, data, old, 2, "--prior", "1", "--prior-prompts", str(prompts)))
    assert snapshot(old) == before
    train.main(args(ckpt, data, old, 2))
    for name, extra in (("ti-prior", ["--prior", "1", "--prior-prompts", str(prompts)]), ("ti", [])):
        train.main(args(ckpt, data, tmp_path / name, 1, "--method", "ti", *extra))
    assert json.loads((tmp_path / "ti-prior" / "run.json").read_text())["prior"] == 0.0
    assert (tmp_path / "ti-prior" / "task_01.safetensors").read_bytes() == (tmp_path / "ti" / "task_01.safetensors").read_bytes()

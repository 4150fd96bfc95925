"""The embedded default: the procedural world (v2), the shipped tiny SD and classifier, a run on them,
the evaluation's scores and refusals, and the experiment's validity checks."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import experiment
import sample
import train
import world
from checkpoint import read_metadata, read_state_dict, save_safetensors
from sample import EMBEDDED, StableDiffusion, ddim_sample


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(int)


def neon_distance(images):
    """Per pixel, the RGB distance to the nearest neon colour of the marks. (N, H, W)"""
    neon = np.array(list(world.NEON.values()))
    return np.sqrt(((pixels(images)[..., None, :] - neon) ** 2).sum(-1)).min(-1)


def test_world_is_deterministic_and_splits_differ():
    assert (pixels(world.concept_images(3, "train", 4)) == pixels(world.concept_images(3, "train", 4))).all()
    assert (pixels(world.concept_images(3, "train", 4)) != pixels(world.concept_images(3, "heldout", 4))).any()
    (a, cap_a), (b, cap_b) = world.base_images(1, seed=5)[0], world.base_images(1, seed=5)[0]
    assert (pixels([a]) == pixels([b])).all() and cap_a == cap_b
    assert world.base_captions(20, seed=5) == [c for _, c in world.base_images(20, seed=5)]  # drawn without the images
    assert len({name for name, _ in world.CONCEPTS}) == len(world.CONCEPTS) >= 50


def test_two_domains_and_look_alikes_that_differ_only_by_their_mark():
    captions = [c for _, c in world.base_images(200, seed=1)]
    faces = sum(c.startswith("a photo of a face") for c in captions)
    assert faces + sum(c.startswith("a photo of a building") for c in captions) == 200 and 70 < faces < 130
    assert {s["kind"] for _, s in world.CONCEPTS} == {"face", "building"}
    for i, (_, s) in enumerate(world.CONCEPTS):
        group = world.look_alikes(i)
        assert len(group) == len(world.MARKS) and i in group
        for j in group:
            other = world.CONCEPTS[j][1]
            assert {k for k in s if s[k] != other[k]} == ({"mark"} if j != i else set())
        # Look-alikes arrive apart in the stream: at least 10 tasks between two members of a group.
        assert min(abs(i - j) for j in group if j != i) >= 10


def test_no_concept_identity_in_any_pretraining_image():
    """The marks are drawn in neon colours; no base image (what the UNet and text encoder are
    pretrained on) comes near one, and every image of every concept shows its mark's colour."""
    base = [im for im, _ in world.base_images(400, seed=0)]
    assert neon_distance(base).min() > 45
    for i, (_, s) in enumerate(world.CONCEPTS):
        colour = np.array(world.NEON[world.MARKS[s["mark"]]["colour"]])
        ims = pixels(world.concept_images(i, "train", 4))
        near = (np.sqrt(((ims - colour) ** 2).sum(-1)) < 30).sum((1, 2))
        assert near.min() >= 25, (i, near)


def test_write_concepts_is_train_py_data(tmp_path):
    world.write_concepts(tmp_path, n=12)
    stream = train.concepts(tmp_path)
    assert [w for w, _ in stream] == [f"<{name}>" for name, _ in world.CONCEPTS[:12]]
    images = train.load_images(stream[0][1], world.SIZE)
    assert images.shape == (world.N_TRAIN, 3, world.SIZE, world.SIZE)


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusion.load(EMBEDDED)


def group_caption(g):
    """The captioned attributes of look-alike group g, background left out: what text alone can say."""
    return ", ".join([f"a photo of a {world.GROUPS[g]['kind']}"] + world.attributes(world.GROUPS[g]))


def test_shipped_model_loads_strictly_and_follows_captions(tiny):
    """A look-alike group's caption draws that group, as the concept classifier judges it: the base
    model can draw what text says, so a concept that fails to reach its group fails in the learning
    (README, "The tiny SD"). Bare domain words ("a photo of a face") are not enough for
    this model: an under-specified prompt comes out as a washed-out blend."""
    meta = read_metadata(EMBEDDED)
    assert tiny.name == meta["model"] == "tiny-world" and meta["world"] == str(world.VERSION) and tiny.resolution == world.SIZE
    assert tiny.unet.cfg.num_heads == int(meta["unet.num_heads"])
    n, f, groups = 8, tiny.vae.cfg.downsample, range(4)  # two face groups, two building groups
    noise = torch.randn(n * len(groups), 4, world.SIZE // f, world.SIZE // f, generator=torch.Generator().manual_seed(0))
    prompts = [group_caption(g) for g in groups for _ in range(n)]
    images = tiny.decode(ddim_sample(tiny.unet, tiny.encode_text(prompts), tiny.encode_text([""] * len(prompts)), noise, 15, 3.0))
    logits = evaluate.load_classifier()(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    right = (logits.argmax(1).reshape(len(groups), n) % len(world.GROUPS) == torch.tensor(list(groups))[:, None]).sum(1)
    assert (right >= n - 2).all(), right


def test_base_prompts_draw_their_own_kind(tiny, monkeypatch):
    """evaluate.kept on the base model: "a photo of a face" / "a photo of a building" draw their own kind
    (0.984 at seed 0, 0.875 and 0.891 at seeds 1 and 2: README, "The experiment and its validity checks").
    Samples placed in a learned concept do not count, and a kind whose every concept was learned is left
    out: it has no right answer left (the 50-concept stream learns them all: None)."""
    classifier, samples, generate = evaluate.load_classifier(), {}, evaluate.generate

    def once(model, prompt, *rest):  # the second call scores the very same (seeded) samples: drawn once
        if (prompt, *rest) not in samples:
            samples[(prompt, *rest)] = generate(model, prompt, *rest)
        return samples[(prompt, *rest)]

    monkeypatch.setattr(evaluate, "generate", once)
    whole = evaluate.kept(tiny, classifier, 32, evaluate.STEPS, evaluate.CFG, 0)
    assert whole >= 0.9  # 0.984 measured here
    faces = [j for j, (_, c) in enumerate(world.CONCEPTS) if c["kind"] == "face"]
    buildings = evaluate.kept(tiny, classifier, 32, evaluate.STEPS, evaluate.CFG, 0, learned=faces)
    assert buildings >= 0.9  # the face prompt left out: the building prompt's share alone
    # One face left unlearned: the face prompt counts again, and its samples placed in learned faces are lost
    assert 0.45 < evaluate.kept(tiny, classifier, 32, evaluate.STEPS, evaluate.CFG, 0, learned=faces[1:]) <= 0.55  # 0.484
    assert evaluate.kept(tiny, classifier, 32, evaluate.STEPS, evaluate.CFG, 0, learned=range(len(world.CONCEPTS))) is None


def test_classifier_reaches_its_stated_accuracy(tiny):
    meta = read_metadata(evaluate.CLASSIFIER)
    measured = evaluate.heldout_accuracy(evaluate.load_classifier(), tiny.vae)
    for k in ("real", "vae"):
        stated = float(meta[f"heldout_accuracy_{k}"])
        assert stated >= 0.9 and abs(measured[k] - stated) < 2e-3, (k, measured)


def test_mmd_same_concept_near_zero_other_concept_larger():
    clf = evaluate.load_classifier()
    a = clf.features(evaluate.heldout_images(0))
    b = clf.features(torch.from_numpy(world.to_tensor_batch(world.concept_images(0, "train"))))
    c = clf.features(evaluate.heldout_images(10))  # its look-alike: same face, another mark
    same, other = evaluate.mmd2(a, b), evaluate.mmd2(a, c)
    assert abs(evaluate.mmd2(a, a)) < 0.1 * other and abs(same) < 0.2 * other and other > 0.05, (same, other)


def test_degrade_keeps_range_and_changes_images():
    x, _ = evaluate.concept_batch("classifier", 1)
    d = evaluate.degrade(x[:8], torch.Generator().manual_seed(0))
    assert d.shape == x[:8].shape and d.min() >= -1 and d.max() <= 1 and (d - x[:8]).abs().mean() > 0.01


def test_two_task_run_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "WORLD_DATA", tmp_path / "world")
    monkeypatch.setattr(sample, "WEIGHTS", tmp_path / "no-sd")  # as on a fresh machine: no SD checkpoint
    run = tmp_path / "run"
    train.main(["--task", "2", "--run", str(run), "--steps", "3", "--grid-steps", "2"])
    out = capsys.readouterr().out
    assert "using the embedded tiny model" in out and "world's concept stream" in out
    state = json.loads((run / "run.json").read_text())
    assert [t["word"] for t in state["tasks"]] == [f"<{n}>" for n, _ in world.CONCEPTS[:2]]
    assert state["rank"] == train.DEFAULTS["tiny-world"]["rank"] and state["prior"] == train.PRIOR_TINY > 0  # the testbed's prior term
    assert (run / "grid_task_01.png").exists() and (run / "grid_task_02.png").exists()
    res = evaluate.evaluate_run(run, n=2, steps=2)
    assert res["acc"].shape == (2, 2) and np.isnan(res["acc"][0, 1]) and not np.isnan(res["acc"][1]).any()
    # A scoring killed after two cells goes on from them: the same scores, without drawing those cells again.
    (run / evaluate.PARTIAL).unlink()
    calls, generate = [], evaluate.generate

    def counted(model, word, n, *a, stop_at=None):
        calls.append(n)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return generate(model, word, n, *a)
    monkeypatch.setattr(evaluate, "generate", lambda *a: counted(*a, stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_run(run, n=2, steps=2)
    assert len(json.loads((run / evaluate.PARTIAL).read_text())["cells"]) == 2  # R[1][1] and R[2][1]
    calls.clear()
    monkeypatch.setattr(evaluate, "generate", counted)
    resumed = evaluate.evaluate_run(run, n=2, steps=2)
    # R[2][2] and the two base prompts drawn; R[2][1] only again for eval_final.png (min(n, 8) images).
    assert calls == [2, 2, 2, 2] and len(resumed["final_images"]) == 2
    assert all(np.array_equal(resumed[k], res[k], equal_nan=True) for k in ("acc", "mmd")) and resumed["kept"] == res["kept"]
    calls.clear()
    evaluate.evaluate_run(run, n=4, steps=2)  # other settings: the partial's cells are not this scoring's
    assert calls == [4] * 5
    key = evaluate.scoring(run, n=2, steps=2)
    evaluate.write_outputs(res, run, key)
    assert "| after task |" in (run / "eval.md").read_text() and (run / "eval_matrix.png").exists()
    assert json.loads((run / "eval.json").read_text())["acc"][0][1] is None  # valid JSON: no NaN
    # experiment.py keeps these scores for a call that asks for the same (or fewer) cells of the same files.
    kept = evaluate.scored(run, key)
    assert kept["words"] == res["words"] and np.array_equal(kept["acc"], res["acc"], equal_nan=True)
    assert evaluate.summary(kept) == evaluate.summary(res) and 0 <= res["kept"] <= 1
    assert evaluate.scored(run, {**key, "version": evaluate.VERSION - 1}) is None  # what a score means changed
    assert evaluate.scored(run, {**key, "every": 5}) is not None  # full rows after every task hold those of every 5th
    assert evaluate.scored(run, evaluate.scoring(run, n=4, steps=2)) is None
    assert set(read_state_dict(run / "task_02.safetensors")) >= {"tokens"}

    # Scored at checkpoints: R[j][j] after every task, full rows after every 2nd task and the last.
    train.main(["--task", "3", "--run", str(run), "--steps", "2", "--grid-steps", "2"])
    assert evaluate.scoring(run, n=2, steps=2) != key and evaluate.scored(run, evaluate.scoring(run, n=2, steps=2)) is None  # a new task file
    res = evaluate.evaluate_run(run, n=2, steps=2, every=2)
    scored = ~np.isnan(res["acc"])
    assert scored.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert set(evaluate.summary(res)) == set(experiment.FIGURES)
    evaluate.write_outputs(res, run, evaluate.scoring(run, n=2, steps=2, every=2))
    assert evaluate.scored(run, evaluate.scoring(run, n=2, steps=2, every=4)) is not None
    assert evaluate.scored(run, evaluate.scoring(run, n=2, steps=2, every=1)) is None  # rows it has not scored
    assert evaluate.scored(run, evaluate.scoring(run, n=2, steps=2, every=7)) is not None  # only the last row: it has it

    # Bad input: one line, non-zero exit, the run's files unchanged.
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(SystemExit, match="no run.json"):
        evaluate.main(["--run", str(tmp_path / "missing"), "--n", "2"])
    other = tmp_path / "other-world.safetensors"  # the same model, labelled as made on world 1
    save_safetensors(read_state_dict(EMBEDDED), other, metadata={**read_metadata(EMBEDDED), "world": "1"})
    original = (run / "run.json").read_bytes()
    (run / "run.json").write_text(json.dumps({**json.loads(original), "base_checkpoint": str(other)}))
    with pytest.raises(SystemExit, match="made on world version 1"):
        evaluate.main(["--run", str(run), "--n", "2"])
    # A run made on the shipped model in another checkout (a clone of the README's committed runs) is scored on this one's.
    (run / "run.json").write_text(json.dumps({**json.loads(original), "base_checkpoint": "/elsewhere/weights/embedded/tiny_sd.safetensors"}))
    assert evaluate.world_model(run)[0]["base_sha256"] == json.loads(original)["base_sha256"]
    # The shipped model's place holding another model of the same world: its digest is not the run's.
    changed = tmp_path / "changed.safetensors"
    sd = read_state_dict(EMBEDDED)
    sd = {k: v + 1 if k == next(iter(sd)) else v for k, v in sd.items()}
    save_safetensors(sd, changed, metadata=read_metadata(EMBEDDED))
    (run / "run.json").write_text(json.dumps({**json.loads(original), "base_checkpoint": str(changed)}))
    with pytest.raises(SystemExit, match="is not the base checkpoint of run .*; put that model back, or retrain the run on this one"):
        evaluate.main(["--run", str(run), "--n", "2"])
    (run / "run.json").write_bytes(original)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_evaluate_refuses_a_run_on_another_base_model(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    world.write_concepts(tmp_path / "data", n=1)
    run = tmp_path / "run"
    train.main(["--task", "1", "--data", str(tmp_path / "data"), "--run", str(run), "--ckpt", str(ckpt), "--res", "16",
                "--steps", "1", "--grid-steps", "1", "--rank", "2"])
    with pytest.raises(SystemExit, match="embedded world model only"):
        evaluate.main(["--run", str(run), "--n", "2"])


def result(kind, method, seed, concept=None, **figures):
    base = dict.fromkeys(experiment.FIGURES, 0.5)
    return {"kind": kind, "method": method, "seed": seed, "concept": concept, **base, **figures}


def test_validity_checks_pass_and_fail_as_stated():
    good = [result("alone", "clora", 0, j, final_acc=0.9, kept=0.85) for j in range(3)]
    good += [result("alone", "ti", 0, j, final_acc=0.3) for j in range(3)]
    good += [result("stream", "lora", 0, forgetting_acc=0.5)]
    assert all(ok for ok, _ in experiment.checks(good, [0], quick=True)) and len(experiment.checks(good, [0], True)) == 4
    weak = [dict(r, final_acc=0.7) if r["method"] == "clora" else r for r in good]  # the upper bound does not learn
    tokens = [dict(r, final_acc=0.8) if r["method"] == "ti" else r for r in good]  # tokens alone suffice
    stable = [dict(r, forgetting_acc=0.1) if r["method"] == "lora" else r for r in good]  # lora does not forget
    taken = [dict(r, kept=0.4) if r["method"] == "clora" else r for r in good]  # a concept takes over the base prompts
    for bad in (weak, tokens, stable, taken):
        assert [ok for ok, _ in experiment.checks(bad, [0], quick=True)].count(False) == 1
    # Without ti alone, its stream stands for it: each ti task trains as its concept would alone.
    streams = [r for r in good if r["method"] != "ti"] + [result("stream", "ti", 0, plasticity_acc=0.3)]
    assert [ok for ok, line in experiment.checks(streams, [0], quick=False) if "needs weights" in line] == [True]
    streams[-1]["plasticity_acc"] = 0.8
    assert [ok for ok, line in experiment.checks(streams, [0], quick=False) if "needs weights" in line] == [False]
    # Seeds that disagree: the interval of a headline figure is wider than +-0.05.
    seeds = [result("stream", "clora", s, final_acc=a) for s, a in enumerate((0.5, 0.6, 0.7))]
    (ok, line), = experiment.checks(seeds, [0, 1, 2], quick=False)
    assert not ok and "clora final_acc" in line
    agree = [result("stream", "clora", s, final_acc=a) for s, a in enumerate((0.60, 0.61, 0.60))]
    assert experiment.checks(agree, [0, 1, 2], quick=False)[0][0]
    # The upper bound is a headline figure too: its seeds must agree as well.
    alone = agree + [result("alone", "clora", s, j, final_acc=a) for s, a in enumerate((0.8, 0.9, 0.95)) for j in range(2)]
    (ok, line), = [c for c in experiment.checks(alone, [0, 1, 2], quick=False) if "seeds agree" in c[1]]
    assert not ok and "clora alone final_acc" in line
    # Beyond the table (10 seeds), t(0.975, n - 1) from its expansion: t(0.975, 10) = 2.2281, t(0.975, 30) = 2.0423.
    assert abs(experiment.t975(11) - 2.2281) < 0.005 and abs(experiment.t975(31) - 2.0423) < 0.002
    mean, half = experiment.interval([0.60, 0.61, 0.60])
    assert abs(mean - 0.60333) < 1e-4 and abs(half - 4.303 * np.std([0.6, 0.61, 0.6], ddof=1) / 3**0.5) < 1e-9


def test_paired_differences_cancel_what_a_seed_moves_in_every_method():
    """Seeds that move both methods alike: each figure's interval is wide, the paired difference's is zero;
    a seed on which clora did not run is left out of the pairs."""
    rs = [result("stream", m, s, final_acc=a + d, forgetting_acc=0.5 - d)
          for s, a in enumerate((0.3, 0.5, 0.7)) for m, d in (("clora", 0.0), ("stamina", 0.1))]
    rs.append(result("stream", "stamina", 3, final_acc=0.0, forgetting_acc=0.0))
    md = experiment.paired(rs, ["clora", "stamina", "lora"], [0, 1, 2, 3])
    assert md.splitlines()[-1] == "| stamina | 0.100 ± 0.000 | -0.100 ± 0.000 | +0.100, +0.100, +0.100 |"
    assert "| clora |" not in md and "| lora |" not in md
    assert experiment.interval(experiment.per_seed(rs, "stream", "clora", "final_acc", [0, 1, 2]))[1] > 0.4  # the figure's own
    assert experiment.paired([r for r in rs if r["method"] == "stamina"], ["stamina"], [0, 1, 2]) == ""


def test_a_figure_that_could_not_be_measured_is_left_out_of_the_table():
    """`kept` is None for a stream that learned every concept: the seeds that have it make the figure,
    and with none it prints as "–", not as 0."""
    rs = [result("stream", "lora", 0, kept=None, delta_norms=[1.0]), result("stream", "lora", 1, kept=0.8, delta_norms=[1.0])]
    assert experiment.per_seed(rs, "stream", "lora", "kept", [0, 1]) == [0.8]
    row, = [line for line in experiment.table(rs, ["lora"], [0, 1]).splitlines() if line.startswith("| lora")]
    assert row.split(" | ")[6] == "0.800"
    row, = [line for line in experiment.table(rs[:1], ["lora"], [0]).splitlines() if line.startswith("| lora")]
    assert row.split(" | ")[6] == "–"


def test_curves_draw_the_upper_bound_where_the_experiment_has_it(tmp_path):
    """The curve figure: a stream's accuracy right after learning in its colour, and each concept
    alone (the upper bound, black) at its height: 0.9 alone puts black at y = 10 + 0.1 * 260."""
    stream = result("stream", "lora", 0, acc=[[0.5, 0.0], [0.2, 0.5]])
    alone = [result("alone", "clora", s, j, final_acc=a) for s, a in ((0, 0.85), (1, 0.95)) for j in range(2)]
    for rs, name in (([stream, *alone], "with.png"), ([stream], "without.png")):
        experiment.curves_png(rs, ["lora"], [0, 1], tmp_path / name)
    at = lambda name, x, y: Image.open(tmp_path / name).convert("RGB").getpixel((x, y))  # noqa: E731
    assert at("with.png", 200, 36) == (0, 0, 0) and at("with.png", 520, 36) == (0, 0, 0)
    assert at("without.png", 200, 36) == (255, 255, 255)
    assert at("with.png", 200, 140) == experiment.COLOURS[0]  # the stream's line at 0.5


def test_experiment_refuses_bad_flags(capsys):
    for argv, msg in ((["--tasks", "51"], "--tasks must be 1-50"), (["--n", "1"], "--n must be >= 2"),
                      (["--methods", "nope"], "invalid choice")):
        with pytest.raises(SystemExit):
            experiment.main(argv)
        assert msg in capsys.readouterr().err


def test_experiment_refuses_a_folder_of_runs_made_with_other_flags(tmp_path):
    """experiment.py keeps the runs it finds in --out: a call with other --train-args must not score them."""
    out = tmp_path / "exp"
    experiment.claim(out, "--lam 10")
    experiment.claim(out, "--lam 10")  # the same flags: the runs are reused
    with pytest.raises(SystemExit, match=r"holds runs made with --train-args '--lam 10', not '--lam 100'; pass another --out"):
        experiment.claim(out, "--lam 100")
    old = tmp_path / "old"
    (old / "clora-s0").mkdir(parents=True)
    (old / "clora-s0" / "run.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds runs of an unknown experiment"):
        experiment.claim(old, "")
    assert not (old / "experiment.json").exists()
    # A folder claimed before train.py had --prior: its runs were made without the term, now "--prior 0".
    (old / "experiment.json").write_text(json.dumps({"train_args": "--lam 10"}))
    with pytest.raises(SystemExit, match=r"made with --train-args '--lam 10 --prior 0', not '--lam 10'"):
        experiment.claim(old, "--lam 10")
    experiment.claim(old, "--lam 10 --prior 0")


def test_checkpoints_give_the_mean_over_concepts_learned_so_far_after_each_full_row():
    """A 4-task stream scored in full after tasks 2 and 4 (--every 2): after task 2 the mean of R[2][1..2],
    after task 4 that of R[4][1..4], mean over seeds; a stream with only its last row full gives ""."""
    acc = [[0.8, None, None, None], [0.4, 0.6, None, None], [None, None, 0.9, None], [0.0, 0.2, 0.4, 0.6]]
    rs = [result("stream", "lora", s, acc=acc) for s in (0, 1)]
    md = experiment.checkpoints(rs, ["clora", "lora"], [0, 1])
    assert md.splitlines()[2:] == ["| method | i = 2 | i = 4 |", "|---|---|---|", "| lora | 0.500 ± 0.000 | 0.300 ± 0.000 |"]
    # A run scored before at a finer --every (kept by evaluate.scored) has more full rows: the table keeps those of every run.
    finer = [result("stream", "lora", 2, acc=[[0.8, None, None, None], [0.4, 0.6, None, None], [0.1, 0.1, 0.9, None], acc[3]])]
    assert experiment.checkpoints(rs + finer, ["lora"], [0, 1, 2]).splitlines()[2] == "| method | i = 2 | i = 4 |"
    last_only = [[0.8, None], [0.4, 0.6]]
    assert experiment.checkpoints([result("stream", "lora", 0, acc=last_only)], ["lora"], [0]) == ""


def test_paired_against_another_reference():
    rs = [result("stream", m, s, final_acc=a) for s in (0, 1) for m, a in (("lora", 0.3), ("stamina", 0.4), ("clora", 0.35))]
    md = experiment.paired(rs, ["clora", "lora", "stamina"], [0, 1], ref="lora")
    assert "minus lora" in md and "| stamina | 0.100 ± 0.000 |" in md and "| clora | 0.050 ± 0.000 |" in md

"""The embedded default: the procedural world, the shipped tiny SD and classifier, a run on them, and
the evaluation's scores."""
import json

import numpy as np
import pytest
import torch

import evaluate
import sample
import train
import world
from checkpoint import read_metadata, read_state_dict
from sample import EMBEDDED, StableDiffusion, ddim_sample


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_world_is_deterministic_and_splits_differ():
    assert (pixels(world.concept_images(3, "train", 4)) == pixels(world.concept_images(3, "train", 4))).all()
    assert (pixels(world.concept_images(3, "train", 4)) != pixels(world.concept_images(3, "heldout", 4))).any()
    (a, cap_a), (b, cap_b) = world.base_images(1, seed=5)[0], world.base_images(1, seed=5)[0]
    assert (pixels([a]) == pixels([b])).all() and cap_a == cap_b and cap_a.startswith("a photo of a face")
    assert len({name for name, _ in world.CONCEPTS}) == len(world.CONCEPTS) >= 10


def test_write_concepts_is_train_py_data(tmp_path):
    world.write_concepts(tmp_path)
    stream = train.concepts(tmp_path)
    assert [w for w, _ in stream] == [f"<{name}>" for name, _ in world.CONCEPTS]
    images = train.load_images(stream[0][1], world.SIZE)
    assert images.shape == (world.N_TRAIN, 3, world.SIZE, world.SIZE)


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusion.load(EMBEDDED)


def test_shipped_model_loads_strictly_and_follows_captions(tiny):
    meta = read_metadata(EMBEDDED)
    assert tiny.name == meta["model"] == "tiny-world" and tiny.resolution == world.SIZE
    assert tiny.unet.cfg.num_heads == int(meta["unet.num_heads"])
    # The background colour is named in the caption: the border of the samples must show it.
    n, f = 4, tiny.vae.cfg.downsample
    noise = torch.randn(2 * n, 4, world.SIZE // f, world.SIZE // f, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a face, red background"] * n + ["a photo of a face, blue background"] * n
    images = tiny.decode(ddim_sample(tiny.unet, tiny.encode_text(prompts), tiny.encode_text([""] * 2 * n), noise, 20, 3.0))
    border = torch.cat([images[:, :4].flatten(1, 2), images[:, :, :4].flatten(1, 2)], 1).float().mean(1)  # (2n, 3) RGB
    red, blue = border[:n], border[n:]
    # Most samples (at least 3 of 4 per colour) show the named colour, clearly.
    assert (red[:, 0] > red[:, 2] + 40).sum() >= 3 and (blue[:, 2] > blue[:, 0] + 40).sum() >= 3, border


def test_classifier_reaches_its_stated_accuracy():
    meta = read_metadata(evaluate.CLASSIFIER)
    measured = evaluate.heldout_accuracy(evaluate.load_classifier())
    for k in ("all", "concepts"):
        stated = float(meta[f"heldout_accuracy_{k}"])
        assert stated >= 0.9 and abs(measured[k] - stated) < 1e-3, (k, measured)


def test_mmd_same_concept_near_zero_other_concept_larger():
    clf = evaluate.load_classifier()
    a = clf.features(evaluate.heldout_images(0))
    b = clf.features(torch.from_numpy(world.to_tensor_batch(world.concept_images(0, "train"))))
    c = clf.features(evaluate.heldout_images(1))
    same, other = evaluate.mmd2(a, b), evaluate.mmd2(a, c)
    assert abs(evaluate.mmd2(a, a)) < 0.1 * other and abs(same) < 0.1 * other and other > 0.1, (same, other)


def test_two_task_run_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "WORLD_DATA", tmp_path / "world")
    monkeypatch.setattr(sample, "WEIGHTS", tmp_path / "no-sd")  # as on a fresh machine: no SD checkpoint
    run = tmp_path / "run"
    train.main(["--task", "2", "--run", str(run), "--steps", "3", "--grid-steps", "2"])
    out = capsys.readouterr().out
    assert "using the embedded tiny model" in out and "world's concept stream" in out
    state = json.loads((run / "run.json").read_text())
    assert [t["word"] for t in state["tasks"]] == ["<ada>", "<bea>"] and state["rank"] == train.DEFAULTS["tiny-world"]["rank"]
    assert (run / "grid_task_01.png").exists() and (run / "grid_task_02.png").exists()
    res = evaluate.evaluate_run(run, n=2, steps=2)
    assert res["acc"].shape == (2, 2) and np.isnan(res["acc"][0, 1]) and not np.isnan(res["acc"][1]).any()
    evaluate.write_outputs(res, run)
    assert "| after task |" in (run / "eval.md").read_text() and (run / "eval_matrix.png").exists()
    assert set(read_state_dict(run / "task_02.safetensors")) >= {"tokens"}

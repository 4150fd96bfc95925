"""export.py and sample.py --lora / --embedding: what we write loads in diffusers (+ peft) to the
weights and text features we sample with, the merged checkpoint converts with diffusers' single-file
code, an export read back through import reproduces the run's images, the full-size layout is the
real one, and bad inputs are refused in one line with nothing written."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import export
import sample
import train
from checkpoint import read_metadata, read_state_dict, save_safetensors, sha256
from clip_text import TextEncoder, Tokenizer
from clora import TARGETS, CLoRA, load_run, task_file
from conftest import (MANIFEST, TINY_TEXT, TINY_UNET, TINY_VAE, diffusers_unet, diffusers_vae, rel_err,
                      transformers_clip)
from unet import UNet


def make_run(root, ckpt, method, n_tasks=2, rank=3):
    """A run folder as train.py leaves it, with random tasks made by the adapter itself (any method of
    clora.METHODS), big enough to change what the model does."""
    model = sample.StableDiffusion.load(ckpt)
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, method, rank)
    run, g, tasks = root / f"run-{method}", torch.Generator().manual_seed(0), []
    for t in range(1, n_tasks + 1):
        adapter.start_task(f"<c{t}>", 2, seed=t)
        with torch.no_grad():
            for p in adapter.trainable():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        save_safetensors(adapter.task_tensors(), task_file(run, t))
        tasks.append({"task": t, "word": f"<c{t}>"})
        adapter.finish_task()
    (run / "run.json").write_text(json.dumps({"base_checkpoint": str(ckpt), "base_sha256": sha256(ckpt), "method": method,
                                              "rank": rank, "tokens_per_concept": 2, "tasks": tasks}))
    return run


def ours_diffusers_path(name):
    """diffusers' K/V module path -> ours, written out for the tiny test UNet (num_res_blocks 1: 2 blocks per level)."""
    m = re.fullmatch(r"(down|mid|up)_blocks?\.?(\d*)\.attentions\.(\d+)\.(.*)", name)
    kind, level, j, rest = m.group(1), int(m.group(2) or 0), int(m.group(3)), m.group(4)
    block = {"down": f"input_blocks.{2 * level + j + 1}.1", "mid": "middle_block.1",
             "up": f"output_blocks.{2 * level + j}.1"}[kind]
    return f"{block}.{rest}"


def hf_tokenizer():
    """transformers' CLIPTokenizer from our vocabulary (the same BPE file), offline."""
    from transformers import CLIPTokenizer

    tok = Tokenizer()
    return CLIPTokenizer(vocab=dict(tok.encoder), merges=sorted(tok.bpe_ranks, key=tok.bpe_ranks.get), model_max_length=77)


def reference_pipeline(sd):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=diffusers_vae(TINY_VAE, sd), text_encoder=transformers_clip(TINY_TEXT, sd),
                                   tokenizer=hf_tokenizer(), unet=diffusers_unet(TINY_UNET, sd),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("method, extra", [("clora", []), ("stamina", ["--rank", "64"])])  # stamina: masked, SVD at full rank
def test_diffusers_loads_our_export_to_our_weights(tiny_ckpt, tmp_path, method, extra):
    ckpt, _ = tiny_ckpt
    run, out = make_run(tmp_path, ckpt, method), tmp_path / "out"
    export.main(["--run", str(run), "--out", str(out), "--merged", *extra])
    ours = sample.StableDiffusion.load(ckpt)
    words = load_run(run, ours, ckpt)
    lora = read_metadata(out / "lora.safetensors")
    assert float(lora["clora.relative_error"]) < 1e-6 and lora["ss_network_dim"] == lora["ss_network_alpha"]

    pipe = reference_pipeline(read_state_dict(ckpt))
    pipe.load_lora_weights(str(out), weight_name="lora.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; plain modules again
    kv = {n: m.weight for n, m in pipe.unet.named_modules() if n.endswith(TARGETS)}
    assert len(kv) == 14
    for name, weight in kv.items():
        assert rel_err(weight, ours.unet.get_submodule(ours_diffusers_path(name)).weight) < 1e-6, name

    for word in words:
        pipe.load_textual_inversion(str(out / "embeddings" / f"{word.strip('<>')}.safetensors"))
    for prompt in [f"a photo of {w}" for w in words] + [f"{words[1]} and {words[0]}"]:
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        assert rel_err(ours.encode_text([prompt]), theirs) < 1e-5, prompt

    merged = read_state_dict(out / "merged.safetensors")
    assert read_metadata(out / "merged.safetensors")["clora.merged"] == f"{run.name}: <c1> <c2>"
    converted = diffusers_unet(TINY_UNET, merged).state_dict()
    assert converted.keys() == pipe.unet.state_dict().keys()
    assert all(rel_err(v, converted[k]) < 1e-6 for k, v in pipe.unet.state_dict().items())
    base_text = transformers_clip(TINY_TEXT, read_state_dict(ckpt)).state_dict()
    assert all(torch.equal(v, base_text[k]) for k, v in transformers_clip(TINY_TEXT, merged).state_dict().items())
    assert merged.keys() == read_state_dict(ckpt).keys()


def test_export_read_back_reproduces_the_run(tiny_ckpt, tmp_path):
    """A real train.py run; its images from --run and from the export through --lora / --embedding,
    in diffusers' and both AUTOMATIC1111 embedding formats."""
    ckpt, _ = tiny_ckpt
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "out"
    rng = np.random.default_rng(0)
    for name in ("01_ann", "02_ben"):
        (data / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / name / f"{j}.png")
    train.main(["--task", "2", "--data", str(data), "--run", str(run), "--ckpt", str(ckpt), "--res", "16", "--steps", "2",
                "--lr", "0.1", "--token-lr", "0.1", "--save-every", "0", "--grid-steps", "1", "--rank", "2"])
    export.main(["--run", str(run), "--out", str(out)])
    assert "a photo of <ann>" in (out / "README.md").read_text()
    a1111 = tmp_path / "a1111"
    a1111.mkdir()
    torch.save({"string_to_token": {"*": 265}, "name": "ann", "step": 2,
                "string_to_param": {"*": read_state_dict(out / "embeddings/ann.safetensors")["<ann>"]}}, a1111 / "ann.pt")
    save_safetensors({"emb_params": read_state_dict(out / "embeddings/ben.safetensors")["<ben>"]}, a1111 / "ben.safetensors")

    base = ["--prompt", "a photo of <ann> and <ben>", "--steps", "3", "--n", "2", "--size", "16", "--cfg", "3"]
    sample.main(["--run", str(run), *base, "--out", str(tmp_path / "run.png")])
    embeddings = {"diffusers": [out / "embeddings/ann.safetensors", out / "embeddings/ben.safetensors"],
                  "a1111": [a1111 / "ann.pt", a1111 / "ben.safetensors"]}
    run_image = np.asarray(Image.open(tmp_path / "run.png"), dtype=np.int16)
    for kind, files in embeddings.items():
        args = ["--ckpt", str(ckpt), "--lora", str(out / "lora.safetensors"),
                *(a for f in files for a in ("--embedding", str(f)))]
        sample.main([*args, *base, "--out", str(tmp_path / f"{kind}.png")])
        image = np.asarray(Image.open(tmp_path / f"{kind}.png"), dtype=np.int16)
        assert np.abs(image - run_image).max() <= 1, kind  # the same images, up to float summation order
    # The LoRA matters, and at --lora-scale 0 it is not there.
    words_only = [a for f in embeddings["diffusers"] for a in ("--embedding", str(f))]
    sample.main(["--ckpt", str(ckpt), *words_only, *base, "--out", str(tmp_path / "words.png")])
    sample.main(["--ckpt", str(ckpt), *words_only, "--lora", str(out / "lora.safetensors"), "--lora-scale", "0", *base,
                 "--out", str(tmp_path / "scale0.png")])
    assert (tmp_path / "words.png").read_bytes() == (tmp_path / "scale0.png").read_bytes()
    assert np.abs(np.asarray(Image.open(tmp_path / "words.png"), dtype=np.int16) - run_image).max() > 10


def test_full_size_export_has_the_real_layout():
    """SD 1.x size on the meta device (no weights allocated): the 32 K/V modules under the kohya names
    of the v1-5 layout (FORMATS.md's list, written out), and a merged checkpoint with every key and shape
    of the real file."""
    with torch.device("meta"):
        model = sample.StableDiffusion(Tokenizer(), TextEncoder(), UNet(), None)
    kv = {n: m.weight.shape for n, m in model.unet.named_modules() if n.endswith(TARGETS)}
    tasks = [(f"<c{t}>", {"tokens": torch.zeros(2, 768), **{f"{n}.{k}": torch.zeros(s) for n, (o, i) in kv.items()
                                                              for k, s in (("A", (o, 16)), ("B", (16, i)))}})
             for t in (1, 2)]
    files, _ = export.export_files(model, "clora", 16, tasks, {k: torch.empty(s, device="meta") for k, s in MANIFEST.items()})
    blocks = {**{f"input_blocks.{i}.1": f"down_blocks_{(i - 1) // 3}_attentions_{(i - 1) % 3}" for i in (1, 2, 4, 5, 7, 8)},
              "middle_block.1": "mid_block_attentions_0",
              **{f"output_blocks.{i}.1": f"up_blocks_{i // 3}_attentions_{i % 3}" for i in range(3, 12)}}
    expected = {}
    for block, kohya in blocks.items():
        for t in "kv":
            out, inp = kv[f"{block}.transformer_blocks.0.attn2.to_{t}"]
            assert inp == 768 and out in (320, 640, 1280)
            key = f"lora_unet_{kohya}_transformer_blocks_0_attn2_to_{t}"
            expected.update({f"{key}.lora_down.weight": (32, inp), f"{key}.lora_up.weight": (out, 32), f"{key}.alpha": ()})
    assert {k: tuple(v.shape) for k, v in files["lora.safetensors"][0].items()} == expected and len(expected) == 96
    assert {k: list(v.shape) for k, v in files["merged.safetensors"][0].items()} == MANIFEST
    assert files["embeddings/c2.safetensors"][0]["<c2>"].shape == (2, 768)


def test_svd_exports_say_their_error_and_ti_exports_tokens(tiny_ckpt, tmp_path, monkeypatch):
    """kv by truncated SVD at the default rank (the run's rank times its tasks): the relative error in
    the metadata is the one the imported weights show. A method export.py does not know goes the same
    way, here exactly since its deltas have rank <= 6. ti: embeddings and no LoRA."""
    ckpt, _ = tiny_ckpt
    monkeypatch.setitem(export.METHODS, "newlow", ("lowrank", False))
    for method in ("kv", "newlow"):
        run, out = make_run(tmp_path, ckpt, method), tmp_path / method
        export.main(["--run", str(run), "--out", str(out)])
        meta = read_metadata(out / "lora.safetensors")
        assert meta["clora.export"] == "truncated SVD" and meta["ss_network_dim"] == "6"
        base, ours, imported = (sample.StableDiffusion.load(ckpt) for _ in range(3))
        load_run(run, ours, ckpt)
        export.apply_lora(imported, out / "lora.safetensors")
        err, delta = 0.0, 0.0
        for name, m in ours.unet.named_modules():
            if name.endswith(TARGETS):
                err += (imported.unet.get_submodule(name).weight - m.weight).double().square().sum().item()
                delta += (m.weight - base.unet.get_submodule(name).weight).double().square().sum().item()
        stated = float(meta["clora.relative_error"])
        assert (err / delta) ** 0.5 == pytest.approx(stated, rel=1e-3, abs=1e-6)
        assert stated > 0.1 if method == "kv" else stated < 1e-6
    export.main(["--run", str(make_run(tmp_path, ckpt, "ti")), "--out", str(tmp_path / "ti")])
    assert sorted(p.name for p in (tmp_path / "ti").iterdir()) == ["README.md", "embeddings"]
    assert "lora" not in (tmp_path / "ti" / "README.md").read_text().lower().replace("no lora.safetensors", "")


def test_import_applies_kohya_layers_by_any_name(tiny_ckpt, tmp_path):
    """A 1x1-convolution layer, a text-encoder layer (no alpha: scale 1) and a CompVis-named layer, at --lora-scale 0.5."""
    ckpt, _ = tiny_ckpt
    g = torch.Generator().manual_seed(0)
    layers = {  # kohya name: (model, our module path, weight shape, alpha)
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "input_blocks.1.1.proj_in", (32, 32, 1, 1), 1.0),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", (128, 128), None),
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v":
            ("unet", "middle_block.1.transformer_blocks.0.attn2.to_v", (64, 128), 8.0)}
    sd = {}
    for key, (_, _, (out, inp, *k), alpha) in layers.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(2, inp, *k, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 2, *k, generator=g)
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_safetensors(sd, tmp_path / "lora.safetensors")
    base, model = sample.StableDiffusion.load(ckpt), sample.StableDiffusion.load(ckpt)
    assert export.apply_lora(model, tmp_path / "lora.safetensors", scale=0.5) == 3
    for key, (root, name, shape, alpha) in layers.items():
        up, down = sd[f"{key}.lora_up.weight"].flatten(1), sd[f"{key}.lora_down.weight"].flatten(1)
        expected = getattr(base, root).get_submodule(name).weight + 0.5 * (alpha or 2) / 2 * (up @ down).view(shape)
        assert rel_err(getattr(model, root).get_submodule(name).weight, expected) < 1e-6, key


# ------------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit, nothing written


def refused(fn, args, says):
    with pytest.raises(SystemExit) as e:
        fn(args)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and re.search(says, message), message


def test_bad_runs_and_out_folders_are_refused(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    run = make_run(tmp_path, ckpt, "lora")
    out = tmp_path / "exports" / "out"
    args = ["--run", str(run), "--out", str(out)]
    task2 = (run / "task_02.safetensors").read_bytes()
    (run / "task_02.safetensors").unlink()
    refused(export.main, args, r"task_02.safetensors: no such file")
    (run / "task_02.safetensors").write_bytes(task2[: len(task2) // 2])
    refused(export.main, args, r"task_02.safetensors: truncated")
    assert not (tmp_path / "exports").exists()
    (run / "task_02.safetensors").write_bytes(task2)

    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep")
    refused(export.main, args, r"--out .* exists and is not an empty folder; pass --overwrite")
    refused(export.main, [*args, "--overwrite", "--rank", "1000"], r"--rank 1000: must be in 1\.\.64")
    refused(export.main, ["--run", str(run), "--out", str(tmp_path), "--overwrite"], r"holds the run or its base checkpoint")
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["mine.txt"]
    export.main([*args, "--overwrite", "--dtype", "fp16", "--rank", "4"])  # lora re-truncated by SVD
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["out"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == [
        "README.md", "embeddings/c1.safetensors", "embeddings/c2.safetensors", "lora.safetensors"]
    lora = read_state_dict(out / "lora.safetensors")
    assert {v.dtype for v in lora.values()} == {torch.float16}
    assert all(v.shape[0] == 4 for k, v in lora.items() if k.endswith("lora_down.weight"))
    assert 0 < float(read_metadata(out / "lora.safetensors")["clora.relative_error"]) < 1


class Payload:  # a pickled object that would need this code to be rebuilt
    def __reduce__(self):
        return (print, ("this ran",))


def test_bad_loras_and_embeddings_are_refused(tiny_ckpt, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    png = tmp_path / "never.png"
    base = ["--ckpt", str(ckpt), "--prompt", "a photo", "--steps", "1", "--n", "1", "--size", "16", "--out", str(png)]
    g = torch.Generator().manual_seed(0)

    def lora(name, width, extra=()):
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        sd = {f"{key}.lora_down.weight": torch.randn(4, width, generator=g), f"{key}.alpha": torch.tensor(4.0),
              f"{key}.lora_up.weight": torch.randn(32, 4, generator=g), **{k: torch.zeros(1) for k in extra}}
        save_safetensors(sd, tmp_path / name)
        return ["--lora", str(tmp_path / name)]

    refused(sample.main, [*base, *lora("sdxl.safetensors", 128, ["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"])],
            r"an SDXL LoRA")
    refused(sample.main, [*base, *lora("sd2.safetensors", 1024)], r"a LoRA for SD 2\.x .* this model's reads 128-wide")
    refused(sample.main, [*base, *lora("odd.safetensors", 128, ["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"])],
            r"1 keys are not kohya LoRA weights .* \(e\.g\. lora_unet_down_blocks_0_resnets_0_conv1")
    refused(sample.main, [*base, *lora("lycoris.safetensors", 128, ["lora_unet_mid_block_attentions_0_proj_in.hada_w1_a"])],
            r"not kohya LoRA weights")

    save_safetensors({"<wide>": torch.randn(2, 768)}, tmp_path / "wide.safetensors")
    refused(sample.main, [*base, "--embedding", str(tmp_path / "wide.safetensors")],
            r"width 768 \(SD 1\.x\); this model's text encoder is 128 wide")
    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil.pt")
    refused(sample.main, [*base, "--embedding", str(tmp_path / "evil.pt")], r"evil\.pt: not a plain-tensor file, so not read")
    assert "this ran" not in capsys.readouterr().out
    save_safetensors({"a": torch.randn(2, 128), "b": torch.randn(2, 128)}, tmp_path / "two.safetensors")
    refused(sample.main, [*base, "--embedding", str(tmp_path / "two.safetensors")], r"not a textual-inversion file")
    save_safetensors({"<c1>": torch.randn(2, 128)}, tmp_path / "c1.safetensors")
    twice = ["--embedding", str(tmp_path / "c1.safetensors")] * 2
    refused(sample.main, [*base, *twice],
            r"c1\.safetensors: concept word '<c1>' is already in the vocabulary")
    assert not png.exists()

"""Checkpoint files: the safetensors reader/writer, .ckpt, strict loading, and one-line errors."""
import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint import CheckpointError, read_state_dict, save_safetensors
from conftest import original_checkpoint, tiny_models
from sample import StableDiffusion


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_safetensors_format_matches_the_reference_library(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "i64": torch.arange(77)[None], "scalar": torch.tensor(0.5), "empty": torch.zeros(0, 4)}
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"note": "x"})
    assert same(load_file(tmp_path / "ours.safetensors"), tensors)
    save_file(tensors, tmp_path / "ref.safetensors")
    assert same(read_state_dict(tmp_path / "ref.safetensors"), tensors)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temp file behind


def test_strict_round_trip(tiny_ckpt):
    path, (text, unet, vae) = tiny_ckpt
    model = StableDiffusion.load(path)
    for ours, loaded in ((text, model.text_encoder), (unet, model.unet), (vae, model.vae)):
        assert same(ours.state_dict(), loaded.state_dict())
    assert model.unet.cfg.context_dim == text.cfg.width


def test_fp16_ckpt_with_state_dict_wrapper(tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in original_checkpoint(*tiny_models()).items()}
    torch.save({"state_dict": sd, "global_step": 470000}, tmp_path / "half.ckpt")
    model = StableDiffusion.load(tmp_path / "half.ckpt", dtype=torch.float32)
    w = model.unet.input_blocks[0][0].weight
    assert w.dtype == torch.float32 and torch.equal(w, sd["model.diffusion_model.input_blocks.0.0.weight"].float())


def error(path):
    with pytest.raises(CheckpointError) as e:
        StableDiffusion.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.safetensors").write_text("hello, this is not a checkpoint at all")
    assert "not a .safetensors or .ckpt checkpoint" in error(tmp_path / "notes.safetensors")
    assert "no such file" in error(tmp_path / "missing.safetensors")


def test_truncated_files(tiny_ckpt, tmp_path):
    path, models = tiny_ckpt
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in error(tmp_path / "cut.safetensors")
    torch.save({"state_dict": original_checkpoint(*models)}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert "truncated" in error(tmp_path / "cut.ckpt")


def test_pickled_objects_are_refused(tmp_path):
    # Any class outside torch's weights-only allow-list stands for code that unpickling would run.
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1e-4)}, tmp_path / "evil.ckpt")
    assert "weights-only" in error(tmp_path / "evil.ckpt")


@pytest.mark.parametrize("edit, says", [
    (lambda sd: sd.update({"conditioner.embedders.0.transformer.x": torch.zeros(1)}), "SDXL"),
    (lambda sd: sd.update({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}), "SD 2.x"),
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}), "inpainting"),
    (lambda sd: sd.pop("model.diffusion_model.middle_block.1.proj_in.bias"), "1 missing (e.g. middle_block.1.proj_in.bias)"),
    (lambda sd: sd.pop("model.diffusion_model.out.2.weight"), "shape from the checkpoint (no 'out.2.weight')"),
    (lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(1)}), "1 unexpected (e.g. extra.weight)"),
    (lambda sd: sd.update({"some_other_model.weight": torch.zeros(1)}), "belong to no SD 1.x model"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.diffusion_model.")], "no model.diffusion_model"),
    (lambda sd: sd.update({"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 3, 3)}), "unexpected shapes"),
])
def test_unsupported_checkpoints_get_one_line_errors(tmp_path, edit, says):
    sd = original_checkpoint(*tiny_models())
    edit(sd)
    save_safetensors(sd, tmp_path / "x.safetensors")
    assert says in error(tmp_path / "x.safetensors")

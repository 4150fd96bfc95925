"""Take what a run learned to diffusers, AUTOMATIC1111 and ComfyUI, and bring their LoRAs and
textual-inversion embeddings here (sample.py's --lora and --embedding use the readers below).

    python export.py --run runs/world-v2-clora --out export/
    python export.py --run runs/faces --out export/faces --merged --dtype fp16
    python export.py --run runs/faces-kv --out export/faces-kv --rank 64 --overwrite

It writes a new folder (built beside --out, then renamed into place):
- `lora.safetensors`: the run's cross-attention K/V deltas in the kohya format all of those tools load
  (`lora_unet_<diffusers module>.lora_down.weight` [r, in], `.lora_up.weight` [out, r], `.alpha`;
  delta = alpha / r * up @ down). Low-rank tasks (clora, lora) stack exactly: their factors are
  concatenated. Any other delta (kv, or a new method's) is exported by a truncated SVD at --rank; the
  relative error of the truncation is printed and kept in the file's metadata.
- `embeddings/<name>.safetensors`: one textual-inversion file per concept, {"<name>": [n_tokens, width]}.
- `merged.safetensors` (--merged): the base checkpoint in its own layout with the deltas folded into
  `attn2.to_k` / `attn2.to_v` and its token table unchanged (the concepts travel as the embedding files).
- `README.md`: the concept words and how to load them in diffusers, AUTOMATIC1111 and ComfyUI.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, read_metadata, read_state_dict, save_safetensors
from clora import METHODS, TARGETS, CLoRA, check_base, read_run, read_task
from sample import StableDiffusion, find_checkpoint, run_checkpoint
from unet import SpatialTransformer, UNet

# Methods whose task files hold factors A (out, r) and B (r, in) with delta = A @ B: their tasks stack
# exactly. Every other method is exported from its folded weights, by a truncated SVD.
LOWRANK_EXACT = ("clora", "lora")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# The width of the text features each family's cross-attention reads: it names the model a file was made for.
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}
LORA_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")


def diffusers_name(name, n):
    """A UNet module inside a transformer, CompVis path -> diffusers path, n = num_res_blocks + 1 (the
    blocks per level): input_blocks.i.1 -> down_blocks.{(i-1)//n}.attentions.{(i-1)%n},
    middle_block.1 -> mid_block.attentions.0, output_blocks.i.1 -> up_blocks.{i//n}.attentions.{i%n}."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return ".".join(["mid_block.attentions.0", *parts[2:]])
    down = parts[0] == "input_blocks"
    level, j = divmod(int(parts[1]) - down, n)
    return ".".join([f"{'down' if down else 'up'}_blocks.{level}.attentions.{j}", *parts[3:]])


def kohya_names(unet, text_encoder):
    """{kohya module name: (root, module path)} for every layer a kohya SD 1.x LoRA may name here: a
    kohya name is a module path with `.` -> `_`, under `lora_unet_` or `lora_te_`. The text encoder's
    paths are Hugging Face's already; the UNet's transformers go by diffusers' paths (what kohya and
    diffusers write), and every UNet layer also by its CompVis path (what some trainers write)."""
    names = {}
    for prefix, block in unet.named_modules():
        if isinstance(block, SpatialTransformer):
            names.update({"lora_unet_" + diffusers_name(f"{prefix}.{sub}", unet.cfg.num_res_blocks + 1).replace(".", "_"):
                          (unet, f"{prefix}.{sub}") for sub, m in block.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
    for root, tag in ((unet, "unet"), (text_encoder, "te")):
        names.update({f"lora_{tag}_{name}".replace(".", "_"): (root, name)
                      for name, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
    return names


# ------------------------------------------------------------------------------------------------
# Export


def lowrank_factors(names, tasks):
    """The tasks' own factors side by side: sum_t A_t B_t = [A_1 .. A_T] [B_1; ..; B_T], exactly."""
    return {n: (torch.cat([t[f"{n}.A"] for t in tasks], 1), torch.cat([t[f"{n}.B"] for t in tasks], 0)) for n in names}


def svd_factors(deltas, rank):
    """Each delta's truncated SVD at one rank for every layer (a layer with fewer directions keeps them
    all, padded with zeros), sqrt(S) on each side. Also returns the relative Frobenius error of the
    truncation over all layers together, and that of the worst layer."""
    factors, cut, total, worst = {}, 0.0, 0.0, 0.0
    for name, d in deltas.items():
        U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
        k = min(rank, len(S))
        root = S[:k].sqrt()
        factors[name] = (F.pad(U[:, :k] * root, (0, rank - k)), F.pad(root[:, None] * Vh[:k], (0, 0, 0, rank - k)))
        tail, energy = S[k:].square().sum().item(), S.square().sum().item()
        cut, total, worst = cut + tail, total + energy, max(worst, (tail / energy) ** 0.5 if energy else 0.0)
    return factors, (cut / total) ** 0.5 if total else 0.0, worst


def lora_tensors(kohya, factors, rank, dtype):
    """The kohya file's tensors: one rank and one alpha (= rank, so scale 1) for every module, since
    loaders mishandle per-module alphas."""
    out = {}
    for name, (up, down) in factors.items():
        out[f"{kohya[name]}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{kohya[name]}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{kohya[name]}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return out


def merged_checkpoint(base_sd, folded, dtype):
    """The base checkpoint, every key kept, with the folded K/V weights in place; floats in `dtype`."""
    swap = {f"{UNet.PREFIX}{name}.weight": w for name, w in folded.items()}
    return {k: swap.get(k, v).to(dtype) if v.is_floating_point() else v for k, v in base_sd.items()}


def export_files(model, method, rank, tasks, base_sd=None, dtype="fp32", svd_rank=None):
    """Everything an export folder holds but its README: {path in the folder: (tensors, metadata)}, and
    one line about each file. `model`: the base StableDiffusion; `tasks`: [(word, task file tensors)] of
    a run made with `method` at `rank`; `base_sd`: the base checkpoint's tensors, for merged.safetensors.
    The deltas come from folding the tasks through the C-LoRA adapter, whatever the method."""
    n = model.unet.cfg.num_res_blocks + 1
    kohya = {name: "lora_unet_" + diffusers_name(name, n).replace(".", "_")
             for name, _ in model.unet.named_modules() if name.endswith(TARGETS)}
    base = {name: model.unet.get_submodule(name).weight for name in kohya}
    adapter = CLoRA(model.unet, model.text_encoder, model.tokenizer, method, rank)
    for word, tensors in tasks:
        adapter.load_task(word, tensors)
    adapter.fold()
    folded = {name: model.unet.get_submodule(name).weight for name in kohya}
    files, notes, words = {}, [], adapter.words

    if METHODS[method][0] is None:
        notes.append(f"no lora.safetensors: method {method} changes no UNet weight")
    else:
        most = max(min(w.shape) for w in folded.values())
        if svd_rank is not None and not 1 <= svd_rank <= most:
            raise CheckpointError(f"--rank {svd_rank}: must be in 1..{most} for this UNet "
                                  f"(its largest K/V layer has {most} directions)")
        if method in LOWRANK_EXACT and svd_rank is None:
            factors = lowrank_factors(kohya, [tensors for _, tensors in tasks])
            r, err, worst = next(iter(factors.values()))[1].shape[0], 0.0, 0.0
            how = f"exact: the {len(tasks)} tasks' factors side by side"
        else:
            r = svd_rank or min(rank * len(tasks), most)
            factors, err, worst = svd_factors({name: folded[name].double() - base[name].double() for name in kohya}, r)
            how = f"truncated SVD, relative error {err:.3g} (worst layer {worst:.3g})"
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": r, "ss_network_alpha": r,
                "ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.architecture": "stable-diffusion-v1/lora",
                "clora.method": method, "clora.concepts": " ".join(words), "clora.export": how.split(",")[0].split(":")[0],
                "clora.relative_error": err, "clora.worst_layer_relative_error": worst}
        files["lora.safetensors"] = (lora_tensors(kohya, factors, r, DTYPES[dtype]), meta)
        notes.append(f"lora.safetensors: {len(kohya)} K/V layers, rank {r}, {dtype}; {how}")

    table = model.text_encoder.text_model.embeddings.token_embedding.weight
    for word in words:
        rows = table[model.tokenizer.concepts[word]].float().clone()
        files[f"embeddings/{word.strip('<>')}.safetensors"] = ({word: rows}, {})
        notes.append(f"embeddings/{word.strip('<>')}.safetensors: {word}, {len(rows)} tokens of width {rows.shape[1]}")
    if base_sd is not None:
        files["merged.safetensors"] = (merged_checkpoint(base_sd, folded, DTYPES[dtype]), {})
        notes.append(f"merged.safetensors: the base checkpoint with the K/V deltas folded in, {dtype}")
    return files, notes


def export(run_dir, out, ckpt=None, merged=False, dtype="fp32", rank=None, overwrite=False):
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    run = read_run(run_dir)
    if not run["tasks"]:
        raise CheckpointError(f"{run_dir}: the run has no finished task yet; nothing to export")
    path = find_checkpoint(ckpt or run_checkpoint(run))
    if any(out.resolve() in (p, *p.parents) for p in (Path(run_dir).resolve(), path.resolve())):
        raise CheckpointError(f"--out {out} holds the run or its base checkpoint, which it would replace; pick another folder")
    check_base(run_dir, run, path, "; pass it as --ckpt")
    tasks = [(t["word"], read_task(run_dir, t, run["method"])) for t in run["tasks"]]  # all of them, before any work
    print(f"loading {path}")
    model = StableDiffusion.load(path)
    files, notes = export_files(model, run["method"], run["rank"], tasks, read_state_dict(path) if merged else None, dtype, rank)
    words = [w for w, _ in tasks]
    if merged:  # the base's own metadata (the tiny model keeps its config there), and where the deltas came from
        files["merged.safetensors"][1].update({**read_metadata(path), "clora.merged": f"{Path(run_dir).name}: {' '.join(words)}"})

    out = out.resolve()  # `--out .` has no name of its own to build a temporary one from
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name, (tensors, meta) in files.items():
            save_safetensors(tensors, tmp / name, meta)
        (tmp / "README.md").write_text(readme(run_dir, run, path, words, notes, "lora.safetensors" in files,
                                              read_metadata(path).get("model", "sd1")))
        for p in [tmp, *tmp.rglob("*")]:  # temporary files are private; an export is for sharing
            p.chmod(0o755 if p.is_dir() else 0o644)
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        if out.exists():
            out.rename(old)  # aside, not deleted, until the new folder is in place
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(notes) + f"\nwrote {out} (its README.md says how to load it)")


def readme(run_dir, run, base, words, notes, lora, model_name):
    """The folder's README: what is in it and how each tool loads it."""
    names, name = [w.strip("<>") for w in words], Path(run_dir).name
    return "\n".join([
        f"# Concepts learned by `{run_dir}`", "",
        f"Learned with `{run['method']}` on `{base.name}`, one task after another: "
        + ", ".join(f"`{w}`" for w in words) + ".", "",
        *[f"- {note}" for note in notes], "",
        *(["Use both: the embeddings are the words, the LoRA is how the UNet reads them."] if lora else []),
        *([f"The base model is this project's `{model_name}`, not a standard SD 1.x checkpoint: the files are in the "
           "standard formats, but the tools below configure standard SD 1.x checkpoints only."] if model_name != "sd1" else []),
        "", "## diffusers", "", "```python", "from diffusers import StableDiffusionPipeline  # run in this folder", "",
        f'pipe = StableDiffusionPipeline.from_single_file("{base.name}")  # the base checkpoint'
        + (" (or merged.safetensors, without the LoRA)" if lora else ""),
        *(['pipe.load_lora_weights(".", weight_name="lora.safetensors")'] if lora else []),
        *[f'pipe.load_textual_inversion("embeddings/{w}.safetensors")' for w in names],
        f'image = pipe("a photo of <{names[0]}>").images[0]', "```", "",
        "## AUTOMATIC1111", "",
        (f"Copy `lora.safetensors` to `models/Lora/{name}.safetensors` and " if lora else "Copy ")
        + "`embeddings/*.safetensors` to `embeddings/`. A1111 names an embedding by its file name, so the prompt is "
        f"`a photo of {names[0]}" + (f" <lora:{name}:1>`" if lora else "`") + " (no `<>` around the word).", "",
        "## ComfyUI", "",
        ("Copy `lora.safetensors` to `models/loras/` and " if lora else "Copy ")
        + "`embeddings/*.safetensors` to `models/embeddings/`. "
        + ("Load the base checkpoint and pass its MODEL through a LoraLoader (strength_model 1; the LoRA has no "
           "text-encoder part, so strength_clip does nothing). " if lora else "")
        + f"Write the prompt as `a photo of embedding:{names[0]}`.", ""])


# ------------------------------------------------------------------------------------------------
# Import: what sample.py --lora / --embedding read


def lora_deltas(path, model):
    """A kohya-format LoRA -> {(root, module path): delta (out, in[, 1, 1]) float32, alpha / r folded in}.
    Refuses, in one line, LoRAs for other model families, keys it does not understand, and shapes that
    do not fit this model."""
    sd = read_state_dict(path)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd):
        raise CheckpointError(f"{path}: an SDXL LoRA (it adapts two text encoders); only SD 1.x LoRAs fit this model")
    width = model.unet.cfg.context_dim
    for k, v in sd.items():  # the text width read by the cross-attention names the family
        if k.endswith("attn2_to_k.lora_down.weight") and v.shape[1] != width:
            family = FAMILIES.get(v.shape[1], f"a model with {v.shape[1]}-wide text features")
            raise CheckpointError(f"{path}: a LoRA for {family} (its cross-attention reads {v.shape[1]}-wide text); "
                                  f"this model's reads {width}-wide text")
    names = kohya_names(model.unet, model.text_encoder)
    unknown = [k for k in sd if k.partition(".")[2] not in LORA_KEYS or k.partition(".")[0] not in names]
    if unknown:
        example = next(k for k in names if k.endswith("attn2_to_k"))
        raise CheckpointError(f"{path}: {len(unknown)} keys are not kohya LoRA weights of a layer this SD 1.x model has "
                              f"(e.g. {unknown[0]}); expected keys such as {example}.lora_down.weight")
    deltas = {}
    for module in sorted({k.partition(".")[0] for k in sd}):
        if f"{module}.lora_down.weight" not in sd or f"{module}.lora_up.weight" not in sd:
            raise CheckpointError(f"{path}: {module} has no lora_down / lora_up pair; the file is incomplete")
        root, name = names[module]
        w, down, up = root.get_submodule(name).weight, sd[f"{module}.lora_down.weight"], sd[f"{module}.lora_up.weight"]
        # Linear: down (r, in), up (out, r); a 1x1 convolution has the same with trailing 1x1 dims.
        if (up.shape[0], down.shape[1], *down.shape[2:]) != (w.shape[0], *w.shape[1:]) or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{path}: {module} is {up.shape[0]}x{down.shape[1]} (rank {down.shape[0]}), but this "
                                  f"model's layer is {tuple(w.shape)}: the LoRA was made for another model")
        alpha = sd[f"{module}.alpha"].item() if f"{module}.alpha" in sd else down.shape[0]  # no alpha: scale 1
        deltas[(root, name)] = (alpha / down.shape[0]) * (up.flatten(1).float() @ down.flatten(1).float()).view(w.shape)
    return deltas


def apply_lora(model, path, scale=1.0):
    """Fold a kohya LoRA into the model's weights: W + scale * alpha / r * up @ down. Returns the layer count."""
    deltas = lora_deltas(path, model)
    for (root, name), delta in deltas.items():
        module = root.get_submodule(name)
        w = module.weight
        module.weight = nn.Parameter((w.float() + scale * delta.to(w.device)).to(w.dtype), requires_grad=False)
    return len(deltas)


def read_embedding(path):
    """A textual-inversion file -> (word, (n, width) float32). Formats: diffusers' {"<word>": tensor}
    (.safetensors or .bin), AUTOMATIC1111's {"emb_params": tensor} (.safetensors) and its .pt with
    {"string_to_param": {"*": tensor}}; A1111 names a concept by its file name, so those become
    `<file name>`. Pickled files are read with weights_only=True: nothing in them runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        sd = read_state_dict(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling refusals, zip errors: the file cannot be read safely
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: not a plain-tensor file, so not read (torch.load with weights_only=True: "
                                  f"{first}); only files that need no code to load are read") from None
    word = f"<{path.stem.lower().replace(' ', '_')}>"
    if isinstance(sd, dict) and isinstance(sd.get("string_to_param"), dict) and "*" in sd["string_to_param"]:
        rows = sd["string_to_param"]["*"]
    elif isinstance(sd, dict) and "emb_params" in sd:
        rows = sd["emb_params"]
    elif isinstance(sd, dict) and len(sd) == 1:
        (word, rows), = sd.items()
        word = str(word).lower()
    else:
        sdxl = "; clip_l + clip_g is an SDXL embedding" if isinstance(sd, dict) and "clip_g" in sd else ""
        raise CheckpointError(f"{path}: not a textual-inversion file "
                              f"(expected one tensor, 'emb_params' or 'string_to_param'{sdxl})")
    if not isinstance(rows, torch.Tensor) or rows.ndim not in (1, 2) or not rows.is_floating_point():
        raise CheckpointError(f"{path}: its embedding is not a float tensor of shape (tokens, width)")
    return word, rows.float().reshape(-1, rows.shape[-1])


def add_embedding(model, path):
    """A textual-inversion file's tokens as a new concept word of the model's tokenizer. Returns the word."""
    word, rows = read_embedding(path)
    emb = model.text_encoder.text_model.embeddings.token_embedding
    if rows.shape[1] != emb.weight.shape[1]:
        family = FAMILIES.get(rows.shape[1], "another model")
        raise CheckpointError(f"{path}: an embedding of width {rows.shape[1]} ({family}); this model's text encoder "
                              f"is {emb.weight.shape[1]} wide")
    try:
        ids = model.tokenizer.add_concept(word, len(rows))
    except ValueError as e:  # a word already known (from --run or another embedding), or not a usable word
        raise CheckpointError(f"{path}: {e}") from None
    assert ids[0] == emb.weight.shape[0], "tokenizer and token table disagree"
    emb.weight = nn.Parameter(torch.cat([emb.weight, rows.to(emb.weight)]), requires_grad=False)
    emb.num_embeddings = emb.weight.shape[0]
    return word


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train.py run folder")
    p.add_argument("--out", required=True, help="the folder to write; it must not exist or be empty (or pass --overwrite)")
    p.add_argument("--ckpt", help="the run's base checkpoint, if it moved since training")
    p.add_argument("--merged", action="store_true", help="also write merged.safetensors: the base with the deltas folded in")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="of the LoRA and the merged checkpoint (embeddings: fp32)")
    p.add_argument("--rank", type=int, help="export the deltas by truncated SVD at this rank (default: exact factors for "
                   "clora / lora; other methods: the run's rank times its tasks)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    args = p.parse_args(argv)
    try:
        export(args.run, args.out, args.ckpt, args.merged, args.dtype, args.rank, args.overwrite)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

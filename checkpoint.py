"""Reading and writing original-layout (CompVis) Stable Diffusion checkpoints.

- `.safetensors`: 8-byte little-endian header length, a JSON header, then raw tensor bytes. We
  memory-map the file, so a 4 GB checkpoint is not copied into RAM before it is converted.
- `.ckpt`: a torch zip, read with `weights_only=True` (no arbitrary unpickling), `state_dict` unwrapped.

Every failure is a `CheckpointError` whose message is one line saying what is wrong and what to do.
"""
import errno
import hashlib
import json
import mmap
import os
import secrets
import struct
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch


class CheckpointError(Exception):
    pass


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_state_dict(path):
    """Any supported checkpoint file -> {key: tensor}, keys exactly as stored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:2] == b"PK":  # torch.save's zip format
        return _read_ckpt(path)
    return _read_safetensors(path)


def _read_safetensors(path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a .safetensors or .ckpt checkpoint (unrecognised header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a .safetensors or .ckpt checkpoint (header is not JSON)") from None
        # ACCESS_COPY: copy-on-write pages, so tensors are writable views that never touch the file.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    sd = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated ({size} bytes, tensor {name} ends at {8 + n + end}); "
                                  "replace it with a complete copy")
        if end == begin:
            sd[name] = torch.empty(shape, dtype=dtype)
        else:
            count = (end - begin) // dtype.itemsize
            sd[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin).reshape(shape)
    return sd


def read_metadata(path):
    """A .safetensors file's `__metadata__` ({} for none, and for .ckpt files). The embedded tiny model
    keeps there what its tensor shapes cannot tell (UNet heads, the VAE's latent scale, its name)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or len(head) < 8:
            return {}
        n = struct.unpack("<Q", head)[0]
        try:
            return json.loads(f.read(min(n, 100_000_000))).get("__metadata__", {})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return {}  # read_state_dict reports what is wrong with the file


def _read_ckpt(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip errors, unpickling refusals: all mean "this file cannot be used"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint ({first}); "
                              "the file may be truncated, or convert it to .safetensors") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no tensor state dict")
    return sd


def sha256(path):
    """Content fingerprint of a file (a run records its base checkpoint's)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_write(path):
    """Yield a temp path beside `path`; move it onto `path` only if the block completes. A crash at
    any moment leaves either the old file or the new one, never half of one; the temp file is named
    `.NAME.*.tmp`, so that the next run can tell an interrupted write's leftover (`stale_temps`).
    The file gets the umask's permissions like any other (0o666 & ~umask), and the folder is fsynced
    after the rename, so the new name survives a power cut too. A failure to write (no space,
    read-only, permission) is one CheckpointError naming `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the kernel applies the umask
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        hint = ("free some space and run again" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else "check that the folder exists and is writable, or write elsewhere")
        raise CheckpointError(f"{path}: cannot write it ({e.strerror or e}); {hint}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(text, path):
    """A text file, written atomically."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def stale_temps(folder):
    """Leftovers of atomic writes that a kill interrupted (never the file they were to replace)."""
    return sorted(Path(folder).glob(".*.*.tmp"))


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors (the format read above), atomically."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)


def check_sd1(sd, path=""):
    """Refuse, in one line, the checkpoints this project does not support, saying what they look like."""
    only = "only SD 1.x text-to-image checkpoints (e.g. v1-5-pruned-emaonly.safetensors) are supported"
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError(f"{path}: this looks like an SDXL checkpoint; {only}")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise CheckpointError(f"{path}: this looks like an SD 2.x checkpoint (OpenCLIP text encoder); {only}")
    conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(f"{path}: no model.diffusion_model.* keys, so not an original-layout SD checkpoint "
                              f"(a diffusers folder, a LoRA or a VAE-only file?); {only}")
    variants = {9: "an inpainting", 8: "an InstructPix2Pix", 5: "a depth-conditioned"}
    if conv_in.shape[1] != 4:
        kind = variants.get(conv_in.shape[1], f"a {conv_in.shape[1]}-channel")
        raise CheckpointError(f"{path}: this looks like {kind} SD checkpoint (UNet takes {conv_in.shape[1]} channels); {only}")
    if any(k.startswith("model.diffusion_model.label_emb.") for k in sd):
        raise CheckpointError(f"{path}: this looks like an SD 2.x unCLIP checkpoint; {only}")


def submodel_state_dict(sd, prefix, skipped=()):
    """The keys under `prefix`, prefix stripped, minus the named `skipped` ones."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] not in skipped}


def load_model(cls, config_from_state_dict, sd, **overrides):
    """Build `cls` from a full original checkpoint: take the keys under `cls.PREFIX` (minus the named
    `cls.SKIPPED`), read the config off their shapes (plus `overrides`: what shapes cannot tell), build on the meta device and
    load_state_dict(strict=True, assign=True). Assign takes the checkpoint's tensors as they are: no
    random init of 860M parameters and no second copy of the weights; call `.to(device, dtype)` after.
    Missing or unexpected keys become one readable line instead of torch's page-long error."""
    what = f"{cls.__name__} ({cls.PREFIX}*)"
    own = submodel_state_dict(sd, cls.PREFIX, cls.SKIPPED)
    try:
        cfg = replace(config_from_state_dict(own), **overrides)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{what}: cannot read the model's shape from the checkpoint (no {e}); "
                              "not a complete SD 1.x checkpoint") from None
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - own.keys(), own.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"{len(s)} {word} (e.g. {sorted(s)[0]})" for s, word in ((missing, "missing"), (unexpected, "unexpected")) if s]
        raise CheckpointError(f"{what}: {', '.join(parts)} keys; not a complete SD 1.x checkpoint of this layout")
    bad = [k for k in expected if expected[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensors have unexpected shapes (e.g. {bad[0]}: "
                              f"{tuple(own[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)})")
    model.load_state_dict(own, strict=True, assign=True)
    return model

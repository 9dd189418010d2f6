"""A teacher's files: safetensors weights plus JSON, and its resume checkpoint.

A saved teacher is ``<name>.json`` and either ``<name>.safetensors`` or, when the
weights exceed ``max_shard_bytes``, the shards ``<name>.<k>-of-<n>.safetensors``
(``k`` from 1), each a complete safetensors file of whole tensors and smaller than
``max_shard_bytes``. The JSON records the weights' ``file`` (the first shard),
``sha256`` of the saved bytes (the shards' bytes in order) and, for shards,
``shards``: ``[{"file", "sha256"}, ...]``. Floating tensors may be stored in float16
(``saved_dtype``); a loaded teacher is always float32.

A teacher in training keeps ``<name>.resume.safetensors`` (model, momentum, generator
states as uint8 tensors; the step and epoch counts in its header) plus a readable
``<name>.resume.json``. Every file is written atomically (:func:`rows.atomic_write_bytes`)
and read with safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .devices import prefers_channels_last, resolve_device
from .models import create_model
from .rows import atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "find_teacher",
    "load_resume",
    "load_teacher",
    "remove_resume",
    "save_resume",
    "save_teacher",
]

FORMAT_VERSION = 1
#: the file-name stem of shard ``k`` of ``n``: ``<name>.<k>-of-<n>``
_SHARD = re.compile(r"^(?P<name>.+)\.\d+-of-\d+$")
_RESUME = ".resume"
#: metadata kept out of the weights' header (timings vary; the file names and hashes
#: describe the bytes themselves)
_VOLATILE = ("train_seconds", "train_images_per_s", "file", "sha256", "shards")
#: safetensors header bytes reserved per tensor when packing shards (name, dtype,
#: shape, offsets), on top of the metadata
_HEADER_PER_TENSOR = 256


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _encode(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


def _state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, floating tensors in ``dtype``."""
    return {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
        for k, v in model.state_dict().items()
    }


def _pack(tensors: dict[str, torch.Tensor], header: dict[str, str], max_bytes: int) -> list[bytes]:
    """``tensors`` in order, split greedily into safetensors files under ``max_bytes``."""
    reserve = len(json.dumps(header)) + 64
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = reserve
    for key, value in tensors.items():
        need = value.numel() * value.element_size() + _HEADER_PER_TENSOR
        if reserve + need >= max_bytes:
            raise ValueError(f"tensor {key} ({need} bytes) does not fit a {max_bytes}-byte shard")
        if groups[-1] and size + need >= max_bytes:
            groups.append({})
            size = reserve
        groups[-1][key] = value
        size += need
    blobs = [_encode(g, header) for g in groups]
    if max(map(len, blobs)) >= max_bytes:
        raise RuntimeError(f"a shard reached {max_bytes} bytes: the header reserve is too small")
    return blobs


def save_teacher(
    model: nn.Module,
    out_dir: str | Path,
    name: str,
    meta: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``model``'s weights then ``<name>.json``, each atomically; returns the path
    :func:`load_teacher` takes (``<name>.safetensors``, or ``<name>.json`` for shards).

    ``dtype``: floating tensors are stored in it (``torch.float16`` halves the bytes);
    ``max_shard_bytes``: weights of that many bytes or more go into shards, each smaller.
    The metadata (without timings) is also in every weights file's header, so a kill
    between the writes loses nothing for a one-file teacher.
    """
    meta = {**meta, "saved_dtype": str(dtype).removeprefix("torch.")}
    kept = {k: v for k, v in meta.items() if k not in _VOLATILE}
    header = {"ckd_teacher": json.dumps(kept, sort_keys=True)}
    tensors = _state(model, dtype)
    out = Path(out_dir)
    blob = _encode(tensors, header)
    if max_shard_bytes is None or len(blob) < max_shard_bytes:
        blobs, files = [blob], [f"{name}.safetensors"]
    else:
        blobs = _pack(tensors, header, max_shard_bytes)
        files = [f"{name}.{k}-of-{len(blobs)}.safetensors" for k in range(1, len(blobs) + 1)]
    for file, part in zip(files, blobs, strict=True):
        atomic_write_bytes(out / file, part)
    meta["file"], meta["sha256"] = files[0], _sha256(b"".join(blobs))
    if len(blobs) > 1:
        meta["shards"] = [
            {"file": f, "sha256": _sha256(b)} for f, b in zip(files, blobs, strict=True)
        ]
    json_path = out / f"{name}.json"
    atomic_write_bytes(json_path, (json.dumps(meta, indent=2) + "\n").encode())
    return json_path if len(blobs) > 1 else out / files[0]


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (no tensor is read)."""
    if len(blob) < 8:
        raise ValueError("file too short for a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("truncated safetensors header")
    return dict(json.loads(blob[8 : 8 + size]).get("__metadata__") or {})


def _stem(path: str | Path) -> Path:
    """``<folder>/<name>`` of any of a teacher's files (or of the stem itself)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    if p.name.endswith(_RESUME):
        raise ValueError(f"{path} is the resume checkpoint of a teacher still in training")
    shard = _SHARD.match(p.name)
    return p.with_name(shard["name"]) if shard else p


def _rebuilt_meta(weights: Path, blob: bytes, meta_path: Path) -> dict[str, Any]:
    """The JSON of a one-file teacher whose JSON write was cut, from the weights' header."""
    try:
        kept = json.loads(_header_metadata(blob)["ckd_teacher"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{weights} is not a teacher saved by this package: {e}") from None
    meta = {**kept, "file": weights.name, "sha256": _sha256(blob)}
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _checked_blobs(stem: Path, meta: Mapping[str, Any]) -> list[bytes]:
    """The weights' bytes, file by file, each sha256 checked against ``meta``."""
    parts = meta.get("shards") or [{"file": meta["file"], "sha256": None}]
    blobs = []
    for part in parts:
        blob = (stem.parent / part["file"]).read_bytes()
        if part["sha256"] is not None and _sha256(blob) != part["sha256"]:
            raise ValueError(f"sha256 mismatch for shard {part['file']} of {stem}.json")
        blobs.append(blob)
    got = _sha256(b"".join(blobs))
    if got != meta.get("sha256"):
        raise ValueError(
            f"sha256 mismatch for {stem.parent / parts[0]['file']}: metadata says "
            f"{meta.get('sha256')}, file has {got}; the weights were modified or belong "
            "to another run"
        )
    return blobs


def load_teacher(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved teacher from any of its files (``.json``, ``.safetensors``, a shard)
    or their common stem; returns ``(float32 model in eval mode on device, metadata)``.

    Every file's sha256 and the sha256 of all the bytes are checked against the JSON
    first (``ValueError`` on a mismatch); the bytes already hashed are then read with
    safetensors (no pickle). A one-file teacher whose JSON is missing (a kill between
    the two writes) gets it rebuilt from the metadata in the weights' header.
    """
    from safetensors.torch import load

    stem = _stem(path)
    meta_path = stem.with_name(stem.name + ".json")
    weights = stem.with_name(stem.name + ".safetensors")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    elif weights.is_file():
        meta = _rebuilt_meta(weights, weights.read_bytes(), meta_path)
    else:
        raise FileNotFoundError(f"teacher file {path} not found (no {meta_path.name})")
    state: dict[str, torch.Tensor] = {}
    for blob in _checked_blobs(stem, meta):
        state.update(load(blob))
    dev = resolve_device(device)
    model = create_model(meta["arch"], int(meta["num_classes"]), int(meta.get("in_channels", 3)))
    model.load_state_dict(state, strict=True)  # copies (and casts) into float32 tensors
    model.to(dev)
    if dev.type == "cuda" and prefers_channels_last(dev, model):
        # torch's stubs lack Module.to(memory_format=...), which exists at runtime
        cast(Any, model).to(memory_format=torch.channels_last)
    model.eval()
    return model, meta


def find_teacher(folder: str | Path) -> Path | None:
    """The JSON of the first (by name) saved teacher in ``folder``; None if there is
    none (a resume checkpoint is not a saved teacher)."""
    found = sorted(p for p in Path(folder).glob("*.json") if not p.stem.endswith(_RESUME))
    return found[0] if found else None


def _resume_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    stem = Path(out_dir) / f"{name}{_RESUME}"
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_resume(
    out_dir: str | Path, name: str, tensors: Mapping[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Atomically write the resume checkpoint: ``tensors`` with ``state`` (JSON values) in
    the header, then a readable copy of ``state`` (the safetensors file is the truth)."""
    weights, readable = _resume_paths(out_dir, name)
    blob = _encode(tensors, {"ckd_resume": json.dumps(state, sort_keys=True)})
    atomic_write_bytes(weights, blob)
    text = json.dumps({**state, "sha256": _sha256(blob)}, indent=2) + "\n"
    atomic_write_bytes(readable, text.encode())


def load_resume(
    out_dir: str | Path, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, state)`` of ``name``'s resume checkpoint; None if there is none."""
    from safetensors.torch import load

    weights, _ = _resume_paths(out_dir, name)
    if not weights.is_file():
        return None
    blob = weights.read_bytes()
    try:
        state = json.loads(_header_metadata(blob)["ckd_resume"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{weights} is not a resume checkpoint of this package: {e}") from None
    return load(blob), state


def remove_resume(out_dir: str | Path, name: str) -> None:
    """Delete ``name``'s resume checkpoint (once the teacher is saved)."""
    for path in _resume_paths(out_dir, name):
        path.unlink(missing_ok=True)

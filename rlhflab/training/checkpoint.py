"""Atomic, verifiable checkpoints.

Layout: `OUT/checkpoints/step-000120/` with
  model.safetensors   the trained module's weights (safetensors: loading cannot run code); when some
                      parameters are frozen (LoRA) only the trainable ones: the frozen base is reloaded
                      from --model on resume, as it was at the start
  trainer_state.pt    optimizer, scheduler, RNG states, data position, recipe and monitor state;
                      loaded with `torch.load(weights_only=True)`, which refuses arbitrary pickles
  manifest.json       size and sha256 of each file, written last

A checkpoint is written into a hidden temporary folder, fsynced, then renamed: a crash or a full
disk mid-write leaves the previous checkpoints as they were. On resume a checkpoint whose
manifest does not verify is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhflab.errors import InputError
from rlhflab.training import hooks

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); earlier checkpoints are intact."""


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_weights(model, tmp / MODEL_FILE)
        torch.save(state, tmp / STATE_FILE)
        hooks.current().in_checkpoint(step)  # tests inject a kill or a full disk here
        manifest = {"step": step, "files": {}}
        for name in (MODEL_FILE, STATE_FILE):
            manifest["files"][name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            _fsync(tmp / name)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint {final}: {exc}") from exc
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trainable_names(model: torch.nn.Module) -> list[str] | None:
    """Names of the parameters that train, or None when all of them do (the whole model is checkpointed)."""
    named = list(model.named_parameters())
    trainable = [name for name, p in named if p.requires_grad]
    return None if len(trainable) == len(named) else trainable


def _save_weights(model: torch.nn.Module, file: Path) -> None:
    names = trainable_names(model)
    if names is None:
        save_model(model, str(file))
        return
    parameters = dict(model.named_parameters())
    save_file({name: parameters[name].detach().contiguous() for name in names}, str(file))


def _load_weights(model: torch.nn.Module, file: Path) -> None:
    """The weights of `_save_weights`: the whole model, or exactly its trainable parameters."""
    names = trainable_names(model)
    if names is None:
        load_model(model, str(file))
        return
    saved = load_file(str(file))
    if set(saved) != set(names):
        raise InputError("the checkpoint's weights are not this model's trainable parameters (another --model, "
                         "or other --lora-* settings?)", file=str(file))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor)


def list_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(out)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify_checkpoint(path: Path) -> str | None:
    """None when the manifest matches the files, else the reason it does not."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest is not valid JSON"
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_resume_checkpoint(out: Path, resume: str, warn: Any = print) -> Path | None:
    """`resume` = a checkpoint folder, or "auto": the newest checkpoint in `out` that verifies."""
    candidates = list_checkpoints(out) if resume == "auto" else [Path(resume)]
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    if resume != "auto":
        raise InputError("checkpoint does not verify", file=resume)
    return None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model` and return the trainer state. Refuses anything but plain tensors and containers."""
    _load_weights(model, path / MODEL_FILE)
    try:
        return torch.load(path / STATE_FILE, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise InputError(
            f"refused to load trainer state: it contains objects other than tensors and plain containers ({exc})",
            file=str(path / STATE_FILE),
        ) from None

"""Reference log-probs, computed once per (reference model, example) and reused everywhere.

DPO's reference model never changes, so log π_ref(y_c | x) and log π_ref(y_r | x) of a pair are
fixed numbers. They are computed the first time a batch needs them (in the first epoch, as each
batch arrives: no separate pass over data the run will never reach) and then read from here:

    key  = sha1(prompt ids, chosen ids, rejected ids)                  one per tokenized pair
    file = DIR/reference-logps-FINGERPRINT.json, DIR = OUT (resume) and CACHE/reference-logps (sharing)
    FINGERPRINT = sha256 of the reference's weights (names, dtypes, shapes, bytes)

The run folder's copy serves resume (the checkpoint carries the values too); the shared copy
serves every other run with the same reference weights and data (study arms, seeds, betas).
Values are float32 numbers stored exactly (a float32 is exact as a JSON double), so a cached
reference gives bit-for-bit the losses of a live one. Writes are atomic (temporary file, then
rename) and merge with what is already on disk, so concurrent runs only ever lose work, never
corrupt a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhflab.models.lora import base_state_dict


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (name, dtype, shape, raw bytes), first 16 hex digits.

    A LoRA policy's reference is its base (adapters off): the fingerprint is the base's, that of the plain model,
    so LoRA and full fine-tuning runs from one SFT model share the cached reference log-probs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(model).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def pair_key(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> str:
    """Identity of one tokenized pair (the text and the tokenizer both matter, so hash the ids)."""
    blob = json.dumps([list(prompt_ids), list(chosen_ids), list(rejected_ids)], separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()


class ReferenceCache:
    """key -> (log π_ref(chosen), log π_ref(rejected)), backed by JSON files."""

    def __init__(self, fingerprint: str, files: Iterable[Path] = ()):
        self.fingerprint = fingerprint
        self.files = [Path(f) for f in files]
        self.values: dict[str, tuple[float, float]] = {}
        self._dirty = False
        for file in self.files:
            self.values.update(self._read(file))

    def _read(self, file: Path) -> dict[str, tuple[float, float]]:
        if not file.exists():
            return {}
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a damaged cache only costs recomputation
        if data.get("fingerprint") != self.fingerprint:
            return {}
        return {k: (float(v[0]), float(v[1])) for k, v in data.get("logps", {}).items()}

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __len__(self) -> int:
        return len(self.values)

    def has_all(self, keys: Iterable[str]) -> bool:
        return all(k in self.values for k in keys)

    def lookup(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen, [B] rejected) float32 reference log-probs, in the order of `keys`."""
        pairs = torch.tensor([self.values[k] for k in keys], dtype=torch.float32)  # [B, 2]
        return pairs[:, 0], pairs[:, 1]

    def put(self, keys: Sequence[str], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        for key, c, r in zip(keys, chosen.float().tolist(), rejected.float().tolist(), strict=True):
            if key not in self.values:
                self.values[key] = (c, r)
                self._dirty = True

    def flush(self) -> None:
        """Write every backing file (merged with its current content) if anything new was computed."""
        if not self._dirty:
            return
        for file in self.files:
            merged = {**self._read(file), **self.values}
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            payload = {"fingerprint": self.fingerprint, "logps": {k: list(v) for k, v in merged.items()}}
            tmp.write_text(json.dumps(payload), encoding="utf-8")
            os.replace(tmp, file)
        self._dirty = False

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only (checkpoints load with weights_only=True)."""
        keys = sorted(self.values)
        logps = torch.tensor([self.values[k] for k in keys], dtype=torch.float32).reshape(-1, 2)
        return {"fingerprint": self.fingerprint, "keys": keys, "logps": logps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            return  # a checkpoint of another reference: recompute rather than mix
        for key, (c, r) in zip(state["keys"], state["logps"].tolist(), strict=True):
            self.values.setdefault(key, (float(c), float(r)))

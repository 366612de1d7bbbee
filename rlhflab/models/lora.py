"""LoRA via peft: low-rank adapters on a frozen model, the reference without a second copy, adapter folders.

    W x  ─►  W x + (α / r) · B A dropout(x)        A [r, in] random, B [out, r] zero: at the start the
                                                   adapted model computes exactly what the base computes

`add_lora` injects peft's LoRA layers into a transformers model in place (`peft.inject_adapter_in_model`), so
the model keeps its class (`LlamaForCausalLM` stays one): the packed forward's head-only path, the sampler's
static-cache decode (core/sampling.py reads the adapted weights) and the scalar head of reward and value models
see the structure they know. Only the adapters (and a scalar model's `score` head) require gradients, so the
training loop's optimizer holds only those.

    with adapters_disabled(model): ...      the base model, bit for bit: the reference of a LoRA run
    save_model(model, folder)               adapter_model.safetensors + adapter_config.json (PEFT's format:
                                            `PeftModel.from_pretrained(base, folder)` reads it) or a plain
                                            save_pretrained folder for a model without adapters
    load_adapter_folder(folder, load_base)  base (adapter_config's base_model_name_or_path) + adapter, merged

transformers' own PEFT integration (`model.add_adapter`) would do the same, but needs peft >= 0.22 in
transformers 5.x; the calls here work from peft 0.14 on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a reward model's adapter folder cannot hold in adapter_config.json: how it pools its scores.
SCALAR_SIDECAR = "rlhflab_scalar_model.json"

# Every linear projection of a Llama / Mistral / Qwen decoder layer (the LM head and embeddings stay frozen).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_targets(model: torch.nn.Module) -> list[str] | str:
    """The decoder's projections by their Llama names when the model has them, else peft's "all-linear"
    (every linear layer but the output layer)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in DEFAULT_TARGETS if t in names]
    return present or "all-linear"


def add_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str] | None = None,
             *, scalar_head: bool = False) -> torch.nn.Module:
    """Inject LoRA adapters of rank `r` into `model` in place; returns `model`.

    Everything but the adapters is frozen. `scalar_head`: a reward or value model, whose `score` head stays
    trainable and is saved with the adapter (peft's task_type SEQ_CLS, `modules_to_save`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules or []) or default_targets(model),
        task_type="SEQ_CLS" if scalar_head else "CAUSAL_LM", modules_to_save=["score"] if scalar_head else None,
        base_model_name_or_path=_base_path(model),
    )  # fmt: skip
    inject_adapter_in_model(config, model)
    return model


def _base_path(model: torch.nn.Module) -> str | None:
    """Where the base weights come from, absolute when local (the adapter folder is read from anywhere)."""
    name = getattr(model, "name_or_path", None) or None
    if name and Path(name).exists():
        return str(Path(name).resolve())
    return name


def lora_from_config(model: torch.nn.Module, cfg: Any, *, scalar_head: bool = False) -> torch.nn.Module:
    """`add_lora` with a run config's `lora_*` fields; the model unchanged when `cfg.lora_r` is 0."""
    if not cfg.lora_r:
        return model
    return add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                    scalar_head=scalar_head)


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model: torch.nn.Module | None) -> bool:
    """Whether peft adapters are injected into `model`."""
    return model is not None and hasattr(model, "peft_config") and bool(_tuner_layers(model))


@contextmanager
def adapters_disabled(model: torch.nn.Module | None) -> Iterator[None]:
    """Inside: `model` computes as its base model, bit for bit (peft's layers call only their base layer), in
    eval mode. A model without adapters is left as it is, so a separate reference model passes through."""
    if not has_adapters(model):
        yield
        return
    layers, was_training = _tuner_layers(model), model.training
    model.eval()
    for layer in layers:  # what PeftModel.disable_adapter() does, on the model itself
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.train(was_training)


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under their own names (a model without adapters: its state dict).

    peft renames an adapted `x.weight` to `x.base_layer.weight` and adds `lora_*` tensors; this undoes both, so
    a LoRA run's reference has the fingerprint of the plain model it was built on (algorithms/reference_cache.py).
    """
    state = model.state_dict()
    if not has_adapters(model):
        return state
    base = {}
    for name, tensor in state.items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        base[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return base


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    """`model` into `folder`: its adapter in PEFT's format when it has one, else `save_pretrained` (safetensors).

    The adapter folder is what `PeftModel.save_pretrained` writes: adapter_model.safetensors (keys
    `base_model.model.<name>`) and adapter_config.json, whose base_model_name_or_path names the base; a
    reward model's score pooling goes beside it (SCALAR_SIDECAR)."""
    folder = Path(folder)
    if not has_adapters(model):
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name="default", save_embedding_layers=False)  # never targeted
    save_file({f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()},
              str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(folder))
    pooling = getattr(model.config, "score_pooling", None)
    if pooling is not None:
        (folder / SCALAR_SIDECAR).write_text(json.dumps({"score_pooling": pooling}))
    return folder


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (its adapter_config's base_model_name_or_path)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(path) / ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def load_adapter_folder(path: str | Path, load_base: Callable[[str], torch.nn.Module]) -> torch.nn.Module:
    """The base model (`load_base(adapter_base(path))`, itself possibly an adapter folder) with the adapter
    merged in: a plain transformers model (`PeftModel.from_pretrained`, then `merge_and_unload`).

    Merged, W' = W + (α/r)·B A differs from the adapted forward (W x + (α/r)·B(A x)) by float rounding only.
    Its `name_or_path` is the adapter folder, so an adapter trained on top of it names this folder as its base.
    """
    from peft import PeftModel

    base = load_base(adapter_base(path))
    merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    merged.name_or_path = str(Path(path).resolve())
    sidecar = Path(path) / SCALAR_SIDECAR
    if sidecar.is_file():
        merged.config.score_pooling = json.loads(sidecar.read_text())["score_pooling"]
    return merged

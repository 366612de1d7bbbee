"""Every model is a `transformers` model: causal LMs for policies, a scalar head for reward and value.

The embedded default is a tiny Llama built from a config. Weights load only from safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhflab.errors import InputError
from rlhflab.models import lora

# hidden, layers, heads, MLP width. tiny ≈ 1M parameters (tests); small ≈ 3M (the demo).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 640},
}


def build_model(preset: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = 256) -> LlamaForCausalLM:
    """A freshly initialised Llama of the given size preset, with the tokenizer's special ids."""
    if preset not in PRESETS:
        raise InputError(f"unknown model preset '{preset}' (valid: {', '.join(PRESETS)})", field="preset")
    dims = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        num_key_value_heads=dims["num_attention_heads"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
        **dims,
    )
    return LlamaForCausalLM(config)


def _check_source(path: str) -> None:
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise InputError("a model must be a save_pretrained folder", file=path)
        if not any(local.glob("*.safetensors")):
            raise InputError(
                "no .safetensors weights in this folder; rlhflab loads weights only from safetensors "
                "(pickle-based .bin files can run code when loaded)",
                file=path,
            )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise InputError(f"cannot load a tokenizer: {exc}", file=path) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos: masks never count padding, see data.collate
    return tokenizer


def load_causal_lm(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM from a save_pretrained folder or hub id; from a LoRA adapter folder (adapter_config.json):
    its base with the adapter merged (`models.lora.load_adapter_folder`)."""
    _check_source(path)
    if lora.is_adapter_folder(path):
        return _load_adapter(path, lambda base: load_causal_lm(base, trust_remote_code, dtype))
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a causal LM: {exc}", file=path) from None


def load_scalar_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A model with one scalar output per token (reward or value model): `AutoModelForSequenceClassification`.

    From a causal-LM folder the backbone is loaded and the scalar head (`score`) starts at zero, so
    a fresh value model predicts 0 everywhere (reward-model training draws its own head, seeded).
    """
    _check_source(path)
    if lora.is_adapter_folder(path):  # the base's head is replaced by the adapter folder's trained `score`
        return _load_adapter(path, lambda base: load_scalar_model(base, trust_remote_code, dtype))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a reward/value model: {exc}", file=path) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if not _is_scalar_folder(path):
        torch.nn.init.zeros_(model.score.weight)
    return model


def _load_adapter(path: str, load_base) -> PreTrainedModel:
    try:
        return lora.load_adapter_folder(path, load_base)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load a LoRA adapter folder: {exc}", file=path) from None


def _is_scalar_folder(path: str) -> bool:
    """True when the folder was saved from a sequence-classification model (its head is trained)."""
    import json

    config_file = Path(path) / "config.json"
    if not config_file.exists():
        return False
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)

"""Every model is a `transformers` model: causal LMs for policies, a scalar head for reward and value.

The embedded default is a tiny Llama built from a config. Weights load only from safetensors.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhflab.data.collate import template_end_token
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


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token at which generation ends (sorted): the tokenizer's EOS, the chat template's end-of-turn token
    (`data.collate.template_end_token`, the token the collator ends conversational completions with) and each id
    of the model folder's `generation_config.eos_token_id` (an int or a list, e.g. Llama 3's [eot, eos])."""
    stops = {tokenizer.eos_token_id, template_end_token(tokenizer)}
    stops.update(_generation_eos_ids(str(getattr(tokenizer, "name_or_path", "") or "")))
    return sorted(i for i in stops if i is not None)


def decode_completion(tokenizer: PreTrainedTokenizerBase, ids: list[int], stops: list[int]) -> str:
    """A sampled completion's text, without the stop token that ended it (the sampler stops at the first)."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids)


def _generation_eos_ids(source: str) -> list[int]:
    """`eos_token_id` of the generation config beside the tokenizer (a local folder's file, else the hub's)."""
    if not source:
        return []
    local = Path(source)
    if local.is_dir():
        file = local / "generation_config.json"
        ids = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    elif local.exists():
        return []
    else:
        ids = _hub_generation_eos(source)
    return [ids] if isinstance(ids, int) else list(ids or [])


@lru_cache(maxsize=16)
def _hub_generation_eos(hub_id: str) -> int | list[int] | None:
    try:
        return GenerationConfig.from_pretrained(hub_id).eos_token_id
    except (OSError, ValueError):  # no generation config there (or offline): the other stop tokens remain
        return None


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

"""A randomly initialised tiny Llama for tests of the core (log-probs, packing, sampling)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0, **config) -> LlamaForCausalLM:
    """2 layers, width 64, vocabulary 64, in eval mode; `config` overrides any LlamaConfig field."""
    torch.manual_seed(seed)
    defaults = {"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "intermediate_size": 128, "max_position_embeddings": 256}  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**{**defaults, **config}))
    model.set_attn_implementation(attn_implementation)
    return model.eval()

"""Gradient checkpointing: keep fewer activations for the backward, recompute the rest.

With `--gradient-checkpointing` every decoder layer of a transformers model keeps only its input during the
forward and recomputes its activations in the backward (transformers' own checkpointing, non-reentrant, so
it works when a recipe calls the backbone and the LM head separately, and under DDP). Activation memory
falls from every op of every layer to one tensor per layer boundary, for about one more forward of compute.
The gradients are those of the plain backward (tests/test_invariants.py).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on checkpointing in every transformers model inside `model` (a policy, or PPO's policy + value)."""
    for module in model.modules():
        if not (isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing):
            continue
        if hasattr(module, "activation_checkpointing_enable"):  # its name since transformers 5.x
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

"""Precision: fp32, or bf16 mixed precision as TRL's `bf16=True` runs it.

    with mixed_precision(cfg.precision, model):   # the loop wraps plan_step and every loss forward
        ...                                        # matmuls (and their backward) in bf16; norms, reductions in fp32
    reference = freeze(reference, cfg.precision)   # frozen models: Linear weights stored in bf16 once

Weights, gradients, optimizer state and checkpoints stay fp32 in both precisions.
"""

from __future__ import annotations

import contextlib

import torch


def mixed_precision(precision: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A context for forwards: bf16 autocast (matmuls in bf16, fp32 weights and reductions) or nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


def bf16_is_emulated(device: torch.device) -> bool:
    """A CPU without bf16 instructions (avx512_bf16, AMX) emulates bf16 matmuls: slower than fp32."""
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return bool(checks) and not any(check() for check in checks)  # a torch without these checks: unknown, no claim


def freeze(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A frozen model (reference, reward model) in eval mode, without gradients.

    Under bf16 its Linear weights are stored in bf16 once: autocast would round them to the same
    bf16 values on every forward, so the outputs are bit-identical and the cast (~45 ms a step for
    a 30M reference) is gone. Embeddings, norms and weights tied to the embedding stay fp32.
    """
    model.eval().requires_grad_(False)
    if precision == "bf16":
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) not in embeddings:
                module.to(torch.bfloat16)
    return model

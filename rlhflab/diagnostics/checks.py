"""One-off self-checks run on the first batch of a run (they stop the run when they fail)."""

from __future__ import annotations

import torch

from rlhflab.diagnostics.findings import Finding


def check_response_mask(input_ids: torch.Tensor, response_mask: torch.Tensor, expected_tokens: int,
                        render: str = "") -> Finding | None:
    """`logps.mask_mismatch`: the tokens the log-prob code will count (response_mask[:, 1:], shifted
    with the labels) must equal the response tokens the collator says it built."""
    counted = int(response_mask[:, 1:].sum().item())
    if counted == expected_tokens:
        return None
    return Finding(
        0,
        "logps.mask_mismatch",
        "error",
        f"the log-prob mask counts {counted} response tokens but the collator built {expected_tokens}; "
        "the loss would be computed on the wrong tokens (prompt tokens or padding).\n" + render,
        "A response token at position 0 (no prompt and no BOS) cannot be predicted; give every "
        "example a prompt or a BOS token, and check that padding is not marked as response.",
    )

"""One-off self-checks run on the first batch of a run (they stop the run when they fail).

`logps.mask_mismatch` runs on the first micro-batch of every training command: padded batches (SFT,
pretrain: `check_response_mask`) and packed rows (DPO, reward model, PPO, GRPO: `check_packed_mask`).
It is the check that catches a label-shift or response-mask bug shared by the policy and the reference,
which the DPO step-0 check (`dpo.start_not_ln2`) cannot see: such a bug cancels in log π − log π_ref.
"""

from __future__ import annotations

import torch

from rlhflab.core.packing import PackedBatch
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


def check_packed_mask(packed: PackedBatch, groups: list[tuple[list[int], list[list[int]]]]) -> Finding | None:
    """`logps.mask_mismatch` for packed rows (DPO, reward model, PPO, GRPO): the tokens the log-prob code
    scores are exactly the groups' completion tokens, each predicted with the label shift applied.

    `groups`: the (prompt ids, [completion ids, ...]) the packer was given. Every completion token must be
    a target once (`target_ids`, by `sequence_index` / `token_position`); the position that predicts it
    (`logit_index`) must hold the token just before it (the prompt's last for the first token, else the
    previous completion token) at the position id that token has in its own unpadded row; a token laid
    out in a row (`token_index`) must sit there as itself.
    """
    sequences = [(prompt, completion) for prompt, completions in groups for completion in completions]
    flat_ids, flat_positions = packed.input_ids.flatten().tolist(), packed.position_ids.flatten().tolist()
    columns = zip(packed.target_ids.tolist(), packed.sequence_index.tolist(), packed.token_position.tolist(),
                  packed.logit_index.tolist(), packed.token_index.tolist(), strict=True)
    problem, seen = None, set()
    for target, seq, i, at, own in columns:
        prompt, completion = sequences[seq]
        before, position = (prompt[-1] if i == 0 else completion[i - 1]), len(prompt) + i - 1
        if i >= len(completion) or target != completion[i] or (seq, i) in seen:
            problem = f"completion {seq} is scored at token {i} as id {target}, which is not its token {i}"
        elif flat_ids[at] != before or flat_positions[at] != position:
            problem = (f"token {i} of completion {seq} is predicted from id {flat_ids[at]} at position "
                       f"{flat_positions[at]}, not from id {before} at position {position}")
        elif own >= 0 and flat_ids[own] != target:
            problem = f"token {i} of completion {seq} is laid out as id {flat_ids[own]}, not {target}"
        if problem:
            break
        seen.add((seq, i))
    built = sum(len(completion) for _, completion in sequences)
    if problem is None and len(seen) != built:
        problem = f"the log-prob code scores {len(seen)} completion tokens but the packer was given {built}"
    if problem is None:
        return None
    return Finding(
        0,
        "logps.mask_mismatch",
        "error",
        f"packed rows: {problem}; the loss would be computed on the wrong tokens (label shift or response mask).",
        "The packer (core/packing.py) and the log-prob gather disagree; a prompt must have at least one token "
        "(a BOS) to predict the first completion token.",
    )

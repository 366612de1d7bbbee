"""Supervised fine-tuning (and pretraining): maximise log p(completion | prompt).

    batch of (prompt, completion) ─► one padded forward ─► −Σ log p(completion tokens incl. EOS)
                                                          ÷ completion tokens of the whole step

The loss covers completion tokens only (the collator's response mask); pretraining is the same
recipe on documents whose prompt is just the BOS token, so every document token is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhflab.config import RunConfig, opt, size_opt
from rlhflab.core.causal_lm import padded_response_logps
from rlhflab.data.collate import TokenizedExample, collate_sequences, render_mask
from rlhflab.diagnostics.checks import check_response_mask
from rlhflab.models.lora import lora_from_config
from rlhflab.training import timing
from rlhflab.training.data_order import EpochSampler, split_micro_batches
from rlhflab.training.loop import StepPlan, TrainingStopped, emit_finding, save_final_model, start_run, train


@dataclass
class SFTConfig(RunConfig):
    lr: float = 1e-3
    max_steps: int = 150
    batch_size: int = 32
    max_prompt_tokens: int | None = size_opt("max_prompt_tokens", "longer prompts keep their last tokens (counted in a warning)")
    max_completion_tokens: int | None = size_opt("max_completion_tokens", "longer completions are cut (and then have no EOS)")
    num_examples: int = opt(8000, "built-in tasks: how many SFT examples to generate", minimum=1)


class SFTRecipe:
    """Next-token loss on the response tokens of padded batches."""

    def __init__(self, model: torch.nn.Module, examples: list[TokenizedExample], cfg: SFTConfig,
                 pad_token_id: int, tokenizer: Any = None):
        self.model = model
        self.examples = examples
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        self.sampler = EpochSampler(len(examples), cfg.seed)
        self.updates_per_step = 1
        self._checked_mask = False

    def plan_step(self, step: int) -> StepPlan:
        indices = self.sampler.take(self.cfg.batch_size)
        micro_batches = []
        for chunk in split_micro_batches(indices, self.cfg.grad_accum):
            batch = collate_sequences([self.examples[i] for i in chunk], self.pad_token_id)
            batch["num_items"] = batch["num_response_tokens"]
            micro_batches.append(batch)
        if not self._checked_mask:
            self._check_mask(micro_batches[0])
        return StepPlan([micro_batches], num_tokens=sum(int(mb["attention_mask"].sum()) for mb in micro_batches))

    def _check_mask(self, batch: dict[str, Any]) -> None:
        self._checked_mask = True
        render = render_mask(self.tokenizer, batch["input_ids"][0], batch["response_mask"][0]) if self.tokenizer else ""
        finding = check_response_mask(batch["input_ids"], batch["response_mask"], batch["num_response_tokens"], render)
        if finding is not None:
            emit_finding(self.cfg.out, finding)
            raise TrainingStopped(finding.message, 3)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        timing.count_flops(self.model, int(batch["attention_mask"].sum()), backward=True)  # real tokens, not padding
        # The LM head runs only on response positions, in chunks: no [B, T, V] logits (core/causal_lm.py).
        scored = padded_response_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                       with_argmax=True)  # [B, T-1] each, label frame  # fmt: skip
        nll = -scored.token_logps.sum()
        accuracy = scored.target_is_argmax.sum().item() / max(int(scored.mask.sum()), 1)
        return nll, {"mean_token_accuracy": accuracy}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def run_sft(cfg: SFTConfig, model: torch.nn.Module, tokenizer: Any, examples: list[TokenizedExample]):
    """Train `model` on tokenized examples into `cfg.out`; returns the saved model folder."""
    out = start_run(cfg)
    model = lora_from_config(model, cfg)  # after the run's seeding: the adapters' initialisation is the seed's
    recipe = SFTRecipe(model, examples, cfg, tokenizer.pad_token_id, tokenizer)
    train(cfg, recipe)
    return save_final_model(model, tokenizer, out)

"""Bradley-Terry reward model: P(chosen ≻ rejected) = σ(r(x, y_c) − r(x, y_r)).

    pairs ─► packed rows [prompt | chosen | rejected] (the prompt once, chosen hidden from rejected)
          ─► a scalar per token ─► r(x, y): their mean over the response ("mean") or the one at its
          last token ("last") ─► loss = −log σ(r_c − r_r), summed ÷ pairs of the step

The model is the policy's backbone with a scalar head (`AutoModelForSequenceClassification`),
so it shares the tokenizer and loads straight back into transformers; the pooling is saved in its
config (`score_pooling`) and every scorer in rlhflab reads it (`models.scoring.reward_model_scores`
scores padded batches the same way, to float rounding: tested). Held-out pairwise accuracy is the
recipe's `evaluate()`, which the loop calls (`eval/accuracy`, `eval/margin` on the metrics line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhflab.config import RunConfig, opt, size_opt
from rlhflab.core.causal_lm import attention_break_even
from rlhflab.core.losses import bradley_terry_loss
from rlhflab.core.packing import PackedBatch, mask_for, to_padded
from rlhflab.data.collate import Pair, pack_pairs, pair_groups
from rlhflab.models.lora import lora_from_config
from rlhflab.models.scoring import pool_scores, score_pooling, token_scores
from rlhflab.training import timing
from rlhflab.training.checks import stop_on_mask_mismatch
from rlhflab.training.data_order import EpochSampler, split_micro_batches
from rlhflab.training.loop import StepPlan, save_final_model, start_run, train


@dataclass
class RewardModelConfig(RunConfig):
    lr: float = 1e-3
    max_steps: int = 400
    batch_size: int = opt(32, "pairs per step", minimum=1)
    warmup_ratio: float = 0.02
    max_grad_norm: float = 0.0  # unclipped: the Bradley-Terry loss is bounded and clipping slowed it (docs/notes.md)
    pooling: Literal["mean", "last"] = opt(
        "mean", "score pooling over response tokens: mean (more accurate here, docs/notes.md) | last (transformers')")
    max_prompt_tokens: int | None = size_opt("max_prompt_tokens", "longer prompts keep their last tokens")
    max_completion_tokens: int | None = size_opt("max_completion_tokens", "longer responses are cut (and have no EOS)")
    max_row_tokens: int | None = size_opt("max_row_tokens", "packed row budget (attention is quadratic in it)",
                                          minimum=2)
    eval_fraction: float = opt(0.1, "held-out share of the pairs, for pairwise accuracy", minimum=0.0, maximum=1.0)


def pair_scores(model: torch.nn.Module, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y_c), r(x, y_r) of each packed pair: [B] each, pooled as `score_pooling(model)` says."""
    scores = token_scores(model, packed.input_ids, mask_for(model, packed), packed.position_ids).reshape(-1)  # [R*L]
    per_token, response_mask = to_padded(scores[packed.token_index], packed)  # [2B, T] each, left-aligned
    rewards = pool_scores(per_token, response_mask, score_pooling(model))  # [2B]
    return rewards[0::2], rewards[1::2]


class RewardModelRecipe:
    progress_metrics = ("loss", "accuracy")  # shown beside the progress bar

    def __init__(self, model: torch.nn.Module, pairs: list[Pair], cfg: RewardModelConfig, pad_token_id: int,
                 eval_pairs: list[Pair] | None = None):
        self.model = model
        self.pairs = pairs
        self.eval_pairs = eval_pairs or []
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.sampler = EpochSampler(len(pairs), cfg.seed)
        self.break_even = attention_break_even(model)  # weighs attention in the row layout (pack_groups)
        self.updates_per_step = 1
        self._checked_mask = False

    def plan_step(self, step: int) -> StepPlan:
        chunks = split_micro_batches(self.sampler.take(self.cfg.batch_size), self.cfg.grad_accum)
        micro_batches = [{"packed": pack_pairs([self.pairs[i] for i in c], self.cfg.max_row_tokens, self.pad_token_id,
                                               attention_break_even=self.break_even),
                          "num_items": len(c)} for c in chunks]
        if not self._checked_mask:  # logps.mask_mismatch on the run's first micro-batch
            self._checked_mask = True
            stop_on_mask_mismatch(self.cfg.out, micro_batches[0]["packed"], pair_groups([self.pairs[i] for i in chunks[0]]))
        return StepPlan([micro_batches], num_tokens=sum(mb["packed"].num_tokens for mb in micro_batches))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        timing.count_flops(self.model, batch["packed"].num_tokens, backward=True)
        chosen, rejected = pair_scores(self.model, batch["packed"])
        losses = bradley_terry_loss(chosen, rejected)  # [B]
        with torch.no_grad():
            both = torch.cat([chosen, rejected])
            metrics = {
                "accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).mean().item(),
                "rewards/chosen": chosen.mean().item(),
                "rewards/rejected": rejected.mean().item(),
                "reward_mean": both.mean().item(),
                "reward_std": both.std().item() if both.numel() > 1 else 0.0,
            }
        return losses.sum(), metrics

    @torch.no_grad()
    def evaluate(self, chunk: int = 64) -> dict[str, float]:
        """Held-out pairwise accuracy (r_c > r_r) and mean margin r_c − r_r with the current model."""
        if not self.eval_pairs:
            return {}
        was_training = self.model.training
        self.model.eval()
        margins = []
        for start in range(0, len(self.eval_pairs), chunk):
            packed = pack_pairs(self.eval_pairs[start : start + chunk], self.cfg.max_row_tokens, self.pad_token_id,
                                attention_break_even=self.break_even)
            timing.count_flops(self.model, packed.num_tokens)
            chosen, rejected = pair_scores(self.model, packed)
            margins.append(chosen - rejected)
        self.model.train(was_training)
        margin = torch.cat(margins)
        return {"eval/accuracy": (margin > 0).float().mean().item(), "eval/margin": margin.mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def run_reward_model(cfg: RewardModelConfig, model: torch.nn.Module, tokenizer: Any, pairs: list[Pair]) -> Path:
    """Train on all but `eval_fraction` of the pairs; save the model. Held-out accuracy: `evaluate()`."""
    start_run(cfg)
    model.config.score_pooling = cfg.pooling  # saved with the model: every scorer pools the same way
    if not model.score.weight.any():
        # A zero head passes no gradient to the backbone (∂loss/∂hidden = w) until the head itself has grown:
        # that held the reward model at loss ln 2 for ~120 of its 300 steps (docs/notes.md). Seeded: same run, same head.
        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            model.score.weight.normal_(0.0, model.score.weight.shape[-1] ** -0.5, generator=generator)
    # LoRA after the head is drawn: the adapter folder saves the trained head whole (peft's modules_to_save)
    model = lora_from_config(model, cfg, scalar_head=True)
    n_eval = max(1, int(len(pairs) * cfg.eval_fraction)) if len(pairs) > 1 else 0
    recipe = RewardModelRecipe(model, pairs[n_eval:], cfg, tokenizer.pad_token_id, pairs[:n_eval])
    train(cfg, recipe)
    model.config.architectures = [type(model).__name__]
    return save_final_model(model, tokenizer, cfg.out)

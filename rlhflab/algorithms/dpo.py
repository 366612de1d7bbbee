"""Direct Preference Optimization (Rafailov et al. 2023) and its TRL loss variants.

    h_c = log π(y_c|x) − log π_ref(y_c|x),  h_r likewise;  loss = −log σ(β (h_c − h_r))   (sigmoid)

log Z(x) cancels in h_c − h_r, so there is no reward model, value function or rollout: one
binary cross-entropy over preference pairs. Per step:

    pairs ─► pack: [ prompt | chosen | rejected ] per pair, pairs first-fit into rows ≤ max_row_tokens
          ─► reference log-probs: cache hit, or one no-grad packed forward (then cached; see reference_cache)
          ─► policy: one packed forward ─► per-pair log π(y_c|x), log π(y_r|x)   [B] each
          ─► core.losses ─► Σ losses (÷ pairs of the step, by the loop) ─► TRL's metrics

The prompt is computed once per pair (chosen and rejected attend to it but not to each other,
positions restart after it: core/packing.py) and there is no padding except at row ends (rows
are balanced), so a pair costs |x| + |y_c| + |y_r| − 2 tokens (each response's last token is only
a target) where a padded two-row batch costs 2 · max(|x| + |y|). The LM head runs only on the
positions that predict a response token.
The reference model is freed as soon as every pair the run will visit is cached. With LoRA (`--lora-r`) the
reference is the policy itself with its adapters off (models/lora.py): no second copy. The reference-free
losses (`simpo`, `orpo`: core/losses.py) use no reference at all. Held-out metrics are the recipe's
`evaluate()`, which the loop calls every `eval_every` steps and after the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhflab.algorithms.reference_cache import ReferenceCache, pair_key, weights_fingerprint
from rlhflab.config import RunConfig, opt, size_opt
from rlhflab.core.causal_lm import attention_break_even
from rlhflab.core.losses import dpo_loss, orpo_loss, simpo_loss
from rlhflab.core.packing import PackedBatch, packed_forward
from rlhflab.data.collate import Pair, pack_pairs, pair_groups
from rlhflab.diagnostics.dpo import (
    TOLERANCES,
    ChosenLogpsFallingMonitor,
    MarginExplosionMonitor,
    OverfitMonitor,
    StartCheckMonitor,
)
from rlhflab.diagnostics.findings import Monitor
from rlhflab.models.lora import adapters_disabled, has_adapters, lora_from_config
from rlhflab.training import timing
from rlhflab.training.checks import stop_on_mask_mismatch
from rlhflab.training.data_order import EpochSampler, split_micro_batches
from rlhflab.training.loop import StepPlan, save_final_model, start_run, train
from rlhflab.training.precision import freeze, mixed_precision

REFERENCE_FREE = ("simpo", "orpo")  # loss types on the policy's length-normalised log-probs alone


@dataclass
class DPOConfig(RunConfig):
    lr: float = 1e-4
    max_steps: int = 150
    batch_size: int = opt(16, "preference pairs per optimizer step", minimum=1)
    beta: float = opt(0.1, "β: rewards are β·log(π/π_ref); larger keeps the policy closer to the reference", minimum=0.0)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                       "apo_down", "simpo", "orpo"] = opt(
        "sigmoid", "DPO-family loss, TRL's names (core/losses.py); simpo and orpo need no reference")
    label_smoothing: float = opt(0.0, "ε of conservative DPO (sigmoid), robust and exo_pair", minimum=0.0, maximum=1.0)
    sft_weight: float = opt(0.0, "adds sft_weight × mean NLL per token of the chosen response (RPO; TRL's rpo_alpha)",
                            minimum=0.0)
    simpo_gamma: float = opt(0.5, "γ of loss_type simpo: the target margin (TRL's CPOConfig.simpo_gamma)")
    max_prompt_tokens: int | None = size_opt("max_prompt_tokens", "longer prompts keep their last tokens")
    max_completion_tokens: int | None = size_opt("max_completion_tokens", "longer responses are cut (and have no EOS)")
    max_row_tokens: int | None = size_opt(
        "max_row_tokens", "packed row budget; attention is quadratic in it, so keep it a few pairs long", minimum=2)
    live_reference: bool = opt(False, "keep the reference model and recompute its log-probs every step")
    share_reference_cache: bool = opt(True, "also read/write CACHE/reference-logps/ (shared by runs of one reference)")
    eval_fraction: float = opt(0.05, "held-out share of the pairs, for implicit-reward accuracy", minimum=0.0,
                               maximum=1.0)
    eval_every: int = 25
    max_margin: float = opt(10.0, "dpo.margin_explosion: healthy mean margin upper bound")
    explosion_max_loss: float = opt(0.05, "... and it fires only while the loss is below this")
    explosion_min_accuracy: float = opt(0.95, "... and train accuracy at least this", minimum=0.0, maximum=1.0)
    monitor_window: int = opt(10, "steps averaged by the margin and overfit monitors", minimum=1)


def pair_logps(model: torch.nn.Module, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(y_c|x), log π(y_r|x): [B] each, from one packed forward."""
    logps = packed_forward(model, packed).sequence_logps  # [2B], chosen/rejected interleaved
    return logps[0::2], logps[1::2]


def wins(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, batch: dict[str, Any], beta: float,
         precision: str = "fp32") -> torch.Tensor:  # fmt: skip
    """Pairs ranked right: β(h_c − h_r) > β·noise·(|ref_c| + |ref_r|), i.e. beyond rounding noise.

    A reference cached from another batch composition can differ from a live forward by the rounding
    `TOLERANCES[precision].logp`. TRL counts any positive margin; here a margin inside that noise is a
    tie, so a policy equal to its reference scores accuracy 0 whichever way its reference was computed.
    A reference-free loss has no reference to round: any positive margin wins.
    """
    if "ref_chosen" not in batch:
        return chosen_rewards > rejected_rewards
    reference = (batch["ref_chosen"].abs() + batch["ref_rejected"].abs()).clamp(min=1.0)
    return (chosen_rewards - rejected_rewards) > beta * TOLERANCES[precision].logp * reference


class DPORecipe:
    """Packed pairs, cached reference log-probs, one of TRL's DPO losses (or a reference-free one)."""

    progress_metrics = ("loss", "rewards/accuracies")  # shown beside the progress bar

    def __init__(self, model: torch.nn.Module, pairs: list[Pair], cfg: DPOConfig, pad_token_id: int,
                 load_reference: Callable[[], torch.nn.Module], eval_pairs: list[Pair] | None = None,
                 cache_dirs: list[Path] | None = None):  # fmt: skip
        self.model, self.pairs, self.eval_pairs = model, pairs, eval_pairs or []
        self.cfg, self.pad_token_id, self.updates_per_step = cfg, pad_token_id, 1
        self.sampler = EpochSampler(len(pairs), cfg.seed)
        self.break_even = attention_break_even(model)  # weighs attention in the row layout (pack_groups)
        self.reference_free = cfg.loss_type in REFERENCE_FREE
        self.keys = [pair_key(c.prompt_ids, c.completion_ids, r.completion_ids) for c, r in pairs]
        self.eval_keys = [pair_key(c.prompt_ids, c.completion_ids, r.completion_ids) for c, r in self.eval_pairs]
        # policy == reference at construction (before a resume loads trained weights): fingerprint it now.
        # bf16 log-probs differ from fp32 ones by more than the step-0 check allows: cached apart.
        fingerprint = "" if self.reference_free else weights_fingerprint(model) + (
            "" if cfg.precision == "fp32" else f"-{cfg.precision}")
        files = [] if self.reference_free else [Path(d) / f"reference-logps-{fingerprint}.json" for d in cache_dirs or []]
        self.cache = ReferenceCache(fingerprint, files)
        self._load_reference = None if self.reference_free else load_reference
        self.reference: torch.nn.Module | None = None
        self._pending: set[str] | None = None  # keys the run will still visit that are not cached
        self._checked_mask = False

    # ── reference log-probs ──────────────────────────────────────────────────────────────
    def _reference_model(self) -> torch.nn.Module:
        if has_adapters(self.model):  # LoRA: the policy, run inside adapters_disabled
            return self.model
        if self.reference is None:
            if self._load_reference is None:
                raise RuntimeError("the reference model was freed but a pair is not cached")
            self.reference = freeze(self._load_reference(), self.cfg.precision)
        return self.reference

    def _future_keys(self, step: int) -> set[str]:
        """Keys of every pair the remaining steps will visit (a replay of the sampler) and the eval pairs."""
        replay = EpochSampler(len(self.pairs), self.cfg.seed)
        replay.load_state_dict(self.sampler.state_dict())
        visits = replay.take(max(self.cfg.max_steps - step, 0) * self.cfg.batch_size)
        return {self.keys[i] for i in visits} | set(self.eval_keys)

    @torch.no_grad()
    def reference_logps(self, keys: list[str], packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log π_ref of each pair: from the cache, else one no-grad packed forward (then cached)."""
        if not self.cfg.live_reference and self.cache.has_all(keys):
            return self.cache.lookup(keys)
        with timing.phase("reference"):  # loading the reference, the first time, included
            reference = self._reference_model()
            timing.count_flops(reference, packed.num_tokens)
            with adapters_disabled(reference):
                chosen, rejected = pair_logps(reference, packed)
        if self.cfg.live_reference:
            return chosen, rejected
        self.cache.put(keys, chosen, rejected)
        if self._pending is not None:
            self._pending.difference_update(keys)
            if not self._pending:
                self.free_reference()
        return self.cache.lookup(keys)

    def free_reference(self) -> None:
        """Every pair the run will visit is cached: drop the reference model for good."""
        self.cache.flush()
        self.reference = None
        self._load_reference = None

    def _batch(self, pairs: list[Pair], keys: list[str]) -> dict[str, Any]:
        """Packed pairs and, unless the loss is reference-free, their reference log-probs."""
        packed = pack_pairs(pairs, self.cfg.max_row_tokens, self.pad_token_id, trim_final_tokens=True,
                            attention_break_even=self.break_even)
        batch = {"packed": packed, "num_items": len(pairs)}
        if not self.reference_free:
            batch["ref_chosen"], batch["ref_rejected"] = self.reference_logps(keys, packed)
        return batch

    def _eval_batches(self, chunk: int = 64) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.eval_pairs), chunk):
            yield self._batch(self.eval_pairs[start : start + chunk], self.eval_keys[start : start + chunk])

    # ── one step ─────────────────────────────────────────────────────────────────────────
    def plan_step(self, step: int) -> StepPlan:
        if self._pending is None and not self.cfg.live_reference and not self.reference_free:
            self._pending = {k for k in self._future_keys(step) if k not in self.cache}
            list(self._eval_batches())  # the held-out pairs' reference log-probs now, while the reference is loaded
            if not self._pending:
                self.free_reference()
        chunks = split_micro_batches(self.sampler.take(self.cfg.batch_size), self.cfg.grad_accum)
        micro_batches = [self._batch([self.pairs[i] for i in c], [self.keys[i] for i in c]) for c in chunks]
        if not self._checked_mask:  # logps.mask_mismatch on the run's first micro-batch
            self._checked_mask = True
            stop_on_mask_mismatch(self.cfg.out, micro_batches[0]["packed"], pair_groups([self.pairs[i] for i in chunks[0]]))
        laid_out = sum(mb["packed"].num_tokens for mb in micro_batches)
        computed = sum(mb["packed"].num_computed_tokens for mb in micro_batches)
        return StepPlan([micro_batches], {"packing/efficiency": laid_out / computed}, num_tokens=laid_out)

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, Any]):
        """(losses, chosen rewards, rejected rewards), [B] each, from summed log-probs [B]."""
        cfg, lengths = self.cfg, batch["packed"].completion_lengths
        if cfg.loss_type in REFERENCE_FREE:  # on length-normalised log-probs, no reference
            chosen_avg, rejected_avg = chosen / lengths[0::2].clamp(min=1), rejected / lengths[1::2].clamp(min=1)
            if cfg.loss_type == "simpo":
                return simpo_loss(chosen_avg, rejected_avg, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
            return orpo_loss(chosen_avg, rejected_avg, cfg.beta)
        return dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], cfg.beta, cfg.loss_type,
                        cfg.label_smoothing, chosen_lengths=lengths[0::2], rejected_lengths=lengths[1::2])

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        timing.count_flops(self.model, batch["packed"].num_tokens, backward=True)
        chosen, rejected = pair_logps(self.model, batch["packed"])  # [B], [B]
        losses, chosen_rewards, rejected_rewards = self.pair_losses(chosen, rejected, batch)  # [B] each
        total = losses
        metrics = {"dpo_loss": losses.mean().item()}
        sft_weight = 1.0 if self.cfg.loss_type == "orpo" else self.cfg.sft_weight
        if sft_weight:
            # RPO (Pang et al. 2024) and ORPO (Hong et al. 2024, eq. 6): + α · NLL of y_c per token, averaged per pair.
            nll = -chosen / batch["packed"].completion_lengths[0::2].clamp(min=1)
            total = losses + sft_weight * nll
            metrics["nll_loss"] = nll.mean().item()
        accuracy = wins(chosen_rewards, rejected_rewards, batch, self.cfg.beta, self.cfg.precision).float().mean()
        metrics |= {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": accuracy.item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item(),
        }
        return total.sum(), metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, implicit rewards, accuracy and margin with the current policy (TRL's `eval/` names)."""
        if not self.eval_pairs:
            return {}
        was_training = self.model.training
        self.model.eval()
        parts = []  # (losses, chosen rewards, rejected rewards, wins) of each chunk
        with mixed_precision(self.cfg.precision, self.model):  # as in training, also when called after it
            for batch in self._eval_batches():
                timing.count_flops(self.model, batch["packed"].num_tokens)
                loss, r_c, r_r = self.pair_losses(*pair_logps(self.model, batch["packed"]), batch)
                parts.append((loss, r_c, r_r, wins(r_c, r_r, batch, self.cfg.beta, self.cfg.precision)))
        self.model.train(was_training)
        losses, r_c, r_r, won = (torch.cat(column) for column in zip(*parts, strict=True))
        return {
            "eval/loss": losses.mean().item(),
            "eval/rewards/chosen": r_c.mean().item(),
            "eval/rewards/rejected": r_r.mean().item(),
            "eval/rewards/accuracies": won.float().mean().item(),
            "eval/rewards/margins": (r_c - r_r).mean().item(),
        }

    def state_dict(self) -> dict[str, Any]:
        self.cache.flush()  # the loop asks for state at every checkpoint: persist the cache with it
        return {"sampler": self.sampler.state_dict(), "reference": self.cache.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.cache.load_state_dict(state["reference"])


def dpo_monitors(cfg: DPOConfig) -> list[Monitor]:
    """The DPO monitors; the step-0 check only where step 0 has a known loss (a reference to equal)."""
    monitors: list[Monitor] = []
    if cfg.loss_type not in REFERENCE_FREE:
        zero = torch.zeros(1)
        start_loss = dpo_loss(zero, zero, zero, zero, cfg.beta, cfg.loss_type, cfg.label_smoothing)[0].item()
        monitors.append(StartCheckMonitor(start_loss, TOLERANCES[cfg.precision].start_loss))
    return [
        *monitors,
        MarginExplosionMonitor(cfg.max_margin, cfg.explosion_max_loss, cfg.explosion_min_accuracy, cfg.monitor_window),
        ChosenLogpsFallingMonitor(),
        OverfitMonitor(window=cfg.monitor_window),
    ]


def split_heldout(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a fixed permutation (seed 0, not --seed, so every seed sees one split)."""
    n_eval = max(1, int(len(pairs) * fraction)) if fraction > 0 and len(pairs) > 1 else 0
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def reference_cache_dirs(cfg: DPOConfig, out: Path, shared: Path | None) -> list[Path]:
    """The run folder (resume) and, when the config shares it, `shared` (other runs of the same reference)."""
    if shared is None or not cfg.share_reference_cache or cfg.live_reference:
        return [out]
    return [out, shared]


def run_dpo(cfg: DPOConfig, model: torch.nn.Module, tokenizer: Any, pairs: list[Pair],
            load_reference: Callable[[], torch.nn.Module], shared_reference_cache: Path | None = None) -> Path:
    """Train `model` (which must equal the reference at the start) on `pairs`; save it; returns OUT/model.

    `load_reference()` returns a fresh copy of the reference (the SFT model); it is called only if some
    pair is not cached yet (never for a reference-free loss, nor with LoRA: the reference is then `model`
    with its adapters off). `shared_reference_cache`: a folder of
    reference log-probs shared by runs (the stage's CACHE/reference-logps), used with share_reference_cache.
    """
    out = start_run(cfg)
    model = lora_from_config(model, cfg)  # after the run's seeding: the adapters' initialisation is the seed's
    train_pairs, eval_pairs = split_heldout(pairs, cfg.eval_fraction)
    recipe = DPORecipe(model, train_pairs, cfg, tokenizer.pad_token_id, load_reference, eval_pairs,
                       reference_cache_dirs(cfg, out, shared_reference_cache))
    train(cfg, recipe, dpo_monitors(cfg))
    recipe.cache.flush()
    return save_final_model(model, tokenizer, out)

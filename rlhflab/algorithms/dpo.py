"""Direct Preference Optimization (Rafailov et al. 2023) and its TRL loss variants.

    h_c = log π(y_c|x) − log π_ref(y_c|x),  h_r likewise;  loss = −log σ(β (h_c − h_r))   (sigmoid)

log Z(x) cancels in h_c − h_r, so there is no reward model, value function or rollout: one
binary cross-entropy over preference pairs. Per step:

    pairs ─► pack: [ prompt | chosen | rejected ] per pair, pairs first-fit into rows ≤ max_row_tokens
          ─► reference log-probs: cache hit, or one no-grad packed forward (then cached; see reference_cache)
          ─► policy: one packed forward ─► per-pair log π(y_c|x), log π(y_r|x)   [B] each
          ─► core.losses.dpo_loss ─► Σ losses (÷ pairs of the step, by the loop) ─► TRL's metrics

The prompt is computed once per pair (chosen and rejected attend to it but not to each other,
positions restart after it: core/packing.py) and there is no padding except at row ends (rows
are balanced), so a pair costs |x| + |y_c| + |y_r| − 2 tokens (each response's last token is only
a target) where a padded two-row batch costs 2 · max(|x| + |y|). The LM head runs only on the
positions that predict a response token.
The reference model is freed as soon as every pair the run will visit is cached.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhflab.algorithms.reference_cache import ReferenceCache, pair_key, weights_fingerprint
from rlhflab.config import RunConfig, opt
from rlhflab.core.losses import dpo_loss
from rlhflab.core.packing import PackedBatch, pack_groups, packed_forward
from rlhflab.data.collate import TokenizedExample
from rlhflab.diagnostics.dpo import (
    ChosenLogpsFallingMonitor,
    MarginExplosionMonitor,
    OverfitMonitor,
    StartCheckMonitor,
)
from rlhflab.diagnostics.findings import Monitor
from rlhflab.training.data_order import EpochSampler, split_micro_batches
from rlhflab.training.loop import StepPlan, emit_finding, save_final_model, start_run, train
from rlhflab.training.precision import freeze, mixed_precision

Pair = tuple[TokenizedExample, TokenizedExample]  # (chosen, rejected), same prompt ids


@dataclass
class DPOConfig(RunConfig):
    lr: float = 1e-4
    max_steps: int = 150
    batch_size: int = opt(16, "preference pairs per optimizer step", minimum=1)
    beta: float = opt(0.1, "β: rewards are β·log(π/π_ref); larger keeps the policy closer to the reference", minimum=0.0)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                       "apo_down"] = opt("sigmoid", "DPO-family loss, TRL's names (core/losses.py)")
    label_smoothing: float = opt(0.0, "ε of conservative DPO (sigmoid), robust and exo_pair", minimum=0.0, maximum=1.0)
    sft_weight: float = opt(0.0, "adds sft_weight × mean NLL per token of the chosen response (RPO; TRL's rpo_alpha)",
                            minimum=0.0)
    max_prompt_tokens: int = opt(64, "longer prompts keep their last tokens", minimum=1)
    max_completion_tokens: int = opt(64, "longer responses are cut (and have no EOS)", minimum=1)
    max_row_tokens: int = opt(256, "packed row budget; attention is quadratic in it, so keep it a few pairs long",
                              minimum=2)
    live_reference: bool = opt(False, "keep the reference model and recompute its log-probs every step")
    share_reference_cache: bool = opt(True, "also read/write CACHE/reference-logps/ (shared by runs of one reference)")
    eval_fraction: float = opt(0.05, "held-out share of the pairs, for implicit-reward accuracy", minimum=0.0,
                               maximum=1.0)
    eval_every: int = 25
    max_margin: float = opt(10.0, "dpo.margin_explosion: healthy mean margin upper bound")
    explosion_max_loss: float = opt(0.05, "... and it fires only while the loss is below this")
    explosion_min_accuracy: float = opt(0.95, "... and train accuracy at least this", minimum=0.0, maximum=1.0)
    monitor_window: int = opt(10, "steps averaged by the margin and overfit monitors", minimum=1)


def pack_pairs(pairs: list[Pair], max_row_tokens: int, pad_token_id: int) -> PackedBatch:
    """Pair i becomes group i = (prompt, [chosen, rejected]): sequences 2i (chosen) and 2i + 1 (rejected)."""
    groups = [(c.prompt_ids, [c.completion_ids, r.completion_ids]) for c, r in pairs]
    # only log-probs are needed, so each response's last token (a target, never an input) is left out
    return pack_groups(groups, max_row_tokens, pad_token_id, trim_final_tokens=True)


def pair_logps(model: torch.nn.Module, packed: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(y_c|x), log π(y_r|x): [B] each, from one packed forward."""
    logps = packed_forward(model, packed).sequence_logps  # [2B], chosen/rejected interleaved
    return logps[0::2], logps[1::2]


# Relative rounding of a summed log-prob between two packed layouts of the same pair (a cached
# reference from another batch composition vs a live forward). Measured at 30M on 64 sums of
# ~100 nats: fp32 1.6e-7, bf16 autocast 4.2e-4.
LOGP_NOISE = {"fp32": 1e-6, "bf16": 2e-3}


def wins(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, batch: dict[str, Any], beta: float,
         precision: str = "fp32"):  # fmt: skip
    """Pairs ranked right: β(h_c − h_r) > β·noise·(|ref_c| + |ref_r|), i.e. beyond rounding noise.

    A reference cached from another batch composition can differ from a live forward by the
    rounding in LOGP_NOISE. TRL counts any positive margin; here a margin inside that noise is a
    tie, so a policy equal to its reference scores accuracy 0 whichever way its reference was computed.
    """
    noise = beta * LOGP_NOISE[precision] * (batch["ref_chosen"].abs() + batch["ref_rejected"].abs()).clamp(min=1.0)
    return (chosen_rewards - rejected_rewards) > noise


class DPORecipe:
    """Packed pairs, cached reference log-probs, one of TRL's DPO losses."""

    def __init__(
        self,
        model: torch.nn.Module,
        pairs: list[Pair],
        cfg: DPOConfig,
        pad_token_id: int,
        load_reference: Callable[[], torch.nn.Module],
        eval_pairs: list[Pair] | None = None,
        cache_dirs: list[Path] | None = None,
    ):
        self.model = model
        self.pairs = pairs
        self.eval_pairs = eval_pairs or []
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.sampler = EpochSampler(len(pairs), cfg.seed)
        self.updates_per_step = 1
        self.keys = [pair_key(c.prompt_ids, c.completion_ids, r.completion_ids) for c, r in pairs]
        self.eval_keys = [
            pair_key(c.prompt_ids, c.completion_ids, r.completion_ids) for c, r in self.eval_pairs
        ]
        # policy == reference at construction (before a resume loads trained weights): fingerprint it now.
        # bf16 log-probs differ from fp32 ones by more than the ln 2 check allows: cached apart.
        fingerprint = weights_fingerprint(model) + ("" if cfg.precision == "fp32" else f"-{cfg.precision}")
        self.cache = ReferenceCache(
            fingerprint, [Path(d) / f"reference-logps-{fingerprint}.json" for d in cache_dirs or []]
        )
        self._load_reference: Callable[[], torch.nn.Module] | None = load_reference
        self.reference: torch.nn.Module | None = None
        self._pending: set[str] | None = None  # keys the run will still visit that are not cached
        self.num_tokens = 0  # real tokens laid out so far (TRL's cumulative `num_tokens`)
        self._clock: tuple[float, int] | None = None  # (time, num_tokens) at this process's first step

    # ── reference log-probs ──────────────────────────────────────────────────────────────
    def _reference_model(self) -> torch.nn.Module:
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
        chosen, rejected = pair_logps(self._reference_model(), packed)
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

    # ── one step ─────────────────────────────────────────────────────────────────────────
    def plan_step(self, step: int) -> StepPlan:
        if self._pending is None and not self.cfg.live_reference:
            self._pending = {k for k in self._future_keys(step) if k not in self.cache}
            if not self._pending:
                self.free_reference()
        now = time.perf_counter()
        if self._clock is None:
            self._clock = (now, self.num_tokens)
        elapsed, done = now - self._clock[0], self.num_tokens - self._clock[1]
        metrics = {"tokens_per_second": done / elapsed if elapsed > 0 else 0.0}
        if self.cfg.eval_every and step % self.cfg.eval_every == 0 and self.eval_pairs:
            metrics |= self.heldout_metrics()
        micro_batches = []
        computed = 0
        for chunk in split_micro_batches(self.sampler.take(self.cfg.batch_size), self.cfg.grad_accum):
            packed = pack_pairs([self.pairs[i] for i in chunk], self.cfg.max_row_tokens, self.pad_token_id)
            ref_chosen, ref_rejected = self.reference_logps([self.keys[i] for i in chunk], packed)
            micro_batches.append(
                {
                    "packed": packed,
                    "ref_chosen": ref_chosen,
                    "ref_rejected": ref_rejected,
                    "num_items": len(chunk),
                }
            )
            self.num_tokens += packed.num_tokens
            computed += packed.num_computed_tokens
        metrics["num_tokens"] = float(self.num_tokens)
        metrics["packing/efficiency"] = sum(mb["packed"].num_tokens for mb in micro_batches) / computed
        return StepPlan([micro_batches], metrics)

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, Any]):
        """dpo_loss on [B] log-probs; lengths feed ipo's length normalisation (as TRL)."""
        lengths = batch["packed"].completion_lengths
        return dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen"],
            batch["ref_rejected"],
            self.cfg.beta,
            self.cfg.loss_type,
            self.cfg.label_smoothing,
            chosen_lengths=lengths[0::2],
            rejected_lengths=lengths[1::2],
        )

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_logps(self.model, batch["packed"])  # [B], [B]
        losses, chosen_rewards, rejected_rewards = self.pair_losses(chosen, rejected, batch)  # [B] each
        total = losses
        metrics = {"dpo_loss": losses.mean().item()}
        if self.cfg.sft_weight:
            # RPO (Pang et al. 2024): + α · NLL of y_c per token, here averaged per pair.
            nll = -chosen / batch["packed"].completion_lengths[0::2].clamp(min=1)
            total = losses + self.cfg.sft_weight * nll
            metrics["nll_loss"] = nll.mean().item()
        metrics |= {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": wins(chosen_rewards, rejected_rewards, batch, self.cfg.beta, self.cfg.precision)
            .float()
            .mean()
            .item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item(),
        }
        return total.sum(), metrics

    @torch.no_grad()
    def heldout_metrics(self, chunk: int = 64) -> dict[str, float]:
        """Implicit-reward accuracy and margin on the held-out pairs with the current policy."""
        with mixed_precision(self.cfg.precision, self.model):  # as in training, also when called after it
            return self._heldout_metrics(chunk)

    def _heldout_metrics(self, chunk: int) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        chosen_rewards, rejected_rewards, losses, won = [], [], [], []
        for start in range(0, len(self.eval_pairs), chunk):
            pairs = self.eval_pairs[start : start + chunk]
            packed = pack_pairs(pairs, self.cfg.max_row_tokens, self.pad_token_id)
            ref_chosen, ref_rejected = self.reference_logps(self.eval_keys[start : start + chunk], packed)
            chosen, rejected = pair_logps(self.model, packed)
            batch = {"packed": packed, "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
            loss, r_c, r_r = self.pair_losses(chosen, rejected, batch)
            losses.append(loss)
            won.append(wins(r_c, r_r, batch, self.cfg.beta, self.cfg.precision))
            chosen_rewards.append(r_c)
            rejected_rewards.append(r_r)
        self.model.train(was_training)
        r_c, r_r = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
        return {
            "eval/loss": torch.cat(losses).mean().item(),
            "eval/rewards/chosen": r_c.mean().item(),
            "eval/rewards/rejected": r_r.mean().item(),
            "eval/rewards/accuracies": torch.cat(won).float().mean().item(),
            "eval/rewards/margins": (r_c - r_r).mean().item(),
        }

    def state_dict(self) -> dict[str, Any]:
        self.cache.flush()  # the loop asks for state at every checkpoint: persist the cache with it
        return {
            "sampler": self.sampler.state_dict(),
            "num_tokens": self.num_tokens,
            "reference": self.cache.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.num_tokens = int(state["num_tokens"])
        self.cache.load_state_dict(state["reference"])


def dpo_monitors(cfg: DPOConfig) -> list[Monitor]:
    zero = torch.zeros(1)
    start_loss = dpo_loss(zero, zero, zero, zero, cfg.beta, cfg.loss_type, cfg.label_smoothing)[0].item()
    return [
        # bf16: a reference cached from another batch composition moves the step-0 loss by ~1e-3
        StartCheckMonitor(expected_loss=start_loss, tolerance=1e-4 if cfg.precision == "fp32" else 1e-2),
        MarginExplosionMonitor(
            cfg.max_margin, cfg.explosion_max_loss, cfg.explosion_min_accuracy, cfg.monitor_window
        ),
        ChosenLogpsFallingMonitor(),
        OverfitMonitor(window=cfg.monitor_window),
    ]


def split_heldout(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a fixed permutation (seed 0, not --seed, so every seed sees one split)."""
    n_eval = max(1, int(len(pairs) * fraction)) if fraction > 0 and len(pairs) > 1 else 0
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def reference_cache_dirs(cfg: DPOConfig, out: Path, shared: Path | None) -> list[Path]:
    """The run folder (resume) and, when given, the shared cache (other runs of the same reference)."""
    if shared is None or cfg.live_reference:
        return [out]
    return [out, shared]


def run_dpo(
    cfg: DPOConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[Pair],
    load_reference: Callable[[], torch.nn.Module],
    shared_reference_cache: Path | None = None,
) -> Path:
    """Train `model` (which must equal the reference at the start) on `pairs`; save it; returns OUT/model.

    `load_reference()` returns a fresh copy of the reference (the SFT model); it is called only
    if some pair is not cached yet. `shared_reference_cache`: a folder of reference log-probs shared
    by runs of the same reference (the stage passes CACHE/reference-logps).
    """
    out = start_run(cfg)
    train_pairs, eval_pairs = split_heldout(pairs, cfg.eval_fraction)
    recipe = DPORecipe(
        model,
        train_pairs,
        cfg,
        tokenizer.pad_token_id,
        load_reference,
        eval_pairs,
        reference_cache_dirs(cfg, out, shared_reference_cache),
    )
    monitors = dpo_monitors(cfg)
    train(cfg, recipe, monitors)
    results: dict[str, Any] = recipe.heldout_metrics() if eval_pairs else {}
    recipe.cache.flush()
    findings = [f for m in monitors[-1:] for f in m.observe(cfg.max_steps, {**results})]
    for finding in findings:
        emit_finding(out, finding)
    _append_final_metrics(out, cfg.max_steps, results)
    return save_final_model(model, tokenizer, out)


def _append_final_metrics(out: Path, step: int, metrics: dict[str, float]) -> None:
    """The end-of-run held-out metrics as the last metrics.jsonl line (`step` = max_steps)."""
    if not metrics:
        return
    path = out / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elapsed = lines[-1]["time"] if lines else 0.0
    row = {
        "step": step,
        "time": elapsed,
        **{k: v if math.isfinite(v) else str(v) for k, v in metrics.items()},
    }
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")

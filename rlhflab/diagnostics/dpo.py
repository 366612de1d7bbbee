"""DPO monitors: pure functions of the metric stream (TRL's names), tested on synthetic streams.

| code | fires when | means |
|---|---|---|
| `dpo.start_not_ln2` | step 0 loss != loss(0, 0) (ln 2 for sigmoid), or accuracy/margin != 0 | policy and reference log-probs not computed alike |
| `dpo.margin_explosion` | mean `rewards/margins` > max_margin while loss → 0 and accuracy → 1 | memorising pairs |
| `dpo.chosen_logps_falling` | `logps/chosen` falls steadily while the margin grows | likelihood displacement |
| `dpo.overfit` | train `rewards/accuracies` far above `eval/rewards/accuracies` | memorising the train split |

Windows are means over the last `window` logged steps, so a batch-1 run (accuracy 0 or 1 each
step) is judged on its average, not on one lucky step.

`dpo.start_not_ln2` proves that the policy's and the reference's log-probs are computed alike; a
label-shift or response-mask bug that both share cancels in log π − log π_ref and still gives ln 2.
The check that catches such a bug is `logps.mask_mismatch` (diagnostics/checks.py), run on the first
micro-batch of every training command.

TOLERANCES is the one table of DPO's precision tolerances: how far two computations of the same
quantities may differ by float rounding alone (the accuracy's tie band, the step-0 check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhflab.diagnostics.findings import Finding, StatefulMonitor


@dataclass(frozen=True)
class Tolerance:
    logp: float  # relative rounding of a summed log-prob between two packed layouts of the same pair
    start_loss: float  # |step-0 loss − loss(0, 0)| and |margin| that dpo.start_not_ln2 accepts


# Measured at 30M on 64 sums of ~100 nats (docs/notes_dpo.md): a cached reference from another batch
# composition vs a live forward differs by fp32 1.6e-7, bf16 autocast 4.2e-4 (relative), which moves
# a bf16 step-0 loss by ~1e-3.
TOLERANCES = {
    "fp32": Tolerance(logp=1e-6, start_loss=1e-4),
    "bf16": Tolerance(logp=2e-3, start_loss=1e-2),
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class StartCheckMonitor(StatefulMonitor):
    """`dpo.start_not_ln2`: at step 0 the policy is the reference, so every log-ratio is exactly 0.

    Then rewards are 0, no pair is ranked correctly (accuracy 0: ties are not wins), the margin is 0,
    and the loss is the loss at zero log-ratios: -log σ(0) = ln 2 = 0.693147 for `sigmoid` (with
    or without label smoothing), `expected_loss` in general. Error (stops the run) if not; one info
    line if it holds. What it proves: policy and reference log-probs are computed alike (same weights,
    same packing, a cache that belongs to them). What it cannot prove: that the log-probs are of the
    right tokens. A shift or mask bug shared by both cancels in the log-ratio and still gives ln 2;
    `logps.mask_mismatch` (diagnostics/checks.py, on the first micro-batch) is the check for that.
    """

    def __init__(
        self,
        expected_loss: float = math.log(2),
        tolerance: float = TOLERANCES["fp32"].start_loss,
        loss_key: str = "dpo_loss",
    ):
        self.expected_loss = expected_loss
        self.tolerance = tolerance
        self.loss_key = loss_key  # the preference term alone (an added SFT term would shift `loss`)

    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        if step != 0:
            return []
        loss = metrics.get(self.loss_key, metrics.get("loss", math.nan))
        accuracy = metrics.get("rewards/accuracies", math.nan)
        margin = metrics.get("rewards/margins", math.nan)
        seen = f"loss {loss:.6f} (expected {self.expected_loss:.6f}), accuracy {accuracy:.3f}, margin {margin:.2e}"
        ok = (
            abs(loss - self.expected_loss) <= self.tolerance
            and accuracy == 0.0
            and abs(margin) <= self.tolerance
        )
        if ok:
            return [
                Finding(step, "dpo.start_not_ln2", "info",
                        f"step-0 check passed: {seen}; policy and reference log-probs are computed alike (a shift "
                        "or mask bug shared by both would cancel here: logps.mask_mismatch checks that).",
                        "none needed")
            ]
        return [
            Finding(
                step,
                "dpo.start_not_ln2",
                "error",
                f"at step 0 the policy equals the reference, so every log-ratio must be 0; got {seen}. "
                "Policy and reference log-probs are not computed alike (different weights, packing, precision, "
                "or a cached reference of another model or data).",
                "Check that policy and reference load the same weights, that the response mask covers "
                "completion tokens only, and that a cached reference belongs to this model and data.",
            )
        ]


class MarginExplosionMonitor(StatefulMonitor):
    """`dpo.margin_explosion`: mean margin β·(h_c − h_r) beyond `max_margin` while loss → 0, accuracy → 1.

    A healthy DPO margin is about 1–10; far beyond it with a vanishing loss the policy has
    separated the training pairs by pushing log-ratios apart without bound (memorising pairs,
    reward hacking of the implicit reward). Fires once; re-arms when the margin is back in range.
    """

    def __init__(
        self, max_margin: float = 10.0, max_loss: float = 0.05, min_accuracy: float = 0.95, window: int = 10
    ):
        self.max_margin = max_margin
        self.max_loss = max_loss
        self.min_accuracy = min_accuracy
        self.window = window
        self.history: list[tuple[float, float, float]] = []  # (margin, loss, accuracy)
        self.fired = False

    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        if "rewards/margins" not in metrics:
            return []
        loss = metrics.get("dpo_loss", metrics.get("loss", math.nan))
        self.history = [
            *self.history,
            (metrics["rewards/margins"], loss, metrics.get("rewards/accuracies", 0.0)),
        ]
        self.history = self.history[-self.window :]
        if len(self.history) < self.window:
            return []
        margin, loss, accuracy = (_mean([h[i] for h in self.history]) for i in range(3))
        exploded = margin > self.max_margin and loss < self.max_loss and accuracy >= self.min_accuracy
        if not exploded:
            self.fired = self.fired and margin > self.max_margin
            return []
        if self.fired:
            return []
        self.fired = True
        return [
            Finding(
                step,
                "dpo.margin_explosion",
                "warning",
                f"mean reward margin {margin:.1f} over the last {self.window} steps (healthy: about 1 to "
                f"{self.max_margin:g}) while loss is {loss:.4f} and accuracy {accuracy:.2f}: the policy is "
                "memorising its training pairs; its implicit reward no longer generalises.",
                "Raise beta (e.g. 0.1 -> 0.3), enlarge the batch, lower the learning rate, or add data.",
            )
        ]


class ChosenLogpsFallingMonitor(StatefulMonitor):
    """`dpo.chosen_logps_falling`: likelihood displacement (Razin et al. 2024).

    DPO only needs h_c − h_r to grow; it can get there by lowering log π(y_c) too, as long as
    log π(y_r) falls faster. Fires once when the mean of `logps/chosen` over the last `window`
    steps is `min_drop` nats below its mean over the first `window` steps, is still below the
    window before it (falling, not a dip), and the margin has grown by `min_margin_gain` over the same span.
    """

    def __init__(self, window: int = 20, min_drop: float = 2.0, min_margin_gain: float = 0.1):
        self.window = window
        self.min_drop = min_drop
        self.min_margin_gain = min_margin_gain
        self.first: list[tuple[float, float]] = []  # (logps/chosen, margin) of the first window
        self.recent: list[tuple[float, float]] = []  # the last 2 * window
        self.fired = False

    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        if "logps/chosen" not in metrics or "rewards/margins" not in metrics:
            return []
        point = (metrics["logps/chosen"], metrics["rewards/margins"])
        if len(self.first) < self.window:
            self.first = [*self.first, point]
        self.recent = [*self.recent, point][-2 * self.window :]
        if self.fired or len(self.recent) < 2 * self.window:
            return []
        start_chosen, start_margin = (_mean([p[i] for p in self.first]) for i in range(2))
        before = _mean([p[0] for p in self.recent[: self.window]])
        now_chosen, now_margin = (_mean([p[i] for p in self.recent[self.window :]]) for i in range(2))
        falling = now_chosen < start_chosen - self.min_drop and now_chosen < before
        if not (falling and now_margin > start_margin + self.min_margin_gain):
            return []
        self.fired = True
        return [
            Finding(
                step,
                "dpo.chosen_logps_falling",
                "warning",
                f"log-prob of the chosen responses fell from {start_chosen:.2f} to {now_chosen:.2f} nats while "
                f"the margin grew from {start_margin:.2f} to {now_margin:.2f}: the policy widens the gap by "
                "making the preferred responses less likely too (likelihood displacement); the probability "
                "mass goes to responses in neither set.",
                "Add an SFT term on the chosen responses (--sft-weight 0.2 to 1.0) or raise beta.",
            )
        ]


class OverfitMonitor(StatefulMonitor):
    """`dpo.overfit`: train implicit-reward accuracy far above held-out accuracy.

    Compares the mean train `rewards/accuracies` over the last `window` steps with each new
    `eval/rewards/accuracies`; fires once when the gap exceeds `max_gap`.
    """

    def __init__(self, max_gap: float = 0.25, window: int = 10):
        self.max_gap = max_gap
        self.window = window
        self.train_accuracy: list[float] = []
        self.fired = False

    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        if "rewards/accuracies" in metrics:
            self.train_accuracy = [*self.train_accuracy, metrics["rewards/accuracies"]][-self.window :]
        heldout = metrics.get("eval/rewards/accuracies")
        if heldout is None or self.fired or len(self.train_accuracy) < self.window:
            return []
        train = _mean(self.train_accuracy)
        if train - heldout <= self.max_gap:
            return []
        self.fired = True
        return [
            Finding(
                step,
                "dpo.overfit",
                "warning",
                f"train implicit-reward accuracy {train:.2f} vs held-out {heldout:.2f}: the policy ranks its "
                "training pairs but not new ones (memorisation, not preference learning).",
                "Stop earlier, raise beta, lower the learning rate, or add data.",
            )
        ]

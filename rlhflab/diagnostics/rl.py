"""Monitors for online RL (PPO, GRPO): each watches a few metrics over a sliding window and says what
the pattern means and what to change. Pure functions of the metric stream (tested on synthetic ones).
They read only the metric names PPO and GRPO share, each with one meaning (algorithms/rollout.py):
`reward` (mean reward of the batch's completions), `kl` (mean per-token KL to the reference over
completion tokens), `entropy` (mean per-token entropy), `completions/clipped_ratio`, `gold/reward`.

    code                          reads                            fires when (defaults)
    grpo.zero_std_groups          frac_reward_zero_std             window mean > 0.25
    rl.kl_runaway                 kl (per token)                   window mean > 0.3 nats per token
    ppo.policy_stuck              reward, kl, kl_coef              reward and KL flat, KL ≈ 0 (< 0.002 nats per
                                                                   token), kl_coef ≥ 0.1
    rl.entropy_collapse           entropy (per token)              window mean < 0.05 nats
    rl.truncation                 completions/clipped_ratio        window mean > 0.5
    reward.proxy_gold_divergence  reward, gold/reward              reward's later-half mean rises and the
                                                                   gold's falls, each by > 0.05 (window 10)

The KL bounds are per token: 0.3 nats per token is the former bound of 10 nats per completion over
the reviews task's 32-token budget (roughly), 0.002 the former 0.05 per completion likewise. GRPO
logs `kl` only with beta > 0 (no reference otherwise), so rl.kl_runaway watches it only then.

A monitor fires once when its condition becomes true and again only after the condition has cleared,
so a persistent problem is one finding, not one per step. Windows are plain lists (checkpointable).
"""

from __future__ import annotations

from rlhflab.diagnostics.findings import Finding, Monitor, StatefulMonitor


class WindowMonitor(StatefulMonitor):
    """Keeps the last `window` values of each key in `keys`; subclasses implement `condition`."""

    code = ""
    keys: tuple[str, ...] = ()

    def __init__(self, window: int):
        self.window = window
        self.history: dict[str, list[float]] = {}
        self.active = False

    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        present = [k for k in self.keys if k in metrics]
        if len(present) < len(self.keys):
            return []
        for key in self.keys:
            values = self.history.setdefault(key, [])
            values.append(float(metrics[key]))
            del values[: -self.window]
        if len(self.history[self.keys[0]]) < self.window:
            return []
        message = self.condition()
        fired, self.active = message is not None and not self.active, message is not None
        return [Finding(step, self.code, "warning", message, self.advice)] if fired and message else []

    def mean(self, key: str) -> float:
        values = self.history[key]
        return sum(values) / len(values)

    def halves(self, key: str) -> tuple[float, float]:
        """Means of the older and the newer half of the window."""
        values = self.history[key]
        half = len(values) // 2
        return sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)

    advice = ""

    def condition(self) -> str | None:
        raise NotImplementedError


class ZeroStdGroupsMonitor(WindowMonitor):
    code = "grpo.zero_std_groups"
    keys = ("frac_reward_zero_std",)
    advice = ("Those groups give no gradient. Sample more completions per prompt (--group-size), raise "
              "--temperature, use prompts of a difficulty where some but not all completions succeed, or drop "
              "zero-std groups from the loss (GRPO --drop-zero-std-groups).")

    def __init__(self, threshold: float = 0.25, window: int = 5):
        super().__init__(window)
        self.threshold = threshold

    def condition(self) -> str | None:
        frac = self.mean("frac_reward_zero_std")
        if frac <= self.threshold:
            return None
        return (f"{frac:.0%} of prompt groups had identical rewards for every completion over the last "
                f"{self.window} steps (threshold {self.threshold:.0%}): their group-relative advantages are 0.")


class KLRunawayMonitor(WindowMonitor):
    code = "rl.kl_runaway"
    keys = ("kl",)
    advice = ("The policy is drifting far from the reference and is likely over-optimising the reward. Raise the "
              "KL coefficient (PPO --kl-coef, or --adaptive-kl with a --target-kl; GRPO --beta), lower --lr, or "
              "stop earlier; compare the gold reward if the task has one.")

    def __init__(self, bound: float = 0.3, window: int = 3):
        super().__init__(window)
        self.bound = bound  # nats per completion token

    def condition(self) -> str | None:
        kl = self.mean("kl")
        if kl <= self.bound:
            return None
        return (f"KL to the reference averaged {kl:.3f} nats per token over {self.window} steps "
                f"(bound {self.bound:g}).")


class PolicyStuckMonitor(WindowMonitor):
    code = "ppo.policy_stuck"
    keys = ("reward", "kl", "kl_coef")
    advice = ("The KL penalty is holding the policy at the reference. Lower --kl-coef (or --target-kl for the "
              "adaptive controller), raise --lr, or check that the reward varies across completions.")

    def __init__(self, min_kl_coef: float = 0.1, max_kl: float = 0.002, min_change: float = 0.02, window: int = 10):
        super().__init__(window)
        self.min_kl_coef, self.max_kl, self.min_change = min_kl_coef, max_kl, min_change

    def condition(self) -> str | None:
        older, newer = self.halves("reward")
        kl, coef = self.mean("kl"), self.mean("kl_coef")  # kl per token
        if coef < self.min_kl_coef or abs(kl) > self.max_kl or abs(newer - older) > self.min_change:
            return None
        return (f"over {self.window} steps the reward moved {newer - older:+.3f} and KL stayed at {kl:.4f} "
                f"nats per token while kl_coef is {coef:.3g}: the policy is not moving.")


class EntropyCollapseMonitor(WindowMonitor):
    code = "rl.entropy_collapse"
    keys = ("entropy",)
    advice = ("The policy has become nearly deterministic: exploration has stopped and group rewards will tie. "
              "Lower --lr, raise the KL coefficient, raise --temperature, or stop here.")

    def __init__(self, threshold: float = 0.05, window: int = 3):
        super().__init__(window)
        self.threshold = threshold

    def condition(self) -> str | None:
        entropy = self.mean("entropy")
        if entropy >= self.threshold:
            return None
        return f"per-token entropy averaged {entropy:.4f} nats over {self.window} steps (threshold {self.threshold:g})."


class TruncationMonitor(WindowMonitor):
    code = "rl.truncation"
    keys = ("completions/clipped_ratio",)
    advice = ("Most completions hit --max-new-tokens without EOS: rewards score cut-off text. Raise "
              "--max-new-tokens, penalise missing EOS (PPO: --missing-eos-penalty), or check the SFT model stops.")

    def __init__(self, threshold: float = 0.5, window: int = 3):
        super().__init__(window)
        self.threshold = threshold

    def condition(self) -> str | None:
        share = self.mean("completions/clipped_ratio")
        if share <= self.threshold:
            return None
        return f"{share:.0%} of completions never emitted EOS over the last {self.window} steps."


class ProxyGoldDivergenceMonitor(WindowMonitor):
    code = "reward.proxy_gold_divergence"
    advice = ("The policy is exploiting the reward model (over-optimisation, Gao et al. 2023): the proxy score "
              "rises while the true reward falls. Stop earlier (an earlier checkpoint is better), raise the KL "
              "coefficient, or improve the reward model with pairs sampled from this policy.")

    keys = ("reward", "gold/reward")

    def __init__(self, min_change: float = 0.05, window: int = 10):
        super().__init__(window)
        self.min_change = min_change

    def condition(self) -> str | None:
        proxy_old, proxy_new = self.halves("reward")
        gold_old, gold_new = self.halves("gold/reward")
        if proxy_new - proxy_old <= self.min_change or gold_old - gold_new <= self.min_change:
            return None
        return (f"over {self.window} steps the reward-model score rose {proxy_new - proxy_old:+.3f} while the gold "
                f"reward fell {gold_new - gold_old:+.3f}.")


def ppo_monitors(has_gold: bool) -> list[Monitor]:
    monitors: list[Monitor] = [KLRunawayMonitor(), PolicyStuckMonitor(), EntropyCollapseMonitor(), TruncationMonitor()]
    return [*monitors, ProxyGoldDivergenceMonitor()] if has_gold else monitors


def grpo_monitors(has_gold: bool) -> list[Monitor]:
    monitors: list[Monitor] = [ZeroStdGroupsMonitor(), KLRunawayMonitor(), EntropyCollapseMonitor(), TruncationMonitor()]
    return [*monitors, ProxyGoldDivergenceMonitor()] if has_gold else monitors

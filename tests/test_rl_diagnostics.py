"""RL monitors on synthetic metric streams: each fires on its pattern, once, and stays quiet otherwise."""

from __future__ import annotations

from rlhflab.diagnostics.rl import (
    EntropyCollapseMonitor,
    KLRunawayMonitor,
    PolicyStuckMonitor,
    ProxyGoldDivergenceMonitor,
    TruncationMonitor,
    ZeroStdGroupsMonitor,
    grpo_monitors,
    ppo_monitors,
)


def feed(monitor, stream: list[dict[str, float]]) -> list:
    return [f for step, metrics in enumerate(stream) for f in monitor.observe(step, metrics)]


def test_zero_std_groups_fires_once_above_a_quarter_and_rearms():
    stream = [{"frac_reward_zero_std": v} for v in [0.1] * 6 + [0.5] * 8 + [0.0] * 6 + [0.6] * 5]
    findings = feed(ZeroStdGroupsMonitor(), stream)
    assert [f.code for f in findings] == ["grpo.zero_std_groups"] * 2
    assert findings[0].step == 7 and "group" in findings[0].advice
    assert feed(ZeroStdGroupsMonitor(), [{"frac_reward_zero_std": 0.2}] * 30) == []


def test_kl_runaway_reads_the_per_token_kl():
    stream = [{"kl": 0.04 * k} for k in range(15)]  # window-3 mean 0.04 (step - 1): above 0.3 from step 9
    findings = feed(KLRunawayMonitor(), stream)
    assert len(findings) == 1 and findings[0].code == "rl.kl_runaway" and findings[0].step == 9
    assert "per token" in findings[0].message
    assert feed(KLRunawayMonitor(), [{"kl": 0.2}] * 20) == []
    assert feed(KLRunawayMonitor(), [{"objective/kl": 50.0}] * 20) == []  # PPO's per-completion KL is not read


def test_policy_stuck_needs_flat_reward_no_kl_and_a_high_coefficient():
    stuck = [{"reward": 0.5, "kl": 0.001, "kl_coef": 0.3}] * 12
    assert [f.code for f in feed(PolicyStuckMonitor(), stuck)] == ["ppo.policy_stuck"]
    low_coef = [{**m, "kl_coef": 0.01} for m in stuck]
    assert feed(PolicyStuckMonitor(), low_coef) == []
    learning = [{"reward": 0.1 * i, "kl": 0.001, "kl_coef": 0.3} for i in range(12)]
    assert feed(PolicyStuckMonitor(), learning) == []
    moving = [{**m, "kl": 0.01} for m in stuck]  # 0.01 nats per token: the policy has left the reference
    assert feed(PolicyStuckMonitor(), moving) == []


def test_entropy_collapse_and_truncation():
    entropy = [{"entropy": 2.0 * 0.5**i} for i in range(12)]
    assert [f.code for f in feed(EntropyCollapseMonitor(), entropy)] == ["rl.entropy_collapse"]
    trunc = [{"completions/clipped_ratio": v} for v in [0.1, 0.2, 0.9, 0.9, 0.9, 0.9]]
    assert [f.step for f in feed(TruncationMonitor(), trunc)] == [3]


def test_proxy_gold_divergence():
    rising_proxy = [{"reward": 0.1 * i, "gold/reward": 1.0 - 0.05 * i} for i in range(12)]
    findings = feed(ProxyGoldDivergenceMonitor(), rising_proxy)
    assert [f.code for f in findings] == ["reward.proxy_gold_divergence"]
    both_rise = [{"reward": 0.1 * i, "gold/reward": 0.05 * i} for i in range(12)]
    assert feed(ProxyGoldDivergenceMonitor(), both_rise) == []
    no_gold = [{"reward": 0.1 * i} for i in range(12)]
    assert feed(ProxyGoldDivergenceMonitor(), no_gold) == []


def test_state_round_trip_keeps_the_window():
    monitor, copy = ZeroStdGroupsMonitor(window=4), ZeroStdGroupsMonitor(window=4)
    feed(monitor, [{"frac_reward_zero_std": 0.9}] * 3)
    copy.load_state_dict(monitor.state_dict())
    assert [f.step for f in copy.observe(3, {"frac_reward_zero_std": 0.9})] == [3]


def test_monitor_sets():
    assert {type(m).__name__ for m in grpo_monitors(has_gold=True)} >= {"ZeroStdGroupsMonitor", "ProxyGoldDivergenceMonitor"}
    assert "KLRunawayMonitor" in {type(m).__name__ for m in ppo_monitors(has_gold=False)}


def test_grpo_and_ppo_streams_fire_the_same_kl_runaway():
    """One name, one meaning: the same per-token `kl` stream fires rl.kl_runaway under either algorithm's set."""
    stream = [{"kl": 0.5, "reward": 0.1, "entropy": 1.0, "completions/clipped_ratio": 0.0, "frac_reward_zero_std": 0.0,
               "kl_coef": 0.05}] * 5
    for monitors in (grpo_monitors(has_gold=False), ppo_monitors(has_gold=False)):
        codes = [f.code for m in monitors for step, metrics in enumerate(stream) for f in m.observe(step, metrics)]
        assert codes == ["rl.kl_runaway"]

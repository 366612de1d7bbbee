"""Where a step's time goes (training/timing.py): exclusive phase times, the loop's timing/* and perf/* keys on a
fake clock, model FLOPs against a hand count of the weights, and every trainer's phases adding up to its step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN_RUNS, tiny_lm, tiny_scorer, tiny_tokenizer

from rlhflab.config import RunConfig
from rlhflab.training import loop, timing
from rlhflab.training.data_order import split_micro_batches
from rlhflab.training.loop import StepPlan, train
from rlhflab.training.metrics import is_wall_clock, read_metrics


class FakeClock:
    """perf_counter that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_phases_are_exclusive_and_a_lap_starts_the_next_window():
    clock = FakeClock()
    timer = timing.StepTimer(clock=clock.perf_counter, synchronize=lambda: None)
    clock.now += 1.0  # outside every phase
    with timer.phase("plan"):
        clock.now += 2.0
        with timer.phase("sample"):
            clock.now += 4.0
            with timer.phase("score"):
                clock.now += 8.0
        with timer.phase("sample"):  # a phase entered twice adds up
            clock.now += 16.0
    step = timer.lap()
    assert step.seconds == 31.0
    assert step.phases == {"score": 8.0, "sample": 20.0, "plan": 2.0}  # self times: the nested ones subtracted
    clock.now += 0.5
    assert timer.lap().seconds == 0.5 and timer.phases == {}


def test_phase_and_count_flops_do_nothing_outside_a_loop():
    model = torch.nn.Linear(4, 1)
    with timing.phase("sample", model, 10):
        timing.count_flops(model, 10, backward=True)
    timer = timing.StepTimer(synchronize=lambda: None)
    with timing.measuring(timer):
        timing.count_flops(model, 10, backward=True)
    timing.count_flops(model, 10)  # after the block: not counted
    assert timer.flops == 6 * 5 * 10


def llama_matmul_params(cfg) -> tuple[int, int]:
    """(decoder stack + final norm, output layer) weights, from the config alone: per layer q, k, v, o
    (no biases), the gated MLP's three matrices and two norms."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * cfg.hidden_size * cfg.num_attention_heads * head_dim
    attention += 2 * cfg.hidden_size * cfg.num_key_value_heads * head_dim
    layer = attention + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    return cfg.num_hidden_layers * layer + cfg.hidden_size, cfg.vocab_size * cfg.hidden_size


def test_matmul_params_count_the_weights_a_token_multiplies():
    tokenizer = tiny_tokenizer()
    lm = tiny_lm(tokenizer)  # tied: the embedding table is the output layer's weight, counted once
    stack, head = llama_matmul_params(lm.config)
    assert timing.matmul_params(lm) == (stack + head, stack + head)
    untied = tiny_lm(tokenizer, tie_word_embeddings=False)  # the input table is a lookup: no FLOPs
    assert timing.matmul_params(untied)[0] == stack + head
    assert sum(p.numel() for p in untied.parameters()) == stack + 2 * head
    scorer = tiny_scorer(tokenizer)  # a scalar head instead of the output layer
    assert timing.matmul_params(scorer)[0] == stack + lm.config.hidden_size
    for p in lm.model.layers.parameters():  # frozen weights: no weight gradients (LoRA's case)
        p.requires_grad_(False)
    frozen = stack - lm.config.hidden_size  # the layers; the final norm and the output layer still train
    assert timing.matmul_params(lm) == (stack + head, stack + head - frozen)
    assert timing.flops_per_token(lm, backward=True) == 4 * (stack + head) + 2 * (stack + head - frozen)
    assert timing.flops_per_token(lm) == 2 * (stack + head)


def test_peak_flops_given_known_and_unknown(monkeypatch):
    assert timing.peak_flops(torch.device("cpu")) is None
    assert timing.peak_flops(torch.device("cpu"), 2.5) == 2.5e12
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        expected = None if tflops is None else tflops * 1e12
        assert timing.peak_flops(torch.device("cuda", 0)) == expected, name
    assert timing.peak_flops(torch.device("cuda", 0), 100.0) == 100e12  # the user's value wins


class ClockedRecipe:
    """A linear model whose phases take known fake seconds: plan 1 s of its own, sample 2 s, a reference
    forward of 10 tokens 0.5 s; each micro-batch's loss 0.25 s over 3 tokens; evaluate() 3 s."""

    def __init__(self, cfg: RunConfig, clock: FakeClock):
        self.cfg, self.clock = cfg, clock
        self.model = torch.nn.Linear(4, 1)  # N = 5 (weight and bias)
        self.updates_per_step = 1

    def plan_step(self, step: int) -> StepPlan:
        self.clock.now += 1.0
        with timing.phase("sample"):
            self.clock.now += 2.0
        with timing.phase("reference", self.model, 10):
            self.clock.now += 0.5
        mbs = [{"x": torch.ones(len(c), 4), "num_items": len(c)}
               for c in split_micro_batches(list(range(self.cfg.batch_size)), self.cfg.grad_accum)]
        return StepPlan([mbs], num_tokens=6)

    def loss(self, mb):
        self.clock.now += 0.25
        timing.count_flops(self.model, 3, backward=True)
        return self.model(mb["x"]).sum(), {}

    def evaluate(self) -> dict[str, float]:
        self.clock.now += 3.0
        return {"eval/x": 1.0}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_loop_logs_phases_step_time_throughput_and_mfu_on_a_fake_clock(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    cfg = RunConfig(out=str(tmp_path / "run"), max_steps=3, batch_size=4, grad_accum=2, progress=False,
                    checkpoint_every=1, peak_tflops=1e-9)  # a peak of 1000 FLOP/s
    train(cfg, ClockedRecipe(cfg, clock))
    rows = read_metrics(Path(cfg.out))
    flops = 2 * 5 * 10 + 2 * (6 * 5 * 3)  # the reference forward, and two micro-batches' forward + backward
    for row in rows:
        last = row["step"] == 2
        step_seconds = 1.0 + 2.0 + 0.5 + 2 * 0.25 + (3.0 if last else 0.0)
        assert row["timing/step"] == step_seconds
        assert row["timing/plan"] == 1.0 and row["timing/sample"] == 2.0 and row["timing/reference"] == 0.5
        assert row["timing/update"] == 0.5
        assert row.get("timing/evaluate") == (3.0 if last else None)
        assert ("timing/checkpoint" in row) == (row["step"] > 0)  # the previous step's checkpoint (0 s here)
        assert row["perf/tflops"] == pytest.approx(flops / step_seconds / 1e12)
        assert row["perf/mfu"] == pytest.approx(flops / step_seconds / 1000)
    assert [r["perf/tokens_per_second"] for r in rows] == pytest.approx([6 / 4.0, 12 / 8.0, 18 / 12.0])  # before evaluate()
    assert all(is_wall_clock(k) for r in rows for k in r if k.startswith(("timing/", "perf/")))

    unknown = replace(cfg, out=str(tmp_path / "cpu"), peak_tflops=0.0)  # a CPU has no known peak: no perf/mfu
    train(unknown, ClockedRecipe(unknown, clock))
    assert not any("perf/mfu" in r for r in read_metrics(Path(unknown.out)))


# What each trainer marks inside its step, besides the loop's plan and update (and evaluate, where it has one).
PHASES = {
    "pretrain": set(), "sft": set(), "rm": {"evaluate"}, "dpo": {"reference", "evaluate"},
    "ppo": {"sample", "score", "old_logps", "reference", "values", "advantages"},
    "grpo": {"sample", "score", "old_logps", "reference"},
}


def flops_per_token(name: str) -> float | None:
    """Model FLOPs per real token of a golden run's step, by hand (None: not counted here). SFT trains once (6N).
    GRPO (num_iterations 2) trains twice and runs the old-policy, reference and sampling forwards (2N each):
    18N. PPO (group size 1, 2 epochs) trains the policy and the value model twice, and runs the old-policy,
    reference and sampling forwards (2N_policy each) and the value and reward-model forwards (2N_value each)."""
    config = tiny_lm(tiny_tokenizer()).config
    stack, head = llama_matmul_params(config)
    n_policy, n_value = stack + head, stack + config.hidden_size  # the scorers: a scalar head, no output layer
    return {"sft": 6 * n_policy, "grpo": 18 * n_policy,
            "ppo": 2 * 6 * (n_policy + n_value) + 3 * 2 * n_policy + 2 * 2 * n_value}.get(name)


@pytest.mark.parametrize("name", list(GOLDEN_RUNS))
def test_every_trainer_logs_phases_that_add_up_to_its_step(name, tmp_path):
    rows = GOLDEN_RUNS[name](tmp_path).metrics
    seen = set()
    for row in rows:
        phases = {k.removeprefix("timing/"): v for k, v in row.items() if k.startswith("timing/") and k != "timing/step"}
        seen |= set(phases)
        assert all(0 <= seconds <= row["timing/step"] for seconds in phases.values()), row
        assert sum(phases.values()) <= row["timing/step"] * (1 + 1e-9), row
        assert {"plan", "update"} <= set(phases)
        assert row["perf/tflops"] > 0 and row["perf/tokens_per_second"] > 0
        assert "perf/mfu" not in row  # a CPU: no known peak
    assert seen == {"plan", "update"} | PHASES[name]
    if (per_token := flops_per_token(name)) is not None:
        counts = [r["num_tokens"] for r in rows]
        tokens = [b - a for a, b in zip([0.0, *counts], counts, strict=False)]  # the real tokens of each step
        step_flops = [r["perf/tflops"] * r["timing/step"] * 1e12 for r in rows]
        assert step_flops == pytest.approx([per_token * t for t in tokens])

"""The shared training loop: accumulation invariance, resume, checkpoints, non-finite steps, token counts,
evaluation, progress text, configs."""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from helpers import without_timing

from rlhflab.config import RunConfig, load_config
from rlhflab.errors import InputError
from rlhflab.training import loop
from rlhflab.training.checkpoint import (
    STATE_FILE,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rlhflab.training.data_order import EpochSampler, split_micro_batches
from rlhflab.training.loop import StepPlan, TrainingStopped, train
from rlhflab.training.metrics import read_metrics


class ToyRecipe:
    """Least squares on fixed data: loss numerator = Σ (w·x − y)², num_items = examples."""

    def __init__(self, cfg: RunConfig, nan_at_step: int | None = None, crash_at_step: int | None = None):
        torch.manual_seed(0)
        self.x = torch.randn(64, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64)
        self.model = torch.nn.Linear(4, 1)
        self.cfg = cfg
        self.sampler = EpochSampler(64, cfg.seed)
        self.updates_per_step = 1
        self.nan_at_step = nan_at_step
        self.crash_at_step = crash_at_step

    def plan_step(self, step: int) -> StepPlan:
        if step == self.crash_at_step:
            raise RuntimeError("killed")
        indices = self.sampler.take(self.cfg.batch_size)
        mbs = [
            {"x": self.x[c], "y": self.y[c], "num_items": len(c), "poison": step == self.nan_at_step}
            for c in split_micro_batches(indices, self.cfg.grad_accum)
        ]
        # "tokens": the sum of the indices, so that every step counts a different number
        return StepPlan([mbs], {"noise": float(torch.rand(()).item())}, num_tokens=sum(indices))  # consumes the RNG

    def loss(self, mb):
        err = self.model(mb["x"]).squeeze(-1) - mb["y"]
        loss = (err**2).sum()
        if mb["poison"]:
            loss = loss * float("nan")
        return loss, {"mse": (err**2).mean().item()}

    def state_dict(self):
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state["sampler"])


def _cfg(tmp_path: Path, **kw) -> RunConfig:
    base = RunConfig(out=str(tmp_path / "run"), max_steps=12, batch_size=8, lr=0.05, progress=False, warmup_ratio=0.1)
    return replace(base, **kw)


def test_accumulation_matches_full_batch(tmp_path):
    full = ToyRecipe(_cfg(tmp_path / "a"))
    train(_cfg(tmp_path / "a"), full)
    accumulated = ToyRecipe(_cfg(tmp_path / "b", grad_accum=2))
    train(_cfg(tmp_path / "b", grad_accum=2), accumulated)
    # uneven micro-batches (3, 3, 2): the normalisation is over the whole step, not per micro-batch
    uneven = ToyRecipe(_cfg(tmp_path / "c", grad_accum=3))
    train(_cfg(tmp_path / "c", grad_accum=3), uneven)
    for other in (accumulated, uneven):
        for p, q in zip(full.model.parameters(), other.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_reproduces_metrics_exactly(tmp_path):
    straight = _cfg(tmp_path / "straight")
    train(straight, ToyRecipe(straight))
    interrupted = _cfg(tmp_path / "resumed", checkpoint_every=2)
    with pytest.raises(RuntimeError, match="killed"):
        train(interrupted, ToyRecipe(interrupted, crash_at_step=5))
    # a killed run may have logged steps past its last checkpoint: they must be dropped on resume
    resumed = _cfg(tmp_path / "resumed", checkpoint_every=2, resume="auto")
    with open(Path(resumed.out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "time": 0, "loss": 123.0}) + "\n")
    train(resumed, ToyRecipe(resumed))
    a = without_timing(read_metrics(Path(straight.out)))
    b = without_timing(read_metrics(Path(resumed.out)))
    assert [r["step"] for r in b] == list(range(12))
    assert a == b


class FakeClock:
    """The loop's `time`, advanced one second by each plan_step: every step takes exactly 1 s of wall time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class TimedToyRecipe(ToyRecipe):
    def __init__(self, cfg: RunConfig, clock: FakeClock, **kwargs):
        super().__init__(cfg, **kwargs)
        self.clock = clock

    def plan_step(self, step: int) -> StepPlan:
        self.clock.now += 1.0
        return super().plan_step(step)


def test_num_tokens_is_cumulative_across_resume_and_throughput_counts_this_process(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    replay = EpochSampler(64, 0)  # the independent reference: the token count of every step, from the data order
    per_step = [sum(replay.take(8)) for _ in range(12)]
    expected = [float(sum(per_step[: step + 1])) for step in range(12)]

    straight = _cfg(tmp_path / "straight")
    train(straight, TimedToyRecipe(straight, clock))
    rows = read_metrics(Path(straight.out))
    assert [r["num_tokens"] for r in rows] == expected
    # tokens since this process's first step, over the seconds since then (each step took 1 s)
    assert [r["perf/tokens_per_second"] for r in rows] == pytest.approx([expected[s] / (s + 1) for s in range(12)])

    interrupted = _cfg(tmp_path / "resumed", checkpoint_every=2)
    with pytest.raises(RuntimeError, match="killed"):
        train(interrupted, TimedToyRecipe(interrupted, clock, crash_at_step=5))
    resumed = replace(interrupted, resume="auto")
    train(resumed, TimedToyRecipe(resumed, clock))  # from checkpoint 4: the count continues from the checkpoint
    rows = read_metrics(Path(resumed.out))
    assert [r["num_tokens"] for r in rows] == expected
    # the resumed process started its clock and its count at step 4
    assert [r["perf/tokens_per_second"] for r in rows[4:]] == pytest.approx(
        [(expected[s] - expected[3]) / (s - 3) for s in range(4, 12)])


class EvaluatedToyRecipe(ToyRecipe):
    """ToyRecipe with a held-out evaluate(): the MSE on 16 examples it never trains on."""

    progress_metrics = ("mse", "eval/mse")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.x_eval = torch.randn(16, 4)
        self.y_eval = self.x_eval @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.planned: int | None = None
        self.evaluations: list[tuple[int | None, float]] = []  # (the last step planned, eval/mse)

    def plan_step(self, step: int) -> StepPlan:
        self.planned = step
        return super().plan_step(step)

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            mse = ((self.model(self.x_eval).squeeze(-1) - self.y_eval) ** 2).mean().item()
        self.evaluations.append((self.planned, mse))
        return {"eval/mse": mse}


class RecordingMonitor:
    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}

    def observe(self, step, metrics):
        self.seen[step] = dict(metrics)
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize(("eval_every", "evaluated"), [(5, [0, 5, 10, 11]), (0, [11]), (4, [0, 4, 8, 11])])
def test_evaluate_runs_at_eval_every_and_after_the_last_step(tmp_path, eval_every, evaluated):
    cfg = _cfg(tmp_path, eval_every=eval_every, log_every=3)
    recipe, monitor = EvaluatedToyRecipe(cfg), RecordingMonitor()
    final = train(cfg, recipe, monitors=[monitor])
    assert [step for step, _ in recipe.evaluations] == evaluated  # after the step's update, before the next plan
    results = dict(recipe.evaluations)
    rows = {r["step"]: r for r in read_metrics(Path(cfg.out))}
    # an evaluated step is logged even where log_every would skip it; no other line has eval metrics
    assert set(rows) == set(range(0, 12, 3)) | set(evaluated)
    assert {s: r["eval/mse"] for s, r in rows.items() if "eval/mse" in r} == results
    assert {s: m["eval/mse"] for s, m in monitor.seen.items() if "eval/mse" in m} == results  # monitors see them
    assert final == {"eval/mse": results[11]}  # train returns the last evaluation: the final weights'
    assert results[11] < results.get(0, math.inf)


def test_train_returns_nothing_without_evaluate_and_reevaluates_a_finished_run(tmp_path):
    cfg = _cfg(tmp_path, max_steps=3, checkpoint_every=1)
    assert train(cfg, ToyRecipe(cfg)) == {}
    recipe = EvaluatedToyRecipe(cfg)
    first = train(cfg, recipe)
    resumed = EvaluatedToyRecipe(cfg)
    again = train(replace(cfg, resume="auto"), resumed)  # nothing left to train: the final weights evaluated again
    assert again == first and len(resumed.evaluations) == 1


def test_progress_text_shows_the_recipes_progress_metrics(tmp_path):
    metrics = {"loss": 0.5, "mse": 0.25, "eval/mse": 0.125, "reward": 2.0}
    cfg = _cfg(tmp_path)
    assert loop._describe(metrics, EvaluatedToyRecipe(cfg)) == "mse=0.250 eval/mse=0.125"
    assert loop._describe(metrics, ToyRecipe(cfg)) == "loss=0.500"  # no progress_metrics: the loss alone


def test_nonfinite_step_is_not_applied_and_stops(tmp_path):
    cfg = _cfg(tmp_path, max_steps=6)
    recipe = ToyRecipe(cfg, nan_at_step=3)
    weights_before = {}

    original = recipe.plan_step

    def plan(step):
        if step == 3:
            weights_before.update({k: v.clone() for k, v in recipe.model.state_dict().items()})
        return original(step)

    recipe.plan_step = plan
    with pytest.raises(TrainingStopped) as info:
        train(cfg, recipe)
    assert info.value.exit_code == 3
    for key, value in recipe.model.state_dict().items():
        torch.testing.assert_close(value, weights_before[key], rtol=0, atol=0)
    codes = [json.loads(line)["code"] for line in (Path(cfg.out) / "diagnostics.jsonl").read_text().splitlines()]
    assert codes == ["train.nonfinite"]


def test_nonfinite_skip_continues(tmp_path):
    cfg = _cfg(tmp_path, max_steps=6, on_nonfinite="skip")
    train(cfg, ToyRecipe(cfg, nan_at_step=2))
    assert len(read_metrics(Path(cfg.out))) == 6


def test_checkpoint_keeps_last_k_and_skips_corrupt(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003"]
    newest = list_checkpoints(tmp_path)[-1]
    with open(newest / STATE_FILE, "ab") as f:
        f.write(b"garbage")
    warnings = []
    chosen = find_resume_checkpoint(tmp_path, "auto", warn=warnings.append)
    assert chosen.name == "step-000002"
    assert "checksum" in warnings[0]


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    from rlhflab.training import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, model, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, {"step": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlhflab-pwned",))


def test_crafted_pickle_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 1, model, {"step": 1})
    with open(path / STATE_FILE, "wb") as f:
        pickle.dump({"step": _Exploit()}, f)
    with pytest.raises(InputError, match="refused"):
        load_checkpoint(path, model)
    assert not Path("/tmp/rlhflab-pwned").exists()


@dataclass
class _Cfg(RunConfig):
    beta: float = 0.1
    temperatures: list[float] | None = None


def test_config_yaml_then_cli_overrides(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("beta: 0.3\nbatch_size: 4\n")
    from click.testing import CliRunner

    from rlhflab.cli import make_command

    parsed = []
    result = CliRunner().invoke(make_command("test", _Cfg, parsed.append, "test"), [
        "--config", str(file), "--batch-size", "8", "--no-progress", "--temperatures=0.3,0.7"])
    assert result.exit_code == 0, result.output
    cfg = parsed[0]
    assert (cfg.beta, cfg.batch_size, cfg.progress, cfg.temperatures) == (0.3, 8, False, [0.3, 0.7])


def test_config_unknown_key_suggests(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("bta: 0.3\n")
    with pytest.raises(InputError, match="Did you mean 'beta'") as info:
        load_config(_Cfg, str(file))
    assert str(file) in str(info.value)
    with pytest.raises(InputError, match="expected int"):
        load_config(_Cfg, None, {"batch_size": "many"})


class AutocastProbe(ToyRecipe):
    """Records, at each call, whether bf16 autocast is on; the backward pass records it too."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.seen: dict[str, set] = {"plan_step": set(), "loss": set(), "output": set(), "backward": set()}
        self.model.weight.register_hook(lambda grad: self.seen["backward"].add(torch.is_autocast_enabled("cpu")))

    def plan_step(self, step: int) -> StepPlan:
        self.seen["plan_step"].add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return super().plan_step(step)

    def loss(self, mb):
        self.seen["loss"].add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        self.seen["output"].add(self.model(mb["x"]).dtype)
        return super().loss(mb)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_bf16_autocasts_forwards_not_backward_or_weights(tmp_path, precision):
    cfg = _cfg(tmp_path, precision=precision)
    recipe = AutocastProbe(cfg)
    train(cfg, recipe)
    bf16 = precision == "bf16"
    assert recipe.seen["plan_step"] == recipe.seen["loss"] == {torch.bfloat16 if bf16 else False}
    assert recipe.seen["output"] == {torch.bfloat16 if bf16 else torch.float32}
    assert recipe.seen["backward"] == {False}
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters())


def test_bf16_training_tracks_fp32(tmp_path):
    """Mixed precision changes rounding, not the optimisation: both fit the same least-squares weights."""
    fits = []
    for precision in ("fp32", "bf16"):
        cfg = _cfg(tmp_path / precision, precision=precision, max_steps=60)
        recipe = ToyRecipe(cfg)
        train(cfg, recipe)
        fits.append(recipe.model.weight.detach().clone())
    torch.testing.assert_close(fits[1], fits[0], atol=0.05, rtol=0.02)
    assert not torch.equal(fits[0], fits[1])  # bf16 matmuls did run


def test_bf16_without_cpu_support_warns(tmp_path, monkeypatch, capsys):
    import rlhflab.training.loop as loop
    from rlhflab.training.precision import bf16_is_emulated as emulated

    monkeypatch.setattr(loop, "bf16_is_emulated", lambda device: True)
    cfg = _cfg(tmp_path, precision="bf16", max_steps=1)
    train(cfg, ToyRecipe(cfg))
    assert "no bf16 instructions" in capsys.readouterr().err
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not emulated(torch.device("cpu"))  # AMX alone is enough
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert emulated(torch.device("cpu")) and not emulated(torch.device("meta"))

"""Injected faults (issue 6, parts 2, 4 and 6): non-finite losses, a full disk while checkpointing, and
unsafe files (a crafted pickle in a checkpoint, pickle-only model weights, remote code)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import (
    COMMANDS,
    assert_same_run,
    command,
    record_trial,
    run_cli,
    straight_run,
)

from rlhflab.config import RunConfig
from rlhflab.training.checkpoint import MANIFEST_FILE, STATE_FILE, list_checkpoints, verify_checkpoint
from rlhflab.training.data_order import split_micro_batches
from rlhflab.training.loop import StepPlan, train
from rlhflab.training.metrics import read_metrics


def codes(out: Path) -> list[tuple[int, str]]:
    return [(f["step"], f["code"]) for f in map(json.loads, (out / "diagnostics.jsonl").read_text().splitlines())]


# ---- non-finite values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_nan_stops_keeps_last_good_checkpoint_and_resumes(name, inputs, tmp_path, tmp_path_factory):
    straight = straight_run(name, inputs, tmp_path_factory)
    out = tmp_path / "run"
    result = run_cli(command(name, inputs, out), "nan@3")
    assert result.exit_code == 3, result.output
    assert "train.nonfinite" in result.output and "last good checkpoint" in result.output
    assert (3, "train.nonfinite") in codes(out)
    rows = read_metrics(out)
    assert rows[-1]["step"] == 3 and rows[-1]["loss"] == "nan"
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert not (out / "model").exists()
    # the fault was transient: resuming from the last good checkpoint gives the unbroken run
    assert run_cli(command(name, inputs, out, "--resume", "auto")).exit_code == 0
    assert_same_run(straight, out)
    record_trial(command=name, scenario="nan then resume", faults=["nan@3"], how="in-process", identical=True)


@pytest.mark.parametrize("name", ["sft", "ppo"])
def test_nan_skip_is_bounded(name, inputs, tmp_path):
    out = tmp_path / "skip"
    result = run_cli(command(name, inputs, out, "--on-nonfinite", "skip"), "nan@3")
    assert result.exit_code == 0, result.output
    rows = read_metrics(out)
    assert len(rows) == 8 and rows[3]["loss"] == "nan" and rows[4]["loss"] != "nan"
    out = tmp_path / "bounded"
    args = command(name, inputs, out, "--on-nonfinite", "skip", "--max-nonfinite-skips", "1")
    result = run_cli(args, "nan@3,nan@4")
    assert result.exit_code == 3, result.output
    assert read_metrics(out)[-1]["step"] == 4
    assert [c for c in codes(out) if c[1] == "train.nonfinite"] == [(3, "train.nonfinite"), (4, "train.nonfinite")]


def test_skipped_step_leaves_weights_as_before(inputs, tmp_path):
    """With skip, a NaN at the last step leaves the weights of the step before (checkpoint 7 of a clean run)."""
    clean = tmp_path / "clean"
    assert run_cli(command("sft", inputs, clean, "--checkpoint-every", "1", "--keep-checkpoints", "9")).exit_code == 0
    skipped = tmp_path / "skipped"
    assert run_cli(command("sft", inputs, skipped, "--on-nonfinite", "skip"), "nan@7").exit_code == 0
    before = load_file(clean / "checkpoints" / "step-000007" / "model.safetensors")
    after = load_file(skipped / "model" / "model.safetensors")
    shared = before.keys() & after.keys()  # the checkpoint also lists the tied lm_head
    assert len(shared) > 10 and all(before[k].equal(after[k]) for k in shared)


class TwoUpdateRecipe:
    """Least squares with two optimizer updates per step (like PPO epochs); update 2 of step 2 is poisoned."""

    def __init__(self, cfg: RunConfig, poison_step: int):
        torch.manual_seed(0)
        self.x, self.y = torch.randn(16, 3), torch.randn(16)
        self.model = torch.nn.Linear(3, 1)
        self.updates_per_step, self.poison_step = 2, poison_step

    def plan_step(self, step):
        updates = [[{"num_items": 8, "rows": rows, "poison": step == self.poison_step and u == 1}]
                   for u, rows in enumerate(split_micro_batches(list(range(16)), 2))]
        return StepPlan(updates)

    def loss(self, mb):
        loss = ((self.model(self.x[mb["rows"]]).squeeze(-1) - self.y[mb["rows"]]) ** 2).sum()
        return loss * float("nan") if mb["poison"] else loss, {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_skip_undoes_every_update_of_a_bad_step(tmp_path):
    """Found by this issue: update 1 of a step was kept when update 2 went NaN (PPO/GRPO with several updates)."""
    cfg = RunConfig(out=str(tmp_path / "a"), max_steps=2, lr=0.1, progress=False, on_nonfinite="skip", warmup_ratio=0,
                    lr_schedule="constant")
    reference = TwoUpdateRecipe(cfg, poison_step=-1)
    train(cfg, reference)  # two clean steps
    cfg_b = replace(cfg, out=str(tmp_path / "b"), max_steps=3)
    skipped = TwoUpdateRecipe(cfg_b, poison_step=2)
    train(cfg_b, skipped)  # the same two steps, then a rejected third
    for p, q in zip(reference.model.parameters(), skipped.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---- a full disk ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", pytest.param("ppo", marks=pytest.mark.slow),
                                  pytest.param("dpo", marks=pytest.mark.slow)])
def test_disk_full_keeps_previous_checkpoint_and_resumes(name, inputs, tmp_path, tmp_path_factory):
    straight = straight_run(name, inputs, tmp_path_factory)
    out = tmp_path / "run"
    result = run_cli(command(name, inputs, out), "disk_full@4")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "No space left on device" in text and "previous checkpoint is intact" in text and "resume" in text
    assert "Traceback" not in result.output
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert verify_checkpoint(list_checkpoints(out)[0]) is None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert run_cli(command(name, inputs, out, "--resume", "auto")).exit_code == 0
    assert_same_run(straight, out)
    record_trial(command=name, scenario="disk full", faults=["disk_full@4"], how="in-process", identical=True)


# ---- nothing unsafe is loaded --------------------------------------------------------------------------------------

MARKER = Path("/tmp/rlhflab-reliability-pwned")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _rewrite_manifest(checkpoint: Path) -> None:
    """Make a tampered checkpoint verify, as an attacker who can write the folder could."""
    import hashlib

    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_crafted_pickle_in_checkpoint_is_refused_by_resume(inputs, tmp_path, tmp_path_factory):
    MARKER.unlink(missing_ok=True)
    out = tmp_path / "run"
    assert run_cli(command("sft", inputs, out, "--max-steps", "4")).exit_code == 0
    newest = list_checkpoints(out)[-1]
    with open(newest / STATE_FILE, "wb") as f:
        pickle.dump({"step": Exploit()}, f)
    # with a stale manifest the tampered checkpoint is skipped and the older one used
    result = run_cli(command("sft", inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert "skipping checkpoint" in result.output and "at step 2" in result.output
    assert not MARKER.exists()
    # with a manifest that matches, loading refuses the pickle rather than running it
    assert run_cli(command("sft", inputs, out, "--max-steps", "4")).exit_code == 0
    newest = list_checkpoints(out)[-1]
    with open(newest / STATE_FILE, "wb") as f:
        pickle.dump({"step": Exploit()}, f)
    _rewrite_manifest(newest)
    result = run_cli(command("sft", inputs, out, "--resume", "auto"))
    assert result.exit_code == 2, result.output
    assert "refused to load trainer state" in result.output and "Traceback" not in result.output
    assert not MARKER.exists()


@pytest.fixture
def pickle_only_model(inputs, tmp_path) -> Path:
    """The SFT model with its weights as pytorch_model.bin (a pickle that would run code) and no safetensors."""
    folder = tmp_path / "pickle-model"
    shutil.copytree(inputs["sft"], folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "exploit": Exploit()}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("name,flag", [("sft", "--model"), ("rm", "--model"), ("dpo", "--model"), ("ppo", "--model"),
                                       ("grpo", "--model"), ("ppo", "--reward-model"), ("grpo", "--reward-model")])
def test_pickle_only_model_folder_is_refused(name, flag, inputs, pickle_only_model, tmp_path):
    MARKER.unlink(missing_ok=True)
    args = command(name, inputs, tmp_path / "run")
    args[args.index(flag) + 1] = str(pickle_only_model)
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    assert "safetensors" in result.output and str(pickle_only_model) in result.output.replace("\n", "")
    assert not MARKER.exists()


def test_remote_code_is_off_by_default(inputs, tmp_path, monkeypatch):
    from rlhflab.algorithms.dpo import DPOConfig
    from rlhflab.algorithms.grpo import GRPOConfig
    from rlhflab.algorithms.ppo import PPOConfig
    from rlhflab.stages import COMMANDS

    for cls in (*(entry.config for entry in COMMANDS.values()), DPOConfig, PPOConfig, GRPOConfig):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["trust_remote_code"] is False, cls
    MARKER.unlink(missing_ok=True)
    folder = tmp_path / "remote-code-model"
    shutil.copytree(inputs["sft"], folder)
    (folder / "custom_llama.py").write_text(
        f"import pathlib\npathlib.Path('{MARKER}').touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    args = command("sft", inputs, tmp_path / "run")
    args[args.index("--model") + 1] = str(folder)
    result = run_cli(args)
    assert not MARKER.exists(), "remote code ran without --trust-remote-code"
    assert result.exit_code in (0, 2), result.output  # refused with a clear error, or loaded as plain Llama
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception

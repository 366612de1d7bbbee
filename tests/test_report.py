"""The report: self-contained HTML and markdown for a study and for a single run; renders in headless Chromium."""

import base64
import json
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest

from rlhflab.config import RunConfig
from rlhflab.report.document import write_report
from rlhflab.stages import Command
from rlhflab.study.config import StudyConfig, expand_arms
from rlhflab.study.runner import eval_settings, run_dir, write_study_json

PROMPTS = [f"the film was {i}" for i in range(16)]


@dataclass
class StubConfig(RunConfig):
    beta: float = 0.1
    group_size: int = 4


def fake_eval(offset: float, seed: int, temperatures=("0.7", "0.3")) -> dict:
    rng = np.random.default_rng(seed)
    out = {"num_prompts": 16, "samples_per_prompt": 4, "temperatures": {}}
    for t in temperatures:
        gold = np.linspace(-1, 1, 16)[:, None] + offset + rng.normal(0, 0.3, size=(16, 4))
        values = {"gold": gold, "rm_score": 1.5 * gold, "kl": np.full((16, 4), 4 * offset), "length": np.full((16, 4), 9.0),
                  "malformed": (rng.random((16, 4)) < 0.1).astype(float)}  # fmt: skip
        per_prompt = [{"prompt": p, "distinct_1": 0.6, "distinct_2": 0.9, "examples": [f" great <{offset}> & fun", " meh"],
                       "values": {k: v[i].tolist() for k, v in values.items()}} for i, p in enumerate(PROMPTS)]  # fmt: skip
        out["temperatures"][t] = {"aggregate": {}, "per_prompt": per_prompt}
    return out


def write_metrics(folder, kind: str) -> None:
    rows = []
    for step in range(1, 21):
        row = {"step": step, "time": step * 0.1, "loss": 0.69 / step}
        row.update({"rewards/margins": 0.1 * step} if kind == "dpo" else {"reward": step / 20, "kl": 0.01 * step,
                                                                          "frac_reward_zero_std": 1 / step})  # fmt: skip
        rows.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    finding = {"step": 12, "code": f"{kind}.test_code", "severity": "warning", "message": f"{kind} did a thing",
               "advice": f"Lower the {kind} learning rate."}  # fmt: skip
    (folder / "diagnostics.jsonl").write_text(json.dumps(finding) + "\n")


@pytest.fixture
def study_folder(tmp_path):
    stubs = {name: Command(StubConfig, lambda cfg: None, name) for name in ("stub_dpo", "stub_grpo")}
    cfg = StudyConfig(out=str(tmp_path / "study"), seeds=[0, 1], temperatures=[0.7, 0.3], name="synthetic", arms=[
        {"algorithm": "stub_dpo", "group": "phase1", "params": {"beta": 0.1}},
        {"algorithm": "stub_grpo", "group": "phase1"},
        {"algorithm": "stub_dpo", "group": "tuned", "params": {"beta": 0.3}},
        {"algorithm": "stub_grpo", "group": "tuned", "grid": {"group_size": [8]}},
    ])  # fmt: skip
    arms = expand_arms(cfg, commands=stubs)
    offsets = {"sft": 0.0, "stub_dpo-phase1": 0.3, "stub_grpo-phase1": 0.8, "stub_dpo-tuned": 0.9,
               "stub_grpo-tuned-group_size8": 0.35}  # fmt: skip
    for arm in arms:
        for seed in cfg.seeds:
            folder = run_dir(cfg, arm, seed)
            folder.mkdir(parents=True)
            results = {**fake_eval(offsets[arm.name], seed), "study_eval": {"settings": eval_settings(cfg, seed)}}
            (folder / "eval.json").write_text(json.dumps(results))
            if arm.algorithm != "sft":
                write_metrics(folder, arm.algorithm.removeprefix("stub_"))
    write_study_json(cfg, arms, wall_seconds=12.0)
    return tmp_path / "study"


def test_study_report_is_self_contained_and_complete(study_folder):
    page = write_report(study_folder)
    text = page.read_text()
    assert not re.search(r"""(src|href)=(?!"data:)""", text)  # nothing outside the file
    assert "http" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 5  # frontier, heatmap, temperature, training curves, zero-std/margin
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "Lower the dpo learning rate." in text and "grpo.test_code" in text  # findings with advice
    assert "great &lt;0.9&gt; &amp; fun" in text  # completions side by side, escaped
    assert "the ranking changed" in text and "Outside the intervals? yes" in text
    assert "Δ gold reward vs sft" in text
    md = (study_folder / "report.md").read_text()
    assert "| rank | arm |" in md and "![Reward–KL frontier](plots/frontier.png)" in md
    assert (study_folder / "plots" / "frontier.png").is_file()


def test_report_of_a_single_run_folder(study_folder, tmp_path):
    run = study_folder / "runs" / "stub_dpo-phase1" / "seed-0"
    page = write_report(run, tmp_path / "elsewhere")
    text = page.read_text()
    assert "run stub_dpo-phase1/seed-0" in text
    assert "Training curves" in text and "dpo.test_code" in text
    assert "gold reward" in text and "Δ" not in text  # no baseline, no paired differences


def test_report_of_a_training_only_run(tmp_path):
    write_metrics(tmp_path, "dpo")
    text = write_report(tmp_path).read_text()
    assert "No evaluation results" in text and "Training curves" in text


def test_report_shows_what_an_rl_policy_wrote_first_and_last(tmp_path):
    """A GRPO run's completions.jsonl: the report shows the first and the last logged step's first completions
    (a torn last line, as a killed run leaves, is skipped)."""
    write_metrics(tmp_path, "grpo")
    lines = [{"step": step, "prompt": f"p{step}", "completion": f"c{step}-{i}", "reward": step + i / 10}
             for step in (0, 5, 9) for i in range(6)]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 10, "prom'
    (tmp_path / "completions.jsonl").write_text(text)
    report = (write_report(tmp_path).parent / "report.md").read_text()
    assert "What the policy wrote while training" in report
    for shown in ("c0-0", "c0-3", "c9-0", "c9-3", "9.300"):
        assert shown in report
    for hidden in ("c0-4", "c5-0", "c9-5"):  # 4 a step, first and last step only
        assert hidden not in report


def test_report_rejects_a_folder_without_results(tmp_path):
    from rlhflab.errors import InputError

    with pytest.raises(InputError, match="not a study folder"):
        write_report(tmp_path)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,1600"]  # fmt: skip


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(study_folder, tmp_path):
    import matplotlib.image

    page = write_report(study_folder)
    shot = tmp_path / "shot.png"
    command = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               page.resolve().as_uri()]  # fmt: skip
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    pixels = matplotlib.image.imread(shot)[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[:2] == (1600, 1200)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is not white"

"""The report: self-contained HTML and markdown for a study and for a single run; renders in headless Chromium."""

import base64
import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import matplotlib.image
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

# Appended to a copy of the page: after the load event (every image decoded or failed), write what the browser
# made of the page into the DOM, which --dump-dom then prints. innerText is the text a reader sees (CSS applied).
RENDER_PROBE = """<script>
window.addEventListener("load", () => {
  const box = e => e.getBoundingClientRect();
  const pixels = i => {  // the decoded image's mean R, G, B, A in 0..255 (a truncated file decodes in part)
    const canvas = Object.assign(document.createElement("canvas"), {width: i.naturalWidth, height: i.naturalHeight});
    const context = canvas.getContext("2d");
    context.drawImage(i, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data, sum = [0, 0, 0, 0];
    for (let k = 0; k < data.length; k++) sum[k % 4] += data[k];
    return sum.map(v => v / (data.length / 4));
  };
  const seen = {
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                            height: i.naturalHeight, shown: box(i).width * box(i).height,
                                            mean: i.naturalWidth ? pixels(i) : null})),
    tables: [...document.querySelectorAll("table")].map(t => ({headers: [...t.querySelectorAll("th")].map(h => h.innerText),
                                                               rows: t.tBodies[0].rows.length, shown: box(t).height})),
    text: document.body.innerText,
  };
  const out = document.createElement("pre");
  out.id = "render-probe";
  out.textContent = JSON.stringify(seen);
  document.body.append(out);
});
</script>"""


def chromium_or_skip() -> str:
    """The browser; its absence skips the test on a developer's machine and fails it under CI=true, where a
    skipped render check would leave the report unrendered while the run stays green."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but Debian's chromium is not installed: the report render check cannot run")
        pytest.skip("Debian's chromium is not installed")
    return path


def test_report_renders_in_headless_chromium(study_folder, tmp_path):
    """What a reader sees in a browser: every figure decoded with its real size and shown, the results table
    with a row per arm, the findings with their advice."""
    page = write_report(study_folder)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", RENDER_PROBE + "</body>"))
    command = [chromium_or_skip(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
               probed.resolve().as_uri()]  # fmt: skip
    dom = subprocess.run(command, check=True, timeout=120, capture_output=True, text=True).stdout
    probe = re.search(r'<pre id="render-probe">(.*?)</pre>', dom, re.S)
    assert probe, f"the page did not finish loading in chromium: {dom[-2000:]}"
    seen = json.loads(html.unescape(probe.group(1)))
    written = {}  # the plots as matplotlib wrote them: (height, width) -> mean R, G, B, A in 0..255
    for png in (study_folder / "plots").glob("*.png"):
        pixels = matplotlib.image.imread(png)  # [H, W, 4] floats in [0, 1]
        written[pixels.shape[:2]] = 255 * pixels.reshape(-1, 4).mean(axis=0)
    assert len(seen["images"]) == len(written) == 5
    for image in seen["images"]:  # decoded whole, at the size matplotlib wrote, and laid out on the page
        assert image["complete"] and image["width"] > 100 and image["height"] > 100 and image["shown"] > 0, image
        mean = written.get((image["height"], image["width"]))
        assert mean is not None and np.allclose(image["mean"], mean, atol=1.0), (image["alt"], image["mean"], mean)
    summary = next(t for t in seen["tables"] if t["headers"][:2] == ["rank", "arm"])
    assert summary["rows"] == 5 and summary["shown"] > 0  # sft and the four arms
    assert "Δ gold reward vs sft" in summary["headers"]
    text = seen["text"]
    for visible in ("Lower the dpo learning rate.", "grpo.test_code", "great <0.9> & fun", "Outside the intervals? yes",
                    "Reward–KL frontier"):
        assert visible in text, visible

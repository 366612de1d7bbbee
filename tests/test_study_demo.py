"""`rlhflab demo` runs a study (here a one-step one on tiny artefacts) and ends with the report's path."""

from pathlib import Path

import yaml
from click.testing import CliRunner


def test_demo_runs_a_study_and_prints_the_report_path(tiny_artefacts, tmp_path):
    from rlhflab.cli import app

    a = tiny_artefacts("reviews")
    study = tmp_path / "small.yaml"
    study.write_text(yaml.safe_dump({
        "name": "demo smoke", "temperatures": [1.0], "samples_per_prompt": 2, "bootstrap_resamples": 100,
        "arms": [{"algorithm": "sft"}, {"algorithm": "dpo", "max_steps": 1, "params": {"batch_size": 2}}],
    }))  # fmt: skip
    out = tmp_path / "demo"
    args = ["demo", "--study", str(study), "--task-size", "tiny", "--cache-dir", a.cache_dir, "--out", str(out),
            "--threads", "1", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and (out / "report.html").is_file()
    assert Path(out / "runs" / "dpo" / "seed-0" / "model").is_dir()
    assert "demo smoke" in (out / "report.html").read_text()


def test_demo_rejects_an_unknown_builtin(tmp_path):
    from rlhflab.cli import app

    result = CliRunner().invoke(app, ["demo", "--study", "demoo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no built-in study 'demoo'" in result.output

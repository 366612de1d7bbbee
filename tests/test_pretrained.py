"""`--model NAME` for a registered real model (models/pretrained.py): what happens without the extra, with a cached
conversion, and for anything else `--model` names. The conversion itself runs in the slow tests/test_real_model.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rlhflab.cli import app
from rlhflab.errors import InputError
from rlhflab.models import pretrained
from rlhflab.models.pretrained import PackagedModel, named_model_folder, resolve_model


@pytest.fixture
def missing_package(monkeypatch) -> str:
    """A registered model whose package is not installed."""
    monkeypatch.setitem(pretrained.REGISTRY, "absent-model", PackagedModel("rlhflab_no_such_package", "m.gguf"))
    return "absent-model"


def test_missing_extra_names_the_install_command(missing_package, tmp_path):
    with pytest.raises(InputError, match=r"needs the optional 'real' extra: pip install 'rlhflab\[real\]'"):
        resolve_model(missing_package, tmp_path)
    assert not (tmp_path / "models").exists()  # nothing half-made in the cache


def test_missing_extra_fails_every_command_cleanly(missing_package, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n')
    for args in (["sft", "--data", str(data)], ["eval", "--data", str(data)], ["grpo", "--data", str(data),
                 "--reward-fn", "rlhflab.tasks:reviews_reward"]):
        result = CliRunner().invoke(app, [*args, "--model", missing_package, "--cache-dir", str(tmp_path),
                                          "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and "rlhflab[real]" in result.output, result.output


def test_a_converted_model_is_reused(missing_package, tmp_path, monkeypatch):
    (tmp_path / "models" / missing_package).mkdir(parents=True)
    monkeypatch.setattr(pretrained, "convert", lambda *a: pytest.fail("converted again"))
    assert named_model_folder(missing_package, tmp_path) == tmp_path / "models" / missing_package


def test_other_model_names_pass_through(missing_package, tmp_path, monkeypatch):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / missing_package).mkdir()  # a local folder of that name wins over the registry
    assert resolve_model(missing_package, tmp_path / "cache") == missing_package

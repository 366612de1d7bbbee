"""Bad configs and CLI arguments never crash (issue 6, part 5): every input either gives a valid config or an
InputError naming the file/field (exit code 2 from the CLI), never a traceback. Data files are fuzzed in
tests/test_data_fuzz.py."""

from __future__ import annotations

import dataclasses
import string
import subprocess
import sys
import typing

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhflab.algorithms.dpo import DPOConfig
from rlhflab.algorithms.grpo import GRPOConfig
from rlhflab.algorithms.ppo import PPOConfig
from rlhflab.algorithms.pretrain import PretrainConfig
from rlhflab.algorithms.reward_model import RewardModelConfig
from rlhflab.algorithms.sft import SFTConfig
from rlhflab.cli import app, make_command
from rlhflab.config import RunConfig, build_config, choices_of, field_names, load_config
from rlhflab.errors import InputError
from rlhflab.stages.evaluate import EvalCommandConfig

CONFIGS = [PretrainConfig, SFTConfig, RewardModelConfig, DPOConfig, PPOConfig, GRPOConfig, EvalCommandConfig]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
                    st.floats(allow_subnormal=False), st.text(max_size=30), st.text(alphabet="0123456789.e-+", max_size=12),
                    st.sampled_from(["inf", "-inf", "nan", ".inf", "1e999", "none", "True", "cosine", "skip", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)


def keys_of(cls) -> st.SearchStrategy[str]:
    names = field_names(cls)
    return st.one_of(st.sampled_from(names), st.sampled_from([n.replace("_", "-") for n in names]),
                     st.text(alphabet=string.ascii_lowercase + "_-", min_size=1, max_size=20))


def parse_or_input_error(fn, *args):
    """Run `fn`; the only acceptable failure is an InputError with a non-empty message of bounded length."""
    try:
        return fn(*args)
    except InputError as exc:
        assert str(exc) and len(str(exc)) < 2000, str(exc)[:300]
        return exc


@FUZZ
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_random_mappings_give_a_config_or_input_error(cls, data):
    mapping = data.draw(st.dictionaries(keys_of(cls), values, max_size=5))
    result = parse_or_input_error(build_config, cls, mapping, "fuzz.yaml")
    if isinstance(result, InputError):
        assert "fuzz.yaml" in str(result)
    else:
        assert isinstance(result, cls)


@FUZZ
@given(cls=st.sampled_from(CONFIGS), text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(
    lambda b: b.decode("latin-1")), st.builds(lambda d: yaml.safe_dump(d), st.dictionaries(st.text(max_size=10), values,
                                                                                           max_size=4))))
def test_random_yaml_files_give_a_config_or_input_error(cls, text, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    parse_or_input_error(load_config, cls, str(path))


@FUZZ
@given(blob=st.binary(max_size=300))
def test_random_bytes_files(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "config.yaml"
    path.write_bytes(blob)
    parse_or_input_error(load_config, SFTConfig, str(path))


@FUZZ
@given(cls=st.sampled_from(CONFIGS), args=st.lists(st.one_of(
    st.text(max_size=12), st.sampled_from(["--", "-", "--=", "--config", "--no-", "--max-steps", "--lr", "--seed",
                                           "--batch-size=0", "--on-nonfinite", "--resume", "--temperatures"]),
    st.builds(lambda k: "--" + k, st.text(alphabet=string.ascii_lowercase + "-_", max_size=15))), max_size=6))
def test_random_cli_arguments(cls, args):
    """Whatever the arguments, the command parses them into a config or exits 2 with a message."""
    parsed = []
    result = CliRunner().invoke(make_command("fuzz", cls, parsed.append, "fuzz"), args)
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    assert "Traceback" not in result.output
    if not {"-h", "--help"} & set(args):
        assert (result.exit_code == 0) == (len(parsed) == 1) and (not parsed or isinstance(parsed[0], cls))


def _wrong_value(hint) -> object:
    if choices_of(hint) is not None:
        return "not-one-of-them"
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(base[0]) or base[0]
    return {bool: "maybe", int: "many", float: "fast", str: {"a": 1}, list: {"a": 1}}[kind]


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_rejects_a_wrong_type_naming_it(cls, tmp_path):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        file = tmp_path / f"{f.name}.yaml"
        file.write_text(yaml.safe_dump({f.name: _wrong_value(hints[f.name])}))
        with pytest.raises(InputError) as info:
            load_config(cls, str(file))
        assert f"field '{f.name}'" in str(info.value) and str(file) in str(info.value)


@pytest.mark.parametrize("cls", CONFIGS)
def test_misspelt_keys_suggest_the_closest(cls):
    for name in field_names(cls):
        if len(name) < 5:
            continue
        typo = name[:2] + name[3:]  # drop the third letter
        if typo in field_names(cls):
            continue
        with pytest.raises(InputError, match="Did you mean") as info:
            build_config(cls, {typo: 1})
        suggested = str(info.value).split("Did you mean '")[1].split("'")[0]
        assert suggested in field_names(cls)


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("max_steps: .inf\n", "expected int"),
    ("max_steps: 1.5\n", "expected int"),
    ("lr: .nan\n", "finite"),
    ("lr: 1.0e999\n", "finite"),
    ("batch_size: 0\n", "at least 1"),
    ("max_steps: -3\n", "at least 0"),
    ("seed: 123456789012345678901234567890\n", "at most"),
    ("lr_schedule: cosin\n", "one of cosine"),
    ("on_nonfinite: ignore\n", "one of stop, skip"),
    ("precision: fp16\n", "one of fp32, bf16"),
    ("log_every: 0\n", "at least 1"),
    ("keep_checkpoints: 0\n", "at least 1"),
    ("warmup_ratio: 2\n", "at most"),
    ("max_steps: " + "9" * 5000 + "\n", "not valid YAML"),  # beyond Python's int parsing limit
    ("out: " + "x" * 100_000 + "\n", None),  # a long string is a valid (if odd) value
    ("- a\n- b\n", "mapping"),
    ("just a string\n", "mapping"),
    ("a: [\n", "not valid YAML"),
    ("a: 1\na: 2\n", "unknown key 'a'"),
    ("!!python/object:os.system {}\n", "not valid YAML"),
    ("[" * 5000 + "]" * 5000 + "\n", None),
    ("a: &x [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &y [*x, *x, *x, *x, *x, *x, *x, *x, *x]\nc: &z [*y, *y, *y, *y, *y, *y, *y, *y]\n"
     "max_steps: [*z, *z, *z, *z, *z, *z, *z, *z, *z, *z]\n", None),  # "billion laughs": short message, no blow-up
])
def test_bad_yaml_configs(yaml_text, message, tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml_text)
    result = parse_or_input_error(load_config, SFTConfig, str(file))
    if message is not None:
        assert isinstance(result, InputError) and message in str(result), result
    if isinstance(result, InputError):
        assert str(file) in str(result)


def test_non_utf8_and_unreadable_config_files(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("out: caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(SFTConfig, str(latin))
    with pytest.raises(InputError, match="not found"):
        load_config(SFTConfig, str(tmp_path))  # a folder
    with pytest.raises(InputError, match="not found"):
        load_config(SFTConfig, str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("args", [
    ["sft", "--max-steps"],  # a bare option is the flag value "true"
    ["sft", "--bach-size", "4"],
    ["sft", "positional"],
    ["sft", "--", "--max-steps", "1"],
    ["sft", "--lr", "fast"],
    ["sft", "--lr-schedule", "cosin", "--task", "reviews"],
    ["dpo", "--beta", "nan"],
    ["ppo", "--batch-size", "-1"],
    ["grpo", "--seed", "99999999999999999999999"],
    ["rm", "--config", "/nonexistent.yaml"],
    ["sft", "--resume", "/nonexistent/checkpoint"],
    ["sft", "--model", "/nonexistent/model", "--data", "/nonexistent.jsonl"],
    ["pretrain", "--preset", "huge", "--num-documents", "8", "--max-steps", "1"],
    ["sft"],  # no --model, --data or --task
])
def test_cli_arguments_end_in_exit_2(args, tmp_path):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "error" in result.output.lower() and "Traceback" not in result.output


def test_out_that_is_a_file_is_an_input_error(tmp_path, tiny_artefacts):
    from rlhflab.stages.artefacts import base_model

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["sft", "--task", "reviews", "--model", str(base_model(tiny_artefacts("reviews"))),
                                      "--num-examples", "8", "--max-steps", "1", "--out", str(blocker / "run"),
                                      "--no-progress", "--threads", "1"])
    assert result.exit_code == 2, (result.output, result.exception)


def test_non_utf8_arguments_in_a_real_process(tmp_path):
    """Arguments that are not UTF-8 reach Python as surrogates; the error must still print cleanly."""
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "sft", b"--b\xffad".decode("utf-8", "surrogateescape"),
                           "1", "--out", str(tmp_path)], capture_output=True)
    assert proc.returncode == 2, proc.stderr
    assert b"Traceback" not in proc.stderr and b"No such option" in proc.stderr


def test_default_configs_are_valid():
    for cls in [RunConfig, *CONFIGS]:
        build_config(cls, {k: v for k, v in dataclasses.asdict(cls()).items()})


def test_saved_config_round_trips(tmp_path):
    from rlhflab.config import save_config

    cfg = build_config(DPOConfig, {"beta": 0.25, "lr_schedule": "linear", "eval_temperatures": [0.5]})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(DPOConfig, str(tmp_path / "config.yaml")) == cfg



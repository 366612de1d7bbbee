"""`rlhflab COMMAND [--config FILE.yaml] [--option value ...]`: argv → config → one function.

Each command's options are generated from the fields of its config dataclass (`rlhflab COMMAND -h`
lists them, grouped by the class that declares them): `Literal` fields take one of their values,
booleans are `--flag/--no-flag`, lists are comma-separated or repeated. A YAML file given with
`--config` is applied first and options override it. TRL's option names are accepted where ours
differ (`TRL_ALIASES`). The training and eval commands come from `rlhflab.stages.COMMANDS`; demo,
study and report are the layers above.
"""

from __future__ import annotations

import os
import time
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape

from rlhflab.config import choices_of, declaring_class, default_of, field_info, load_config, strip_optional
from rlhflab.errors import InputError

console = Console(stderr=True)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# TRL's option name -> the fields of ours it sets (the first one the command's config has). Two convert:
# TRL counts completions per batch where our RL batch_size counts prompts, and TRL's max_length is the
# whole sequence where we budget prompt and completion separately (see `trl_values`).
TRL_ALIASES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",),
    "per_device_train_batch_size": ("batch_size",),
    "num_generations": ("group_size",),
    "max_prompt_length": ("max_prompt_tokens",),
    "max_completion_length": ("max_completion_tokens", "max_new_tokens"),
    "max_length": ("max_completion_tokens",),
}


class FieldOption(click.Option):
    """An option made from a config field; `group` is the class that declares the field (its help section)."""

    def __init__(self, *args: Any, group: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group


class ConfigCommand(click.Command):
    """A command whose help lists its options in sections, one per config class of the hierarchy."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", "Other options"), []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


def _field_type(hint: Any) -> tuple[click.ParamType, bool]:
    """(click type, multiple) for a field's annotation. Values stay strings for `load_config` to coerce,
    so a bad value is an InputError naming the field, as in a YAML file."""
    choices = choices_of(hint)
    if choices is not None:
        return click.Choice([str(c) for c in choices]), False
    hint = strip_optional(hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        item = (typing.get_args(hint) or (str,))[0]
        return _Raw(f"{getattr(item, '__name__', 'TEXT').upper()}[,...]"), True
    if origin is dict:
        return _Raw("YAML"), False
    return _Raw({"str": "TEXT"}.get(getattr(hint, "__name__", "str"), getattr(hint, "__name__", "").upper())), False


class _Raw(click.ParamType):
    def __init__(self, name: str):
        self.name = name

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return value


def config_options(cls: type) -> list[click.Parameter]:
    """One option per field of `cls` (plus --config and TRL's names for fields it has)."""
    hints = typing.get_type_hints(cls)
    params: list[click.Parameter] = [
        FieldOption(["--config", "config"], group="Options", metavar="FILE.yaml",
                    help="YAML file of options, applied first; options given here override it")]
    for f in fields(cls):
        info, flag = field_info(cls, f.name), f"--{f.name.replace('_', '-')}"
        group = declaring_class(cls, f.name)
        title = f"{group.__name__} ({group.__module__.replace('.', '/')}.py)"
        default = default_of(f)
        if hints[f.name] is bool:
            params.append(FieldOption([f"{flag}/--no-{flag[2:]}", f.name], group=title, default=default,
                                      show_default=True, help=info.get("help", "")))
            continue
        kind, multiple = _field_type(hints[f.name])
        extra = {"is_flag": False, "flag_value": info["flag_value"]} if info.get("flag_value") else {}
        if isinstance(default, list):  # shown as the comma-separated value one would type
            extra["show_default"] = ",".join(map(str, default)) or '""'
        params.append(FieldOption([flag, f.name], group=title, type=kind, multiple=multiple, help=info.get("help", ""),
                                  default=None if isinstance(default, list | dict) else default,
                                  **{"show_default": default not in (None, ""), **extra}))
    return params + trl_options(cls, hints)


def trl_options(cls: type, hints: dict[str, Any]) -> list[click.Parameter]:
    """TRL's option names for the fields a config has (`TRL_ALIASES`)."""
    notes = {"per_device_train_batch_size": " (completions per step: divided by --group-size)" if "group_size" in hints else "",
             "max_length": " (prompt + completion: minus --max-prompt-tokens)"}  # fmt: skip
    params: list[click.Parameter] = []
    for alias, targets in TRL_ALIASES.items():
        target = next((t for t in targets if t in hints), None)
        if target is None or (alias == "max_length" and not _has_prompts(cls, hints)):
            continue
        params.append(FieldOption([f"--{alias.replace('_', '-')}", f"trl_{alias}"], group="TRL's names", type=_Raw("VALUE"),
                                  help=f"sets --{target.replace('_', '-')}{notes.get(alias, '')}"))
    return params


def _has_prompts(cls: type, hints: dict[str, Any]) -> bool:
    """Whether the config's examples have a prompt budget (pretraining documents have none)."""
    if "max_prompt_tokens" not in hints:
        return False
    from rlhflab.algorithms.pretrain import PretrainConfig

    return not issubclass(cls, PretrainConfig)


def trl_values(cls: type, given: dict[str, Any], aliases: dict[str, Any], config_file: str | None) -> dict[str, Any]:
    """Our field values for TRL's option names, converted where TRL counts differently."""
    values: dict[str, Any] = {}
    for alias, value in aliases.items():
        target = next(t for t in TRL_ALIASES[alias] if t in typing.get_type_hints(cls))
        if target in given:
            raise InputError(f"--{alias.replace('_', '-')} and --{target.replace('_', '-')} set the same field; give one",
                             file="<cli>", field=target)
        values[target] = value
    if "per_device_train_batch_size" in aliases or "max_length" in aliases:
        cfg = load_config(cls, config_file, {**given, **values})
        if "per_device_train_batch_size" in aliases and hasattr(cfg, "group_size"):
            completions, k = int(values["batch_size"]), cfg.group_size  # TRL: completions; ours: prompts
            if completions % k:
                raise InputError(f"--per-device-train-batch-size {completions} (completions) is not a multiple of "
                                 f"the group size {k}", file="<cli>", field="batch_size")
            values["batch_size"] = completions // k
        if "max_length" in aliases:  # TRL: prompt + completion tokens; ours: a budget for each
            values["max_completion_tokens"] = int(values["max_completion_tokens"]) - cfg.max_prompt_tokens
    return values


def parse_config(cls: type, params: dict[str, Any], sources: dict[str, ParameterSource]) -> Any:
    """Defaults, then --config FILE, then the options given on the command line."""
    given = {k: v for k, v in params.items() if sources.get(k) is ParameterSource.COMMANDLINE and v is not None}
    config_file = given.pop("config", None)
    aliases = {k.removeprefix("trl_"): given.pop(k) for k in list(given) if k.startswith("trl_")}
    given = {k: ",".join(v) if isinstance(v, tuple) else v for k, v in given.items()}
    given.update(trl_values(cls, given, aliases, config_file))
    return load_config(cls, config_file, given)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _fail(message: str, code: int, label: str = "error") -> None:
    console.print(f"[bold red]{label}:[/] {escape(message)}", soft_wrap=True)
    raise click.exceptions.Exit(code)


Positional = Callable[[dict[str, Any], dict[str, ParameterSource]], None]


def make_command(name: str, cls: type, run: Callable[[Any], Any], summary: str, positional: Positional | None = None,
                 extra: tuple[click.Parameter, ...] = ()) -> click.Command:
    """`rlhflab NAME`: options from `cls`, then `run(config)`; user errors exit 2 without a traceback.

    `positional(params, sources)` turns the `extra` parameters (positional arguments) into options."""

    def callback(**params: Any) -> None:
        from rlhflab.training.loop import TrainingStopped

        ctx = click.get_current_context()
        sources = {k: ctx.get_parameter_source(k) for k in params}
        try:
            if positional is not None:
                positional(params, sources)
            cfg = parse_config(cls, params, sources)
            _quiet_libraries()
            _check_launch(name)
            run(cfg)
        except InputError as exc:
            _fail(str(exc), 2)
        except TrainingStopped as exc:
            _fail(str(exc), exc.exit_code, "stopped")
        except KeyboardInterrupt:  # a second signal stops at once (click would print "Aborted!" and exit 1)
            console.print("[red]interrupted[/]")
            raise click.exceptions.Exit(130) from None

    return ConfigCommand(name, callback=callback, params=[*extra, *config_options(cls)], help=summary,
                         short_help=summary, context_settings=CONTEXT)


def _check_launch(name: str) -> None:
    from rlhflab.stages import DATA_PARALLEL_COMMANDS
    from rlhflab.training.distributed import launched

    if launched() and name not in DATA_PARALLEL_COMMANDS:
        raise InputError(f"rlhflab {name} under torchrun is not supported yet; data-parallel commands: "
                         f"{', '.join(DATA_PARALLEL_COMMANDS)}. Run it as one process.")


def _set(params: dict[str, Any], sources: dict[str, ParameterSource], key: str, value: Any) -> None:
    params[key], sources[key] = value, ParameterSource.COMMANDLINE


def _study_positional(params: dict[str, Any], sources: dict[str, ParameterSource]) -> None:
    """`rlhflab study FILE.yaml` and `--builtin NAME` both name the config file."""
    from rlhflab.study.config import builtin_path

    file, builtin = params.pop("file"), params.pop("builtin")
    if sum(x is not None for x in (file, builtin, params.get("config"))) > 1:
        raise InputError("give the study once: FILE.yaml, --builtin NAME or --config FILE.yaml", field="config")
    if file is not None:
        _set(params, sources, "config", file)
    if builtin is not None:
        _set(params, sources, "config", str(builtin_path(builtin)))


def _report_positional(params: dict[str, Any], sources: dict[str, ParameterSource]) -> None:
    """`rlhflab report DIR` is `--path DIR`."""
    folder = params.pop("folder")
    if folder is not None:
        _set(params, sources, "path", folder)


def _write_report(study_json: Path, started: float, what: str) -> Path:
    from rlhflab.report.document import write_report

    page = write_report(study_json.parent)
    Console().print(f"{what} finished in {time.perf_counter() - started:.0f} s; report: {page}")
    return page


def run_study_command(cfg: Any, commands: dict[str, Any] | None = None) -> Path:
    """The study (its arms from `commands`, default the stages' table), then its report (unless --no-report)."""
    from rlhflab.study.config import ARM_COMMANDS
    from rlhflab.study.runner import run_study

    started = time.perf_counter()
    path = run_study(cfg, commands or ARM_COMMANDS)
    return _write_report(path, started, "study") if cfg.report else path


def run_demo_command(cfg: Any) -> Path:
    from rlhflab.study.demo import run_demo

    started = time.perf_counter()
    return _write_report(run_demo(cfg), started, "demo")


def demo_command() -> click.Command:
    from rlhflab.study.demo import DemoConfig

    return make_command("demo", DemoConfig, run_demo_command, "the default study on the reviews task, end to end")


def study_command(run: Callable[[Any], Any] = run_study_command) -> click.Command:
    from rlhflab.study.config import StudyConfig

    builtin = click.Option(["--builtin"], metavar="NAME", help="a built-in study: demo | phases | frontier")
    return make_command(
        "study", StudyConfig, run,
        "arms x seeds on shared artefacts, one evaluation suite, intervals and a report: "
        "rlhflab study FILE.yaml | --builtin demo|phases|frontier", _study_positional,
        (click.Argument(["file"], required=False, metavar="[FILE.yaml]"), builtin))  # fmt: skip


def report_command() -> click.Command:
    from rlhflab.report.document import ReportConfig, report

    return make_command("report", ReportConfig, report, "report.html + report.md for a study or run folder: "
                        "rlhflab report DIR", _report_positional,
                        (click.Argument(["folder"], required=False, metavar="[DIR]"),))  # fmt: skip


class Commands(click.Group):
    """The command table of `rlhflab.stages` plus demo/study/report, imported when first needed: loading the
    stages imports torch and transformers (measured in docs/notes.md, "CLI start-up"), which `rlhflab report`
    does not need."""

    UPPER: dict[str, Callable[[], click.Command]] = {"demo": demo_command, "study": study_command,
                                                      "report": report_command}

    def list_commands(self, ctx: click.Context) -> list[str]:
        from rlhflab.stages import COMMANDS

        return [*COMMANDS, *self.UPPER]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.UPPER:
            return self.UPPER[name]()
        from rlhflab.stages import COMMANDS

        command = COMMANDS.get(name)
        return None if command is None else make_command(name, command.config, command.run, command.summary)


app = Commands("rlhflab", context_settings=CONTEXT, no_args_is_help=True,
               help="SFT, reward models, DPO, PPO and GRPO on one model family, one evaluation suite. "
                    "`rlhflab COMMAND -h` lists a command's options; `--config FILE.yaml` sets them from a file.")


def main() -> None:
    # a KeyboardInterrupt inside a command exits 130 (the command's callback); elsewhere click's "Aborted!"
    app(prog_name="rlhflab")


if __name__ == "__main__":
    main()

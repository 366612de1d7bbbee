"""`rlhflab COMMAND [--config FILE.yaml] [--key value ...]`: one command per stage.

Options are the fields of the stage's config dataclass (`rlhflab COMMAND --help` lists them),
given as `--batch-size 16` or `--batch-size=16`; a YAML file given with `--config` is applied
first and options override it. Unknown options are errors that suggest the closest valid one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from rlhflab.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}
# Commands whose training runs data-parallel under torchrun; any other would run N copies into one folder.
DATA_PARALLEL_COMMANDS = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _run(ctx: typer.Context, name: str, config_cls: Callable[[], type], stage: Callable[[Any], Any]) -> None:
    """Parse options into the stage's config, run it, and turn user errors into exit code 2."""
    from rlhflab.config import load_config, parse_cli_overrides
    from rlhflab.training.distributed import launched
    from rlhflab.training.loop import TrainingStopped

    _quiet_libraries()
    try:
        if launched() and name not in DATA_PARALLEL_COMMANDS:
            raise InputError(f"rlhflab {name} under torchrun is not supported yet; data-parallel commands: "
                             f"{', '.join(DATA_PARALLEL_COMMANDS)}. Run it as one process.")
        config_file, overrides = parse_cli_overrides(list(ctx.args))
        cfg = load_config(config_cls(), config_file, overrides)
        stage(cfg)
    except InputError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except TrainingStopped as exc:
        console.print(f"[bold red]stopped:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _command(name: str, config_path: str, stage_path: str, summary: str, args_path: str | None = None) -> None:
    """Register `rlhflab NAME`, importing its config class and stage function only when run.

    `args_path` names a function that rewrites the arguments first (positional paths into options)."""

    def load(path: str) -> Any:
        module, _, attr = path.rpartition(".")
        return getattr(__import__(module, fromlist=[attr]), attr)

    def command(ctx: typer.Context) -> None:
        if args_path is not None and not any(a in ("-h", "--help") for a in ctx.args):
            try:
                ctx.args = load(args_path)(ctx.args)
            except InputError as exc:
                console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(2) from None
        if any(a in ("-h", "--help") for a in ctx.args):
            from rlhflab.config import describe_fields

            typer.echo(f"rlhflab {name}: {summary}\n\nOptions:\n{describe_fields(load(config_path))}")
            raise typer.Exit(0)
        _run(ctx, name, lambda: load(config_path), load(stage_path))

    command.__doc__ = summary
    app.command(name, context_settings={**EXTRA, "help_option_names": []})(command)


_command("pretrain", "rlhflab.stages.PretrainConfig", "rlhflab.stages.pretrain", "train a tiny model from scratch on a task corpus")
_command("sft", "rlhflab.stages.SFTConfig", "rlhflab.stages.sft", "supervised fine-tuning (completion-only loss)")
_command("rm", "rlhflab.stages.RewardModelConfig", "rlhflab.stages.reward_model", "Bradley-Terry reward model on preference pairs")
_command("eval", "rlhflab.stages.EvalStageConfig", "rlhflab.stages.evaluate", "the shared evaluation suite on a model")
_command("demo", "rlhflab.stages.DemoConfig", "rlhflab.stages.demo", "the default study on the reviews task, end to end")
_command("ppo", "rlhflab.algorithms.ppo.PPOConfig", "rlhflab.stages.ppo", "PPO with a value model and a KL-penalised reward")
_command("dpo", "rlhflab.algorithms.dpo.DPOConfig", "rlhflab.stages.dpo", "DPO on preference pairs (packed pairs, cached reference)")
_command("grpo", "rlhflab.algorithms.grpo.GRPOConfig", "rlhflab.stages.grpo", "GRPO: group-relative advantages, k samples per prompt")
_command("study", "rlhflab.study.config.StudyConfig", "rlhflab.study.runner.run_study",
         "arms x seeds on shared artefacts, one evaluation suite, intervals and a report: "
         "rlhflab study FILE.yaml | --builtin demo|phases|frontier", "rlhflab.study.config.study_cli_args")
_command("report", "rlhflab.report.document.ReportConfig", "rlhflab.report.document.report",
         "report.html + report.md for a study or run folder: rlhflab report DIR", "rlhflab.report.document.report_cli_args")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()

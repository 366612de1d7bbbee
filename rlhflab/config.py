"""Typed run configs: dataclasses with working defaults, loaded from YAML, overridden from the CLI.

One dataclass per stage (in its algorithm file), all sharing `RunConfig` for the fields every
training command has. Every field is documented once, in the comment beside it. Unknown keys are
errors that suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhflab.errors import InputError

C = TypeVar("C")


@dataclass
class RunConfig:
    """Fields shared by every training command (pretrain, sft, rm, dpo, ppo, grpo)."""

    out: str = "runs/run"  # run folder: config.yaml, metrics.jsonl, diagnostics.jsonl, checkpoints/, model/
    task: str | None = None  # built-in task (reviews | arithmetic): builds and caches this stage's prerequisites
    model: str | None = None  # a local save_pretrained folder or a hub id; default: the task's cached model
    data: str | None = None  # a data file, datasets folder or hub id in TRL format; default: the task's data
    cache_dir: str | None = None  # task artefact cache (default $RLHFLAB_CACHE or ~/.cache/rlhflab)
    seed: int = 0
    max_steps: int = 100  # optimizer steps (RL: rollout steps)
    batch_size: int = 16  # examples per optimizer step (RL: prompts per step)
    grad_accum: int = 1  # micro-batches per optimizer step; the loss is normalised over all of them
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.05  # fraction of max_steps spent warming up linearly from 0
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    log_every: int = 1  # write a metrics line every N steps
    eval_every: int = 0  # the recipe's held-out evaluate() every N steps (and after the last); 0: only after the last
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps; 0: only at the end
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: str | None = None  # a checkpoint folder, or "auto": the newest valid one in `out`
    on_nonfinite: str = "stop"  # stop | skip: what to do when the loss or gradients are NaN/inf
    max_nonfinite_skips: int = 5  # with on_nonfinite=skip, stop after this many consecutive bad steps
    threads: int = 0  # torch threads; 0: all cores
    precision: str = "fp32"  # fp32 | bf16: bf16 autocast in forwards and sampling (TRL's bf16=True); weights stay fp32
    trust_remote_code: bool = False  # allow custom model code from a model folder / hub id
    progress: bool = True  # rich progress bar


# Values a RunConfig field must take; checked wherever a config is built from YAML or the CLI.
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_schedule": ("cosine", "linear", "constant"),
    "on_nonfinite": ("stop", "skip"),
    "precision": ("fp32", "bf16"),
    "pooling": ("last", "mean"),
    "loss_agg": ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"),
    "scale_rewards": ("group", "batch", "none"),
    "advantage_estimator": ("grpo", "rloo"),
    "importance_sampling_level": ("token", "sequence"),
}
MINIMUM: dict[str, int | float] = {
    "seed": 0, "max_steps": 0, "batch_size": 1, "grad_accum": 1, "lr": 0.0, "warmup_ratio": 0.0, "min_lr_ratio": 0.0,
    "weight_decay": 0.0, "adam_beta2": 0.0, "max_grad_norm": 0.0, "log_every": 1, "checkpoint_every": 0,
    "keep_checkpoints": 1, "max_nonfinite_skips": 0,
}  # fmt: skip
MAXIMUM: dict[str, int | float] = {"seed": 2**32 - 1, "warmup_ratio": 1.0, "min_lr_ratio": 1.0, "adam_beta2": 1.0}

_short = reprlib.Repr()  # values quoted in messages stay short, whatever a YAML file holds
_short.maxstring, _short.maxother, _short.maxlong, _short.maxlevel = 80, 80, 40, 3


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type; a wrong type is an InputError naming the key."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(hint)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise InputError(f"expected a list, got {_short.repr(value)}", file=source, field=key)
        return [_coerce(v, item_type, key, source) for v in value]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise InputError(f"expected a finite number, got {_short.repr(value)}", file=source, field=key)
            return number
        if hint is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(hint, "__name__", str(hint))
        raise InputError(f"expected {name}, got {_short.repr(value)}", file=source, field=key) from None
    return value


def build_config(cls: type[C], values: dict[str, Any], source: str = "<config>") -> C:
    """Make a `cls` from a dict, checking keys and types. Keys may use '-' or '_'."""
    hints = typing.get_type_hints(cls)
    valid = field_names(cls)
    kwargs = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in valid:
            shown = _short.repr(raw_key)[1:-1] if isinstance(raw_key, str) else _short.repr(raw_key)
            raise InputError(f"unknown key '{shown}'.{_suggest(key[:100], valid)}", file=source, field=shown)
        kwargs[key] = _coerce(value, hints[key], key, source)
        _check_range(key, kwargs[key], source)
    return cls(**kwargs)


def _check_range(key: str, value: Any, source: str) -> None:
    if value is None:
        return
    if key in CHOICES and value not in CHOICES[key]:
        raise InputError(f"must be one of {', '.join(CHOICES[key])}, got {_short.repr(value)}", file=source, field=key)
    if key in MINIMUM and value < MINIMUM[key]:
        raise InputError(f"must be at least {MINIMUM[key]}, got {value}", file=source, field=key)
    if key in MAXIMUM and value > MAXIMUM[key]:
        raise InputError(f"must be at most {MAXIMUM[key]}, got {value}", file=source, field=key)


def load_config(cls: type[C], config_file: str | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults, then the YAML file, then CLI overrides (strings, coerced to the field types)."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise InputError("config file not found", file=config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:  # ValueError: an int of > 4300 digits
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            raise InputError(f"not valid YAML: {exc}", file=config_file, line=None if line is None else line + 1) from None
        except RecursionError:
            raise InputError("not a usable config: nested too deeply", file=config_file) from None
        except OSError as exc:
            raise InputError(f"cannot read the config file: {exc.strerror or exc}", file=config_file) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError("a config file must be a mapping of key: value", file=config_file)
        build_config(cls, loaded, source=config_file)  # validate the file on its own, naming it
        values.update(loaded)
    for key, value in (overrides or {}).items():
        values[key.replace("-", "_")] = value
    return build_config(cls, {k.replace("-", "_"): v for k, v in values.items()}, source=config_file or "<cli>")


def parse_cli_overrides(args: list[str]) -> tuple[str | None, dict[str, str]]:
    """`--key value`, `--key=value` and bare `--flag` (true) / `--no-flag` (false) -> (config_file, overrides)."""
    overrides: dict[str, str] = {}
    config_file = None
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise InputError(f"unexpected argument '{arg}' (options look like --key value)", file="<cli>")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            elif key.startswith("no-"):
                key, value = key[3:], "false"
            else:
                value = "true"
        if key == "config":
            config_file = value
        else:
            overrides[key.replace("-", "_")] = value
        i += 1
    return config_file, overrides


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def describe_fields(cls: type) -> str:
    """One line per field with its default and the comment written beside it (for --help)."""
    import inspect

    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                name, _, rest = line.strip().partition(":")
                if "#" in rest and name.isidentifier():
                    comments[name] = rest.split("#", 1)[1].strip()
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"--{f.name.replace('_', '-')} (default {default!r})  {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)

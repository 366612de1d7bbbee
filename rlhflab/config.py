"""Typed run configs: dataclasses with working defaults, loaded from YAML, overridden from the CLI.

One dataclass per command (training commands in their algorithm file), sharing `TaskConfig` (what
every command has) and `RunConfig` (what every training command has). Each field is declared once
with `opt(default, "help", minimum=..., maximum=...)`: its help text and range live in the field's
metadata, its allowed values in its type (`Literal[...]`). Subclasses may re-declare a field with a
plain default; help and range are then inherited. Unknown keys are errors that suggest the closest.
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
from typing import Any, Literal, TypeVar

import yaml

from rlhflab.errors import InputError

C = TypeVar("C")
TaskName = Literal["reviews", "arithmetic"]


def opt(default: Any, help: str = "", *, minimum: float | None = None, maximum: float | None = None,
        flag_value: str | None = None) -> Any:
    """A config field: its default, its help text and (for numbers) its range.

    `flag_value`: what the option means when given bare on the command line (`--resume` = "auto")."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "flag_value": flag_value}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TaskConfig:
    """The built-in task and its artefact cache: every command has these."""

    task: TaskName | None = opt(None, "built-in task: builds and caches this command's prerequisites")
    task_size: Literal["small", "tiny"] = opt("small", "which cached task artefacts: small (the demo) | tiny (smoke runs)")
    cache_dir: str | None = opt(None, "task artefact cache (default $RLHFLAB_CACHE, else ~/.cache/rlhflab)")


# Token budgets a config leaves unset (None), by what the run trains: (a built-in task, or no --model named;
# --model without --task: a pretrained chat model). Task prompts and answers are a few dozen tokens; a chat model's
# sizes follow TRL's defaults (max_prompt_length 512; max_length 1024 = prompt + completion), and a packed row
# holds one whole pair (prompt + chosen + rejected). Generation budgets: `stages.evaluate.completion_budget`.
SIZES: dict[str, tuple[int, int]] = {
    "max_prompt_tokens": (64, 512),
    "max_completion_tokens": (64, 512),
    "max_row_tokens": (256, 1536),
}
SIZE_HELP = " (default: {} with --task or no --model, {} on your --model)"


def size_opt(name: str, help: str, minimum: int = 1) -> Any:
    """A token budget left None in the config, then filled by `RunConfig.__post_init__` from SIZES."""
    return opt(None, help + SIZE_HELP.format(*SIZES[name]), minimum=minimum)


@dataclass
class RunConfig(TaskConfig):
    """Fields shared by every training command (pretrain, sft, rm, dpo, ppo, grpo)."""

    out: str = opt("runs/run", "run folder: config.yaml, metrics.jsonl, diagnostics.jsonl, checkpoints/, model/")
    model: str | None = opt(None, "a local save_pretrained folder or a hub id; default: the task's cached model")
    data: str | None = opt(None, "a data file, datasets folder or hub id in TRL format; default: the task's data")
    seed: int = opt(0, "seed of initialisation, data order and sampling", minimum=0, maximum=2**32 - 1)
    max_steps: int = opt(100, "optimizer steps (RL: rollout steps)", minimum=0)
    batch_size: int = opt(16, "examples per optimizer step (RL: prompts per step)", minimum=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step; the loss is normalised over all of them", minimum=1)
    lr: float = opt(1e-4, "peak learning rate", minimum=0.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    warmup_ratio: float = opt(0.05, "fraction of max_steps spent warming up linearly from 0", minimum=0.0, maximum=1.0)
    min_lr_ratio: float = opt(0.1, "cosine/linear decay ends at lr * min_lr_ratio", minimum=0.0, maximum=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0.0)
    adam_beta2: float = opt(0.999, "AdamW beta2", minimum=0.0, maximum=1.0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm; 0 disables", minimum=0.0)
    log_every: int = opt(1, "write a metrics line every N steps", minimum=1)
    eval_every: int = opt(0, "held-out metrics every N steps (and always at the end); 0: only at the end", minimum=0)
    eval_prompts: str | None = opt(None, "prompt-only file for the end-of-run evaluation (default: the task's 16)")
    eval_temperatures: list[float] = opt([0.3, 0.7, 1.0], "end-of-run evaluation suite temperatures; empty: none")
    eval_samples_per_prompt: int = opt(8, "end-of-run evaluation samples per prompt and temperature", minimum=1)
    checkpoint_every: int = opt(0, "write a resumable checkpoint every N steps; 0: only at the end", minimum=0)
    keep_checkpoints: int = opt(2, "how many checkpoints to keep", minimum=1)
    resume: str | None = opt(None, "a checkpoint folder, or auto (a bare --resume): the newest valid one in --out",
                             flag_value="auto")
    on_nonfinite: Literal["stop", "skip"] = opt("stop", "what to do when the loss or gradients are NaN/inf")
    max_nonfinite_skips: int = opt(5, "with on_nonfinite=skip, stop after this many consecutive bad steps", minimum=0)
    threads: int = opt(0, "torch threads; 0: all cores", minimum=0)
    precision: Literal["fp32", "bf16"] = opt(
        "fp32", "bf16: autocast in forwards and sampling (TRL's bf16=True); weights stay fp32")
    gradient_checkpointing: bool = opt(
        False, "recompute decoder-layer activations in the backward: less memory, about one more forward")
    lora_r: int = opt(0, "LoRA rank (peft); 0: full fine-tuning. With LoRA the reference is the same weights with "
                         "the adapters off, and model/ holds the adapter", minimum=0)
    lora_alpha: int = opt(32, "LoRA α: the update is scaled by α / r (TRL's default 32)", minimum=1)
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch's input (peft's default 0; each adapted projection keeps "
                              "its own dropped copy of its input for the backward: +2.2 GB at 0.05, docs/notes_lora.md)",
                              minimum=0.0, maximum=1.0)
    lora_target_modules: list[str] = opt(
        [], "module names to adapt; empty: every linear projection of the decoder (q/k/v/o, gate/up/down), "
            "else peft's all-linear (never the LM head)")
    merge_lora: bool = opt(False, "with LoRA, also write OUT/model_merged: base + adapter merged, a plain "
                                  "transformers folder")
    trust_remote_code: bool = opt(False, "allow custom model code from a model folder / hub id")
    peak_tflops: float = opt(
        0.0, "the device's peak TFLOP/s, for perf/mfu; 0: known CUDA devices' bf16 peak, else no perf/mfu", minimum=0.0)
    progress: bool = opt(True, "rich progress bar")

    def __post_init__(self) -> None:
        """Fill the token budgets left None (SIZES): a pretrained model's sizes when --model names the model
        and no built-in task is given, else the tiny tasks' (so API callers that name no model keep them)."""
        own_model = self.model is not None and self.task is None
        for name, (task_size, model_size) in SIZES.items():
            if hasattr(self, name) and getattr(self, name) is None:
                setattr(self, name, model_size if own_model else task_size)


_short = reprlib.Repr()  # values quoted in messages stay short, whatever a YAML file holds
_short.maxstring, _short.maxother, _short.maxlong, _short.maxlevel = 80, 80, 40, 3


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def field_info(cls: type, name: str) -> dict[str, Any]:
    """A field's metadata (help, minimum, maximum, flag_value), inherited through re-declarations."""
    info: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and declared.metadata:
            info.update({k: v for k, v in declared.metadata.items() if v not in (None, "")})
    return info


def declaring_class(cls: type, name: str) -> type:
    """The most basic class of `cls`'s hierarchy that declares field `name` (its help group)."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def strip_optional(hint: Any) -> Any:
    """`X | None` -> X; any other type as it is."""
    return next(a for a in typing.get_args(hint) if a is not type(None)) if is_optional(hint) else hint


def choices_of(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) type; None for other types."""
    hint = strip_optional(hint)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type; a wrong type is an InputError naming the key."""
    if is_optional(annotation) and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    hint = strip_optional(annotation)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if not isinstance(value, str | int | float) or str(value) not in [str(a) for a in allowed]:
            raise InputError(f"must be one of {', '.join(map(str, allowed))}, got {_short.repr(value)}",
                             file=source, field=key)
        return allowed[[str(a) for a in allowed].index(str(value))]
    if origin in (list, tuple):
        (item_type,) = typing.get_args(hint)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise InputError(f"expected a list, got {_short.repr(value)}", file=source, field=key)
        return [_coerce(v, item_type, key, source) for v in value]
    try:
        return _coerce_scalar(value, hint, key, source)
    except (TypeError, ValueError, OverflowError):
        name = getattr(hint, "__name__", str(hint))
        raise InputError(f"expected {name}, got {_short.repr(value)}", file=source, field=key) from None


def _coerce_scalar(value: Any, hint: Any, key: str, source: str) -> Any:
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
    return value


def coerce_field(cls: type, key: str, value: Any, source: str) -> Any:
    """`value` as field `key` of `cls` takes it: converted to its type, checked against its range."""
    converted = _coerce(value, typing.get_type_hints(cls)[key], key, source)
    info = field_info(cls, key)
    numbers = converted if isinstance(converted, list) else [converted]
    for number in numbers:
        if number is None or isinstance(number, str | bool):
            continue
        if info.get("minimum") is not None and number < info["minimum"]:
            raise InputError(f"must be at least {info['minimum']}, got {number}", file=source, field=key)
        if info.get("maximum") is not None and number > info["maximum"]:
            raise InputError(f"must be at most {info['maximum']}, got {number}", file=source, field=key)
    return converted


def build_config(cls: type[C], values: dict[str, Any], source: str = "<config>") -> C:
    """Make a `cls` from a dict, checking keys, types, choices and ranges. Keys may use '-' or '_'."""
    valid = field_names(cls)
    kwargs = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in valid:
            shown = _short.repr(raw_key)[1:-1] if isinstance(raw_key, str) else _short.repr(raw_key)
            raise InputError(f"unknown key '{shown}'.{_suggest(key[:100], valid)}", file=source, field=shown)
        kwargs[key] = coerce_field(cls, key, value, source)
    return cls(**kwargs)


def read_yaml_mapping(config_file: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; anything else is an InputError naming the file (and line)."""
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
        return {}
    if not isinstance(loaded, dict):
        raise InputError("a config file must be a mapping of key: value", file=config_file)
    return loaded


def load_config(cls: type[C], config_file: str | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults, then the YAML file, then overrides (from the CLI: strings, coerced to the field types)."""
    values: dict[str, Any] = {}
    if config_file:
        loaded = read_yaml_mapping(config_file)
        build_config(cls, loaded, source=config_file)  # validate the file on its own, naming it
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    for key, value in (overrides or {}).items():
        values[key.replace("-", "_")] = value
    return build_config(cls, values, source=config_file or "<cli>")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")

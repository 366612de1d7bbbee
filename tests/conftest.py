"""Test set-up: offline, one torch thread per process (tests run two processes in parallel)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_artefacts(tmp_path_factory):
    """Tiny cached task artefacts (base, SFT, pairs, reward model), shared by every test and xdist worker."""
    from rlhflab.stages.artefacts import TaskArtefacts

    def make(task: str = "reviews"):
        cache = tmp_path_factory.getbasetemp().parent / "rlhflab-cache"
        return TaskArtefacts(task=task, size="tiny", cache_dir=str(cache), progress=False)

    return make


@pytest.fixture(scope="session")
def inputs(tiny_artefacts, tmp_path_factory) -> dict[str, str]:
    """For the reliability tests (resume, faults, signals, reproducibility): paths of the tiny task artefacts and
    a 17-pair preference file (16 train + 1 held out). test_distributed.py has its own `inputs`."""
    from rlhflab.stages.artefacts import base_model, preference_pairs, reward_model, sft_model

    a = tiny_artefacts("reviews")
    root = tmp_path_factory.mktemp("reliability-inputs")
    pairs = root / "pairs17.jsonl"
    pairs.write_text("".join(preference_pairs(a).read_text().splitlines(keepends=True)[:17]))
    return {"base": str(base_model(a)), "sft": str(sft_model(a)), "rm": str(reward_model(a)), "pairs": str(pairs),
            "cache": str(root / "cache")}


def needs_real_model():
    """Skip without the `real` extra, except under CI (CI=true), where the real-model checks must run."""
    from rlhflab.models.pretrained import package_available

    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return pytest.mark.skipif(not package_available("smollm2-135m-instruct") and not in_ci,
                              reason="needs the real extra: make setup-real")


@pytest.fixture(scope="session")
def real_model_cache(tmp_path_factory):
    """A cache holding SmolLM2-135M-Instruct converted from the `real` extra (what a first `--model
    smollm2-135m-instruct` does), shared by every test and xdist worker (converted once, under a file lock)."""
    from rlhflab.models.pretrained import named_model_folder

    cache = tmp_path_factory.getbasetemp().parent / "rlhflab-real-cache"
    named_model_folder("smollm2-135m-instruct", cache)
    return cache

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
    from rlhflab.pipeline import TaskArtefacts

    def make(task: str = "reviews"):
        cache = tmp_path_factory.getbasetemp().parent / "rlhflab-cache"
        return TaskArtefacts(task=task, size="tiny", cache_dir=str(cache), progress=False)

    return make

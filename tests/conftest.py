import os
import shutil
from pathlib import Path

import pytest

from .hub_server import HubServer, env_for
from .models import EXAMPLE_LLAVA, make_llama, make_llava

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="session")
def llama_sharded_dir(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-sharded") / "tiny-llama-sharded", shard_size="40KB")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    return make_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture()
def example_llava(tmp_path) -> Path:
    """A private copy of the shipped example model (tests never touch the original)."""
    return Path(shutil.copytree(EXAMPLE_LLAVA, tmp_path / "tiny-llava"))


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    server = HubServer()
    for k, v in env_for(server, tmp_path / "hf-cache").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(params=["safetensors", "zarr"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def tmp_path(tmp_path_factory):
    """A fresh folder on tmpfs when there is one: the cache fsyncs every shard and folder, which on a
    real disk costs milliseconds each and would dominate the suite. The calls still run."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="saecache-test-", dir=shm))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("cache")

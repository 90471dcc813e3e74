"""Shared test set-up: deterministic seeds, and no network (the suite must pass offline)."""

import os
import random
import signal

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# The suite's tensors are tiny: a second intra-op thread only adds synchronisation (10x slower
# small matmuls were seen on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, whatever an earlier test set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt during the test. A shell starts a background job (`make test &`,
    nohup) with SIGINT ignored, and Python then leaves it ignored, by design: a test that sends itself
    SIGINT needs the usual handler back."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


# The real SmolLM2 model and a small real harvest of it, shared by every package's tests.
from tests.smollm2_fixtures import smollm2, smollm2_cache  # noqa: E402, F401

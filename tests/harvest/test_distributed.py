"""Large models for harvest: `model.device_map` reaches `from_pretrained` (CPU-checkable part).

Not checked here (needs several GPUs): hooks and the early stop with blocks on different devices;
see the closing note of issue 6.
"""

from __future__ import annotations

import torch
import transformers

from harvest.model import load_model
from tests.harvest.tiny_models import save_tiny


def test_device_map_reaches_from_pretrained_and_skips_the_device_move(tmp_path, monkeypatch):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    seen: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("device_map", None)  # accelerate is not needed to check the plumbing
        model = original(path, **kwargs)
        model.to = lambda *a, **k: (_ for _ in ()).throw(AssertionError("a device_map model must not be moved"))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    lm = load_model(str(folder), dtype="float32", device="cpu", device_map="auto")
    assert seen and seen[0]["device_map"] == "auto"
    assert lm.n_blocks == 3 and lm.device == torch.device("cpu")


def test_without_device_map_nothing_is_passed(tmp_path, monkeypatch):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    seen: list[dict] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        seen.append(dict(kwargs))
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    load_model(str(folder), dtype="float32", device="cpu")
    assert "device_map" not in seen[0]

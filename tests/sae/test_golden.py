"""The golden SAE checkpoints in tests/data/golden-sae (one per registered type, written once by
tests/data/make_golden.py and committed) must keep loading and giving the same outputs on the golden
cache's held-out rows as the code changes. A newly registered type needs its own golden checkpoint:
`.venv/bin/python -m tests.data.make_golden` adds it without touching the others."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sae as zoo
from sae import load_sae
from tests.data.make_golden import SAES, heldout

EXPECTED = load_file(str(SAES / "expected.safetensors"))


@pytest.mark.parametrize("canonical", sorted({zoo.canonical(n) for n in zoo.names()}))
def test_a_golden_checkpoint_still_loads_and_gives_the_same_outputs(canonical):
    folder = SAES / canonical
    assert folder.is_dir(), f"no golden checkpoint for {canonical}: run .venv/bin/python -m tests.data.make_golden"
    model, meta = load_sae(folder)
    assert type(model).type_name == canonical and meta == {"golden": True}
    model.eval()
    with torch.no_grad():
        x = heldout(model.routed)
        recon = model.reconstruct(x)
        recon = recon[0] if isinstance(recon, tuple) else recon
        torch.testing.assert_close(recon, EXPECTED[f"{canonical}.reconstruct"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode(x), EXPECTED[f"{canonical}.encode"], rtol=1e-5, atol=1e-6)
    saved = json.loads((folder / "sae.json").read_text())
    assert saved["format_version"] == 1 and saved["config"]["type"] == canonical

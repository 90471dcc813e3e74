"""Writes the golden artefacts in tests/data/ (run once, from the repository root, and commit what it
writes; tests/test_golden.py checks that they keep loading and giving the same outputs):

    .venv/bin/python -m tests.data.make_golden

- `golden-cache/`: a complete safetensors cache of format_version 1: 3 layers of d_model 8, 96 train
  and 32 held-out rows in shards of 48, float32, every value given by `golden_value` (so a test can
  check the bytes against the formula, independently of the reader);
- `golden-sae/<type>/`: a saved SAE of every registered type (d_in 8, 16 latents, seeded weights, an
  input scale, a positive inference threshold where the type has one), as `BaseSAE.save` writes it;
- `golden-sae/expected.safetensors`: each one's `reconstruct` and `encode` of the golden cache's
  held-out rows, computed when the artefacts were written.
Rerun only to add a newly registered type (the existing files must not change: the test says so).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import sae as zoo
from cache import CacheWriter
from sae import SAEConfig

HERE = Path(__file__).resolve().parent
CACHE, SAES = HERE / "golden-cache", HERE / "golden-sae"
LAYERS, D, SHARD_ROWS = [0, 1, 2], 8, 48
ROWS = {"train": 96, "heldout": 32}
IDENTITY = {"model_id": "golden", "revision": "1", "layers": LAYERS, "seq_len": 16}


def golden_value(split: str, rows: torch.Tensor, layer: int) -> torch.Tensor:
    """[n, D] float32: the activations of rows `rows` of `split` at `layer`."""
    j = torch.arange(D, dtype=torch.float64)
    phase = 0.37 if split == "heldout" else 0.0
    x = torch.sin(0.13 * rows.double()[:, None] + 0.71 * layer + 0.29 * j + phase) * (1 + layer) + 0.1 * layer
    return x.float()


def golden_tokens(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"token_ids": (rows * 7 % 97).int(), "sequence": (rows // 16).long(), "position": (rows % 16).int(),
            "document": (rows // 32).long()}


def write_cache() -> None:
    w = CacheWriter(CACHE, layers=LAYERS, d_model=D, dtype="float32", shard_rows=SHARD_ROWS, identity=IDENTITY,
                    metadata={"model": "golden"}, backend="safetensors")
    for split, n in ROWS.items():
        for chunk in range(0, n, 16):  # 16-row chunks, as a harvest's windows
            rows = torch.arange(chunk, chunk + 16)
            acts = {L: golden_value(split, rows, L) for L in LAYERS}
            w.append(split, chunk=chunk // 16, offset=0, acts=acts, **golden_tokens(rows))
    w.finish()


def golden_sae(canonical: str) -> zoo.BaseSAE:
    cls = zoo.get(canonical)
    extra = {"group_sizes": [4, 4, 8]} if "group_sizes" in _required(cls) else {}
    layers = LAYERS if cls.routed else [1]
    torch.manual_seed(sum(map(ord, canonical)))
    model = cls(SAEConfig(type=canonical, hidden_size=D, latent_size=16, k=4, n_layers=len(layers), layers=layers,
                          **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_input_scale(torch.linspace(0.8, 1.2, len(layers)))
    if isinstance(getattr(model, "threshold", None), torch.Tensor) and model.threshold.dim() == 0:
        model.threshold.fill_(0.3)
    return model.eval()


def _required(cls: type[zoo.BaseSAE]) -> set[str]:
    """Settings the class refuses to go without (found by asking it)."""
    try:
        cls.check_settings(zoo.SAESettings(type=cls.type_name, latent_size=16, k=4))
    except ValueError as e:
        return {"group_sizes"} if "group_sizes" in str(e) else set()
    return set()


def heldout(routed: bool) -> torch.Tensor:
    rows = torch.arange(ROWS["heldout"])
    if routed:
        return torch.stack([golden_value("heldout", rows, L) for L in LAYERS], dim=1)
    return golden_value("heldout", rows, 1)


def write_saes() -> None:
    expected = {}
    for canonical in sorted({zoo.canonical(n) for n in zoo.names()}):
        if (SAES / canonical).exists():
            continue
        model = golden_sae(canonical)
        model.save(SAES / canonical, meta={"golden": True})
        with torch.no_grad():
            x = heldout(model.routed)
            recon = model.reconstruct(x)
            expected[f"{canonical}.reconstruct"] = recon[0] if isinstance(recon, tuple) else recon
            expected[f"{canonical}.encode"] = model.encode(x)
    old = SAES / "expected.safetensors"
    if old.exists():
        from safetensors.torch import load_file

        expected = {**load_file(str(old)), **expected}
    save_file({k: v.contiguous() for k, v in expected.items()}, str(old))


if __name__ == "__main__":
    if not CACHE.exists():
        write_cache()
    SAES.mkdir(parents=True, exist_ok=True)
    write_saes()

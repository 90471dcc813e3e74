"""Export to SAELens: the exported SAE, loaded by sae-lens itself, encodes and decodes as ours.

sae-lens lives in a separate environment (.venv-saelens, see the Makefile target) because its
dependencies clash with ours; the comparison runs there in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluate.export import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, export_saelens
from sae import SAEConfig, get

ROOT = Path(__file__).resolve().parents[2]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
KINDS = ("vanilla", "gated", "topk", "jumprelu", "batchtopk", "matryoshka")
D, M = 12, 24


def _sae(kind):
    cfg = SAEConfig(type=get(kind).type_name, hidden_size=D, latent_size=M, k=5, threshold=0.05, layers=[2],
                    group_sizes=[8, 16] if kind == "matryoshka" else None)
    sae = get(kind)(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name not in ("threshold",):
                p.add_(0.1 * torch.randn_like(p))
        if kind in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.2)
    sae.set_input_scale(2.5)
    return sae.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    saes = {}
    for kind in KINDS:
        sae = _sae(kind)
        sae.save(work / "src" / kind)
        export_saelens(work / "src" / kind, work / "out" / kind, density=[0.01] * (M - 1) + [0.0])
        saes[kind] = sae
    x = torch.randn(64, D) * 3 + 0.5
    save_file({"x": x}, str(work / "out" / "inputs.safetensors"))
    return work, saes, x


def test_export_files(exported):
    work, _, _ = exported
    for kind in KINDS:
        folder = work / "out" / kind
        cfg = json.loads((folder / CFG_FILE).read_text())
        assert cfg["d_in"] == D and cfg["d_sae"] == M and cfg["normalize_activations"] == "none"
        assert cfg["architecture"] == {"vanilla": "standard", "topk": "topk", "gated": "gated"}.get(kind, "jumprelu")
        assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
        assert load_file(str(folder / SPARSITY_FILE))["sparsity"][-1] == -10.0
        assert load_file(str(folder / WEIGHTS_FILE))["W_enc"].shape == (D, M)


def test_routed_sae_is_refused(tmp_path):
    cfg = SAEConfig(type="RouteSAE", hidden_size=D, latent_size=M, k=4, n_layers=2, layers=[0, 1])
    get("route")(cfg).save(tmp_path / "r")
    with pytest.raises(ValueError, match="no SAELens counterpart"):
        export_saelens(tmp_path / "r", tmp_path / "out")


@pytest.mark.skipif(not SAELENS_PY.exists(), reason=f"sae-lens environment {SAELENS_PY} absent: run "
                    "`make saelens-env` (python3 -m venv .venv-saelens; .venv-saelens/bin/pip install sae-lens)")
def test_saelens_loads_and_matches(exported):
    work, saes, x = exported
    subprocess.run([str(SAELENS_PY), str(Path(__file__).with_name("saelens_check.py")), str(work / "out")],
                   check=True, capture_output=True, timeout=300)
    got = load_file(str(work / "out" / "outputs.safetensors"))
    for kind, sae in saes.items():
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
        assert (f != 0).any(), kind
        torch.testing.assert_close(got[f"{kind}.encode"], f, atol=1e-5, rtol=1e-5, msg=kind)
        torch.testing.assert_close(got[f"{kind}.decode"], x_hat, atol=1e-5, rtol=1e-5, msg=kind)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

"""Save -> load gives identical outputs for the five TopK-family SAEs; bad folders are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import SAEConfig, get, load_sae, registry

FIVE = {
    "topk": {},
    "batchtopk": {},
    "matryoshka": {"group_sizes": [16, 48]},
    "route": {"n_layers": 3, "routing": "soft", "aggre": "mean"},
    "route_matryoshka": {"n_layers": 3, "group_sizes": [16, 48], "base_sae_type": "matryoshka"},
}


def trained_looking(kind: str) -> torch.nn.Module:
    """A model whose every tensor differs from a fresh one (so a load that dropped one would show)."""
    torch.manual_seed(13)
    model = get(kind)(SAEConfig(type=kind, hidden_size=16, latent_size=64, k=4, **FIVE[kind]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    n_layers = FIVE[kind].get("n_layers", 1)
    model.set_input_scale(torch.linspace(0.5, 2.0, n_layers))
    if hasattr(model, "threshold"):
        model.threshold.fill_(0.3)
    return model.eval()


@pytest.mark.parametrize("kind", list(FIVE))
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path):
    model = trained_looking(kind)
    n_layers = FIVE[kind].get("n_layers")
    x = torch.randn(20, n_layers, 16) if n_layers else torch.randn(20, 16)
    model.save(tmp_path / "sae", meta={"cache": "unit-test"})
    loaded, meta = load_sae(tmp_path / "sae")
    assert type(loaded) is type(model) and meta == {"cache": "unit-test"}
    assert loaded.cfg == model.cfg and loaded.cfg.type == registry.canonical(kind)
    loaded.eval()
    with torch.no_grad():
        a, b = model(x), loaded(x)
        for key in ("target", "sae_out", "feature_acts"):
            assert torch.equal(a[key], b[key]), key
        ra, rb = model.reconstruct(x), loaded.reconstruct(x)
        if model.routed:
            assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
        else:
            assert torch.equal(ra, rb)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def saved(tmp_path, kind="batchtopk"):
    folder = tmp_path / kind
    trained_looking(kind).save(folder)
    return folder


def unrecorded(folder):
    """Drop the weights' checksum from sae.json (as an SAE saved before checksums): the checks below
    must still catch a file that was replaced whole."""
    doc = json.loads((folder / "sae.json").read_text())
    doc.pop("files")
    (folder / "sae.json").write_text(json.dumps(doc))
    return folder


def test_a_replaced_weights_file_is_refused_by_its_checksum(tmp_path):
    folder = saved(tmp_path)
    state = load_file(str(folder / "sae.safetensors"))
    state["W_dec"] = state["W_dec"] + 1
    save_file(state, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"sae.safetensors does not match its checksum in .*sae.json"):
        load_sae(folder)


def test_wrong_shape_is_refused(tmp_path):
    folder = unrecorded(saved(tmp_path))
    state = load_file(str(folder / "sae.safetensors"))
    state["W_dec"] = torch.zeros(64, 15)
    save_file(state, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(64, 15\).*expects \(64, 16\)"):
        load_sae(folder)


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    folder = unrecorded(saved(tmp_path))
    state = load_file(str(folder / "sae.safetensors"))
    del state["threshold"]
    state["surprise"] = torch.zeros(1)
    save_file(state, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['threshold'\], unexpected tensors \['surprise'\]"):
        load_sae(folder)


def test_unknown_type_and_bad_config_are_refused(tmp_path):
    folder = saved(tmp_path)
    doc = json.loads((folder / "sae.json").read_text())
    doc["config"]["type"] = "megasae"
    (folder / "sae.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown SAE type 'megasae'; valid: .*batchtopk"):
        load_sae(folder)
    doc["config"]["type"] = "batchtopk"
    doc["config"]["k"] = "32"
    (folder / "sae.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'k' must be an integer"):
        load_sae(folder)
    (folder / "sae.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(folder)
    (folder / "sae.json").unlink()
    with pytest.raises(FileNotFoundError, match="sae.json"):
        load_sae(folder)


def test_garbled_weights_are_refused(tmp_path):
    folder = unrecorded(saved(tmp_path))
    (folder / "sae.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(folder)

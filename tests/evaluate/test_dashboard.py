"""The feature dashboard renders in headless Chromium without console errors and shows the
expected number of features; a screenshot is kept (tests/evaluate/_artifacts/dashboard.png)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cache_fixtures import write_cache

import cache
from evaluate.dashboard import top_activations, write_dashboard
from evaluate.heldout import heldout_metrics
from sae import SAEConfig
from sae.vanilla import VanillaSAE
from settings import load_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).with_name("_artifacts")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    c = cache.open(write_cache(root / "cache", content="sparse", n_train=64, n_heldout=200, layers=(0,),
                               d_model=8, shard_rows=64).path)
    sae = VanillaSAE(SAEConfig(type="VanillaSAE", hidden_size=8, latent_size=20, k=4, layers=[0],
                               group_sizes=[5, 15]))
    cfg = load_config(None, ["evaluate.dashboard_features=6", "evaluate.dashboard_contexts=4",
                             "evaluate.batch_size=50"])
    result = {"run": "dash-test", "sae": {"type": "VanillaSAE", "layers": [0]},
              **heldout_metrics(sae, c, batch_size=50)}
    alive = sum(1 for d in result["feature_density"] if d > 0)
    return write_dashboard(root / "dashboard.html", sae, c, result, cfg), min(6, alive), sae, c


def test_top_activations_match_brute_force(page):
    _, _, sae, c = page
    x = torch.cat([c.read("heldout", s.index, 0).clone() for s in c.shards("heldout")])
    with torch.no_grad():
        acts = sae.encode(x)
    vals, rows = top_activations(sae, c, [0, 7], k=4, batch_size=37)
    for i, f in enumerate([0, 7]):
        ref = acts[:, f].topk(4)
        torch.testing.assert_close(vals[i], ref.values)
        assert torch.equal(acts[rows[i], f], ref.values)


def test_page_structure(page):
    path, expected, _, _ = page
    text = path.read_text()
    assert text.count('<section class="feature"') == expected
    assert "group latents 0..4" in text and 'class="hit"' in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(page):
    path, expected, _, _ = page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=2000"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the page's own script counts the rendered features into <body data-features="N">
    assert re.search(rf'<body[^>]*data-features="{expected}"', dom.stdout), dom.stdout[:500]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000


def test_wordpiece_contexts_are_decoded_not_glued():
    """MiniLM's WordPiece pieces read as words: `##` continuations join the previous piece."""
    from tiny_models import tiny_tokenizer

    from evaluate.dashboard import token_pieces

    tok = tiny_tokenizer("minilm")
    ids = tok("tokenization of unbelievably long words", add_special_tokens=False)["input_ids"]
    assert any(t.startswith("##") for t in tok.convert_ids_to_tokens(ids))  # the sample has continuations
    pieces = token_pieces(ids, tok)
    assert "".join(pieces) == tok.decode(ids) == "tokenization of unbelievably long words"
    assert not any("##" in p for p in pieces) and len(pieces) == len(ids)
    assert token_pieces([5, 6], None) == ["[5]", "[6]"]


@pytest.mark.parametrize("kind,offset", [("llama", 0.0), ("gpt2", 0.0), ("gemma", 1.0)])
def test_output_directions_fold_the_final_norm_gain(kind, offset):
    """The unembedding scaled per dimension by the final norm's gain (Gemma's norms scale by 1 + weight);
    an encoder has none."""
    from tiny_models import tiny_model

    from evaluate.dashboard import output_directions

    model = tiny_model(kind)
    norm = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gemma": "model.norm"}[kind]
    gain = model.get_submodule(norm).weight
    with torch.no_grad():
        gain.copy_(torch.linspace(0.5, 2.0, gain.numel()))
    got = output_directions(model)
    want = model.get_output_embeddings().weight * (torch.linspace(0.5, 2.0, gain.numel()) + offset)
    torch.testing.assert_close(got, want)
    assert output_directions(tiny_model("minilm")) is None

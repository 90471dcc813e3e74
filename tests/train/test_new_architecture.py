"""A new architecture needs one class and nothing else: this file defines one, registers it, and trains,
resumes and evaluates it through the command lines, with no change anywhere in train/ or evaluate/.

`TiedReLUSAE` shares one matrix between encoder and decoder: f = ReLU(W (x - b_dec) + b_enc),
x_hat = f W + b_dec, loss = ||x - x_hat||^2 + lambda ||f||_1. Nothing in the trainer knows it.
"""

from __future__ import annotations

import json
import tokenize
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import sae as zoo
import train.run as run_mod
from evaluate.__main__ import main as evaluate_main
from sae import BaseSAE, SAEConfig
from sae.base import kaiming_unit_rows
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, canonical_types
from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[2]


class TiedReLUSAE(BaseSAE):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.W = nn.Parameter(kaiming_unit_rows(self.d_sae, self.d_in))  # [d_sae, d_in], unit rows
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]  # the decoder is the tied matrix
        return self.W

    def _acts(self, xn: Tensor) -> Tensor:
        return torch.relu((xn - self.b_dec) @ self.W.T + self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self._acts(self.normalise(x))

    def decode(self, latents: Tensor) -> Tensor:
        return (latents @ self.W + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.check_input(x)
        xn = self.normalise(x)
        f = self._acts(xn)
        return {"target": xn, "sae_out": f @ self.W + self.b_dec, "feature_acts": f}

    def loss(self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0,
             dead_mask: Tensor | None = None) -> dict[str, Tensor]:
        mse = (out["target"] - out["sae_out"]).pow(2).sum(-1).mean()
        l1 = out["feature_acts"].abs().sum(-1).mean()
        return {"mse": mse, "l1": l1, "total": mse + l1_coefficient * l1}


@pytest.fixture()
def tied():
    zoo.register("TiedReLUSAE", "tiedrelu")(TiedReLUSAE)
    yield
    zoo.registry.unregister("TiedReLUSAE")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


class Killed(Exception):
    pass


def _cli(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "tiedrelu", "--cache", str(cache), f"training.output_dir={out}", f"training.run_name={name}",
            "model.latent_size=32", "training.batch_size=128", "training.steps=30", "training.checkpoint_every=10",
            "training.log_every=5", "training.lr=3e-3", "training.l1_coefficient=0.05",
            "training.shuffle_buffer_rows=512", *extra]


def test_a_class_defined_here_trains_resumes_and_evaluates_through_the_clis(tied, tiny_cache, tmp_path, monkeypatch,
                                                                           capsys):
    assert "TiedReLUSAE" in canonical_types()
    assert train_main(_cli(tiny_cache, tmp_path, "full")) == 0
    real = run_mod.train

    def killed_at_15(cfg, **kw):
        def kill(state):
            if state.step == 15:
                raise Killed
        return real(cfg, after_step=[kill], **kw)

    monkeypatch.setattr(run_mod, "train", killed_at_15)
    with pytest.raises(Killed):
        train_main(_cli(tiny_cache, tmp_path, "resumed"))
    monkeypatch.undo()
    assert train_main(_cli(tiny_cache, tmp_path, "resumed", "--resume")) == 0
    full, resumed = (load_file(str(tmp_path / r / "sae" / "sae.safetensors")) for r in ("full", "resumed"))
    assert full.keys() == {"W", "b_enc", "b_dec", "input_scale"}
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    summary = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    assert summary["sae_type"] == "TiedReLUSAE" and summary["heldout"]["fvu"] < 1.0
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "full"), "--no-downstream"]) == 0
    ev = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert ev["sae"]["type"] == "TiedReLUSAE"
    assert ev["metrics"]["fvu"] == pytest.approx(summary["heldout"]["fvu"], rel=1e-6)  # one implementation
    assert evaluate_main(["export", str(tmp_path / "full"), "--format", "saelens"]) == 2  # refused, by name
    assert "TiedReLUSAE has no SAELens counterpart" in capsys.readouterr().err


def _code_tokens(path: Path) -> list[str]:
    """Names and string literals of a module, leaving out comments, docstrings and attributes of other
    objects (`tensor.topk(...)` is torch's method, not an architecture)."""
    out, previous, previous_text = [], tokenize.INDENT, ""
    with open(path, encoding="utf-8") as fh:
        for tok in tokenize.generate_tokens(fh.readline):
            docstring = tok.type == tokenize.STRING and previous in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL,
                                                                    tokenize.DEDENT)
            attribute = tok.type == tokenize.NAME and previous_text == "."
            if (tok.type == tokenize.NAME and not attribute) or (tok.type == tokenize.STRING and not docstring):
                out.append(tok.string)
            if tok.type not in (tokenize.COMMENT, tokenize.NL):
                previous, previous_text = tok.type, tok.string
    return out


def test_train_and_evaluate_name_no_architecture():
    names = set(zoo.registry.aliases()) | set(canonical_types())
    for package in ("train", "evaluate"):
        for path in sorted((ROOT / package).glob("*.py")):
            for token in _code_tokens(path):
                word = token.strip("\"'fbr")
                if word in names and not (path.name == "schedule.py" and word == "route"):
                    # (the lr schedule "route" is the RouteSAE paper's schedule; any SAE may use it)
                    pytest.fail(f"{path.relative_to(ROOT)} names the architecture {word!r} outside comments")

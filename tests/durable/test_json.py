"""durable's strict JSON writer: a non-finite value never becomes a bare NaN token (issue 17)."""

import json
import math

import pytest
import torch

import durable
from evaluate.run import write_json
from evaluate.splice import CausalFidelity
from train.metrics import MetricsLog


def _refuse(name: str) -> float:
    raise ValueError(name)


def test_json_text_refuses_non_finite_values():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            durable.json_text({"fvu": bad})
    assert json.loads(durable.json_text({"w": torch.tensor([1.0, 2.0])})) == {"w": [1.0, 2.0]}


def test_atomic_write_json_leaves_the_old_file_when_a_value_is_not_finite(tmp_path):
    f = tmp_path / "doc.json"
    durable.atomic_write_json(f, {"fvu": 0.5})
    with pytest.raises(ValueError):
        durable.atomic_write_json(f, {"fvu": math.nan})
    assert json.loads(f.read_text()) == {"fvu": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_null_non_finite_records_null_with_the_reason_beside_it():
    doc = {"metrics": {"fvu": math.nan, "l0": 3.0, "ce": torch.tensor(math.inf)}, "curve": [1.0, -math.inf]}
    out = durable.null_non_finite(doc, "a zero denominator")
    assert out == {
        "metrics": {"fvu": None, "fvu_reason": "not computable (nan): a zero denominator", "l0": 3.0,
                    "ce": None, "ce_reason": "not computable (inf): a zero denominator"},
        "curve": [1.0, None],
    }
    assert math.isnan(doc["metrics"]["fvu"])  # the caller's document is not changed


def test_null_non_finite_takes_a_known_cause_per_key():
    out = durable.null_non_finite({"fvu": math.nan, "mse": math.inf}, "generic", {"fvu": "zero variance"})
    assert out == {"fvu": None, "fvu_reason": "not computable (nan): zero variance",
                   "mse": None, "mse_reason": "not computable (inf): generic"}


def test_undefined_ce_loss_score_has_its_reason_beside_it():
    acc = CausalFidelity()
    acc.tokens, acc.ce = 4, {"clean": 8.0, "sae": 8.4, "zero": 8.0}  # zero ablation changes nothing
    with pytest.warns(UserWarning, match="CE loss score undefined"):
        r = acc.result()
    assert r["ce_loss_score"] is None and "denominator" in str(r["ce_loss_score_reason"])
    doc = json.loads(durable.json_text(r), parse_constant=_refuse)
    assert doc["ce_loss_score"] is None


def test_eval_json_writes_a_non_computable_metric_as_null_with_reason(tmp_path):
    write_json(tmp_path / "eval.json", {"metrics": {"fvu": math.nan, "explained_variance": math.nan, "l0": 2.0}})
    doc = json.loads((tmp_path / "eval.json").read_text(), parse_constant=_refuse)
    assert doc["metrics"]["fvu"] is None and doc["metrics"]["explained_variance"] is None
    assert "nan" in doc["metrics"]["fvu_reason"] and doc["metrics"]["l0"] == 2.0


def test_metrics_line_writes_a_non_finite_loss_as_null_with_reason(tmp_path):
    log = MetricsLog(tmp_path, total_steps=1)
    log.log({"step": 1, "loss": torch.tensor(math.inf), "fvu": 0.25})
    log.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=_refuse)
    assert line["loss"] is None and line["loss_reason"].startswith("not computable (inf)")
    assert line["fvu"] == 0.25

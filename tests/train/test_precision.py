"""training.dtype: what `auto` picks, bf16 training keeps float32 master weights and learns as well as
float32 on a planted-feature problem, and the run summary says what was used."""

import json

import pytest
import torch

import sae as zoo
import train.precision as precision
from settings import TrainingConfig
from tests.sae.synthetic import heldout_fvu, make_sparse_data, scale_for, single_thread
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.loop import Stepper, TrainState, train_step
from train.plan import plan_run
from train.precision import bf16_autocast_available, compute_dtype, precision_record
from train.run import TrainError, train

CPU = torch.device("cpu")
NATIVE = bf16_autocast_available(CPU)
needs_bf16 = pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 GEMM")


def test_auto_picks_bf16_only_where_native_and_the_architecture_allows_it(monkeypatch):
    monkeypatch.setattr(precision, "bf16_autocast_available", lambda device: True)
    assert compute_dtype("auto", CPU, bf16_auto=True) == "bfloat16"
    assert compute_dtype("auto", CPU, bf16_auto=False) == "float32"
    assert compute_dtype("bfloat16", CPU, bf16_auto=False) == "bfloat16"  # an explicit choice is honoured
    monkeypatch.setattr(precision, "bf16_autocast_available", lambda device: False)  # e.g. a CI CPU
    for setting in ("auto", "bfloat16", "float32"):
        assert compute_dtype(setting, CPU, bf16_auto=True) == "float32"
    assert compute_dtype("float64", CPU, bf16_auto=True) == "float64"
    with pytest.raises(ValueError, match="training.dtype='half' is not one of"):
        compute_dtype("half", CPU, bf16_auto=True)


def test_which_architectures_auto_trains_in_bf16():
    # The quality-checked ones (bench/RESULTS.md "bf16 quality check"); the others keep float32.
    auto = {name for name in {zoo.canonical(n) for n in zoo.registry.names()} if zoo.get(name).bf16_auto}
    assert auto == {"TopKSAE", "BatchTopKSAE"}


def _train_planted(dtype: str, x: torch.Tensor, steps: int = 600) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """TopK on planted features through the trainer's own step (autocast included)."""
    t = TrainingConfig(batch_size=256, steps=steps, lr=4e-3, dtype=dtype, log_every=1000, gradient_clip_norm=1.0)
    plan = plan_run(t, x.shape[0], x.shape[0] // 256)
    torch.manual_seed(0)
    model = zoo.get("topk")(zoo.SAEConfig(type="topk", hidden_size=x.shape[1], latent_size=512, k=4))
    model.set_input_scale(scale_for(x))
    model.init_from_data(x[:2048])
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    stepper, state = Stepper.from_config(model, opt, plan, t, CPU), TrainState.fresh(512)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        train_step(stepper, x[torch.randint(0, x.shape[0], (256,), generator=g)], state)
    assert stepper.dtype == dtype
    return model, opt


@needs_bf16
def test_bf16_training_keeps_float32_master_weights_and_matches_float32_fvu():
    data, _ = make_sparse_data(10240, d=64, n_features=256, active=4, seed=3)
    x, test = data[:8192], data[8192:]
    fvu = {}
    with single_thread():
        for dtype in ("float32", "bfloat16"):
            model, opt = _train_planted(dtype, x)
            assert all(p.dtype == torch.float32 for p in model.parameters()), dtype
            assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim() > 0)
            fvu[dtype] = heldout_fvu(model, test)
    assert fvu["float32"] < 0.15  # it learned the planted dictionary at all
    # bf16 rounds the encoder's pre-activations to 8 significant bits; the selection and the kept values
    # move, the learning does not: the stated tolerance is 0.01 absolute FVU
    assert abs(fvu["bfloat16"] - fvu["float32"]) <= 0.01, fvu


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def test_the_run_summary_records_the_precision_used(sparse_cache, tmp_path):
    result = train(tiny_config(sparse_cache, tmp_path, "auto", steps=5, dtype="auto", **{"model.type": "topk"}))
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    want = "bfloat16" if NATIVE else "float32"
    assert summary["precision"] == precision_record("auto", want)
    assert summary["precision"]["master_weights"] == "float32"
    weights = zoo.load_sae(result.run_dir / "sae")[0]
    assert all(p.dtype == torch.float32 for p in weights.parameters())


def test_an_unknown_dtype_is_refused_before_anything_is_written(sparse_cache, tmp_path):
    with pytest.raises(Exception, match="training.dtype"):
        train(tiny_config(sparse_cache, tmp_path, "bad", steps=5, dtype="half"))
    assert not (tmp_path / "bad").exists()
    assert TrainError  # the run's own error type when it gets past config validation

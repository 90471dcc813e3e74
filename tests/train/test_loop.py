"""The step, the loop and a run: what reaches the loss, resume, NaN stops, metrics, held-out summary."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sae as zoo
import train.run as run_mod
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import (
    TINY,
    ProbeSAE,
    canonical_types,
    overrides_for,
    tiny_config,
    tiny_input_shape,
    tiny_sae,
)
from train.checkpoint import list_checkpoints, read_checkpoint
from train.loop import (
    LoopHooks,
    NonFiniteLossError,
    Stepper,
    TrainState,
    batch_metrics,
    run_loop,
    train_step,
)
from train.metrics import read_metrics
from train.plan import plan_run
from train.precision import bf16_autocast_available
from train.run import TrainError, heldout_summary, train
from train.schedule import make_lr_schedule
from train.tensor_loader import TensorLoader


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def _probe_run(n_rows=300, batch=128, steps=12, dead=600, sparsity_warmup=4, l1=0.5):
    """ProbeSAE on random rows with latent 0 forced silent and latent 1 forced on."""
    from settings import TrainingConfig

    t = TrainingConfig(batch_size=batch, steps=steps, dead_feature_threshold=dead, lr=1e-3,
                       sparsity_warmup_steps=sparsity_warmup, l1_coefficient=l1, log_every=100)
    loader = TensorLoader(torch.randn(n_rows, 8), batch, seed=0)
    plan = plan_run(t, loader.rows_per_epoch, loader.batches_per_epoch)
    model = ProbeSAE(8, 16)
    with torch.no_grad():
        model.b_enc[0] = -1e6
        model.b_enc[1] = 1e3
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    state = run_loop(Stepper.from_config(model, opt, plan, t, torch.device("cpu")), loader,
                     TrainState.fresh(16), LoopHooks(), torch.device("cpu"))
    return model, state


def test_dead_latents_are_counted_in_tokens_and_reach_the_loss():
    model, state = _probe_run()
    # 300 rows in batches of 128: 128, 128, 44 per epoch. The mask at step s sees the tokens of steps < s.
    sizes = [128, 128, 44] * 4
    seen = np.cumsum([0] + sizes[:11])
    masks = torch.stack([m for _, m in model.calls])
    assert masks[:, 0].tolist() == [bool(t >= 600) for t in seen]  # first dead at step 6 (600 tokens)
    assert not masks[:, 1].any()  # fires in every batch
    assert state.tokens_since_fired[0].item() == sum(sizes[:12])
    assert state.tokens_since_fired[1].item() == 0
    assert state.tokens == sum(sizes[:12])


def test_sparsity_coefficient_warms_up_linearly():
    model, _ = _probe_run(sparsity_warmup=4, l1=0.5)
    assert [c for c, _ in model.calls][:6] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_each_step_uses_the_scheduled_lr_and_keeps_decoder_rows_unit_norm():
    from settings import TrainingConfig

    t = TrainingConfig(batch_size=32, steps=20, lr=1e-2, lr_schedule="route", log_every=100)
    loader = TensorLoader(torch.randn(64, 8), 32)
    plan = plan_run(t, loader.rows_per_epoch, loader.batches_per_epoch)
    assert plan.lr == make_lr_schedule("route", 20)
    model = ProbeSAE(8, 16)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    stepper, state = Stepper.from_config(model, opt, plan, t, torch.device("cpu")), TrainState.fresh(16)
    lrs = []
    for batch in loader.batches():
        if state.step == 20:
            break
        train_step(stepper, batch.x, state)
        lrs.append(opt.param_groups[0]["lr"])
    # 20 steps: warm-up 1 step (5%), constant to step 16 (80%), then 1e-2 * (20 - s) / 4
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[15] == pytest.approx(1e-2)
    assert lrs[16:] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_batch_metrics_match_the_formulas():
    g = torch.Generator().manual_seed(0)
    x, xhat = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    acts = torch.zeros(10, 6)
    acts[:, :2] = 1.0
    acts[0, 5] = 3.0
    out = {"target": x, "sae_out": xhat, "feature_acts": acts}
    losses = {"mse": torch.tensor(2.0), "total": torch.tensor(3.0)}
    state = TrainState.fresh(6)
    state.tokens_since_fired[:3] = 100
    plan = plan_run(__import__("settings").TrainingConfig(batch_size=10, steps=5, dead_feature_threshold=50), 100, 10)
    m = batch_metrics(ProbeSAE(4, 6), out, losses, state, plan)
    xn, xh = x.numpy().astype(np.float64), xhat.numpy().astype(np.float64)
    fvu = ((xn - xh) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert m["l0"] == pytest.approx(2.1)
    assert m["dead_fraction"] == pytest.approx(0.5)
    assert (m["loss"], m["mse"]) == (3.0, 2.0)


@pytest.mark.parametrize("name", canonical_types())
def test_the_loop_calls_each_hook_when_it_should(name):
    # Every registered type, none skipped: `update_after_step` after every step (JumpReLU keeps
    # theta >= 0 from step 0), `estimate_threshold` only from threshold_start_step on.
    from settings import TrainingConfig

    model = tiny_sae(name)
    calls: dict[str, list[int]] = {"update_after_step": [], "estimate_threshold": []}
    state = TrainState.fresh(model.d_sae)
    for hook, seen in calls.items():
        real = getattr(model, hook)
        setattr(model, hook, lambda out, real=real, seen=seen: (seen.append(state.step), real(out)))
    t = TrainingConfig(batch_size=32, steps=6, threshold_start_step=3, log_every=100)
    plan = plan_run(t, 64, 2)
    stepper = Stepper.from_config(model, torch.optim.Adam(model.parameters(), lr=1e-3), plan, t, torch.device("cpu"))
    x = torch.randn(32, *tiny_input_shape(model))
    for _ in range(6):
        train_step(stepper, x, state)
    assert calls == {"update_after_step": [0, 1, 2, 3, 4, 5], "estimate_threshold": [3, 4, 5]}


@pytest.mark.skipif("BatchTopKSAE" not in canonical_types(), reason="sae/batchtopk.py not registered yet")
def test_batchtopk_threshold_waits_for_its_start_then_becomes_positive(sparse_cache, tmp_path, monkeypatch):
    seen, built = {}, []
    real_build = run_mod.build_sae

    def build(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    def watch(state):
        seen[state.step] = float(built[0].threshold)

    monkeypatch.setattr(run_mod, "build_sae", build)
    cfg = tiny_config(sparse_cache, tmp_path, **{"model.type": "batchtopk", "threshold_start_step": 10},
                      **overrides_for("BatchTopKSAE"))
    train(cfg, after_step=[watch])
    assert all(seen[s] == 0.0 for s in range(1, 11)), seen  # steps 0..9 leave it unestimated
    assert seen[11] > 0 and seen[40] > 0
    saved = _weights(tmp_path / "run")
    # The saved threshold is the final model's cut-off (train/calibrate.py), replacing the EMA.
    meta = json.loads((tmp_path / "run" / "sae" / "sae.json").read_text())["meta"]
    assert meta["threshold_calibration"]["before"] == pytest.approx(seen[40])
    assert float(saved["threshold"]) == pytest.approx(meta["threshold_calibration"]["after"])
    assert float(saved["threshold"]) > 0


def _weights(run_dir):
    return load_file(str(run_dir / "sae" / "sae.safetensors"))


@pytest.mark.parametrize("sae_type", canonical_types())  # every registered type: none is left out
def test_resume_after_a_kill_is_bitwise_identical(sparse_cache, tmp_path, sae_type):
    # A short dead window on a wide dictionary: some latents are dead at the checkpoint, so AuxK
    # (and the dead counters it reads) shape the steps after the resume.
    over = {"model.type": sae_type, **overrides_for(sae_type, latent=256), "threshold_start_step": 5,
            "dead_feature_threshold": 256}
    train(tiny_config(sparse_cache, tmp_path, "full", **over))
    at_20 = read_checkpoint(list_checkpoints(tmp_path / "full")[0]).tensors["state"]["tokens_since_fired"]
    assert (at_20 >= 256).any() or not zoo.get(sae_type).ratio_terms  # dead latents, where AuxK reads them

    def kill(state):
        if state.step == 25:  # after the checkpoint at step 20
            raise Killed

    with pytest.raises(Killed):
        train(tiny_config(sparse_cache, tmp_path, "killed", **over), after_step=[kill])
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-00000010", "step-00000020"]
    train(tiny_config(sparse_cache, tmp_path, "killed", resume=True, **over))
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    a = read_checkpoint(list_checkpoints(tmp_path / "full")[-1])
    b = read_checkpoint(list_checkpoints(tmp_path / "killed")[-1])
    for group in ("optimizer", "state"):
        for name in a.tensors[group]:
            assert torch.equal(a.tensors[group][name], b.tensors[group][name]), (group, name)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(tmp_path / "killed"))


def test_resume_refuses_a_changed_config_and_names_the_keys(sparse_cache, tmp_path):
    train(tiny_config(sparse_cache, tmp_path, steps=20))
    with pytest.raises(TrainError, match=r"training\.lr.*0\.001 -> 0\.002"):
        train(tiny_config(sparse_cache, tmp_path, steps=20, lr=2e-3, resume=True))
    # device and logging keys may change
    result = train(tiny_config(sparse_cache, tmp_path, steps=20, log_every=3, resume=True))
    assert result.state.step == 20


def test_an_existing_run_folder_is_refused_without_resume_or_overwrite(sparse_cache, tmp_path):
    train(tiny_config(sparse_cache, tmp_path, steps=10))
    with pytest.raises(run_mod.RunDirError, match="already exists.*--resume.*--overwrite"):
        train(tiny_config(sparse_cache, tmp_path, steps=10))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(run_mod.RunDirError, match="not a training run folder"):
        train(tiny_config(sparse_cache, tmp_path, "mine", steps=10, overwrite=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert train(tiny_config(sparse_cache, tmp_path, steps=10, overwrite=True)).state.step == 10


class _PoisonedLoader(run_mod.ActivationLoader):
    """Puts a NaN into global batch POISON_AT."""

    POISON_AT = 23

    def batches(self, epoch=0, batch=0):
        for b in super().batches(epoch, batch):
            if b.epoch * self.batches_per_epoch + b.index == self.POISON_AT:
                b.x = b.x.clone()
                b.x[0, 0] = float("nan")
            yield b


def test_a_nan_loss_stops_the_run_names_the_step_and_keeps_the_last_good_checkpoint(
        sparse_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "ActivationLoader", _PoisonedLoader)
    with pytest.raises(NonFiniteLossError, match="step 23.*step-00000020.*lr") as info:
        train(tiny_config(sparse_cache, tmp_path))
    assert info.value.step == 23
    kept = list_checkpoints(tmp_path / "run")
    assert kept[-1].name == "step-00000020"
    for t in read_checkpoint(kept[-1]).tensors["model"].values():
        assert torch.isfinite(t).all()
    assert not (tmp_path / "run" / "sae").exists()


def test_metrics_file_has_every_field(sparse_cache, tmp_path):
    train(tiny_config(sparse_cache, tmp_path, steps=12, log_every=5))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [5, 10, 12]
    for key in ("tokens", "loss", "mse", "l1", "l0", "fvu", "dead_fraction", "lr", "tokens_per_s"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    assert rows[-1]["tokens"] == 12 * 128
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 12 and summary["heldout"]["rows"] == TINY["n_heldout"]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_heldout_summary_matches_an_independent_computation(sparse_cache):
    import cache

    c = cache.open(sparse_cache)
    model = ProbeSAE(16, 32)
    model.set_input_scale(0.7)
    model.train()
    got = heldout_summary(model, c, 1, batch_size=100)
    assert model.training  # restored
    xs = torch.cat([c.read("heldout", i.index, 1) for i in c.shards("heldout")]).double()
    with torch.no_grad():
        out = model(xs.float())
    t, r, f = (out["target"].double().numpy(), out["sae_out"].double().numpy(), out["feature_acts"].numpy())
    fvu = ((t - r) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
    assert got["rows"] == len(xs)
    assert got["fvu"] == pytest.approx(fvu, rel=1e-6)
    assert got["l0"] == pytest.approx((f != 0).sum(1).mean())
    assert got["dead_fraction"] == pytest.approx(1 - (f != 0).any(0).mean())
    assert heldout_summary(model, c, 1, batch_size=64, max_rows=100)["rows"] == 100


class _FakeWandb(types.ModuleType):
    def __init__(self, fail=False):
        super().__init__("wandb")
        self.fail, self.logged, self.inits, self.finished = fail, [], [], False

    def init(self, **kwargs):
        if self.fail:
            raise RuntimeError("no network")
        self.inits.append(kwargs)

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_metrics_and_a_failing_wandb_does_not_stop_training(sparse_cache, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(tiny_config(sparse_cache, tmp_path, "w1", steps=10, **{"wandb.use_wandb": True}))
    assert fake.inits[0]["name"] == "w1" and fake.finished
    assert [s for s, _ in fake.logged] == [5, 10] and "fvu" in fake.logged[0][1]
    broken = _FakeWandb(fail=True)
    monkeypatch.setitem(sys.modules, "wandb", broken)
    with pytest.warns(UserWarning, match="wandb could not start"):
        result = train(tiny_config(sparse_cache, tmp_path, "w2", steps=10, **{"wandb.use_wandb": True}))
    assert result.state.step == 10 and len(read_metrics(tmp_path / "w2")) == 2
    untouched = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", untouched)
    train(tiny_config(sparse_cache, tmp_path, "w3", steps=5))
    assert not untouched.inits


def test_resume_without_a_run_name_continues_the_newest_run_of_that_type_and_layer(sparse_cache, tmp_path):
    def kill(state):
        if state.step == 15:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_config(sparse_cache, tmp_path, None, steps=20), after_step=[kill])
    (started,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # beside it: its lock file (durable.lock)
    assert started.name.startswith("vanilla-L1-")  # the cache's middle layer
    result = train(tiny_config(sparse_cache, tmp_path, None, steps=20, resume=True))
    assert result.run_dir == started and result.state.step == 20
    with pytest.raises(run_mod.RunDirError, match="nothing to resume"):
        train(tiny_config(sparse_cache, tmp_path, None, steps=20, resume=True, **{"model.type": "gated"}))


@pytest.mark.skipif(not bf16_autocast_available(torch.device("cpu")), reason="this CPU has no native bf16 GEMM")
def test_bfloat16_on_a_bf16_cpu_autocasts_the_encoder_and_keeps_float32_master_weights():
    from settings import TrainingConfig

    torch.manual_seed(0)
    x = torch.randn(256, 32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        t = TrainingConfig(batch_size=256, steps=1, lr=1e-3, dtype=dtype, log_every=100)
        plan = plan_run(t, 256, 1)
        torch.manual_seed(1)
        model = zoo.get("topk")(zoo.SAEConfig(type="topk", hidden_size=32, latent_size=128, k=8))
        opt = torch.optim.Adam(model.parameters(), lr=t.lr)
        out, losses[dtype] = train_step(Stepper.from_config(model, opt, plan, t, torch.device("cpu")), x,
                                        TrainState.fresh(128))
        want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        assert out["top_val"].dtype == want  # the encoder GEMM ran in the training dtype
        assert ("pre_acts" in out) == (dtype == "float32")  # bf16: the fused encoder, no [B, M] matrix
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim() > 0)
    # bf16 rounds the pre-activations to 8 significant bits: the loss moves by well under 5%
    assert losses["bfloat16"]["mse"].item() == pytest.approx(losses["float32"]["mse"].item(), rel=0.05)

"""The fast step's choices keep its arithmetic: fused Adam, and a TopK step with no host-device sync on
the GPU path (checked with the profiler on the CPU, the GPU's fixed-shape AuxK selection forced)."""

import functools

import torch
from torch.profiler import ProfilerActivity, profile

import sae as zoo
import sae.selection
import sae.topk
from sae.auxk import auxk_loss
from settings import TrainingConfig
from train.loop import Stepper, TrainState, make_optimizer, train_step
from train.plan import plan_run

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")


def _topk(latent: int = 256) -> zoo.BaseSAE:
    torch.manual_seed(0)
    return zoo.get("topk")(zoo.SAEConfig(type="topk", hidden_size=32, latent_size=latent, k=4, aux_k=8))


def test_the_optimizer_is_fused_adam_with_the_configured_hyperparameters():
    t = TrainingConfig(lr=3e-3, betas=[0.8, 0.99], eps=1e-7)
    a, b = _topk(), _topk()
    opt = make_optimizer(a, t)
    assert opt.param_groups[0]["fused"] is True
    # the textbook Adam update, written out, on the same gradients
    x = torch.randn(64, 32)
    m = {n: torch.zeros_like(p) for n, p in b.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in b.named_parameters()}
    for step in range(1, 4):
        for model in (a, b):
            for p in model.parameters():
                p.grad = None
            model.loss(model(x))["total"].backward()
        opt.step()
        with torch.no_grad():
            for n, p in b.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                m[n] = 0.8 * m[n] + 0.2 * g
                v[n] = 0.99 * v[n] + 0.01 * g * g
                mhat, vhat = m[n] / (1 - 0.8**step), v[n] / (1 - 0.99**step)
                p -= 3e-3 * mhat / (vhat.sqrt() + 1e-7)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_topk_step_on_the_gpu_path_never_syncs_host_and_device(monkeypatch):
    monkeypatch.setattr(sae.topk, "auxk_loss", functools.partial(auxk_loss, sync_free=True))
    # CUDA's selection is torch.topk over a kept z: keep the CPU's C kernel (sae.native) and its fused
    # encoder (no z) out of the path checked here
    monkeypatch.setattr(sae.selection.native, "row_topk", lambda z, k, *args, **kwargs: None)
    monkeypatch.setattr(sae.topk.TopKSAE, "_fused_encode", lambda self, xn: False)
    model = _topk()
    t = TrainingConfig(batch_size=128, steps=100, lr=1e-3, dtype="float32", log_every=1000,
                       dead_feature_threshold=1)  # every latent that missed one batch is dead: AuxK runs
    plan = plan_run(t, 128 * 100, 100)
    stepper = Stepper.from_config(model, make_optimizer(model, t), plan, t, torch.device("cpu"))
    state = TrainState.fresh(256)
    x = torch.randn(128, 32)
    for _ in range(3):
        _, losses = train_step(stepper, x, state)
    assert losses["auxk"].item() > 0  # the dead-latent path is part of what was checked
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(stepper, x, state)
    events = prof.events()
    assert "aten::topk" in [e.name for e in events]  # the profiler saw the step
    assert [_chain(e) for e in events if e.name in SYNC_OPS and not _inside(e, "aten::_fused_adam_")] == []
    # The CPU's fused Adam reads each step counter on the host, where it lives; the CUDA kernel takes the
    # counters as device tensors and reads them there.
    assert {e.cpu_parent.name for e in events if e.name == "aten::item"} <= {"aten::_fused_adam_"}


def _inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def _chain(event) -> str:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return " < ".join(names)

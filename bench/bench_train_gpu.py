"""The training loop on a CUDA device: every architecture in fp32 and bf16 autocast (weights must stay
float32), resume bitwise on CUDA, TopK tokens/s fed from the cache vs from a tensor in memory (CPU and
GPU), the step's phases, and torch.compile.

    python bench/bench_train_gpu.py            # writes $OUT/gpu_report.json (default /tmp/out)
    DEV=cpu python bench/bench_train_gpu.py    # the same on a CPU (slow)

Scratch files go to /tmp/gpuwork. Results: bench/RESULTS.md, "Training loop on CUDA".
"""

import json
import os
import shutil
import sys
import time
import traceback

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.getcwd())  # run from the repository root
import cache  # noqa: E402
import sae as zoo  # noqa: E402
from settings import TrainingConfig  # noqa: E402
from tests.train.cache_fixtures import write_cache  # noqa: E402
from tests.train.run_fixtures import canonical_types, overrides_for, tiny_config  # noqa: E402
from train.data import ActivationLoader  # noqa: E402
from train.loop import LoopHooks, Stepper, TrainState, make_optimizer, run_loop, train_step  # noqa: E402
from train.plan import plan_run  # noqa: E402
from train.run import train  # noqa: E402
from train.tensor_loader import TensorLoader  # noqa: E402

torch.set_num_threads(min(8, os.cpu_count() or 1))  # run_fixtures sets 1 for the tests
OUT = os.environ.get("OUT", "/tmp/out")
W = "/tmp/gpuwork"
DEV = os.environ.get("DEV", "cuda")
REPORT = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV}
SYNC = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)


def dump():
    with open(os.path.join(OUT, "gpu_report.json"), "w") as fh:
        json.dump(REPORT, fh, indent=1)


def part(name, fn):
    t = time.time()
    try:
        REPORT[name] = fn()
    except Exception:
        REPORT[name] = {"error": traceback.format_exc()[-3000:]}
    REPORT[name + "_s"] = round(time.time() - t, 1)
    print(name, json.dumps(REPORT[name])[:3000], flush=True)
    dump()


TINY = dict(d_model=64, n_train=8192, n_heldout=1024, layers=(0, 1, 2), shard_rows=2000, seq_len=16, window_seqs=8)


def archs():
    c = write_cache(f"{W}/sparse", content="sparse", **TINY).path
    res = {}
    for dtype in ("float32", "bfloat16"):
        for name in canonical_types():
            over = {"model.type": name, **overrides_for(name, latent=256), "device": DEV, "dtype": dtype,
                    "steps": 150, "batch_size": 512, "lr": 3e-3, "log_every": 50, "checkpoint_every": 50}
            r = train(tiny_config(c, f"{W}/runs", f"{name}-{dtype}", **over), say=lambda m: None)
            w = load_file(f"{W}/runs/{name}-{dtype}/sae/sae.safetensors")
            res[f"{name}/{dtype}"] = {"fvu": r.summary["heldout"]["fvu"], "l0": r.summary["heldout"]["l0"],
                                      "dead": r.summary["heldout"]["dead_fraction"],
                                      "dtypes": sorted({str(v.dtype) for v in w.values()}),
                                      "tok_s": r.summary["tokens_per_s"]}
    return res


class Killed(Exception):
    pass


def resume():
    c = f"{W}/sparse"
    res = {}
    for name in ("TopKSAE", "BatchTopKSAE", "VanillaSAE"):
        over = {"model.type": name, **overrides_for(name, latent=256), "device": DEV, "steps": 40,
                "batch_size": 512, "threshold_start_step": 5}
        train(tiny_config(c, f"{W}/res", f"{name}-full", **over), say=lambda m: None)

        def kill(state):
            if state.step == 25:
                raise Killed

        try:
            train(tiny_config(c, f"{W}/res", f"{name}-k", **over), after_step=[kill], say=lambda m: None)
        except Killed:
            pass
        train(tiny_config(c, f"{W}/res", f"{name}-k", resume=True, **over), say=lambda m: None)
        a = load_file(f"{W}/res/{name}-full/sae/sae.safetensors")
        b = load_file(f"{W}/res/{name}-k/sae/sae.safetensors")
        res[name] = {k: ("equal" if torch.equal(a[k], b[k]) else float((a[k] - b[k]).abs().max())) for k in a}
    return res


def _bench(loader, dtype, steps=300, warm=30, compile=False):
    dev = torch.device(DEV)
    t = TrainingConfig(batch_size=4096, steps=steps, lr=4e-4, dtype=dtype, log_every=10**9, checkpoint_every=10**9,
                       compile=compile)
    plan = plan_run(t, loader.rows_per_epoch, loader.batches_per_epoch)
    torch.manual_seed(0)
    model = zoo.get("topk")(zoo.SAEConfig(type="TopKSAE", hidden_size=384, latent_size=3072, k=32)).to(dev)
    stepper = Stepper.from_config(model, make_optimizer(model, t), plan, t, dev)
    marks = {}

    def mark(state):
        if state.step in (warm, steps):
            SYNC()
            marks[state.step] = time.perf_counter()

    run_loop(stepper, loader, TrainState.fresh(3072, dev), LoopHooks(after_step=[mark]), dev)
    return round((steps - warm) * 4096 / (marks[steps] - marks[warm]))


def throughput():
    writer_rows = 262144
    write_cache(f"{W}/gauss", content="gaussian", d_model=384, n_train=writer_rows, n_heldout=4096, layers=(0,),
                shard_rows=65536, seq_len=128, window_seqs=64)
    c = cache.open(f"{W}/gauss")
    x = torch.cat([c.read("train", i.index, 0).clone() for i in c.shards("train")])
    res = {}
    for dtype in ("float32", "bfloat16"):
        res[f"cache/{dtype}"] = _bench(ActivationLoader(c, 0, 4096, seed=0), dtype)
        res[f"memory_cpu/{dtype}"] = _bench(TensorLoader(x, 4096), dtype)
        res[f"memory_gpu/{dtype}"] = _bench(TensorLoader(x.to(DEV), 4096), dtype)
    return res


def compiled():
    c = f"{W}/sparse"
    out = {}
    for name in ("TopKSAE", "VanillaSAE"):
        over = {"model.type": name, **overrides_for(name, latent=256), "device": DEV, "steps": 60,
                "batch_size": 512, "compile": True}
        r = train(tiny_config(c, f"{W}/comp", name, **over), say=lambda m: None)
        out[name] = {"fvu": r.summary["heldout"]["fvu"], "tok_s": r.summary["tokens_per_s"]}
    return out


def throughput_compiled():
    x = torch.randn(262144, 384)
    return {f"{d}/compiled={c}": _bench(TensorLoader(x.to(DEV), 4096), d, compile=c)
            for d in ("float32", "bfloat16") for c in (False, True)}


def phases():
    dev = torch.device(DEV)
    x = torch.randn(4096, 384, device=dev)
    t = TrainingConfig(batch_size=4096, steps=10**6, lr=4e-4)
    plan = plan_run(t, 10**9, 10**6)
    torch.manual_seed(0)
    model = zoo.get("topk")(zoo.SAEConfig(type="TopKSAE", hidden_size=384, latent_size=3072, k=32)).to(dev)
    opt = make_optimizer(model, t)
    stepper, state = Stepper.from_config(model, opt, plan, t, dev), TrainState.fresh(3072, dev)
    mask = torch.zeros(3072, dtype=torch.bool, device=dev)

    def ms(fn, n=100):
        for _ in range(20):
            fn()
        SYNC()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        SYNC()
        return round((time.perf_counter() - t0) / n * 1e3, 3)

    def fwd():
        with torch.no_grad():
            model(x, dense_acts=False)

    def fwd_bwd():
        out = model(x, dense_acts=False)
        opt.zero_grad()
        model.loss(out, dead_mask=mask)["total"].backward()

    def bare():
        fwd_bwd()
        opt.step()

    def dense_matmul():
        torch.nn.functional.linear(x, model.W_enc, model.b_enc)

    return {"encoder_gemm_ms": ms(dense_matmul), "forward_ms": ms(fwd), "fwd_loss_bwd_ms": ms(fwd_bwd),
            "plus_adam_ms": ms(bare), "train_step_ms": ms(lambda: train_step(stepper, x, state))}


if __name__ == "__main__":
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(W)
    os.makedirs(OUT, exist_ok=True)
    part("archs", archs)
    part("resume", resume)
    part("throughput", throughput)
    part("phases", phases)
    part("compile", compiled)
    part("throughput_compiled", throughput_compiled)

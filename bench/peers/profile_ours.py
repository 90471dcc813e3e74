"""Where does one of our training steps spend its time? (the follow-up bench_peers.py asks for)

Builds the SAE, optimiser, plan and `Stepper` the way train/run.py does for the peer benchmark's
config (bench/peers/ours_worker.py), feeds the stream file's batches (real activations, the trainer's
order) to `train.loop.train_step`, and after a few warm-up steps prints torch.profiler's operator
table for N steps (self CPU time), plus the median wall time of a step.

`--phases` instead times the phases of a step separately (forward, loss, backward, optimiser, ...) by
running them in train/loop.py's `train_step` order with a clock between them (profiling only: the
real step is `train_step`; if that order changes, update `phase_step`), next to the bare encoder
GEMM measured in the same process, so that the shares hold even when other processes load the CPU.

    .venv/bin/python bench/peers/profile_ours.py --arch topk --steps 8
    .venv/bin/python bench/peers/profile_ours.py --arch topk --steps 8 --phases
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402
from ours_worker import ARCHES, build_config  # noqa: E402
from runmeter import set_threads  # noqa: E402
from streamfile import load_meta, train_batches  # noqa: E402


def make_stepper(arch: str, meta, work: Path):
    import cache
    from train.build import build_sae, init_from_sample, input_scales, resolve_layers
    from train.loop import Stepper, TrainState, make_optimizer
    from train.plan import plan_run

    cfg = build_config(arch, meta.cache, meta.layer, meta.batch_size, work / "runs")
    c = cache.open(meta.cache)
    choice = resolve_layers(cfg.model, c.layers)
    model = build_sae(cfg.model, c.d_model, choice, input_scales(c, choice.layers), cfg.training.seed)
    plan = plan_run(cfg.training, meta.train_rows, meta.n_batches)
    stepper = Stepper.from_config(model, make_optimizer(model, cfg.training), plan, cfg.training, torch.device("cpu"))
    return stepper, TrainState.fresh(model.d_sae), init_from_sample


def phase_step(s, x: torch.Tensor, state, clock: dict[str, list[float]]) -> None:
    """One step of train/loop.py's `train_step`, phase by phase, adding each phase's seconds to `clock`."""
    from train.loop import _count_tokens

    sae, opt = s.sae, s.optimizer
    marks = [("start", time.perf_counter())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    dead_mask = state.tokens_since_fired >= s.plan.dead_threshold_tokens
    out = sae(x, **s.forward_kwargs)
    mark("forward")
    losses = sae.loss(out, l1_coefficient=0.0, dead_mask=dead_mask)
    mark("loss (incl. AuxK forward)")
    opt.zero_grad(set_to_none=True)
    losses["total"].backward()
    mark("backward")
    sae.remove_parallel_grads()
    mark("remove_parallel_grads")
    torch.nn.utils.clip_grad_norm_(sae.parameters(), s.clip_norm)
    mark("clip_grad_norm_")
    opt.step()
    mark("Adam step")
    sae.normalize_decoder()
    mark("normalize_decoder")
    sae.update_after_step(out)
    if state.step >= s.plan.threshold_start_step:
        sae.estimate_threshold(out)
    _count_tokens(sae, out, state, x.shape[0])
    state.step += 1
    state.tokens += x.shape[0]
    mark("threshold + dead counters")
    for (_, a), (name, b) in zip(marks[:-1], marks[1:], strict=True):
        clock.setdefault(name, []).append(b - a)


def report_phases(s, xs: list[torch.Tensor], state, batch: int) -> None:
    clock: dict[str, list[float]] = {}
    for x in xs:
        phase_step(s, x, state, clock)
    sae = s.sae
    xn = sae.normalise(xs[0]) - sae.b_dec.detach()
    gemm = []
    with torch.no_grad():
        for _ in range(len(xs)):
            t = time.perf_counter()
            torch.nn.functional.linear(xn, sae.W_enc, sae.b_enc)
            gemm.append(time.perf_counter() - t)
    g = statistics.median(gemm)
    total = sum(statistics.median(v) for v in clock.values())
    print(f"median step {1e3 * total:.1f} ms = {batch / total:,.0f} tokens/s; bare encoder GEMM {1e3 * g:.1f} ms "
          f"(the step is {total / g:.1f} GEMMs)")
    print(f"{'phase':32s} {'ms':>8s} {'share':>6s} {'x GEMM':>7s}")
    for name, v in clock.items():
        m = statistics.median(v)
        print(f"{name:32s} {1e3 * m:8.1f} {100 * m / total:5.1f}% {m / g:7.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=ARCHES, default="topk")
    p.add_argument("--work", type=Path, default=HERE.parent / "_work" / "peers")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=30, help="operator rows to print")
    p.add_argument("--phases", action="store_true", help="time the phases of a step instead of operators")
    a = p.parse_args(argv)
    set_threads(a.threads)
    from train.loop import train_step

    meta = load_meta(a.work)
    if 1 + a.warmup + a.steps > meta.n_batches:
        sys.exit(f"the stream in {a.work} has {meta.n_batches} batches; ask for at most {meta.n_batches - 1} "
                 "warm-up + profiled steps")
    stepper, state, init = make_stepper(a.arch, meta, a.work)
    batches = train_batches(a.work, meta)
    first = next(batches)
    init(stepper.sae, first)
    for _ in range(a.warmup):
        train_step(stepper, next(batches), state)
    xs = [next(batches) for _ in range(a.steps)]
    if a.phases:
        report_phases(stepper, xs, state, meta.batch_size)
        return 0
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x in xs:
            t = time.perf_counter()
            train_step(stepper, x, state)
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    print(f"{a.arch}: median step {1e3 * step:.1f} ms under the profiler = {meta.batch_size / step:,.0f} tokens/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

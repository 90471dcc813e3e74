"""Would one wider encoder GEMM over a sweep's stacked TopK encoders beat one GEMM per member?

8 TopK members (d 384, 3072 latents, batch 4096, float32): the forward encoder GEMM of each member,
F.linear(x - b_dec_i, W_enc_i, b_enc_i), 8 times, against one F.linear over the stacked weights
[8 * 3072, 384] on the shared x, with each member's b_dec folded in as -W_enc_i @ b_dec_i (the
algebra the shared GEMM needs, since each member centres x with its own b_dec). Timings alternate
between the two, medians of --repeats; then the largest difference between the two results (the
shared GEMM is not bitwise equal to the members' own: it sums in another order).

    flock /work/bench.lock .venv/bin/python bench/bench_sweep_gemm.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

D, D_SAE, BATCH, MEMBERS = 384, 3072, 4096, 8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D, generator=g)
    w = [torch.randn(D_SAE, D, generator=g) / D**0.5 for _ in range(MEMBERS)]
    b_enc = [torch.randn(D_SAE, generator=g) * 0.01 for _ in range(MEMBERS)]
    b_dec = [torch.randn(D, generator=g) * 0.1 for _ in range(MEMBERS)]

    def separate() -> list[torch.Tensor]:
        return [F.linear(x - b_dec[i], w[i], b_enc[i]) for i in range(MEMBERS)]

    def shared() -> list[torch.Tensor]:
        stacked_w = torch.cat(w)  # a real implementation would keep it stacked; the copy is timed too
        bias = torch.cat([b_enc[i] - w[i] @ b_dec[i] for i in range(MEMBERS)])
        return list(F.linear(x, stacked_w, bias).split(D_SAE, dim=1))

    times: dict[str, list[float]] = {"separate": [], "shared": []}
    for _ in range(2):
        separate(), shared()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("separate", separate), ("shared", shared)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    a, b = separate(), shared()
    diff = max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"bench_sweep_gemm: {MEMBERS} TopK encoders d {D} -> {D_SAE}, batch {BATCH}, float32, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f} (shared machine: compare the ratio)")
    print(f"  8 separate GEMMs: {med['separate'] * 1e3:.1f} ms; one stacked GEMM: {med['shared'] * 1e3:.1f} ms; "
          f"ratio shared/separate {med['shared'] / med['separate']:.3f}")
    print(f"  largest difference between the two: {diff:.2e} (not bitwise equal)")


if __name__ == "__main__":
    main()

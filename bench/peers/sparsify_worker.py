"""Peer-benchmark worker (runs in .venv-peers): EleutherAI sparsify's `SparseCoder`, TopK only.

sparsify's `Trainer` runs a language model with hooks, so its step is reproduced around the public
`SparseCoder` (ANCHORS.md), in the order its trainer uses: b_dec = mean of the first batch; decoder
rows set to unit norm before each forward; loss = the FVU the coder returns (AuxK off: its default
`auxk_alpha` is 0); backward; gradient parallel to the decoder rows removed; Adam step; no clipping.
Adam lr 4e-4 constant unless `--lr` says otherwise (sparsify's own default would warm up for 1,000
steps). Its eager CPU decoder (embedding_bag) is what runs here: Triton is not installed.

    .venv-peers/bin/python bench/peers/sparsify_worker.py --work bench/_work/peers --out r.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from heldout_eval import evaluate
from runmeter import COMMON_LR, Gate, StepClock, peak_rss_bytes, set_threads, worker_parser, write_result
from streamfile import StreamMeta, heldout_chunks, load_meta, train_batches

D_SAE, K = 3072, 32


def train(coder, meta: StreamMeta, work: Path, clock: StepClock, lr: float = COMMON_LR, bf16: bool = False) -> None:
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    for step, x in enumerate(train_batches(work, meta, scale=meta.scale)):
        if step == 0:
            with torch.no_grad():
                coder.b_dec.copy_(x.mean(dim=0))
        coder.set_decoder_norm_to_unit_norm()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # its matmuls in bf16, weights float32
            out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.step_end()


def main(argv: list[str] | None = None) -> int:
    p = worker_parser(__doc__.splitlines()[0], ("topk",))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: its step under CPU autocast (float32 weights and Adam), its fastest CPU setting")
    a = p.parse_args(argv)
    set_threads(a.threads)
    meta = load_meta(a.work)
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(meta.d, SparseCoderConfig(num_latents=D_SAE, k=K), device="cpu", dtype=torch.float32)
    clock = StepClock(meta.n_batches, Gate.from_arg(a.gate))
    train(coder, meta, a.work, clock, a.lr, bf16=a.dtype == "bfloat16")
    rates = clock.rates(meta.batch_rows())
    coder.eval()

    def infer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = x * meta.scale
        enc = coder.encode(xs)
        latents = torch.zeros(xs.shape[0], D_SAE).scatter_(1, enc.top_indices, enc.top_acts)
        return xs, coder.decode(enc.top_acts, enc.top_indices), latents

    metrics = evaluate(infer, heldout_chunks(a.work, meta), D_SAE)
    name = f"sparsify {version('eai-sparsify')}" + (" (bfloat16 autocast)" if a.dtype == "bfloat16" else "")
    doc = {"impl": name, "arch": "topk", "threads": torch.get_num_threads(),
           **rates, **metrics, "peak_rss_bytes": peak_rss_bytes(), "threshold": None}
    write_result(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

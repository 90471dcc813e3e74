"""`python -m train.sweep configs/sweeps/<name>.yaml [--resume] [--overwrite] [section.key=value ...]`
(`make sweep SWEEP=...`): train every member of the sweep in one pass over the cache.

Exit status: 0 every member done, 1 the sweep could not start or a member stopped (the summary says
which and why), 2 a bad sweep file or command line.
"""

from __future__ import annotations

import argparse
import sys

from settings import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep",
                                description="Train many SAEs in one pass over a cache (a sweep file).")
    p.add_argument("sweep", help="sweep file, e.g. configs/sweeps/topk-k-lr.yaml")
    p.add_argument("--resume", action="store_true", help="continue every member from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the members' existing run folders")
    p.add_argument("overrides", nargs="*", help="section.key=value for every member, e.g. training.num_epochs=1")
    args = p.parse_intermixed_args(argv)
    from train.sweep.spec import SweepError, load_sweep

    try:
        sweep = load_sweep(args.sweep, args.overrides, resume=args.resume, overwrite=args.overwrite)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.run import user_errors
    from train.sweep.run import run_sweep

    stops: tuple[type[BaseException], ...] = (SweepError, *user_errors())
    try:
        result = run_sweep(sweep)
    except stops as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume (RESUME=1) to continue every member", file=sys.stderr)
        return 130
    return 1 if result.stopped else 0


if __name__ == "__main__":
    from durable.launcher import exit_process

    exit_process(main())  # under torchrun: os._exit, no interpreter teardown (see exit_process for why)

"""Command line of stage 1: `python -m harvest [--config FILE ...] [--overwrite] [section.key=value ...]`.

Under `torchrun --nproc-per-node N -m harvest ...` (WORLD_SIZE > 1) the processes share the work and
rank 0 merges their caches into one (harvest.distributed); an error line then names the rank.

Exit codes: 0 done (also when the cache was already complete), 1 failure while running (disk full,
I/O error), 2 bad input (config, model path, layers, text source, a different cache in the way, a
cache held by another process), 128 + signal number when stopped by SIGINT (130), SIGTERM (143) or
SIGUSR1 (138): every complete shard is committed first. Errors are one line on stderr; a rerun
resumes whatever was committed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

DEFAULT_CONFIG = Path("configs/default.yaml")


def _parser() -> argparse.ArgumentParser:
    from settings.describe import describe, help_formatter

    p = argparse.ArgumentParser(
        prog="python -m harvest", epilog=describe(["model", "data", "harvest"]), formatter_class=help_formatter,
        description="Run a language model over text and cache its residual-stream activations. A rerun with "
                    "the same settings resumes; a larger harvest.max_tokens extends a complete cache.")
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help=f"YAML config (repeatable, later wins); default {DEFAULT_CONFIG} if it exists")
    p.add_argument("--overwrite", action="store_true", help="replace a different cache at harvest.output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. harvest.layers=2:4 harvest.max_tokens=100000")
    return p


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 (a scheduler's warning), raised where the harvest is, so that it unwinds as on
    Ctrl-C: the writer commits every shard already complete and drops the rest."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    from harvest.distributed import harvest_distributed, world_from_env
    from harvest.errors import TextError
    from harvest.model import HarvestError
    from harvest.run import harvest
    from settings import ConfigError, load_config

    if args.quiet:
        _silence_transformers()
    paths = args.config if args.config is not None else ([DEFAULT_CONFIG] if DEFAULT_CONFIG.is_file() else [])
    try:
        cfg = load_config(paths, args.overrides)
        if args.overwrite:
            cfg.harvest.overwrite = True
        distributed = world_from_env()[1] > 1
        summary = (harvest_distributed if distributed else harvest)(cfg, progress=not args.quiet)
    except (ConfigError, HarvestError, TextError) as e:
        return _fail(str(e), 2)
    except ValueError as e:  # the cache writer's refusals (a different cache, a foreign folder)
        return _fail(str(e), 2)
    except OSError as e:  # disk full and other I/O errors, already described by the cache writer
        return _fail(str(e) or type(e).__name__, 1)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        return _fail(f"stopped by {signal.Signals(signum).name}; every complete shard is committed: rerun the "
                     f"same command to resume", 128 + signum)
    if os.environ.get("RANK", "0") == "0":  # every rank holds the same summary
        for line in summary.lines():
            print(line)
    return 0


def _silence_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars
    logging.set_verbosity_error()


def _fail(message: str, code: int) -> int:
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    where = f"rank {rank} of {world}: " if world != "1" else ""
    print(f"harvest: error: {where}{' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    from durable.launcher import exit_process

    exit_process(main())  # under torchrun: os._exit, no interpreter teardown (see exit_process for why)

"""Stage 3 command line.

    python -m evaluate [RUN] [--config FILE ...] [section.key=value ...]   evaluate a run (default: the latest)
    python -m evaluate runs/<sweep> [...]                                  every member of a sweep, then compare
    python -m evaluate compare RUN [RUN ...] [--out DIR]                   table + FVU-L0 plot of several runs
    python -m evaluate export RUN --format saelens [--out DIR]             write a SAELens-loadable SAE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.layout import SAE_DIR


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "compare":
            return _compare(argv[1:])
        if argv and argv[0] == "export":
            return _export(argv[1:])
        return _evaluate(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk while writing eval.json, plots, the dashboard or an export
        import durable

        what = "disk full" if durable.is_disk_full(e) else "could not write"
        print(f"error: {what}: {' '.join(str(e).split())}; free space and rerun (nothing half-written is kept)",
              file=sys.stderr)
        return 1


def _evaluate(argv: list[str]) -> int:
    from evaluate.run import EVAL_FILE, evaluate_run, find_run, format_table, run_config
    from settings.describe import describe, help_formatter

    p = argparse.ArgumentParser(prog="python -m evaluate", description="Evaluate a training run.",
                                epilog=describe(["evaluate"]), formatter_class=help_formatter)
    p.add_argument("run", nargs="?", help="run folder (default: the latest under training.output_dir)")
    p.add_argument("--config", action="append", default=[], help="extra config YAML (after the run's own)")
    p.add_argument("--no-downstream", action="store_true", help="skip rerunning the language model")
    p.add_argument("--device", default="cpu")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        p.error(f"unrecognised arguments {unknown}; config overrides look like evaluate.max_tokens=100000")
    from settings import load_config
    from settings.device import resolve_device

    base = load_config(args.config, overrides)
    device = str(resolve_device(args.device, key="--device"))
    from evaluate.sweep import evaluate_sweep, is_sweep

    if args.run and is_sweep(args.run):
        def one(run_dir: Path) -> None:
            evaluate_run(run_dir, run_config(run_dir, overrides, args.config), downstream=not args.no_downstream,
                         device=device)

        text, plot = evaluate_sweep(args.run, one, lambda msg: print(msg, file=sys.stderr))
        print(text)
        print(f"\nwrote {Path(args.run) / '_compare' / 'compare.md'}" + (f" and {plot}" if plot else ""))
        return 0
    run_dir = find_run(args.run or base.evaluate.run, base.training.output_dir)
    cfg = run_config(run_dir, overrides, args.config)
    result = evaluate_run(run_dir, cfg, downstream=not args.no_downstream, device=device)
    print(format_table(result))
    print(f"\nwrote {run_dir / EVAL_FILE}")
    for plot in result.get("plots", []):
        print(f"plot: {plot}")
    if "dashboard" in result:
        print(f"dashboard: {result['dashboard']}")
    return 0


def _compare(argv: list[str]) -> int:
    from evaluate.compare import compare

    p = argparse.ArgumentParser(prog="python -m evaluate compare")
    p.add_argument("runs", nargs="+", help="run folders (e.g. runs/*)")
    p.add_argument("--out", default="runs/_compare", help="folder for compare.md and fvu_vs_l0.png")
    args = p.parse_args(argv)
    runs = [r for r in args.runs if Path(r).is_dir() and not Path(r).name.startswith("_")]
    text, plot = compare(runs, args.out)
    print(text)
    print(f"\nwrote {Path(args.out) / 'compare.md'}" + (f" and {plot}" if plot else ""))
    return 0


def _export(argv: list[str]) -> int:
    from evaluate.export import export_saelens

    p = argparse.ArgumentParser(prog="python -m evaluate export")
    p.add_argument("run", help="run folder")
    p.add_argument("--format", choices=["saelens"], required=True)
    p.add_argument("--out", default=None, help="output folder (default: RUN/export-saelens)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / "export-saelens"
    export_saelens(Path(args.run) / SAE_DIR, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

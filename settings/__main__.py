"""`python -m settings show|get KEY [--config FILE ...] [section.key=value ...]`: print the resolved
config, or one value of it (the Makefile uses `get` to find the cache folder)."""

from __future__ import annotations

import argparse
import sys

import yaml

from settings.load import ConfigError, load_config, to_dict


def main(argv: list[str] | None = None) -> int:
    from settings.describe import describe, help_formatter

    sections = ["model", "data", "harvest", "training", "wandb", "evaluate"]
    parser = argparse.ArgumentParser(prog="python -m settings", description=__doc__, epilog=describe(sections),
                                     formatter_class=help_formatter)
    parser.add_argument("command", choices=["show", "get"])
    parser.add_argument("key", nargs="?", help="section.key, for get")
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), later ones win")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args, extra = parser.parse_known_args(argv)
    overrides = list(args.overrides) + extra
    if args.command == "get" and args.key and "=" in args.key:
        parser.error("get needs a key before the overrides")
    try:
        cfg = to_dict(load_config(args.config, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "show":
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    if not args.key:
        parser.error("get needs a key, e.g. harvest.output")
    node = cfg
    for part in args.key.split("."):
        if not isinstance(node, dict) or part not in node:
            print(f"error: no config key {args.key}", file=sys.stderr)
            return 2
        node = node[part]
    print(node)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gpt2lab config`: print the config a run would use, after presets, a TOML file and overrides."""

from __future__ import annotations

import argparse

from gpt2lab import config

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab config --preset gpt2 --train.lr=3e-4
gpt2lab config --preset shakespeare-char > my.toml   # edit, then: gpt2lab train --config my.toml
gpt2lab config --list                                 # every key, with its default
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"start from a preset: {', '.join(config.PRESETS)}")
    p.add_argument("--config", metavar="FILE", help="a TOML file with [model], [train], ... tables")
    p.add_argument("--list", action="store_true", help="list every key with its default and exit")
    p.add_argument("--presets", action="store_true", help="list the presets and exit")


def run(args: argparse.Namespace) -> int:
    if args.presets:
        for name in config.PRESETS:
            print(name)
        return 0
    cfg = config.resolve(args.preset, args.config, args.overrides)
    if args.list:
        for key in config.all_keys(cfg):
            section, _, leaf = key.partition(".")
            print(f"--{key}={getattr(getattr(cfg, section), leaf)!r}")
        return 0
    if args.preset in config.PRESET_SOURCES:
        print(f"# preset {args.preset}: {config.PRESET_SOURCES[args.preset]}")
    print(config.to_toml(cfg), end="")
    return 0

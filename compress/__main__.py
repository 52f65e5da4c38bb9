"""`python -m compress SUBCOMMAND`: one function per subcommand; errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import os
import sys

# Nothing in this toolkit may reach a model hub; fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBCOMMANDS = ("upscale", "eval", "prune")


def build_parser() -> argparse.ArgumentParser:
    from compress import evaluate, upscale
    from compress.cli import OneLineParser
    from compress.prune import cli as prune_cli

    parser = OneLineParser(
        prog="python -m compress",
        description="Compress the TSD-SR one-step super-resolution student and run it.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    upscale.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    prune_cli.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)  # --help and flag errors end here, before torch is imported
    from compress.cli import run_command

    return run_command(ns)


if __name__ == "__main__":
    sys.exit(main())

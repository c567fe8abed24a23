"""Command line of the cdc-sink worker: `python -m cdc_sink COMMAND`."""

from __future__ import annotations

import argparse
import platform
import sys

from cdc_sink import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cdc_sink",
        description=(
            "Streams Debezium Cassandra change events from Kafka into PostgreSQL "
            "and reconciles PostgreSQL against Cassandra."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cdc-sink {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("version", help="print the version of cdc-sink and its runtime")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the chosen command and return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"cdc-sink {__version__} (Python {platform.python_version()}, {sys.platform})")
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse only allows known ones

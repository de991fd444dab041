"""The `offsite` commands, one module per group; each module's `register` adds its subcommands to the parser."""

from __future__ import annotations

import argparse

MiB = 1024 * 1024
Commands = argparse._SubParsersAction  # what add_subparsers returns; argparse names no public type for it


def add_command(commands: Commands, name: str, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return sub

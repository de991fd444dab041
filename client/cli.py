"""`offsite`: the data owner's command line. Each command parses, calls one function, and reports.

The commands live in client/commands/, one module per group; this module assembles the parser and runs one.
"""

from __future__ import annotations

import argparse
import sys

import shtab

from ..common.cli_output import fail, quiet_libraries
from ..common.contract import DEFAULT_EMULATOR
from ..common.examples import DataError
from ..common.manifest import BundleError
from .commands import add_command, evaluate, memory, servers, train, transfer
from .connection import RemoteError


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args)


def cmd_completion(args: argparse.Namespace) -> None:
    # a static script: a Python start-up (torch included) on every TAB would take seconds
    print(shtab.complete(parser(), args.shell))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="offsite", description="Tune a remote model on private data, offsite.")
    root.set_defaults(json=False)  # `completion` prints a script, never JSON
    commands = root.add_subparsers(dest="command", required=True)
    for group in (servers, transfer, train, evaluate, memory):
        group.register(commands)

    demo = add_command(commands, "demo", "the whole workflow on the default model, on loopback")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--train-data", help="JSONL (default: the committed SST-2 sample)")
    demo.add_argument("--eval-data", help="JSONL (default: the committed SST-2 dev sample)")
    demo.add_argument("--train-limit", type=int, default=1000)
    demo.add_argument("--eval-limit", type=int, default=872, help="dev rows scored (the sample has 872)")
    demo.add_argument(
        "--emulator", default=DEFAULT_EMULATOR, help="METHOD:L-N-R[,key=value...], e.g. distill:3-14-3,tokens=50000"
    )
    demo.add_argument("--method", choices=["lora", "full"], default="lora")
    demo.add_argument("--epochs", type=float, help="default: the training recipe's")
    demo.add_argument("--lr", type=float, help="default: the training recipe's")
    demo.add_argument("--train-blocks", choices=["all", "top", "bottom"], help="default: the training recipe's")
    demo.add_argument(
        "--workdir", default="runs/demo", help="store, bundles and results; kept, so a built emulator is reused"
    )
    demo.set_defaults(handler=cmd_demo)

    completion = commands.add_parser("completion", help="print a shell completion script (see the README)")
    completion.add_argument("shell", choices=shtab.SUPPORTED_SHELLS)
    completion.set_defaults(handler=cmd_completion)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    quiet_libraries()
    try:
        args.handler(args)
    except (DataError, BundleError, RemoteError, ValueError, OSError) as error:
        fail(str(error), args.json)
    except KeyboardInterrupt:
        fail("interrupted", args.json, code=130)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Regenerates the committed gRPC stubs from proto/ (a developer tool; needs grpcio-tools).

python -m offsite.common.rpc.codegen            # rewrite the stubs in place
python -m offsite.common.rpc.codegen --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = "offsite/v1/offsite.proto"
STUB_DIR = Path(__file__).resolve().parent
STUB_NAMES = ("offsite_pb2.py", "offsite_pb2.pyi", "offsite_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Runs protoc into out_dir and makes the stubs import each other relatively."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as raw:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                str(PROTO_ROOT / PROTO_FILE),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        for name in STUB_NAMES:
            text = (Path(raw) / "offsite" / "v1" / name).read_text()
            # protoc writes absolute imports from the proto package; the stubs live inside offsite.common.rpc.
            text = re.sub(r"^from offsite\.v1 import", "from . import", text, flags=re.M)
            (out_dir / name).write_text(text)


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        return [n for n in STUB_NAMES if (Path(fresh) / n).read_text() != (STUB_DIR / n).read_text()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            sys.exit(f"stale gRPC stubs: {', '.join(stale)}; run python -m offsite.common.rpc.codegen")
        return
    generate(STUB_DIR)


if __name__ == "__main__":
    main()

"""Regenerate the gRPC Python modules from the checked-in .proto files: `python -m checkpoint.proto`."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def generate(out_dir: Path = REPO) -> None:
    from grpc_tools import protoc

    for proto in sorted(HERE.glob("*.proto")):
        args = ["protoc", f"-I{REPO}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
        args.append(f"--grpc_python_out={out_dir}")
        if protoc.main([*args, str(proto.relative_to(REPO))]) != 0:
            sys.exit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate()

"""Generate the Python rollout.v1 code from protos/ into the client package.

The generated modules are committed (so `pip install ./clients/python` needs no protoc) and never
edited by hand; `make proto` runs this, and a test checks the committed copy is current.

protoc's `-I virtual=disk` mapping makes the generated imports absolute under
`rollout_client.proto` (a public part of the client package: the server and tests import the
messages from there), so no import rewriting is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
PACKAGE_PREFIX = "rollout_client/proto"
DEFAULT_OUT = REPO / "clients" / "python"


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under protos/; return them."""
    protos = sorted(PROTOS.rglob("*.proto"))
    virtual = [f"{PACKAGE_PREFIX}/{p.relative_to(PROTOS).as_posix()}" for p in protos]
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PACKAGE_PREFIX}={PROTOS}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *virtual,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    generated = sorted((out_dir / PACKAGE_PREFIX).rglob("*_pb2*.py*"))
    # Every folder on the way down must be a package for setuptools and for imports.
    for folder in {g.parent for g in generated}:
        while folder != out_dir / "rollout_client":
            (folder / "__init__.py").touch()
            folder = folder.parent
    return generated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: clients/python)")
    for path in generate(parser.parse_args(argv).out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()

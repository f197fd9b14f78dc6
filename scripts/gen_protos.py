"""Regenerate the checked-in Python stubs of protos/chiron/v1 and the vendored protos/chiron/keda (or check that
they are current).

Usage: python scripts/gen_protos.py [--check]

The stubs land in chiron/v1/ and chiron/keda/ (protoc's import layout: `from chiron.v1 import types_pb2`,
`from chiron.keda import externalscaler_pb2`: KEDA's external-scaler contract, package `externalscaler`).
With --check, stubs are generated into a temporary directory and compared byte for byte with the
checked-in ones; the exit status is 1 and the stale files are listed when they differ.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIRS = (Path("chiron") / "v1", Path("chiron") / "keda")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every .proto under PACKAGE_DIRS into out_dir; return the generated files."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for d in PACKAGE_DIRS for p in (PROTO_ROOT / d).glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(f for d in PACKAGE_DIRS for f in (out_dir / d).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = parser.parse_args()
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            rel = f.relative_to(tmp)
            if not (ROOT / rel).exists() or not filecmp.cmp(f, ROOT / rel, shallow=False):
                stale.append(str(rel))
        checked_in = {str(p.relative_to(ROOT)) for d in PACKAGE_DIRS for p in (ROOT / d).glob("*_pb2*.py*")}
        extra = sorted(checked_in - {str(f.relative_to(tmp)) for f in fresh})
    if stale or extra:
        print("stale generated stubs (run `python scripts/gen_protos.py`):", *stale, *extra, sep="\n  ")
        return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())

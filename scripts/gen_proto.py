"""Regenerate the checked-in gRPC/protobuf code in cake_py/rpc/pb from proto/**/*.proto.

Run from anywhere with the project's venv: `python scripts/gen_proto.py`. `--check` regenerates into a temporary
folder and exits 1 (listing the stale files) when the checked-in code differs; `--out DIR` writes elsewhere.

protoc (from grpcio-tools) writes `cake/v1/worker_pb2.py` with `from cake.v1 import ...` imports; we flatten the
output into one folder and rewrite those imports to relative ones so the code works as the package
`cake_py.rpc.pb`. The output is a pure function of the .proto files and the grpcio-tools version.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PB_DIR = ROOT / "cake_py" / "rpc" / "pb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# `from cake.v1 import worker_pb2 as cake_dot_v1_dot_worker__pb2` -> `from . import worker_pb2 as ...`
_PACKAGE_IMPORT = re.compile(r"^from cake(?:\.\w+)* import ", re.MULTILINE)


def _is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under proto/ into out_dir (flat); return the files written, sorted."""
    from grpc_tools import protoc

    protos = sorted(path.relative_to(PROTO_DIR).as_posix() for path in PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as raw:
        raw_dir = Path(raw)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={raw_dir}",
            f"--pyi_out={raw_dir}",
            f"--grpc_python_out={raw_dir}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the message above")
        for source in sorted(raw_dir.rglob("*")):
            if not source.is_file() or not _is_generated(source):
                continue
            target = out_dir / source.name
            if target in written:
                raise SystemExit(f"two protos generate {source.name}; give them distinct file names")
            text = _PACKAGE_IMPORT.sub("from . import ", source.read_text(encoding="utf-8"))
            target.write_text(text, encoding="utf-8", newline="\n")
            written.append(target)
    return sorted(written)


def _stale(fresh_dir: Path, checked_in_dir: Path) -> list[str]:
    """Names of generated files that differ between the two folders (missing or extra count as different)."""
    fresh = {path.name: path for path in fresh_dir.iterdir() if _is_generated(path)}
    checked_in = {path.name: path for path in checked_in_dir.iterdir() if _is_generated(path)}
    stale = []
    for name in sorted(fresh.keys() | checked_in.keys()):
        if name not in fresh or name not in checked_in or fresh[name].read_bytes() != checked_in[name].read_bytes():
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 if the checked-in code is stale")
    group.add_argument("--out", type=Path, help=f"write here instead of {PB_DIR.relative_to(ROOT)}")
    options = parser.parse_args(argv)

    if options.check:
        with tempfile.TemporaryDirectory() as fresh:
            generate(Path(fresh))
            stale = _stale(Path(fresh), PB_DIR)
        if stale:
            print(f"stale generated code in {PB_DIR}: {', '.join(stale)}; run python scripts/gen_proto.py")
            return 1
        return 0

    out_dir: Path = options.out or PB_DIR
    written = generate(out_dir)
    # Drop generated files whose .proto is gone, so the folder mirrors proto/ exactly.
    for path in out_dir.iterdir():
        if _is_generated(path) and path not in written:
            path.unlink()
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The checked-in generated code in cake_py/rpc/pb matches proto/ and imports cleanly."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PB_DIR = ROOT / "cake_py" / "rpc" / "pb"
GENERATED = ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"scripts/gen_proto.py failed:\n{result.stdout}{result.stderr}"
    fresh = sorted(path.name for path in tmp_path.iterdir())
    checked_in = sorted(path.name for path in PB_DIR.iterdir() if path.name.endswith(GENERATED))
    assert fresh == sorted(GENERATED), f"unexpected generated files {fresh}"
    stale = [name for name in fresh if (tmp_path / name).read_bytes() != (PB_DIR / name).read_bytes()]
    missing = sorted(set(fresh) - set(checked_in))
    assert not (stale or missing), (
        f"generated code in cake_py/rpc/pb is stale ({', '.join(stale + missing)}) relative to proto/ and "
        f"grpcio-tools {version('grpcio-tools')}; run python scripts/gen_proto.py"
    )


def test_generation_is_deterministic(tmp_path: Path) -> None:
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run
        subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(out)], check=True)
        outputs.append({path.name: path.read_bytes() for path in out.iterdir()})
    assert outputs[0] == outputs[1]


def test_generated_code_imports_as_a_package_without_warnings() -> None:
    # A fresh interpreter with warnings as errors: catches grpc/protobuf runtime version complaints and an
    # absolute `from cake.v1 import` left in the _grpc module.
    code = (
        "from cake_py.rpc.pb import worker_pb2, worker_pb2_grpc\n"
        "assert worker_pb2_grpc.cake_dot_v1_dot_worker__pb2 is worker_pb2\n"
        "assert worker_pb2.DESCRIPTOR.package == 'cake.v1'\n"
        "assert set(worker_pb2.DESCRIPTOR.services_by_name['Worker'].methods_by_name) == "
        "{'Handshake', 'Prepare', 'Assign', 'Forward', 'Release', 'Unassign', 'Info'}\n"
        "worker_pb2_grpc.WorkerStub, worker_pb2_grpc.WorkerServicer, worker_pb2_grpc.add_WorkerServicer_to_server\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr

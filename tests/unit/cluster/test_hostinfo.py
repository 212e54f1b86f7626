"""What a node says about itself: its accelerator by name, and a worker's host facts in /system/info."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cake_py.api.system import _stage
from cake_py.cluster import hostinfo
from cake_py.rpc.pb import worker_pb2 as pb
from cake_py.rpc.stage_description import HOST_FIELDS


def test_the_accelerator_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hostinfo.accelerator_name("cpu") == hostinfo.cpu_model()
    assert hostinfo.cpu_model() not in ("", "x86_64", "aarch64")  # /proc/cpuinfo's model name on Linux
    assert hostinfo.accelerator_name("mps") == "Apple MPS"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"NVIDIA H100 80GB HBM3 ({device})")
    hostinfo.accelerator_name.cache_clear()
    try:
        assert hostinfo.accelerator_name("cuda:1") == "NVIDIA H100 80GB HBM3 (cuda:1)"
    finally:
        hostinfo.accelerator_name.cache_clear()


def test_system_info_shows_a_workers_host_facts_from_its_handshake() -> None:
    host = pb.HostInfo(
        accelerator="NVIDIA H100 80GB HBM3",
        cake_version="0.1.0",
        python_version="3.12.3",
        cpu_count=16,
        ram_total_bytes=128 * 2**30,
        memory_id="cuda-GPU-1234",
    )
    stage = SimpleNamespace(
        name="gpu-box",
        start=0,
        end=4,
        connection=SimpleNamespace(host=host),
        describe=lambda: {"local": False, "status": "up"},
        healthy=lambda: True,
    )
    entry = _stage(stage)
    assert {name: entry[name] for name in HOST_FIELDS} == {
        "accelerator": "NVIDIA H100 80GB HBM3",
        "cake_version": "0.1.0",
        "python_version": "3.12.3",
        "cpu_count": 16,
        "ram_total_bytes": 128 * 2**30,
        "memory_id": "cuda-GPU-1234",
    }
    assert (entry["status"], entry["healthy"]) == ("up", True)

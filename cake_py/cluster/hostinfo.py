"""Facts about this machine (for handshakes, topology and /system/info) and a quick measured speed figure."""

from __future__ import annotations

import functools
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cake_py import __version__
from cake_py.host_memory import host_memory


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    os: str
    device: str
    backend: str
    memory_total_bytes: int
    memory_free_bytes: int
    tflops: float
    torch_version: str
    threads: int
    cake_version: str
    python_version: str
    cpu_count: int
    ram_total_bytes: int
    memory_id: str = "ram"  # see memory_identity
    accelerator: str = ""  # see accelerator_name

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of the memory that holds weights on `device`."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total), int(free)
    return host_memory()  # RAM, within a container's limit


def memory_identity(device: str) -> str:
    """Which memory holds weights on `device`: "ram" for host memory (cpu; mps's unified memory), else the GPU's
    UUID (a worker sees its GPU as cuda:0 whichever of the box's GPUs CUDA_VISIBLE_DEVICES gave it)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(torch.device(device)), "uuid", None)
        return f"cuda-{uuid}" if uuid is not None else device
    return "ram"


@functools.cache
def accelerator_name(device: str) -> str:
    """What computes on `device`: the GPU's name, "Apple MPS", or the CPU's model."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(torch.device(device)))
    if device == "mps":
        return "Apple MPS"
    return cpu_model()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9R14 96-Core Processor"); the architecture where the OS does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def measure_tflops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Matmul throughput in TFLOP/s, the relative speed figure used for placement.

    The best of ten ~15 ms trials: workers started together on one box measure at the same moment, and the best
    trial is what a machine can do, not how busy it happened to be.
    """
    size = 256 if device == "cpu" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    with torch.inference_mode():
        torch.mm(a, b)
        for _ in range(10):
            runs, began = 0, time.perf_counter()
            while time.perf_counter() - began < 0.015:
                torch.mm(a, b)
                runs += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize(torch.device(device))
            best = max(best, 2 * size**3 * runs / (time.perf_counter() - began) / 1e12)
            time.sleep(0.005)  # let a neighbour measuring at the same time have the core
    return round(best, 4)


def host_facts(device: str, tflops: float) -> HostFacts:
    """Current facts of this host; `tflops` comes from `measure_tflops`, run once at startup (it runs torch)."""
    total, free = device_memory(device)
    return HostFacts(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        device=device,
        backend=device.split(":")[0],
        memory_total_bytes=total,
        memory_free_bytes=free,
        tflops=tflops,
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        cake_version=__version__,
        python_version=platform.python_version(),
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=host_memory()[0],
        memory_id=memory_identity(device),
        accelerator=accelerator_name(device),
    )

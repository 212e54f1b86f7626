"""Torch device and dtype choice from the `--device` / `--dtype` flags."""

from __future__ import annotations

import torch

from cake_py.errors import ConfigError

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not present is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but torch sees no MPS device")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r} (choose auto, cpu, cuda or mps)")
    return name


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r} (choose one of {', '.join(TORCH_DTYPES)})") from None


def set_threads(threads: int | None) -> None:
    """Give torch a fixed thread count (several workers on one box must not fight over its cores)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)

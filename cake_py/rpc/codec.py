"""Tensor codec for the wire: torch tensors <-> `cake.v1.Tensor` (raw bytes + DType + shape), and dtype names.

This is on the per-token hot path (every Forward request and reply), so each direction makes one copy of the
data besides protobuf's own, and no other work proportional to its size. Bytes are the tensor's C-contiguous
memory as is, so both peers must be little-endian (every platform torch ships for is); bfloat16 travels as its
raw 2-byte bits. Nothing here ever unpickles or executes received data: a corrupt message is rejected with a
ClusterError that names the bad field.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch

from cake_py.errors import ClusterError, ConfigError
from cake_py.rpc.pb import worker_pb2 as pb

_TORCH_TO_PB: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.int16: pb.DTYPE_INT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.bool: pb.DTYPE_BOOL,
}
_PB_TO_TORCH: dict[int, torch.dtype] = {code: dtype for dtype, code in _TORCH_TO_PB.items()}
_ITEMSIZE: dict[int, int] = {code: dtype.itemsize for dtype, code in _TORCH_TO_PB.items()}

# Compute dtypes by the names users write (--dtype, cluster settings, config.json's torch_dtype).
_NAMED_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
}

# torch sizes are signed 64-bit. A non-empty tensor's dims are bounded by its byte length; an empty one's are not.
_MAX_DIM = 2**63 - 1


def dtype_to_pb(dtype: torch.dtype) -> int:
    """The wire DType enum value of a torch dtype; ClusterError for a dtype the wire cannot carry."""
    try:
        return _TORCH_TO_PB[dtype]
    except KeyError:
        supported = ", ".join(str(known).removeprefix("torch.") for known in _TORCH_TO_PB)
        raise ClusterError(f"tensor dtype {dtype} cannot be sent to a worker; supported: {supported}") from None


def dtype_from_pb(code: int) -> torch.dtype:
    """The torch dtype of a wire DType enum value; ClusterError for DTYPE_UNSPECIFIED or an unknown value."""
    try:
        return _PB_TO_TORCH[code]
    except KeyError:
        raise ClusterError(f"tensor message has invalid dtype {_pb_dtype_name(code)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a compute-dtype name such as "bfloat16", "float16" or "float32" (case-insensitive)."""
    try:
        return _NAMED_DTYPES[name.strip().lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected bfloat16, float16 or float32") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype without its module: "bfloat16", "int64", ... (dtype_from_name's inverse)."""
    return str(dtype).removeprefix("torch.")


def encode_tensor(tensor: torch.Tensor, out: Any = None) -> Any:
    """Encode a tensor as a `pb.Tensor`, filling `out` in place when given (e.g. `request.hidden`).

    Filling the field of the enclosing message in place saves protobuf a copy of the data, which matters for
    prefill-sized hidden states. Any device, layout of strides or autograd state is accepted; the wire form is
    C-contiguous CPU memory.
    """
    code = _TORCH_TO_PB.get(tensor.dtype)
    if code is None:
        code = dtype_to_pb(tensor.dtype)  # raises, naming the dtype
    if tensor.layout != torch.strided:
        raise ClusterError(f"tensor layout {tensor.layout} cannot be sent to a worker; only dense tensors")
    if tensor.is_neg():  # a lazily negated view: its memory holds the values un-negated
        tensor = tensor.resolve_neg()
    tensor = tensor.contiguous()  # on the accelerator, before the transfer, where reordering is cheap
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    message = pb.Tensor() if out is None else out
    message.dtype = code
    message.shape[:] = tensor.shape
    # string_at copies nbytes from the data pointer of `tensor` (contiguous, CPU, alive in this frame) into a new
    # bytes object: the one copy, and several times faster than going through numpy for a decode-step tensor.
    message.data = ctypes.string_at(tensor.data_ptr(), tensor.nbytes) if tensor.numel() else b""
    return message


def decode_tensor(message: Any) -> torch.Tensor:
    """Decode a `pb.Tensor` into a new, writable CPU tensor that owns its memory.

    Raises ClusterError naming the problem when the dtype is unknown, the data length does not match
    product(shape) * itemsize, or bool data is not 0/1.
    """
    code = message.dtype
    dtype = _PB_TO_TORCH.get(code)
    if dtype is None:
        dtype = dtype_from_pb(code)  # raises, naming the value
    shape = tuple(message.shape)
    data = message.data
    n_elements = math.prod(shape)
    if len(data) != n_elements * _ITEMSIZE[code]:
        raise ClusterError(
            f"tensor message is corrupt: shape {list(shape)} of {dtype_name(dtype)} needs "
            f"{n_elements * _ITEMSIZE[code]} bytes, data has {len(data)}"
        )
    if n_elements == 0:
        if any(size > _MAX_DIM for size in shape):
            raise ClusterError(f"tensor message has an impossible shape {list(shape)}")
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool and max(data) > 1:  # torch assumes bool bytes are 0 or 1
        raise ClusterError("tensor message is corrupt: bool data holds bytes other than 0 and 1")
    # bytearray is the one copy: it makes the buffer writable (torch warns on read-only buffers) and lets the
    # tensor own memory independent of the message. view(*shape) parses faster than view(shape).
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    return flat.view(*shape) if shape else flat.view(())


def _pb_dtype_name(code: int) -> str:
    """`DTYPE_UNSPECIFIED (0)` for a known enum value, `12345` for an unknown one."""
    try:
        return f"{pb.DType.Name(code)} ({code})"
    except ValueError:
        return str(code)

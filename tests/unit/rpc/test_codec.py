"""Tensor codec: exact round trips for every wire dtype and awkward shapes, and clear rejection of corrupt messages."""

from __future__ import annotations

import math
import timeit
from collections.abc import Callable
from typing import cast

import pytest
import torch

from cake_py.errors import ClusterError, ConfigError
from cake_py.rpc.codec import decode_tensor, dtype_from_name, dtype_from_pb, dtype_name, dtype_to_pb, encode_tensor
from cake_py.rpc.pb import worker_pb2 as pb

WIRE_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(math.prod(shape) + len(shape))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


def _round_trip(tensor: torch.Tensor) -> torch.Tensor:
    """Encode, serialize to wire bytes, parse and decode, as the two peers do."""
    wire = encode_tensor(tensor).SerializeToString()
    return decode_tensor(pb.Tensor.FromString(wire))


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1, 576), (2, 3, 5), (7,)], ids=str)
def test_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _sample(shape, dtype)
    decoded = _round_trip(tensor)
    assert decoded.dtype == dtype
    assert decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_bfloat16_bits_survive_including_specials() -> None:
    # Every bf16 bit pattern, NaNs and infinities included, must come back identical bit for bit.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    tensor = bits.view(torch.bfloat16)
    message = encode_tensor(tensor)
    assert message.dtype == pb.DTYPE_BFLOAT16
    assert len(message.data) == 2 * 2**16
    decoded = decode_tensor(message)
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded.view(torch.int16), bits)


def test_wire_bytes_are_little_endian_row_major() -> None:
    message = encode_tensor(torch.tensor([[1, 2], [3, 256]], dtype=torch.int16))
    assert list(message.shape) == [2, 2]
    assert message.data == b"\x01\x00\x02\x00\x03\x00\x00\x01"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(0, 2),
        lambda: torch.arange(20, dtype=torch.bfloat16).reshape(4, 5)[:, 1:4],
        lambda: torch.arange(10, dtype=torch.int64)[::3],
        lambda: torch.ones(3, 1).expand(3, 4),
        lambda: torch.arange(12, dtype=torch.float16).reshape(3, 4)[1],  # storage offset
        lambda: torch._neg_view(torch.arange(6, dtype=torch.float32)),
    ],
    ids=["transposed", "column-slice", "strided", "expanded", "offset-row", "neg-view"],
)
def test_non_contiguous_input_round_trips(make: Callable[[], torch.Tensor]) -> None:
    tensor = make()
    decoded = _round_trip(tensor)
    assert decoded.is_contiguous()
    assert torch.equal(decoded, tensor)


def test_requires_grad_input_is_encoded() -> None:
    tensor = torch.randn(2, 3, requires_grad=True)
    assert torch.equal(_round_trip(tensor), tensor.detach())


def test_encode_fills_a_nested_field_in_place() -> None:
    tensor = torch.randn(2, 8).to(torch.bfloat16)
    request = pb.ForwardRequest(request_id=7)
    returned = encode_tensor(tensor, out=request.hidden)
    assert returned is request.hidden or returned == request.hidden
    parsed = pb.ForwardRequest.FromString(request.SerializeToString())
    assert parsed.request_id == 7
    assert torch.equal(decode_tensor(parsed.hidden), tensor)


def test_decoded_tensor_owns_writable_memory() -> None:
    message = encode_tensor(torch.zeros(4))
    decoded = decode_tensor(message)
    decoded += 1  # would warn or fail on a read-only buffer
    assert torch.equal(decode_tensor(message), torch.zeros(4))


def test_unsupported_torch_dtype_is_named() -> None:
    with pytest.raises(ClusterError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


def test_sparse_tensor_is_rejected() -> None:
    with pytest.raises(ClusterError, match="layout"):
        encode_tensor(torch.eye(3).to_sparse())


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(pb.DTYPE_UNSPECIFIED, "DTYPE_UNSPECIFIED"), (999, "999")],
)
def test_unknown_dtype_is_rejected(dtype: int, expected: str) -> None:
    # proto3 enums are open: a peer built from a newer .proto can send a value this one has no name for.
    message = pb.Tensor(dtype=cast(pb.DType, dtype), shape=[2], data=b"\x00" * 8)
    with pytest.raises(ClusterError, match=f"invalid dtype {expected}"):
        decode_tensor(message)


@pytest.mark.parametrize(
    ("shape", "data", "needs"),
    [
        ([2, 3], b"\x00" * 10, "needs 12 bytes, data has 10"),
        ([2, 3], b"\x00" * 14, "needs 12 bytes, data has 14"),
        ([], b"", "needs 2 bytes, data has 0"),
        ([0, 4], b"\x00\x00", "needs 0 bytes, data has 2"),
    ],
)
def test_length_mismatch_is_rejected(shape: list[int], data: bytes, needs: str) -> None:
    message = pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=shape, data=data)
    with pytest.raises(ClusterError, match=f"bfloat16 {needs}"):
        decode_tensor(message)


def test_bool_bytes_other_than_zero_or_one_are_rejected() -> None:
    message = pb.Tensor(dtype=pb.DTYPE_BOOL, shape=[3], data=b"\x00\x01\x02")
    with pytest.raises(ClusterError, match="bool data"):
        decode_tensor(message)


def test_impossible_dimension_is_rejected() -> None:
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**64 - 1], data=b"")
    with pytest.raises(ClusterError, match="impossible shape"):
        decode_tensor(message)


def test_dtype_enum_helpers_are_inverse() -> None:
    for dtype in WIRE_DTYPES:
        assert dtype_from_pb(dtype_to_pb(dtype)) == dtype
    assert dtype_to_pb(torch.bfloat16) == pb.DTYPE_BFLOAT16
    assert len({dtype_to_pb(dtype) for dtype in WIRE_DTYPES}) == len(WIRE_DTYPES)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("float32", torch.float32),
        ("BF16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("fp32", torch.float32),
    ],
)
def test_dtype_from_name(name: str, dtype: torch.dtype) -> None:
    assert dtype_from_name(name) == dtype
    assert dtype_from_name(dtype_name(dtype)) == dtype


def test_dtype_from_unknown_name_names_it() -> None:
    with pytest.raises(ConfigError, match="'float8'"):
        dtype_from_name("float8")


def test_micro_timing_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints per-call cost for a decode-step hidden state; informative only (speed lives in benchmarks/)."""
    tensor = torch.randn(1, 576).to(torch.bfloat16)
    message = encode_tensor(tensor)
    n_calls = 1000
    encode_us = min(timeit.repeat(lambda: encode_tensor(tensor), number=n_calls, repeat=5)) / n_calls * 1e6
    decode_us = min(timeit.repeat(lambda: decode_tensor(message), number=n_calls, repeat=5)) / n_calls * 1e6
    with capsys.disabled():
        print(f"\ncodec (1, 576) bf16: encode {encode_us:.2f} us, decode {decode_us:.2f} us")
    assert torch.equal(decode_tensor(message), tensor)

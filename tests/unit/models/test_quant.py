"""Quantized weights: int4 blocks and int8 rows compute what their dequantized weights compute."""

import pytest
import torch
import torch.nn.functional as F

from cake_py.models import quant
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.quant import (
    DENSE_ROWS,
    GROUP_SIZE,
    INT8_DENSE_ROWS,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dequantize,
    dequantize_rows_int8,
    quantize_rows_int8,
)


def random_int4(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scales = torch.rand(k // GROUP_SIZE, n, 2, generator=generator) * 0.1
    return q, scales


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 96, 64), (5, 192, 128), (70, 64, 96)])
def test_int4_linear_matches_dense(rows: int, n: int, k: int) -> None:
    q, scales = random_int4(n, k)
    bias = torch.randn(n)
    layer = Int4Linear(q, scales, bias, torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    expected = F.linear(x.float(), dequantize(q, scales).bfloat16().float(), bias)
    # both sides see bf16 inputs; the kernel keeps bf16 scales
    assert torch.allclose(layer(x).float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_unpacked_weights_equal_a_dense_copy() -> None:
    q, scales = random_int4(192, 128)
    scales[..., 1] -= 0.05  # zeros of both signs
    layer = Int4Linear(q, scales, None, torch.bfloat16)
    assert layer.unpacks
    # the same values a dense copy holds, bit for bit: a prefill chunk computes what a dense model computes
    assert torch.equal(layer.dense_weight(), dequantize(q, layer.scales.float()).bfloat16().t())
    assert not Int4Linear(q, scales, None, torch.float16).unpacks  # no faster dense matmul to run it on


@pytest.mark.parametrize(("n", "with_bias"), [(192, True), (128, False), (96, True)])
def test_a_prefill_chunk_computes_what_the_int4_kernel_computes(
    n: int, with_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, scales = random_int4(n, 128)
    bias = torch.randn(n) if with_bias else None
    layer = Int4Linear(q, scales, bias, torch.bfloat16)
    assert layer.unpacks == (n % 64 == 0)  # torch packs other widths otherwise: those keep the kernel
    x = torch.randn(2, DENSE_ROWS, 128, dtype=torch.bfloat16)
    chunk = layer(x)
    monkeypatch.setattr(quant, "DENSE_ROWS", 10**9)
    kernel = layer(x)
    assert chunk.shape == kernel.shape == (2, DENSE_ROWS, n)
    assert torch.allclose(chunk.float(), kernel.float(), atol=0.02 * kernel.abs().max().item(), rtol=0)


def kernel_calls(monkeypatch: pytest.MonkeyPatch, kernel_name: str) -> list[int]:
    """The rows of each call of torch's `kernel_name` from now on (the call still runs)."""
    kernel_rows: list[int] = []
    kernel = getattr(torch, kernel_name)

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        kernel_rows.append(x.shape[0])
        return kernel(x, *args)

    monkeypatch.setattr(torch, kernel_name, counted)
    return kernel_rows


def test_decode_rows_keep_the_int4_kernel_and_a_chunk_unpacks(monkeypatch: pytest.MonkeyPatch) -> None:
    q, scales = random_int4(128, 64)
    layer = Int4Linear(q, scales, None, torch.bfloat16)
    kernel_rows = kernel_calls(monkeypatch, "_weight_int4pack_mm_for_cpu")
    for rows in (1, 8, DENSE_ROWS - 1, DENSE_ROWS, 512):
        layer(torch.randn(rows, 64, dtype=torch.bfloat16))
    assert kernel_rows == [1, 8, DENSE_ROWS - 1]


def test_dequantize_formula() -> None:
    q = torch.arange(16, dtype=torch.uint8).repeat(2).reshape(1, 32)
    scales = torch.tensor([[[0.5, 1.0]]])  # scale 0.5, zero 1.0: w = (q - 8) * 0.5 + 1
    assert dequantize(q, scales)[0, :16].tolist() == [(v - 8) * 0.5 + 1 for v in range(16)]


def test_int8_rows_round_trip_and_kernels() -> None:
    weights = torch.randn(50, 64)
    q, scales = quantize_rows_int8(weights)
    assert q.dtype == torch.int8
    assert (dequantize_rows_int8(q, scales) - weights).abs().max() <= scales.max() / 2 + 1e-6
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = F.linear(x.float(), dequantize_rows_int8(q, scales))
    assert torch.allclose(Int8Linear(q, scales, torch.bfloat16)(x).float(), expected, atol=0.1, rtol=0.02)
    ids = torch.tensor([3, 0, 49])
    looked_up = Int8Embedding(q, scales, torch.bfloat16)(ids).float()
    assert torch.allclose(looked_up, dequantize_rows_int8(q, scales)[ids], atol=0.02, rtol=0.01)


def test_int8_rows_with_a_bias_keep_the_kernel_for_decode_and_run_dense_from_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Int8 rows (a GGUF's Q8_0/Q6_K projection, a quantized lm_head): a few rows on the int8 kernel, from
    INT8_DENSE_ROWS rows (many sequences decoding, a prefill chunk) dense matmuls over the rows cast to bf16, both
    computing the dequantized weights' output."""
    weights, bias = torch.randn(96, 64), torch.randn(96)
    q, scales = quantize_rows_int8(weights)
    layer = Int8Linear(q, scales, torch.bfloat16, bias)
    kernel_rows = kernel_calls(monkeypatch, "_weight_int8pack_mm")
    for rows in (1, 8, INT8_DENSE_ROWS - 1, INT8_DENSE_ROWS, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        expected = F.linear(x.float(), dequantize_rows_int8(q, scales), bias)
        out = layer(x).float()
        assert torch.allclose(out, expected, atol=0.02 * expected.abs().max().item(), rtol=0), rows
    assert kernel_rows == [1, 8, INT8_DENSE_ROWS - 1]
    half = Int8Linear(q, scales, torch.float16, bias)  # a CPU float16 matmul is no faster: the kernel throughout
    half(torch.randn(DENSE_ROWS, 64, dtype=torch.float16))
    assert kernel_rows[-1] == DENSE_ROWS


def test_int8_rows_cast_in_pieces_compute_what_the_kernel_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are cast a few at a time into a small scratch (a whole lm_head cast at once page-faulted on every
    call): pieces of 10 rows over 96, the last one short, each written into its own columns of the output."""
    generator = torch.Generator().manual_seed(1)
    q, scales = quantize_rows_int8(torch.randn(96, 64, generator=generator))
    layer = Int8Linear(q, scales, torch.bfloat16)
    x = torch.randn(INT8_DENSE_ROWS + 3, 64, dtype=torch.bfloat16, generator=generator)
    kernel = torch._weight_int8pack_mm(x, q, layer.scales).float()
    whole = layer(x).float()
    monkeypatch.setattr(quant, "INT8_PIECE_ELEMENTS", 10 * 64)
    pieces = layer(x).float()
    assert torch.equal(pieces, whole)  # the same products, whatever the pieces
    assert torch.allclose(pieces, kernel, atol=0.01 * kernel.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_smollm2_bf16_quantized_tracks_float32() -> None:
    """The embedded Q4_1 model in bf16 runs on int4/int8 kernels and agrees with its exact float32 dequantization."""
    from cake_py.models.hub import resolve_model
    from cake_py.models.weights import load_transformer

    source = resolve_model(None)
    config = source.config
    ids = torch.tensor(source.tokenizer.encode("The capital of France is Paris, and the capital of Italy is"))
    logits = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_transformer(
            source.weights, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=dtype
        )
        if dtype == torch.bfloat16:
            assert any(isinstance(m, Int4Linear) for m in model.modules())
            assert isinstance(model.lm_head, Int8Linear)
        with torch.inference_mode():
            batch = [SequenceSlice(0, 0, len(ids))]
            logits[dtype] = model.head(model.forward_layers(model.embed(ids), batch, model.new_kv_store()))
    agree = (logits[torch.bfloat16].argmax(-1) == logits[torch.float32].argmax(-1)).float().mean()
    assert agree >= 0.9
    assert logits[torch.bfloat16][-1].argmax() == logits[torch.float32][-1].argmax()


@pytest.mark.slow
def test_smollm2_prefill_chunk_unpacked_agrees_with_the_kernel_and_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt long enough to unpack (the default threshold) predicts the tokens the kernel and float32 predict."""
    from cake_py.models.hub import resolve_model
    from cake_py.models.weights import load_transformer

    source = resolve_model(None)
    config = source.config
    text = "The history of the city of Paris, the capital of France, begins " * 12
    ids = torch.tensor(source.tokenizer.encode(text)[: DENSE_ROWS + 40])
    logits = {}
    for label, dtype, threshold in [
        ("unpacked", torch.bfloat16, DENSE_ROWS),
        ("kernel", torch.bfloat16, 10**9),
        ("float32", torch.float32, DENSE_ROWS),
    ]:
        monkeypatch.setattr(quant, "DENSE_ROWS", threshold)
        model = load_transformer(
            source.weights, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=dtype
        )
        with torch.inference_mode():
            batch = [SequenceSlice(0, 0, len(ids))]
            logits[label] = model.head(model.forward_layers(model.embed(ids), batch, model.new_kv_store())).float()
    predicted = logits["unpacked"].argmax(-1)
    assert (predicted == logits["kernel"].argmax(-1)).float().mean() >= 0.95
    assert (predicted == logits["float32"].argmax(-1)).float().mean() >= 0.95
    assert (logits["unpacked"] - logits["kernel"]).abs().max() < 0.1 * logits["kernel"].abs().max()

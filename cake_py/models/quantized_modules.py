"""A built stage's quantized entries swapped for their kernels (cake_py.models.quant): `.q4_weight`s for the int4
linear, `.q8_weight`s for int8 rows, fused projections whose parts are stored in different types for a
`SplitLinear` of pieces. Where those kernels do not run (a GPU, float32) the entries become dense weights again.
"""

from __future__ import annotations

import torch
from torch import nn

from cake_py.errors import WeightsError
from cake_py.models.quant import (
    Q4_SCALES,
    Q4_WEIGHT,
    Q8_SCALES,
    Q8_WEIGHT,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    SplitLinear,
    dequantize,
    dequantize_rows_int8,
    int4_supported,
)

PIECES = "pieces"  # `<projection>.pieces.<i>.…`: a fused projection whose parts are stored in different types


def stored_weight(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The tensor standing for `prefix`'s weight, of its shape: its 4-bit values, int8 rows, or dense weight."""
    for key in (Q4_WEIGHT, Q8_WEIGHT):
        if f"{prefix}.{key}" in state:
            return state[f"{prefix}.{key}"]
    return state[f"{prefix}.weight"]


def dequantized(state: dict[str, torch.Tensor], prefix: str, pop: bool = False) -> torch.Tensor | None:
    """`prefix`'s weight as float32 when `state` holds it quantized (4-bit values or int8 rows; taken out of
    `state` with `pop`), else None."""
    take = state.pop if pop else state.__getitem__
    if f"{prefix}.{Q4_WEIGHT}" in state:
        return dequantize(take(f"{prefix}.{Q4_WEIGHT}"), take(f"{prefix}.{Q4_SCALES}"))
    if f"{prefix}.{Q8_WEIGHT}" in state:
        return dequantize_rows_int8(take(f"{prefix}.{Q8_WEIGHT}"), take(f"{prefix}.{Q8_SCALES}"))
    return None


def pop_dense(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """`prefix`'s weight taken out of `state` as a float tensor, dequantized if it was stored quantized."""
    weight = dequantized(state, prefix, pop=True)
    return state.pop(f"{prefix}.weight").float() if weight is None else weight


def install_split(model: nn.Module, state: dict[str, torch.Tensor], kernels: bool) -> None:
    """Each fused projection stored as pieces (see weights.to_module_state) becomes a `SplitLinear` of them where
    the quantized kernels run (`kernels`), its quantized pieces left for `install_quantized` and the bias split by
    rows; elsewhere its pieces are dequantized back into one dense weight."""
    marker = f".{PIECES}."
    for path in sorted({key.split(marker)[0] for key in state if marker in key}):
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        indices = sorted(
            {int(key[len(path + marker) :].split(".")[0]) for key in state if key.startswith(path + marker)}
        )
        prefixes = [f"{path}.{PIECES}.{i}" for i in indices]
        shapes = [tuple(stored_weight(state, prefix).shape) for prefix in prefixes]
        if {s[1:] for s in shapes} != {(linear.in_features,)} or sum(s[0] for s in shapes) != linear.out_features:
            raise WeightsError(
                f"tensors for {path!r} have shapes {shapes}, expected {tuple(linear.weight.shape)} in all"
            )
        if not kernels:
            state[f"{path}.weight"] = torch.cat([pop_dense(state, prefix) for prefix in prefixes])
            continue
        bias = state.pop(f"{path}.bias", None)
        if bias is not None:
            for prefix, chunk in zip(prefixes, bias.split([s[0] for s in shapes]), strict=True):
                state[f"{prefix}.bias"] = chunk
        with torch.device("meta"):  # placeholders: dense pieces take their weights as the rest of the model does
            pieces: list[nn.Module] = [nn.Linear(linear.in_features, s[0], bias=bias is not None) for s in shapes]
        parent, _, child = path.rpartition(".")
        model.get_submodule(parent).register_module(child, SplitLinear(pieces))


def install_quantized(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
) -> set[str]:
    """Swap the module of each `.q4_weight` / `.q8_weight` entry for its quantized kernel (CPU, 16-bit), or
    dequantize the entry into a plain `.weight` elsewhere. Returns the paths of the swapped modules."""
    installed = set()
    for weight_key, scales_key in ((Q4_WEIGHT, Q4_SCALES), (Q8_WEIGHT, Q8_SCALES)):
        for key in [k for k in state if k.endswith(f".{weight_key}")]:
            path = key.removesuffix(f".{weight_key}")
            if not int4_supported(device, dtype):
                state[f"{path}.weight"] = pop_dense(state, path)
                continue
            q, scales = state.pop(key), state.pop(f"{path}.{scales_key}")
            module: nn.Module
            if weight_key == Q4_WEIGHT:
                module = Int4Linear(q, scales, state.pop(f"{path}.bias", None), dtype)
            elif path == "embed_tokens":
                module = Int8Embedding(q, scales, dtype)
            else:
                module = Int8Linear(q, scales, dtype, state.pop(f"{path}.bias", None))
            parent, _, child = path.rpartition(".")
            (model.get_submodule(parent) if parent else model).register_module(child, module)
            installed.add(path)
    return installed

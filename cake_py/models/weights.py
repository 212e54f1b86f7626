"""Weight sources (safetensors folders: safetensors_folder.py; GGUF files: gguf.py) and loading a layer range from
them.

A `WeightSource` speaks HF tensor names (`model.layers.3.self_attn.q_proj.weight`). `load_transformer` asks it
for exactly the tensors of one stage, so a stage holding layers [10, 20) never reads layer 3.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cake_py.errors import WeightsError
from cake_py.models.config import ModelConfig
from cake_py.models.gemma import GemmaTransformer
from cake_py.models.llama import Transformer
from cake_py.models.moe import MoeTransformer
from cake_py.models.quant import (
    GROUP_SIZE,
    Q4_SCALES,
    Q4_WEIGHT,
    Q8_SCALES,
    Q8_WEIGHT,
    int4_supported,
    quantize_rows_int8,
)
from cake_py.models.quantized_modules import PIECES, dequantized, install_quantized, install_split
from cake_py.models.variants import GraniteTransformer, Olmo2Transformer, SmolLM3Transformer
from cake_py.models.weights_moe import install_quantized_experts, sparse_mlp_state

LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}  # stored types that are not quantized (safetensors and GGUF names)
# family → the model class of its stages (the others: llama.Transformer).
MODEL_CLASSES: dict[str, type[Transformer]] = {
    "gemma3": GemmaTransformer,
    "gemma2": GemmaTransformer,
    "smollm3": SmolLM3Transformer,
    "granite": GraniteTransformer,
    "olmo2": Olmo2Transformer,
    "mixtral": MoeTransformer,
    "qwen2_moe": MoeTransformer,
    "qwen3_moe": MoeTransformer,
}
# HF norm of a layer → ours: Llama-shaped blocks have two, Gemma's four (its post_attention_layernorm normalises the
# attention's output; the feed-forward's input norm is pre_feedforward_layernorm).
BLOCK_NORMS = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
GEMMA_BLOCK_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}
# OLMo 2 normalises each branch's output only.
OLMO2_BLOCK_NORMS = {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffn_norm"}
FAMILY_BLOCK_NORMS = {"gemma3": GEMMA_BLOCK_NORMS, "gemma2": GEMMA_BLOCK_NORMS, "olmo2": OLMO2_BLOCK_NORMS}


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is on disk (for topology and placement): its dtype name, shape and stored size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int


class WeightSource(Protocol):
    """Tensors by HF name plus the HF config dict that describes them."""

    path: Path
    config_origin: str  # where the config's values come from, for error messages

    @property
    def config(self) -> dict[str, Any]: ...

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def check_readable(self, names: Iterable[str]) -> None:
        """WeightsError naming the first of `names` stored in a type `load` cannot read (headers only)."""


def layer_tensor_names(source: WeightSource, layer: int) -> list[str]:
    prefix = f"model.layers.{layer}."
    return [name for name in source.names() if name.startswith(prefix)]


def stage_tensor_names(
    source: WeightSource, config: ModelConfig, start: int, end: int, *, with_embedding: bool, with_head: bool
) -> list[str]:
    """Exactly the HF tensors a stage holding layers [start, end) (and maybe embedding/head) needs."""
    names = [n for n in source.names() if (m := LAYER_PATTERN.match(n)) and start <= int(m.group(1)) < end]
    available = set(source.names())
    if with_embedding:
        names.append(EMBEDDING)
    if with_head:
        names.append(FINAL_NORM)
        tied = config.tie_word_embeddings or LM_HEAD not in available
        names.append(EMBEDDING if tied else LM_HEAD)
    return list(dict.fromkeys(names))


def load_stage_tensors(source: WeightSource, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The named tensors in `dtype`. With a 16-bit compute dtype, weights a GGUF stores quantized stay small:
    4-bit layer weights as `.q4_weight` + `.q4_scales`, the others (Q8_0, Q6_K, …; the embedding and lm_head
    whatever their type) as int8 rows (`.q8_weight` + `.q8_scales`), since decode speed is bound by the bytes of
    weights read per token."""
    names = list(names)
    int4_names: set[str] = set()
    int8_names: set[str] = set()
    if dtype in (torch.bfloat16, torch.float16):
        int4_names = set(getattr(source, "int4_names", lambda: set())()) & set(names)
        int8_names = {n for n in names if n not in int4_names and _int8_rows(n, source.info(n))}
    tensors = source.load([n for n in names if n not in int4_names | int8_names], dtype)
    for name in int8_names:
        prefix = name.removesuffix(".weight")
        dense = source.load([name], torch.float32)[name]
        tensors[f"{prefix}.{Q8_WEIGHT}"], tensors[f"{prefix}.{Q8_SCALES}"] = quantize_rows_int8(dense)
    for name in int4_names:
        prefix = name.removesuffix(".weight")
        q, scales = source.load_int4(name)  # type: ignore[attr-defined]
        tensors[f"{prefix}.{Q4_WEIGHT}"], tensors[f"{prefix}.{Q4_SCALES}"] = q, scales
    return tensors


def _int8_rows(name: str, info: TensorInfo) -> bool:
    """Whether a weight is kept as int8 rows (with 16-bit compute; a 4-bit one is asked first): the embedding, the
    lm_head or a layer's linear weight (a MoE layer's experts: a 3D tensor of them), stored in a quantized type."""
    linear = LAYER_PATTERN.match(name) is not None and len(info.shape) in (2, 3) and name.endswith(".weight")
    return (linear or name in (EMBEDDING, LM_HEAD)) and info.dtype not in FLOAT_TYPES


def loaded_sizes(
    source: WeightSource, dtype: torch.dtype, device: torch.device | str | None = None
) -> Iterator[tuple[str, int]]:
    """(name, bytes once loaded) of every tensor, as `load_stage_tensors` and the stage's build keep them: on a
    device with the quantized kernels (`device` given), a GGUF's 4-bit layer weights at half a byte per weight
    plus their group scales, and its other quantized weights as int8 rows; dense in `dtype` otherwise. An estimate
    for placement and fit checks, not an allocation."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    kept = device is not None and int4_supported(device, dtype)
    int4_names = set(getattr(source, "int4_names", lambda: set())()) if kept else set()
    for name in source.names():
        info = source.info(name)
        elements = math.prod(info.shape)
        if name in int4_names:
            yield name, elements // 2 + elements // GROUP_SIZE * 2 * itemsize
        elif kept and name in (EMBEDDING, LM_HEAD) and _int8_rows(name, info):
            yield name, elements + info.shape[0] * 4  # a tied one's scales twice: embedding's and head's
        elif kept and _int8_rows(name, info):
            yield name, elements + elements // info.shape[-1] * itemsize  # a scale per row
        else:
            yield name, elements * itemsize


def to_module_state(
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    start: int,
    end: int,
    *,
    with_embedding: bool,
    with_head: bool,
) -> dict[str, torch.Tensor]:
    """Rename HF tensors to `Transformer` parameters, fusing q/k/v and gate/up projections.

    Quantized weights keep their `.q4_weight`/`.q4_scales` or `.q8_weight`/`.q8_scales` form. A fused projection
    whose parts are stored in different forms becomes pieces, `<target>.pieces.<i>.…`: each run of consecutive parts
    stored alike fused into one (a Q4_K_M file's q‖k 4-bit, v int8 rows), its bias still `<target>.bias`;
    `build_transformer` makes them a `SplitLinear`.
    """
    state: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise WeightsError(f"tensor {name!r} is missing from the weights")
        return tensors[name]

    def dense(prefix: str) -> torch.Tensor:
        weight = dequantized(tensors, prefix) if f"{prefix}.weight" not in tensors else None
        return take(f"{prefix}.weight") if weight is None else weight

    def rows(prefix: str, target: str) -> None:
        """Embedding or head: int8 rows when the weights came that way, else dense."""
        if f"{prefix}.{Q8_WEIGHT}" in tensors:
            state[f"{target}.{Q8_WEIGHT}"] = tensors[f"{prefix}.{Q8_WEIGHT}"]
            state[f"{target}.{Q8_SCALES}"] = tensors[f"{prefix}.{Q8_SCALES}"]
        else:
            state[f"{target}.weight"] = dense(prefix)

    def joined(pieces: list[torch.Tensor], parts: list[str], dim: int = 0) -> torch.Tensor:
        """The fused projection; WeightsError naming the parts whose shapes cannot be put side by side."""
        if len(pieces) == 1:
            return pieces[0]
        dims = {p.dim() for p in pieces}
        rest = {tuple(p.shape[:dim]) + tuple(p.shape[dim + 1 :]) for p in pieces}
        if len(dims) != 1 or dims.pop() <= dim or len(rest) != 1:
            shapes = ", ".join(f"{name} {tuple(piece.shape)}" for name, piece in zip(parts, pieces, strict=True))
            raise WeightsError(f"tensors that make one projection do not fit together: {shapes}")
        if pieces[0].is_meta:
            # A shapes-only build (a worker checks an assignment so): torch.cat's meta kernel is Python code whose
            # first call imports torch._dynamo, a second and more added to every worker's first assignment.
            shape = [*pieces[0].shape]
            shape[dim] = sum(piece.shape[dim] for piece in pieces)
            result_dtype = functools.reduce(torch.promote_types, (piece.dtype for piece in pieces))
            return torch.empty(shape, dtype=result_dtype, device="meta")
        return torch.cat(pieces, dim=dim)

    def kind(part: str) -> str:
        return next((key for key in (Q4_WEIGHT, Q8_WEIGHT) if f"{part}.{key}" in tensors), "weight")

    def linear(parts: list[str], target: str) -> None:
        runs = [list(run) for _, run in itertools.groupby(parts, key=kind)]
        for index, run in enumerate(runs):
            prefix = target if len(runs) == 1 else f"{target}.{PIECES}.{index}"
            if kind(run[0]) == Q4_WEIGHT:
                state[f"{prefix}.{Q4_WEIGHT}"] = joined([tensors[f"{p}.{Q4_WEIGHT}"] for p in run], run)
                state[f"{prefix}.{Q4_SCALES}"] = joined([tensors[f"{p}.{Q4_SCALES}"] for p in run], run, dim=1)
            elif kind(run[0]) == Q8_WEIGHT:
                state[f"{prefix}.{Q8_WEIGHT}"] = joined([tensors[f"{p}.{Q8_WEIGHT}"] for p in run], run)
                state[f"{prefix}.{Q8_SCALES}"] = joined([tensors[f"{p}.{Q8_SCALES}"] for p in run], run)
            else:
                state[f"{prefix}.weight"] = joined([dense(p) for p in run], run)

    for index, layer in enumerate(range(start, end)):
        hf, ours = f"model.layers.{layer}.", f"layers.{index}."
        attn = hf + "self_attn."
        for hf_norm, norm in FAMILY_BLOCK_NORMS.get(config.family, BLOCK_NORMS).items():
            state[f"{ours}{norm}.weight"] = take(f"{hf}{hf_norm}.weight")
        # Phi-3's checkpoints hold q/k/v and gate/up already fused, in our order.
        phi3 = config.family == "phi3"
        linear([attn + "qkv_proj"] if phi3 else [f"{attn}{p}_proj" for p in "qkv"], ours + "attention.wqkv")
        if config.qkv_bias:
            biases = [f"{attn}{p}_proj.bias" for p in "qkv"]
            state[ours + "attention.wqkv.bias"] = joined([take(name) for name in biases], biases)
        linear([attn + "o_proj"], ours + "attention.wo")
        if config.o_bias:
            state[ours + "attention.wo.bias"] = take(attn + "o_proj.bias")
        if config.qk_norm:
            state[ours + "attention.q_norm.weight"] = take(attn + "q_norm.weight")
            state[ours + "attention.k_norm.weight"] = take(attn + "k_norm.weight")
        if config.moe is not None and config.moe.is_sparse(layer):
            state.update(sparse_mlp_state(tensors, config.moe, hf, ours + "feed_forward."))
            continue
        mlp = hf + "mlp."
        linear([mlp + "gate_up_proj"] if phi3 else [mlp + "gate_proj", mlp + "up_proj"], ours + "feed_forward.w13")
        linear([mlp + "down_proj"], ours + "feed_forward.w2")
        if config.mlp_bias:
            biases = [f"{mlp}{p}_proj.bias" for p in ("gate", "up")]
            state[ours + "feed_forward.w13.bias"] = joined([take(name) for name in biases], biases)
            state[ours + "feed_forward.w2.bias"] = take(mlp + "down_proj.bias")
    if with_embedding:
        rows(EMBEDDING.removesuffix(".weight"), "embed_tokens")
    if with_head:
        state["norm.weight"] = take(FINAL_NORM)
        head = LM_HEAD.removesuffix(".weight")
        has_head = any(f"{head}.{kind}" in tensors for kind in ("weight", Q4_WEIGHT, Q8_WEIGHT))
        rows(head if has_head else EMBEDDING.removesuffix(".weight"), "lm_head")
    return state


def build_transformer(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    start: int,
    end: int,
    *,
    with_embedding: bool,
    with_head: bool,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Transformer:
    """A `Transformer` for [start, end) whose parameters are exactly `tensors` (HF names), in `dtype`."""
    with torch.device("meta"):
        model_class = MODEL_CLASSES.get(config.family, Transformer)
        model = model_class(config, start, end, with_embedding=with_embedding, with_head=with_head)
    state = to_module_state(tensors, config, start, end, with_embedding=with_embedding, with_head=with_head)
    # Before the quantized kernels replace their modules: a `.q4_weight`/`.q8_weight` has the shape of the weight it
    # stands for, and a kernel given another one loaded fine and failed at the first forward pass.
    for name, parameter in model.named_parameters():
        prefix, shape = name.removesuffix(".weight"), tuple(parameter.shape)
        for key in (name, f"{prefix}.{Q4_WEIGHT}", f"{prefix}.{Q8_WEIGHT}"):
            if key in state and tuple(state[key].shape) != shape:
                raise WeightsError(f"tensor for {name!r} has shape {tuple(state[key].shape)}, expected {shape}")
    what = f"layers {start}-{end - 1}" if end > start else "the embedding and head"
    try:
        experts = install_quantized_experts(model, state, dtype, device)
        install_split(model, state, int4_supported(device, dtype))
        quantized_modules = install_quantized(model, state, dtype, device) | experts
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not _is_placement_error(error):
            raise
        raise _placement_error(error, what, dtype, device) from None
    state = placed(state, dtype, device, what)
    if state.get("embed_tokens.weight") is not None and "lm_head.weight" in state:
        if state["lm_head.weight"].data_ptr() != state["embed_tokens.weight"].data_ptr() and config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]  # one copy of tied weights in memory
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if key.rsplit(".", 1)[0] not in quantized_modules]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model.eval().requires_grad_(False)


def placed(
    state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str, what: str
) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype` on `device`; a device without the memory (or the dtype) is a one-line WeightsError."""
    try:
        return {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not _is_placement_error(error):
            raise
        raise _placement_error(error, what, dtype, device) from None


def _is_placement_error(error: BaseException) -> bool:
    """Out of memory, or a dtype the device cannot hold: the user's to fix. Anything else is a bug to report."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or any(
        word in text for word in ("out of memory", "not enough memory", "allocate", "not supported", "unsupported")
    )


def _placement_error(error: BaseException, what: str, dtype: torch.dtype, device: torch.device | str) -> WeightsError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = "spread the model over workers, or use a smaller --dtype" if "memory" in reason.lower() else "try --dtype"
    return WeightsError(f"cannot place {what} on {device} in {str(dtype).removeprefix('torch.')}: {reason} ({hint})")


def load_transformer(
    source: WeightSource,
    config: ModelConfig,
    start: int,
    end: int,
    *,
    with_embedding: bool,
    with_head: bool,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Read only the tensors of [start, end) (+ embedding/head) from `source` and build the stage's model."""
    names = stage_tensor_names(source, config, start, end, with_embedding=with_embedding, with_head=with_head)
    tensors = load_stage_tensors(source, names, dtype)
    return build_transformer(
        config, tensors, start, end, with_embedding=with_embedding, with_head=with_head, dtype=dtype, device=device
    )

"""GGUF files (llama.cpp's format) as a `WeightSource`: HF config, HF tensor names, lazy dequantization, tokenizer.

A GGUF carries everything a HF folder does, spelled llama.cpp's way: hyper-parameters as `{arch}.*` metadata,
tensors as `blk.N.attn_q.weight` (possibly quantized, shapes innermost-first, q/k rows permuted for llama), and the
tokenizer as `tokenizer.ggml.*` arrays. `GGUFWeights` translates each into the HF form the rest of cake_py speaks.
Construction only parses the header (its counts checked first, in gguf_header.py); `load` dequantizes just the
tensors it is asked for, from a read-only memmap. The vocabulary's translation is gguf_tokenizer.py.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from cake_py.errors import ModelNotFoundError, WeightsError
from cake_py.models import gguf_gemma, gguf_moe, gguf_phi3, gguf_rope, gguf_variants
from cake_py.models.gguf_header import check_header
from cake_py.models.gguf_int4 import INT4_TYPES, int4_groups
from cake_py.models.gguf_split import split_parts
from cake_py.models.gguf_tokenizer import BOS_PRE_TOKENIZERS, tokenizer_json
from cake_py.models.weights import TensorInfo

# general.architecture → HF architectures[0]; an architecture missing here keeps its GGUF name, so
# ModelConfig.from_hf reports it as unsupported by that name.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    gguf_gemma.ARCHITECTURE: "Gemma3ForCausalLM",
    gguf_gemma.GEMMA2_ARCHITECTURE: "Gemma2ForCausalLM",
    **gguf_variants.ARCHITECTURES,
    **gguf_moe.ARCHITECTURES,  # and Mixtral, a `llama` with experts
    gguf_phi3.ARCHITECTURE: "Phi3ForCausalLM",
}
# llama.cpp's converter interleaves the two rotary halves of each q/k head for these (they use its "normal" rope);
# Qwen use the NEOX rope, which already matches HF's rotate-half layout, so their rows are stored as is.
_PERMUTED_ARCHITECTURES = {"llama", "mistral", *gguf_variants.PERMUTED}

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    **gguf_moe.BLOCK_NAMES,  # routers and experts, in the files that have them
}
# Where an architecture's blocks differ from the Llama family's.
_BLOCK_NAMES_OF = {
    **{arch: {**_BLOCK_NAMES, **gguf_gemma.BLOCK_NAMES} for arch in gguf_gemma.ARCHITECTURES},
    **{arch: {**_BLOCK_NAMES, **names} for arch, names in gguf_variants.BLOCK_NAMES.items()},
}
_BLOCK_NAMES_OF[gguf_phi3.ARCHITECTURE] = {**_BLOCK_NAMES, **gguf_phi3.BLOCK_NAMES}
_BLOCK_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFWeights:
    """One `.gguf` file as a `WeightSource` (plus the tokenizer it embeds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        self._reader = _open(path)
        self.parts = split_parts(path, self._reader, _open)  # every part of a split model, the first first
        self.architecture = str(self._value("general.architecture", "<none>"))
        # Tensors (from whichever part holds them) map to HF names; ones the model code has no use for are left out.
        names = _BLOCK_NAMES_OF.get(self.architecture, _BLOCK_NAMES)
        self._tensors: dict[str, gguf.ReaderTensor] = {
            hf_name: tensor for r in self.parts for tensor in r.tensors if (hf_name := _hf_name(tensor.name, names))
        }
        self.config_origin = f"the metadata of GGUF file {str(path)!r}"
        self._config = self._build_config()

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key)
        try:
            return default if field is None else field.contents()
        except UnicodeDecodeError as error:  # gguf decodes a string when it is read, not when the file is opened
            raise WeightsError(f"GGUF file {str(self.path)!r}: metadata {key} is not UTF-8 text ({error})") from None

    def _token_id(self, key: str) -> int | None:
        """`tokenizer.ggml.<key>` (a token id), None when absent; WeightsError naming the key when it is not one (a
        string there ended the load in a ValueError's traceback)."""
        value = self._value(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise WeightsError(
                f"GGUF file {str(self.path)!r}: metadata tokenizer.ggml.{key} must be a token id, got {value!r}"[:300]
            )
        return value

    def _arch_value(self, key: str, default: Any = None) -> Any:
        return self._value(f"{self.architecture}.{key}", default)

    @cached_property
    def _tokens(self) -> list[str]:
        return list(self._value("tokenizer.ggml.tokens", []))  # a token that is not UTF-8: a WeightsError naming it

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    def _rope_freq_factors(self, name: str = "rope_freqs.weight") -> list[float] | None:
        """llama.cpp stores Llama 3 rope scaling as a `rope_freqs` tensor of per-frequency divisors (and Phi-3's
        LongRoPE as two such tensors)."""
        tensor = next((t for r in self.parts for t in r.tensors if t.name == name), None)
        if tensor is None:
            return None
        return [float(x) for x in gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)]

    def _end_token_ids(self) -> list[int] | None:
        """The tokens that end a generation as llama.cpp decides (`llama_vocab`'s EOG set): the end, end-of-turn,
        end-of-message and FIM tokens the metadata names, and the tokens named like a turn's end (`<|im_end|>`,
        `<|eot_id|>`, …). A GGUF names one `eos_token_id`; an instruct model may end its turn with another (Llama 3's
        `<|eot_id|>` beside `<|end_of_text|>`, Qwen's `<|endoftext|>` beside `<|im_end|>`), where llama.cpp stops."""
        keys = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")
        named = [self._token_id(f"{key}_token_id") for key in keys]
        ids = [token_id for token_id in named if token_id is not None]
        try:
            ids += [token_id for token_id, token in enumerate(self._tokens) if token in _END_TOKENS]
        except WeightsError:  # a vocabulary that is not UTF-8: named when the tokenizer is built
            pass
        return list(dict.fromkeys(ids)) or None

    def _build_config(self) -> dict[str, Any]:
        arch = self.architecture
        if arch in _ARCHITECTURES:  # an unknown one is reported by ModelConfig.from_hf, naming the architecture
            required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
            for key in required + gguf_variants.REQUIRED_KEYS.get(arch, ()):
                if self._arch_value(key) is None:
                    raise WeightsError(f"GGUF file {str(self.path)!r} lacks the metadata key {arch}.{key}")
        n_heads = self._arch_value("attention.head_count")
        n_kv_heads = self._arch_value("attention.head_count_kv", n_heads)
        embedding = self._tensors.get("model.embed_tokens.weight")
        vocab_size = self._arch_value("vocab_size")
        if vocab_size is None:  # older converters omit it; the embedding's row count is authoritative
            vocab_size = int(embedding.shape[-1]) if embedding is not None else len(self._tokens)
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES.get(arch, arch)],
            "model_type": arch,
            "vocab_size": vocab_size,
            "hidden_size": self._arch_value("embedding_length"),
            "intermediate_size": self._arch_value("feed_forward_length"),
            "num_hidden_layers": self._arch_value("block_count"),
            "num_attention_heads": n_heads,
            # Per-layer head counts (hybrid models) come as a list; uniform models have one value.
            "num_key_value_heads": max(n_kv_heads) if isinstance(n_kv_heads, list) and n_kv_heads else n_kv_heads,
            "rms_norm_eps": self._arch_value("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._arch_value("rope.freq_base", 10000.0),
            "max_position_embeddings": self._arch_value("context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self._token_id("bos_token_id"),
            "eos_token_id": self._end_token_ids(),
        }
        # llama.cpp's defaults, spelled out: a HF config without them would take transformers' (Qwen3's head_dim of
        # 128, Mistral's window of 4096), which llama.cpp does not.
        config["head_dim"] = self._arch_value("attention.key_length") or _head_dim(config)
        config["sliding_window"] = None
        if arch == gguf_gemma.ARCHITECTURE:
            config.update(gguf_gemma.gemma3_fields(self._arch_value, config))
        if arch == gguf_gemma.GEMMA2_ARCHITECTURE:
            config.update(gguf_gemma.gemma2_fields(self._arch_value, config))
        elif arch in gguf_variants.ARCHITECTURES:
            config.update(gguf_variants.variant_fields(arch, self._arch_value, config))
        config.update(gguf_moe.moe_fields(arch, self._arch_value, self._tensors.keys(), config["num_hidden_layers"]))
        if "model.layers.0.self_attn.q_proj.bias" in self._tensors and arch != "qwen2":
            config["attention_bias"] = True  # Qwen2's q/k/v bias is implied by its family
        if "model.layers.0.mlp.gate_proj.bias" in self._tensors:
            config["mlp_bias"] = True
        # As llama.cpp reads them: no type is linear, and older converters wrote the factor as `rope.scale_linear`.
        scaling = self._arch_value("rope.scaling.type", "linear")
        factor = self._arch_value("rope.scaling.factor")
        if factor is None:
            factor = self._arch_value("rope.scale_linear")
        if scaling != "none" and (scaling != "linear" or factor not in (None, 0, 1)):
            config["rope_scaling"] = {"rope_type": scaling, "factor": factor or 1.0}
            if (original := self._arch_value("rope.scaling.original_context_length")) is not None:
                config["rope_scaling"]["original_max_position_embeddings"] = original
            if scaling == "yarn":
                config["rope_scaling"].update(gguf_rope.yarn_fields(self._arch_value, arch))
        if (factors := self._rope_freq_factors()) is not None:
            config["rope_freq_factors"] = factors
        if arch == gguf_phi3.ARCHITECTURE:
            long, short = (self._rope_freq_factors(n) for n in (gguf_phi3.LONG_FACTORS, gguf_phi3.SHORT_FACTORS))
            config.update(gguf_phi3.phi3_fields(self._arch_value, config, long, short))
        return config

    def names(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str) -> gguf.ReaderTensor:
        if name not in self._tensors:
            raise WeightsError(f"tensor {name!r} is missing from {str(self.path)!r}")
        return self._tensors[name]

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensor(name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne[0] (innermost) first
        return TensorInfo(name, tensor.tensor_type.name, shape, int(tensor.n_bytes))

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {name: self._load_one(name).to(dtype) for name in names}

    def int4_names(self) -> set[str]:
        """Weights stored in a 4-bit format (Q4_0, Q4_1, Q4_K) that `load_int4` hands over without dequantizing: 2-D
        ones, and a MoE layer's experts (3-D, one (N, K) matrix each)."""
        return {
            name
            for name, tensor in self._tensors.items()
            if tensor.tensor_type in INT4_TYPES and len(tensor.shape) in (2, 3) and name.endswith(".weight")
        }

    def load_int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A Q4_0/Q4_1/Q4_K weight as (uint8 (N, K) values 0..15, float32 (K/32, N, 2) scale and zero per group);
        3-D experts as (E, N, K) and (E, K/32, N, 2).

        Represents `(q - 8) * scale + zero` exactly (see cake_py.models.gguf_int4), rows un-permuted like `load`.
        """
        tensor = self._tensor(name)
        if tensor.tensor_type not in INT4_TYPES:
            raise WeightsError(f"tensor {name!r} is {tensor.tensor_type.name}, not a 4-bit type")
        *lead, n_rows, n_cols = self.info(name).shape
        values, groups = int4_groups(tensor.data, tensor.tensor_type, math.prod(lead) * n_rows, n_cols)
        if lead:  # experts: each (N, K) matrix's groups transposed on its own
            q = torch.from_numpy(np.ascontiguousarray(values)).reshape(*lead, n_rows, n_cols)
            scales = torch.from_numpy(groups).reshape(*lead, n_rows, n_cols // 32, 2)
            return q, scales.transpose(-3, -2).contiguous()
        q, scales = torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(groups)  # (N, K), (N, K/32, 2)
        if self.architecture in _PERMUTED_ARCHITECTURES:
            if name.endswith("q_proj.weight"):
                q, scales = (_unpermute_rows(t, self._head_count("num_attention_heads"), name) for t in (q, scales))
            elif name.endswith("k_proj.weight"):
                q, scales = (_unpermute_rows(t, self._head_count("num_key_value_heads"), name) for t in (q, scales))
        return q.contiguous(), scales.transpose(0, 1).contiguous()

    def check_readable(self, names: Iterable[str]) -> None:
        """WeightsError naming the first of `names` stored in a type gguf cannot dequantize (an integer type, one
        newer than its version), found by dequantizing one block of zeros of each type: no tensor data is read."""
        for name in names:
            kind = self._tensor(name).tensor_type
            if not _dequantizable(kind):
                raise self._undequantizable(name, kind)

    def _undequantizable(self, name: str, kind: gguf.GGMLQuantizationType) -> WeightsError:
        return WeightsError(
            f"tensor {name!r} in {str(self.path)!r} has quantization type {kind.name!r}, which cannot be dequantized"
        )

    def _load_one(self, name: str) -> torch.Tensor:
        tensor = self._tensor(name)
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise self._undequantizable(name, tensor.tensor_type) from error
        if not array.flags.writeable:  # unquantized tensors come back as views of the read-only memmap
            array = array.copy()
        weights = torch.from_numpy(array.astype(np.float32, copy=False)).reshape(self.info(name).shape)
        if self.architecture in gguf_gemma.ARCHITECTURES and gguf_gemma.is_shifted_norm(name):
            weights = weights - gguf_gemma.NORM_OFFSET  # back to HF's zero-centred weight
        if self.architecture in _PERMUTED_ARCHITECTURES:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                weights = _unpermute_rows(weights, self._head_count("num_attention_heads"), name)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                weights = _unpermute_rows(weights, self._head_count("num_key_value_heads"), name)
        return weights

    def _head_count(self, key: str) -> int:
        """The config's head count as ModelConfig reads it (no kv count, or 0: as many as the heads)."""
        value = self._config.get(key) or self._config["num_attention_heads"]
        return int(value) if isinstance(value, int | float) else 0

    def tokenizer_config(self) -> dict[str, Any]:
        tokens = self._tokens

        def token(key: str) -> str | None:
            token_id = self._token_id(key)
            return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

        # llama.cpp adds BOS unless the file says otherwise to a sentencepiece vocabulary, and to a BPE one split as
        # Llama 3's or Tekken: a Llama 3 GGUF without add_bos_token wants it before every prompt.
        kind, pre = self._value("tokenizer.ggml.model"), self._value("tokenizer.ggml.pre")
        default_bos = kind == "llama" or (kind == "gpt2" and pre in BOS_PRE_TOKENIZERS)
        config: dict[str, Any] = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
            "add_bos_token": bool(self._value("tokenizer.ggml.add_bos_token", default_bos)),
            "add_eos_token": bool(self._value("tokenizer.ggml.add_eos_token", False)),
        }
        if (template := self._value("tokenizer.chat_template")) is not None:
            config["chat_template"] = template
        return config

    def tokenizer_json(self) -> str:
        """The embedded vocabulary as a tokenizer.json document; WeightsError when it cannot make a tokenizer."""
        try:
            return tokenizer_json(self.path, self._value, self._tokens, self.tokenizer_config())
        except WeightsError:
            raise
        except Exception as error:  # the tokenizers library raises plain Exception on what it cannot build
            raise WeightsError(f"GGUF file {str(self.path)!r} has a tokenizer that cannot be built: {error}") from None


def _open(path: Path) -> gguf.GGUFReader:
    """One GGUF file's reader, refusing what it would misread or take minutes over, naming the path."""
    check_header(path)
    try:
        # Maps the file read-only and parses metadata and tensor descriptors; no tensor data is touched.
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as error:
        # A cut file fails here too: the reader's views of the missing bytes come up short.
        raise WeightsError(f"cannot read GGUF file {str(path)!r} (corrupt or truncated): {error}") from error
    if reader.byte_order == "S":  # its metadata reads right, its tensors' bytes would not (llama.cpp refuses)
        raise WeightsError(
            f"GGUF file {str(path)!r} is {reader.endianess.name.lower()}-endian, unlike this machine: "
            "use a copy in this machine's byte order"
        )
    return reader


@functools.cache
def _dequantizable(kind: gguf.GGMLQuantizationType) -> bool:
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    try:
        gguf.quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def _head_dim(config: dict[str, Any]) -> Any:
    """hidden_size / heads, as llama.cpp computes it without `attention.key_length` (ModelConfig judges the values)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def _hf_name(gguf_name: str, block_names: dict[str, str]) -> str | None:
    """The HF name of a GGUF tensor, or None for one the model code has no use for (e.g. `rope_freqs`)."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _BLOCK_PATTERN.match(gguf_name)
    if match is None or match.group(2) not in block_names:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{block_names[part]}.{kind}"


# The token texts llama.cpp ends a generation on whatever their type (llama-vocab.cpp, `special_eog_ids`).
_END_TOKENS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)


def _unpermute_rows(weights: torch.Tensor, n_heads: int, name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `LlamaModel.permute`, which stores each head's rows as interleaved (x0, y0, x1, …)
    pairs; HF keeps the two rotary halves contiguous. Works for weights (out, in) and biases (out,)."""
    if weights.dim() not in (1, 2, 3) or n_heads <= 0 or weights.shape[0] % (2 * n_heads):
        raise WeightsError(
            f"tensor {name!r} of shape {tuple(weights.shape)} does not hold {n_heads} heads of pairs of rows "
            "(the GGUF file's head counts do not fit its tensors)"
        )
    head_half = weights.shape[0] // n_heads // 2
    return weights.reshape(n_heads, head_half, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)

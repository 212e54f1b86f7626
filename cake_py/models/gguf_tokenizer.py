"""A GGUF file's embedded vocabulary (`tokenizer.ggml.*`) as a tokenizer.json document: GPT-2 style byte-level BPE
split by the regex its `tokenizer.ggml.pre` names, or a SentencePiece BPE vocabulary (merges given, or implied by the
scores), its control and user-defined tokens kept whole, BOS/EOS added as its metadata says, as transformers builds
the same tokenizer from the file."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from cake_py.errors import WeightsError

log = logging.getLogger(__name__)

Metadata = Callable[..., Any]  # (key, default=None) → the file's metadata value under key

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre → the split regex the merges were learned with (llama.cpp's llama-vocab.cpp lists the same).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's Tekken (Mistral-Nemo, Mistral-Small 3, Ministral, Devstral: all "llama" GGUFs), from its tokenizer.json.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer names whose rule is GPT-2's own regex, which ByteLevel(use_regex=True) applies (llama-vocab.cpp's GPT2,
# MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING). Names in no table load with it too, with a warning: their prompts may
# split differently from how the model was trained.
_GPT2_PRE_TOKENIZERS = {"default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling"}
# Names llama.cpp splits each digit alone, then by GPT-2's regex (its STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL,
# EXAONE, MINERVA): SmolLM's, StarCoder's, and Granite 3.x's (`refact`), as their own tokenizer.json splits them.
_DIGIT_PRE_TOKENIZERS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}

# Pre-tokenizers whose BPE vocabularies llama.cpp adds BOS to when the file has no tokenizer.ggml.add_bos_token
# (llama-vocab.cpp sets `add_bos = true` for them): Llama 3's above all.
BOS_PRE_TOKENIZERS = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken", "chameleon"}
)


def tokenizer_json(path: Path, value: Metadata, tokens: list[str], config: dict[str, Any]) -> str:
    """The vocabulary of GGUF file `path` (its `value`s, its `tokens`, its tokenizer config) as a tokenizer.json
    document."""
    kind = value("tokenizer.ggml.model")
    if not tokens:
        raise WeightsError(f"GGUF file {str(path)!r} has no tokenizer (tokenizer.ggml.tokens)")
    token_types: list[int] = value("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] | None = value("tokenizer.ggml.merges")
    if kind == "gpt2":
        tokenizer, byte_level = _byte_level_tokenizer(path, value, tokens, merges), True
    elif kind == "llama":
        tokenizer, byte_level = _sentencepiece_tokenizer(path, value, tokens, merges), False
    else:
        raise WeightsError(f"GGUF file {str(path)!r} has tokenizer model {kind!r}; supported: 'gpt2' (BPE), 'llama'")
    _add_file_tokens(tokenizer, tokens, token_types, byte_level)
    # Like transformers' TokenizersBackend.update_post_processor: BOS/EOS come from the post-processor.
    bos = config["bos_token"] if config["add_bos_token"] else None
    eos = config["eos_token"] if config["add_eos_token"] else None
    if bos is not None or eos is not None:
        single = " ".join(part for part in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if part)
        pair = " ".join(part for part in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if part)
        ids = {bos: value("tokenizer.ggml.bos_token_id"), eos: value("tokenizer.ggml.eos_token_id")}
        specials = [(token, token_id) for token, token_id in ids.items() if token is not None]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tokenizer.to_str()


def _byte_level_tokenizer(path: Path, value: Metadata, tokens: list[str], merges: list[str] | None) -> Tokenizer:
    """GPT-2 style byte-level BPE, split by the regex its `tokenizer.ggml.pre` names."""
    if merges is None:
        raise WeightsError(f"GGUF file {str(path)!r} has a BPE tokenizer without tokenizer.ggml.merges")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # A token written in plain UTF-8 instead of the byte alphabet is respelled, as transformers does; DeepSeek's
    # special tokens keep their text (they are added whole, below).
    vocab = {
        (
            token
            if set(token) <= alphabet or _FULL_WIDTH_SPECIAL.fullmatch(token)
            else spell.pre_tokenize_str(token)[0][0]
        ): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(models.BPE(vocab, _merge_pairs(path, merges, vocab), fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    pre = value("tokenizer.ggml.pre", "default")
    if (split := _PRE_TOKENIZER_SPLITS.get(pre)) is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_PRE_TOKENIZERS:
        # As SmolLM's own tokenizer.json: single digits, then the GPT-2 regex (llama.cpp: "\p{N}" + GPT-2).
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in _GPT2_PRE_TOKENIZERS:
            log.warning(
                "GGUF file %r: pre-tokenizer tokenizer.ggml.pre %r is not known here; splitting text as GPT-2 "
                "does, which may differ from the model's own rule",
                str(path),
                pre,
            )
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merge_pairs(path: Path, merges: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges as pairs, each checked: the tokenizers library panics on a merge of tokens it does not know."""
    pairs = [_split_merge(merge) for merge in merges]
    for (left, right), merge in zip(pairs, merges, strict=True):
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise WeightsError(f"GGUF file {str(path)!r}: merge {merge!r} names tokens it does not have")
    return pairs


def _sentencepiece_tokenizer(path: Path, value: Metadata, tokens: list[str], merges: list[str] | None) -> Tokenizer:
    """A SentencePiece BPE vocabulary (`▁` for spaces, `<0xNN>` byte fallback), as transformers' LlamaTokenizer."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges is not None:
        pairs = _merge_pairs(path, merges, vocab)
    else:
        scores: list[float] = value("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    unk_id = value("tokenizer.ggml.unknown_token_id")
    if unk_id is not None and not 0 <= unk_id < len(tokens):
        raise WeightsError(
            f"GGUF file {str(path)!r}: tokenizer.ggml.unknown_token_id {unk_id} is not one of its {len(tokens)} tokens"
        )
    unk = tokens[unk_id] if unk_id is not None else None
    tokenizer = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix_space = bool(value("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _split_merge(merge: str) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    return left, right


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: every split of a token into two tokens, best-scored first.

    Same order as transformers' `generate_merges`, so the tokenizer encodes exactly as the HF one built from the file.
    """
    ranked: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        ranked.extend(sorted(local, key=lambda merge: (vocab[merge[0]], vocab[merge[1]])))
    ranked.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


_FULL_WIDTH_SPECIAL = re.compile(r"<｜[^｜]+｜>")  # DeepSeek's special tokens: full-width bars


def _add_file_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int], byte_level: bool) -> None:
    """Keep control tokens (`<|im_start|>`) and user-defined ones (`<think>`) whole instead of splitting them."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if byte_level else None
    # A byte-level "control" token outside the byte alphabet is a llama.cpp mislabel, which transformers skips too,
    # except DeepSeek's `<｜…｜>` ones (its fill-in-the-middle markers among them), which llama.cpp marks on purpose.
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet or _FULL_WIDTH_SPECIAL.fullmatch(token))
    ]
    tokenizer.add_special_tokens(control)
    vocab = tokenizer.get_vocab()
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == _USER_DEFINED and token in vocab
    ]
    tokenizer.add_tokens(user_defined)

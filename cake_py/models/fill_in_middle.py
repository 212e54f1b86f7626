"""Fill in the middle (code models): a tokenizer's FIM tokens, the prefix-suffix-middle prompt as llama.cpp's /infill
builds it, and the tokens that end a middle. Used by /v1/completions' `suffix` and /infill."""

from __future__ import annotations

from collections.abc import Sequence

from cake_py.models.tokenizer import Tokenizer

# Prefix, suffix, middle: the PSM order every one of these models was trained on.
_FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, Granite-code
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),  # SantaCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
)
_REPO_TOKENS = ("<|repo_name|>", "<repo_name>", "<reponame>")
_FILE_SEPARATORS = ("<|file_sep|>", "<file_sep>")
# After the middle a code model may write these (llama.cpp's infill stops at its end, pad, repo and file tokens):
# Qwen's middle ends with <|endoftext|>, which an Instruct GGUF does not name as its end token.
_FIM_AFTER_MIDDLE = (
    "<|fim_pad|>",
    "<fim_pad>",
    "<fim-pad>",
    "<|endoftext|>",
    "<|file_separator|>",
    "<filename>",
    *_REPO_TOKENS,
    *_FILE_SEPARATORS,
)


def fim_tokens(tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    """The prefix, suffix and middle tokens, when the vocabulary has one family's as special tokens."""
    for prefix_name, suffix_name, middle_name in _FIM_TOKENS:
        prefix, suffix, middle = (tokenizer.added_id(name) for name in (prefix_name, suffix_name, middle_name))
        if prefix is not None and suffix is not None and middle is not None:
            return prefix, suffix, middle
    return None


def fim_stops(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens that end a middle besides the end tokens: the FIM markers and the pad, file and repository tokens code
    models write after the middle (llama.cpp's infill stops at them too)."""
    names = {name for names in _FIM_TOKENS for name in names} | set(_FIM_AFTER_MIDDLE)
    return frozenset(token for name in names if (token := tokenizer.added_id(name)) is not None)


def fim_prompt(
    tokenizer: Tokenizer,
    prefix: str | Sequence[int],
    suffix: str | Sequence[int],
    *,
    typed: str = "",
    files: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """A fill-in-the-middle prompt, prefix-suffix-middle, after any token the tokenizer puts first (a BOS), as
    llama.cpp's /infill builds it: `typed` (the start of the cursor's line) goes after the prefix; `files` (name,
    text) are other files' chunks, in the repository format where the model has its tokens (Qwen2.5-Coder's
    <|repo_name|>/<|file_sep|>), else each after a `--- snippet ---` line. Code is read as text: a special token's
    name written in it stays text. ValueError without FIM tokens."""
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        raise ValueError("the model has no fill-in-the-middle tokens")
    prefix_id, suffix_id, middle_id = tokens
    literal = tokenizer.encode_literal
    ids = tokenizer.encode("")
    if files:
        repo, separator = _first_added(tokenizer, _REPO_TOKENS), _first_added(tokenizer, _FILE_SEPARATORS)
        if repo is not None and separator is not None:
            ids += [repo, *literal("myproject\n")]
            for name, text in files:
                ids += [separator, *literal(f"{name}\n"), *literal(text)]
            ids += [separator, *literal("filename\n")]
        else:
            for _, text in files:
                ids += literal(f"\n\n--- snippet ---\n\n{text}")
    before = literal(prefix) if isinstance(prefix, str) else list(prefix)
    after = literal(suffix) if isinstance(suffix, str) else list(suffix)
    return [*ids, prefix_id, *before, *literal(typed), suffix_id, *after, middle_id]


def _first_added(tokenizer: Tokenizer, names: Sequence[str]) -> int | None:
    return next((token for name in names if (token := tokenizer.added_id(name)) is not None), None)

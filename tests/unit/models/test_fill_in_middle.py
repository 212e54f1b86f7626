"""Fill in the middle: which tokenizers have FIM tokens, the prompt as llama.cpp's /infill builds it (the repository
format where the model has its tokens), and the tokens that end a middle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from cake_py.models.fill_in_middle import fim_prompt, fim_stops, fim_tokens
from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.tiny_models import with_special_tokens as special_tokens_json


def with_special_tokens(folder: Path, names: list[str]) -> Tokenizer:
    """The folder's tokenizer with its highest-id BPE tokens turned into the special tokens `names`."""
    spec = special_tokens_json(json.loads((folder / "tokenizer.json").read_text()), names)
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)))


def test_a_tokenizer_without_fim_tokens_has_none(tiny_llama: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama)
    assert fim_tokens(tokenizer) is None
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
        fim_prompt(tokenizer, "a", "b")


@pytest.mark.parametrize(
    "names",
    [
        ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
        ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"],
        ["<fim-prefix>", "<fim-suffix>", "<fim-middle>"],
    ],
)
def test_each_familys_markers_are_found(tiny_llama: Path, names: list[str]) -> None:
    tokenizer = with_special_tokens(tiny_llama, names)
    ids = fim_tokens(tokenizer)
    assert ids is not None and [tokenizer.backend.id_to_token(token) for token in ids] == names
    assert set(ids) <= fim_stops(tokenizer)


def test_other_files_go_in_the_repository_format_where_the_model_has_it(tiny_llama: Path) -> None:
    names = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>", "<|file_sep|>", "<|fim_pad|>"]
    tokenizer = with_special_tokens(tiny_llama, names)
    prefix_id, suffix_id, middle_id, repo_id, separator_id, pad_id = (tokenizer.added_id(name) for name in names)
    text = tokenizer.encode_literal
    ids = fim_prompt(tokenizer, "x = ", "\n", typed="1", files=[("oven.py", "HEAT = 180\n")])
    assert ids == [
        repo_id, *text("myproject\n"), separator_id, *text("oven.py\n"), *text("HEAT = 180\n"),
        separator_id, *text("filename\n"), prefix_id, *text("x = "), *text("1"), suffix_id, *text("\n"), middle_id,
    ]  # fmt: skip
    assert {repo_id, separator_id, pad_id} <= fim_stops(tokenizer)
    literal = fim_prompt(tokenizer, "s = '<|file_sep|>'", "")
    assert separator_id not in literal  # a special token's name in code stays text

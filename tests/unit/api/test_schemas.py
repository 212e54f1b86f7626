"""Request-field helpers of the OpenAI routes (api/schemas.py): vLLM's truncate_prompt_tokens."""

import pytest

from cake_py.api.errors import ApiError
from cake_py.api.schemas import cut_prompt, prompt_cut


@pytest.mark.parametrize(
    ("ids", "keep", "head", "expected"),
    [
        ([1, 2, 3, 4, 5], None, (), [1, 2, 3, 4, 5]),  # not asked: all of it
        ([1, 2, 3, 4, 5], 9, (), [1, 2, 3, 4, 5]),  # shorter than asked: all of it
        ([1, 2, 3, 4, 5], 2, (), [4, 5]),
        ([0, 2, 3, 4, 5], 3, (0,), [0, 4, 5]),  # the tokenizer's BOS stays in front
        ([7, 2, 3, 4, 5], 3, (0,), [3, 4, 5]),  # no BOS there (token ids sent as they are): a plain cut
        ([0, 2, 3, 4, 5], 1, (0,), [5]),  # no room for the BOS and a token: the last token alone
    ],
)
def test_a_prompt_is_cut_to_its_last_tokens(
    ids: list[int], keep: int | None, head: tuple[int, ...], expected: list[int]
) -> None:
    assert cut_prompt(ids, keep, head) == expected


def test_truncate_prompt_tokens_is_a_count_or_minus_one() -> None:
    assert prompt_cut({}, 512) is None
    assert prompt_cut({"truncate_prompt_tokens": None}, 512) is None
    assert prompt_cut({"truncate_prompt_tokens": 7}, 512) == 7
    assert prompt_cut({"truncate_prompt_tokens": -1}, 512) == 511  # room for one token of the answer
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ApiError, match="truncate_prompt_tokens"):
            prompt_cut({"truncate_prompt_tokens": bad}, 512)

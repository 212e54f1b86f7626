"""Tokenizer: chat template rendering like transformers, encoding and decoding."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from cake_py.errors import ContextLengthError, ModelError, RequestError
from cake_py.models import chat_template
from cake_py.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_folder(tiny_model_factory("llama"))


def test_chat_template_matches_transformers(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    folder = tiny_model_factory("llama")
    ours = Tokenizer.from_folder(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(messages) == expected
    assert ours.encode_chat(messages) == reference(expected, add_special_tokens=False)["input_ids"]


def test_eos_comes_from_the_files(tokenizer: Tokenizer) -> None:
    assert tokenizer.backend.token_to_id("<|im_end|>") in tokenizer.eos_token_ids


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("eos", ["x", [2, None], True])
def test_a_malformed_generation_config_eos_is_a_clear_error(tiny_model_factory, tmp_path: Path, eos: object) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(ModelError, match=r"generation_config\.json.*eos_token_id must be a token id"):
        Tokenizer.from_folder(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    assert {1, 2} <= Tokenizer.from_folder(folder).eos_token_ids


def test_a_chat_template_file_is_the_template(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # transformers ≥ 4.43 saves the template as chat_template.jinja, not in tokenizer_config.json.
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}]
    rendered = Tokenizer.from_folder(folder).render_chat(messages)
    assert rendered == "[user] hi\n"
    reference = AutoTokenizer.from_pretrained(folder)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_processors_chat_template_json_is_the_template_when_the_tokenizer_has_none(
    tiny_model_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Multimodal repos may keep the template in the processor's chat_template.json only.
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("gemma3_vision"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    own = config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_folder(folder).render_chat(messages) == "<user>hi\n"
    # The tokenizer's own template, where it has one, is still the one used.
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": own}))
    assert Tokenizer.from_folder(folder).chat_template == own
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text("[]")
    with pytest.raises(ModelError, match=r"chat_template\.json' must hold a JSON object"):
        Tokenizer.from_folder(folder)


def test_token_bytes_rebuild_text_whose_characters_span_tokens(tokenizer: Tokenizer) -> None:
    # OpenAI's logprob `bytes`: joined, they give back the text, where each token's own text may be only U+FFFD.
    text = "café 日本 🎂 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.token_text(i) == "\ufffd" for i in ids)  # some token holds part of a character
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    end = tokenizer.backend.token_to_id("<|im_end|>")
    assert tokenizer.token_bytes(end) == b"<|im_end|>"


CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is "},
]


@pytest.mark.parametrize("content", ["The capital is ", "The capital is", ""])
def test_continue_final_message_cuts_where_transformers_does(tiny_model_factory, content: str) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    folder = tiny_model_factory("llama")
    messages = [CONVERSATION[0], {"role": "assistant", "content": content}]
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, continue_final_message=True
    )
    rendered = Tokenizer.from_folder(folder).render_chat(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == expected
    assert rendered.endswith("<|im_start|>assistant\n" + content)  # the message is left open, no <|im_end|>
    assert messages[-1]["content"] == content  # the caller's messages are not touched


def test_no_generation_prompt_matches_transformers(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    folder = tiny_model_factory("llama")
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=False
    )
    rendered = Tokenizer.from_folder(folder).render_chat(CONVERSATION, add_generation_prompt=False)
    assert rendered == expected and rendered.endswith("<|im_end|>\n")


# A template that reads an extra variable (as Qwen3's enable_thinking) and trims what it writes.
KWARGS_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)


def _with_template(folder: Path, tmp_path: Path, template: str) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "chat_template.jinja").write_text(template)
    return copy


def test_template_kwargs_and_a_trimming_template_match_transformers(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    folder = _with_template(tiny_model_factory("llama"), tmp_path, KWARGS_TEMPLATE)
    ours, reference = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    user = CONVERSATION[:1]
    thinking_off = ours.render_chat(user, template_kwargs={"enable_thinking": False})
    assert thinking_off.endswith("<assistant><think></think>")
    assert thinking_off == reference.apply_chat_template(
        user, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert ours.render_chat(user).endswith("<assistant>")
    # The template trims the final content's trailing space: the cut prompt drops it too, as transformers' does.
    continued = ours.render_chat(CONVERSATION, add_generation_prompt=False, continue_final_message=True)
    assert continued.endswith("<assistant>The capital is")
    assert continued == reference.apply_chat_template(CONVERSATION, tokenize=False, continue_final_message=True)


def test_continuing_a_message_the_template_drops_is_a_request_error(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = _with_template(
        tiny_model_factory("llama"), tmp_path, "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    )
    with pytest.raises(RequestError, match="continue_final_message"):
        Tokenizer.from_folder(folder).render_chat(
            CONVERSATION, add_generation_prompt=False, continue_final_message=True
        )


def test_template_variables_of_the_wrong_type_are_a_request_error(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    # Llama 3.1's template writes "Today Date: " + date_string: a number there is a TypeError inside jinja.
    (folder / "chat_template.jinja").write_text("{{ 'Today Date: ' + date_string }}{{ messages[0]['content'] }}")
    tokenizer = Tokenizer.from_folder(folder)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.render_chat(messages, template_kwargs={"date_string": "1 Jan"}) == "Today Date: 1 Janhi"
    with pytest.raises(RequestError, match="cannot render"):
        tokenizer.render_chat(messages, template_kwargs={"date_string": 5})


def test_a_chat_template_given_replaces_the_models_own(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer.from_folder(tiny_model_factory("llama"))  # not the module's: this one is changed
    messages = [{"role": "user", "content": "hi"}]
    own = tokenizer.render_chat(messages)
    tokenizer.set_chat_template("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert tokenizer.render_chat(messages) == "[user] hi\n" != own
    assert tokenizer.chat_template is not None and "[{{ m.role }}]" in tokenizer.chat_template


def test_a_chat_template_that_does_not_compile_names_its_line(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer.from_folder(tiny_model_factory("llama"))
    before = tokenizer.chat_template
    with pytest.raises(ModelError, match=r"^the chat template does not compile: line 3: "):
        tokenizer.set_chat_template("{{ bos_token }}\n{% for m in messages %}\n{{ m.content }")
    assert tokenizer.chat_template == before  # the model's own is kept


def test_a_request_template_renders_with_a_copy_kept_for_the_next_request(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer.from_folder(tiny_model_factory("llama"))
    messages = [{"role": "user", "content": "hi"}]
    own = tokenizer.render_chat(messages)
    brackets = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    copy = tokenizer.with_chat_template(brackets)
    assert copy.render_chat(messages) == "[user] hi\n"
    assert tokenizer.render_chat(messages) == own and tokenizer.chat_template != brackets  # untouched
    assert tokenizer.with_chat_template(brackets) is copy  # compiled once
    assert copy.encode("hi") == tokenizer.encode("hi")
    for index in range(8):  # eight other templates push the first one out
        tokenizer.with_chat_template(f"{index}{{{{ messages[0].content }}}}")
    assert tokenizer.with_chat_template(brackets) is not copy


def test_a_request_template_that_fails_is_a_request_error_naming_it(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    tokenizer = Tokenizer.from_folder(tiny_model_factory("llama"))
    with pytest.raises(RequestError, match=r"^the request's chat_template does not compile: line 2: "):
        tokenizer.with_chat_template("x\n{{ messages }")
    refusing = tokenizer.with_chat_template("{{ raise_exception('no system messages') }}")
    with pytest.raises(RequestError, match=r"^the request's chat_template rejected the messages: no system messages"):
        refusing.render_chat([{"role": "user", "content": "hi"}])


def test_padding_and_truncation_in_tokenizer_json_are_not_applied(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """As transformers encodes: a fixed padding of 10^9 allocated 4 GB and aborted the process."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    document = json.loads((folder / "tokenizer.json").read_text())
    document["padding"] = {
        "strategy": {"Fixed": 1_000_000_000},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "<|endoftext|>",
    }
    document["truncation"] = {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(document))
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.encode("hello world, hello", add_special_tokens=False) == Tokenizer.from_folder(
        tiny_model_factory("llama")
    ).encode("hello world, hello", add_special_tokens=False)


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{{ 1/0 }}", "failed: ZeroDivisionError"),
        ("{% for x in range(10**9) %}{% endfor %}", "safe_range: 1000000000 is too large"),
        ('{{ "x"|center(400000000) }}', "the center filter: 400000000 is too large"),  # folded while compiling
        ('{{ "%0400000000d" % 1 }}', "a format with a width or precision past 999999"),
        ('{{ "{:>1500000000}".format(1) }}', "a format with a width or precision past 999999"),
        ('{{ "x".ljust(1500000000) }}', "ljust: 1500000000 is too large"),
        ("{{ [[1]]|tojson(indent=300000000) }}", "the tojson filter: 300000000 is too large"),
        ('{{ (["x" * 1000000] * 1500)|join }}', "join would make 1500000000 characters"),
        ('{{ ("x" * 1000000).replace("x", "y" * 1500) }}', "replace would make 1500000000 characters"),
        (
            '{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}',
            "~ would make 67108864 characters",
        ),
        ("{{ ([[0] * 10] * 100000)|sum(start=[]) }}", "the sum filter adds numbers"),  # quadratic, in C
        ("{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}", "failed: RecursionError"),
        ("{{ 'a' * 10**10 }}", "repeating 1 items 10000000000 times makes too many"),
        ("{{ (2 ** 30000000) * 3 }}", "2 ** 30000000 is too large"),
        ("{% for x in range(100000) %}{% for y in range(100000) %}{% endfor %}{% endfor %}", "took longer than 0.3 s"),
        (
            '{% set ns = namespace(l=[]) %}{% set s = "x" * 1000000 %}'
            "{% for i in range(100) %}{% set ns.l = ns.l + [s ~ i] %}{% endfor %}",
            "+ would make",
        ),
        ('{% set s = "x" * 1000000 %}{% for i in range(100) %}{{ s }}{% endfor %}', "the rendered prompt passed"),
    ],
    ids=[
        "divide-by-zero",
        "huge-range",
        "huge-center",
        "huge-percent-width",
        "huge-format-width",
        "huge-ljust",
        "huge-indent",
        "huge-join",
        "huge-replace",
        "doubling-concat",
        "list-sum",
        "recursion",
        "huge-string",
        "huge-power",
        "nested-loops",
        "list-of-big-strings",
        "output-piling-up",
    ],
)
def test_a_template_that_fails_or_runs_away_is_stopped_and_named(
    tiny_model_factory,
    monkeypatch: pytest.MonkeyPatch,
    template: str,
    needle: str,  # type: ignore[no-untyped-def]
) -> None:
    """Each was a traceback (a 500 on the server), a gigabyte string, or a thread spinning for hours."""
    monkeypatch.setattr(chat_template, "RENDER_TIMEOUT_S", 0.3)
    tokenizer = Tokenizer.from_folder(tiny_model_factory("llama"))
    tokenizer.set_chat_template(template)
    began = time.monotonic()
    with pytest.raises(RequestError, match=re.escape(needle)):
        tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - began < 5
    assert (
        tokenizer.with_chat_template("{{ messages[0].content }}").render_chat([{"role": "user", "content": "ok"}])
        == "ok"
    )


def test_a_chat_template_that_is_not_text_is_a_model_error(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": 5}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="the model's chat_template must be a string, got 5"):
        Tokenizer.from_folder(folder)


def _wordpiece() -> Tokenizer:
    """A BERT-style tokenizer: its normalizer and pre-tokenizer drop whitespace altogether."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "long": 3}
    backend = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = Tokenizer(backend)
    tokenizer.max_tokens = 100  # at most 100 × 2 × 5 = 1000 characters
    return tokenizer


def test_a_short_prompt_padded_with_whitespace_is_not_refused_for_its_length() -> None:
    """BERT's tokenizers drop whitespace: two words apart by 40,000 spaces are two tokens, and were refused."""
    tokenizer = _wordpiece()
    assert tokenizer.encode("hello " + " " * 40_000 + "\n\t world") == [1, 2]
    with pytest.raises(ContextLengthError, match=r"the text has 1200 characters .*at most 1000 characters"):
        tokenizer.encode("hello " * 200)  # a text that long is refused before it is tokenized
    assert len(tokenizer.encode("hello " * 200, check=False)) == 200  # a caller that cuts the ids itself


def test_a_requests_chat_template_copy_follows_the_context_as_it_changes(tiny_model_factory) -> None:  # type: ignore[no-untyped-def]
    """A kept copy held the context of when it was made: after a failover shrank it, texts were let through."""
    tokenizer = Tokenizer.from_folder(tiny_model_factory("llama"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.max_tokens = 10_000
    assert tokenizer.with_chat_template(template).max_tokens == 10_000
    tokenizer.max_tokens = 10
    with pytest.raises(ContextLengthError):
        tokenizer.with_chat_template(template).encode("word " * 10_000)


def test_template_error_says_why_the_models_template_does_not_compile(tiny_model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    assert Tokenizer.from_folder(folder).template_error() is None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% if %}"}))
    assert Tokenizer.from_folder(folder).template_error() == (
        "the model's chat template does not compile: line 1: Expected an expression, got 'end of statement block'"
    )
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).template_error() is None  # no template: ChatML, nothing to compile

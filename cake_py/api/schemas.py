"""Request parsing and validation shared by the routes: each bad field is named in the error."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cake_py.api.errors import ApiError
from cake_py.errors import RequestError
from cake_py.models.sampling import SamplingParams
from cake_py.models.tokenizer import Tokenizer

MAX_CHOICES = 128  # OpenAI's bound on n; on completions, prompts × samples per prompt are bounded by it too
MAX_TOKEN_IDS = 64  # stop_token_ids per request


def number(body: dict[str, Any], key: str, default: float, *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {kind}, got {value!r}")
    if not integer and isinstance(value, int):
        try:
            float(value)  # the callers convert it: an integer past float's range would raise there, as a 500
        except OverflowError:
            raise ApiError(400, f"{key} is out of range, got {value!r}"[:300]) from None
    if isinstance(value, float) and not math.isfinite(value):  # Python's JSON reads NaN and Infinity
        raise ApiError(400, f"{key} must be a finite number, got {value!r}")
    return value


def flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {value!r}")
    return value


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ApiError(400, f"stop must be a string or a list of strings, got {value!r}")


_TOKEN_ID = re.compile(r"[0-9]+")  # int() would also take " 7", "+7", "7_0" and non-ASCII digits


def logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: a JSON object of token ids (its keys, strings of integers) to a bias in [-100, 100]."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(400, f"logit_bias must be an object of token ids to biases, got {value!r}"[:300])
    biases: dict[int, float] = {}
    for key, bias in value.items():
        if not _TOKEN_ID.fullmatch(key):
            raise ApiError(400, f"logit_bias key {key!r} is not a token id (a string of a non-negative integer)"[:300])
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias value of token {key} must be a number in [-100, 100], got {bias!r}"[:300])
        digits = key.lstrip("0") or "0"  # int() of 5,000 digits raises, leading zeros included
        if len(digits) > 18 or int(digits) >= vocab_size:
            shown = key if len(key) <= 24 else f"{key[:20]}…"
            raise ApiError(400, f"logit_bias token id {shown} is outside the model's vocabulary (0-{vocab_size - 1})")
        biases[int(digits)] = float(bias)  # "7" and "07" name one token: the last one wins, as a dict does
    return tuple(biases.items())


def openai_sampling(
    body: dict[str, Any],
    *,
    vocab_size: int,
    default_max_tokens: int = 2048,
    prompt_logprobs: bool = False,
    logprobs_count: bool = False,
) -> SamplingParams:
    """Sampling fields of the OpenAI chat and completion routes; `vocab_size` bounds logit_bias's token ids.
    `prompt_logprobs` scores the prompt too (completions' echo with logprobs), which allows max_tokens 0.
    `logprobs_count` takes an integer `logprobs` (the legacy completions API's count of top logprobs); chat's is a
    boolean only, as OpenAI's (an integer there turned logprobs on, 0 included)."""
    max_key = "max_completion_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is None:  # absent, or sent as null by clients that send every field
        max_key, max_tokens = "max_tokens", body.get("max_tokens")
    max_tokens = number({max_key: max_tokens}, max_key, default_max_tokens, integer=True)
    logprobs_value = body.get("logprobs")
    top_logprobs = number(body, "top_logprobs", 0, integer=True)
    if logprobs_count and isinstance(logprobs_value, int) and not isinstance(logprobs_value, bool):
        if logprobs_value < 0:
            raise ApiError(400, f"logprobs must be true/false or a count of at least 0, got {logprobs_value}")
        logprobs, top_logprobs = True, max(top_logprobs, logprobs_value)
    else:
        logprobs = flag(body, "logprobs", False)
    scoring = prompt_logprobs and logprobs  # echo with logprobs: the prompt is scored, nothing need be generated
    if max_tokens < (0 if scoring else 1):  # named as sent (SamplingParams names its own max_tokens)
        raise ApiError(400, f"{max_key} must be at least {0 if scoring else 1}, got {max_tokens}")
    seed = number(body, "seed", 0, integer=True) if body.get("seed") is not None else None
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(number(body, "temperature", 1.0)),
            top_p=float(number(body, "top_p", 1.0)),
            top_k=int(number(body, "top_k", 0, integer=True)),
            min_p=float(number(body, "min_p", 0.0)),
            min_tokens=int(number(body, "min_tokens", 0, integer=True)),
            ignore_eos=flag(body, "ignore_eos", False),
            stop_token_ids=token_ids(body, "stop_token_ids", vocab_size),
            repetition_penalty=float(number(body, "repetition_penalty", 1.0)),
            presence_penalty=float(number(body, "presence_penalty", 0.0)),
            frequency_penalty=float(number(body, "frequency_penalty", 0.0)),
            logit_bias=logit_bias(body.get("logit_bias"), vocab_size),
            seed=seed,
            stop=stop_strings(body.get("stop")),
            include_stop=flag(body, "include_stop_str_in_output", False),
            skip_special_tokens=flag(body, "skip_special_tokens", True),
            logprobs=logprobs,
            top_logprobs=int(top_logprobs),
            prompt_logprobs=scoring,
            priority=int(number(body, "priority", 0, integer=True)),
        )
    except RequestError as error:
        raise ApiError(400, str(error)) from error


def prompt_cut(body: dict[str, Any], context_length: int) -> int | None:
    """vLLM's truncate_prompt_tokens: how many of a prompt's last tokens are read (-1: as many as leave room for one
    token of the answer); None: all of them."""
    if body.get("truncate_prompt_tokens") is None:
        return None
    keep = number(body, "truncate_prompt_tokens", 0, integer=True)
    if keep == -1:
        return context_length - 1
    if keep < 1:
        raise ApiError(400, f"truncate_prompt_tokens must be -1 (all the context holds) or at least 1, got {keep}")
    return int(keep)


def cut_prompt(ids: list[int], keep: int | None, head: Sequence[int] = ()) -> list[int]:
    """A prompt's last `keep` tokens (all of them for None), after `head`, the special tokens the tokenizer put before
    every text (a BOS), where it starts with them: they stay, as a tokenizer truncating from the left keeps them."""
    if keep is None or len(ids) <= keep:
        return ids
    if head and keep > len(head) and ids[: len(head)] == list(head):
        return [*head, *ids[len(ids) - (keep - len(head)) :]]
    return ids[len(ids) - keep :]


def token_ids(body: dict[str, Any], key: str, vocab_size: int) -> frozenset[int]:
    """A list of token ids of the model's vocabulary (vLLM's stop_token_ids); absent or null: none."""
    value = body.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or len(value) > MAX_TOKEN_IDS:
        raise ApiError(400, f"{key} must be a list of at most {MAX_TOKEN_IDS} token ids, got {value!r}"[:300])
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < vocab_size:
            raise ApiError(400, f"{key}: {item!r} is not a token id of this model (0-{vocab_size - 1})"[:300])
    return frozenset(value)


def choice_count(body: dict[str, Any]) -> int:
    n = number(body, "n", 1, integer=True)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be between 1 and {MAX_CHOICES}, got {n}")
    return int(n)


def stream_usage(body: dict[str, Any], stream: bool) -> bool | None:
    """`stream_options.include_usage`: True (usage in one extra last chunk), False (none), None (not given)."""
    options = body.get("stream_options")
    if options is None:
        return None
    if not stream:  # as OpenAI and vLLM answer
        raise ApiError(400, "stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r}"[:300])
    if options.get("continuous_usage_stats"):  # vLLM's usage in every chunk: refused, not silently left out
        raise ApiError(
            400, "stream_options.continuous_usage_stats is not supported: usage comes once, at the end (include_usage)"
        )
    include = options.get("include_usage")
    if include is None:
        return None
    if not isinstance(include, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, got {include!r}"[:300])
    return include


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How the model's chat template renders the messages (the fields vLLM and transformers share)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra variables the template can read


# Variables the server itself gives the template (or fields refused elsewhere): chat_template_kwargs cannot set them.
_RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message", "tools")


def chat_template_options(body: dict[str, Any], messages: list[dict[str, str]]) -> ChatTemplateOptions:
    add_generation_prompt = flag(body, "add_generation_prompt", True)
    continue_final_message = flag(body, "continue_final_message", False)
    if continue_final_message and add_generation_prompt:
        raise ApiError(
            400,
            "continue_final_message and add_generation_prompt cannot both be true; send add_generation_prompt: false",
        )
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ApiError(
            400, f"continue_final_message needs the last message to be the assistant's, not {messages[-1]['role']!r}"
        )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, f"chat_template_kwargs must be an object, got {kwargs!r}"[:300])
    if reserved := [key for key in _RESERVED_TEMPLATE_VARIABLES if key in kwargs]:
        raise ApiError(
            400, f"chat_template_kwargs cannot set {reserved[0]!r}: the server sets it from the request's fields"
        )
    return ChatTemplateOptions(add_generation_prompt, continue_final_message, kwargs)


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI messages → [{role, content: str}]; content parts of type text are joined by newlines, as vLLM does.
    An assistant's `tool_calls` and a tool message's `tool_call_id` are kept (checked) for the template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object, got {message!r}")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(
                400, f"messages[{index}].role {role!r} is not one of system, developer, user, assistant, tool"
            )
        content = message.get("content")
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            # as OpenAI: only an assistant's turn that calls tools may have no content (else an empty turn was read)
            raise ApiError(
                400, f"messages[{index}].content is required (only an assistant's with tool_calls may omit it)"
            )
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else part
                # an assistant's earlier refusal (OpenAI's refusal part) is what it said: its text, in the history
                key = "refusal" if kind == "refusal" and role == "assistant" else "text"
                if kind != key:
                    raise ApiError(400, f"messages[{index}] has a {kind!r} part; this model only reads text")
                text = part.get(key)
                if not isinstance(text, str):
                    raise ApiError(400, f"messages[{index}]: a {key} part's {key} must be a string, got {text!r}"[:300])
                parts.append(text)
            content = "\n".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{index}].content must be a string, got {content!r}")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls(message["tool_calls"], f"messages[{index}].tool_calls")
        if role == "tool" and message.get("tool_call_id") is not None:
            if not isinstance(message["tool_call_id"], str):
                raise ApiError(400, f"messages[{index}].tool_call_id must be a string")
            entry["tool_call_id"] = message["tool_call_id"]
        result.append(entry)
    return result


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier calls: [{id, type: function, function: {name, arguments: JSON text}}]."""
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list of tool calls, got {value!r}"[:300])
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise ApiError(
                400, f'{where}[{index}] must be {{"type": "function", "function": {{"name", "arguments"}}}}'[:300]
            )
        call_id = call.get("id")
        calls.append(
            {
                "id": call_id if isinstance(call_id, str) else f"call_{index}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return calls


# Seed 001's response-quality defaults, shared by the JSON and the multipart forms of the native routes.
NATIVE_DEFAULTS: dict[str, Any] = {
    "max_length": 8192,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 80,
    "repetition_penalty": 1.15,
    "do_sample": True,
}
NATIVE_FIELDS = frozenset({*NATIVE_DEFAULTS, "seed", "stop"})


def native_sampling(body: dict[str, Any], *, max_key: str = "max_length") -> SamplingParams:
    """Seed 001's sampling fields with its defaults; `do_sample: false` is greedy decoding."""
    do_sample = flag(body, "do_sample", NATIVE_DEFAULTS["do_sample"])
    seed = number(body, "seed", 0, integer=True) if body.get("seed") is not None else None
    max_tokens = int(number({max_key: body.get(max_key)}, max_key, NATIVE_DEFAULTS["max_length"], integer=True))
    if max_tokens < 1:  # named as sent (SamplingParams would name its own max_tokens)
        raise ApiError(400, f"{max_key} must be at least 1, got {max_tokens}")
    temperature = float(number(body, "temperature", NATIVE_DEFAULTS["temperature"]))  # checked even when unused
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature if do_sample else 0.0,
            top_p=float(number(body, "top_p", NATIVE_DEFAULTS["top_p"])),
            top_k=int(number(body, "top_k", NATIVE_DEFAULTS["top_k"], integer=True)),
            repetition_penalty=float(number(body, "repetition_penalty", NATIVE_DEFAULTS["repetition_penalty"])),
            seed=seed,
            stop=stop_strings(body.get("stop")),
        )
    except RequestError as error:
        raise ApiError(400, str(error)) from error


def text_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key} must be a non-empty string, got {value!r}")
    return value


def string_list(body: dict[str, Any], key: str, *, max_items: int) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{key} must be a non-empty list of non-empty strings, got {value!r}"[:300])
    bad = next((index for index, item in enumerate(value) if not isinstance(item, str) or not item), None)
    if bad is not None:  # named by its index: the whole list may be megabytes
        raise ApiError(400, f"{key}[{bad}] must be a non-empty string, got {value[bad]!r}"[:300])
    if len(value) > max_items:
        raise ApiError(400, f"{key} holds {len(value)} items; at most {max_items} are allowed")
    return value


def predicted_output(
    body: dict[str, Any], tokenizer: Tokenizer, vocab_size: int, context_length: int
) -> tuple[int, ...] | None:
    """OpenAI's `prediction` ({"type": "content", "content": text or text parts}) as token ids; None without one.
    Longer than the model's context it could never be the answer (and its index would cost for nothing): a 400."""
    prediction = body.get("prediction")
    if prediction is None:
        return None
    if not isinstance(prediction, dict) or prediction.get("type") != "content":
        raise ApiError(400, f'prediction must be {{"type": "content", "content": …}}, got {prediction!r}'[:300])
    content = prediction.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"prediction.content must be a string or a list of text parts, got {content!r}"[:300])
    ids = tuple(tokenizer.encode(content, add_special_tokens=False))
    if len(ids) > context_length:
        raise ApiError(400, f"prediction has {len(ids)} tokens, more than the model's context of {context_length}")
    outside = next((token for token in ids if token >= vocab_size), None)
    if outside is not None:  # a token the tokenizer adds past the model's embeddings: it would fail the step
        raise ApiError(400, f"prediction holds token id {outside}, outside the model's vocabulary (0-{vocab_size - 1})")
    return ids


MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's bounds


def metadata_field(value: Any) -> dict[str, str] | None:
    """OpenAI's `metadata`: up to 16 string values under keys of at most 64 characters; null is none."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise ApiError(400, f"metadata must be an object of at most {MAX_METADATA_KEYS} string values")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise ApiError(
                400,
                f"metadata[{key[:80]!r}]: keys are at most {MAX_METADATA_KEY} characters, values strings of at most "
                f"{MAX_METADATA_VALUE}",
            )
    return dict(value)

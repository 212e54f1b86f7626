"""JSON schemas of the request and response bodies, for the OpenAPI document in `openapi`."""

from __future__ import annotations

from typing import Any


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NULL_STR = {"type": ["string", "null"]}
STOP = {"oneOf": [STR, {"type": "array", "items": STR, "maxItems": 16}]}
USAGE = obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT})
MESSAGE = obj({"role": {"enum": ["system", "user", "assistant", "tool", "developer"]}, "content": STR}, ("role",))
TOOL_CALL = obj(
    {
        "id": STR,
        "type": {"const": "function"},
        "function": obj({"name": STR, "arguments": {**STR, "description": "a JSON object, as text"}}),
    }
)
CHAT_MESSAGE = obj(
    {
        **MESSAGE["properties"],
        "content": NULL_STR,
        "tool_calls": {"type": "array", "items": TOOL_CALL},
        "tool_call_id": {**STR, "description": "on a tool message: the call it answers"},
    },
    ("role",),
)
TOOL = obj(
    {
        "type": {"const": "function"},
        "function": obj(
            {
                "name": {**STR, "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": STR,
                "parameters": {"type": "object", "description": "a JSON schema of the arguments"},
            },
            ("name",),
        ),
    },
    ("type", "function"),
)
PENALTY = {**NUM, "minimum": -2, "maximum": 2, "default": 0}
# llama.cpp's other samplers, on its routes and (any of them sent: llama.cpp's chain) on the OpenAI ones.
LLAMA_SAMPLERS = {
    "typical_p": {**NUM, "minimum": 0, "maximum": 1, "default": 1.0, "description": "1: off"},
    "min_keep": {**INT, "minimum": 0, "default": 0},
    "top_n_sigma": {**NUM, "default": -1.0, "description": "0 or less: off"},
    "xtc_probability": {**NUM, "minimum": 0, "maximum": 1, "default": 0.0},
    "xtc_threshold": {**NUM, "minimum": 0, "maximum": 1, "default": 0.1, "description": "above 0.5: off"},
    "dry_multiplier": {**NUM, "minimum": 0, "default": 0.0, "description": "0: off"},
    "dry_base": {**NUM, "default": 1.75, "description": "below 1: the default"},
    "dry_allowed_length": {**INT, "minimum": 0, "default": 2},
    "dry_penalty_last_n": {**INT, "minimum": -1, "default": -1, "description": "-1: the context; 0: off"},
    "dry_sequence_breakers": {"type": "array", "items": STR, "minItems": 1, "maxItems": 32},
    "mirostat": {"enum": [0, 1, 2], "default": 0},
    "mirostat_tau": {**NUM, "minimum": 0, "default": 5.0},
    "mirostat_eta": {**NUM, "minimum": 0, "default": 0.1},
    "dynatemp_range": {**NUM, "minimum": 0, "default": 0.0},
    "dynatemp_exponent": {**NUM, "minimum": 0, "default": 1.0},
    "samplers": {
        "oneOf": [{"type": "array", "items": STR}, STR],
        "description": "the chain's order and subset: names (penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p,"
        " xtc, temperature) or their letters (e d s k y p m x t)",
    },
}
OPENAI_SAMPLING = {
    "model": {**STR, "description": "ignored: the served model answers"},
    "max_tokens": {**INT, "default": 2048, "description": "clipped to the room left in the context"},
    "temperature": {**NUM, "default": 1.0},
    "top_p": {**NUM, "default": 1.0},
    "top_k": {**INT, "minimum": -1, "description": "0 or -1: off"},
    "min_p": {**NUM, "minimum": 0, "maximum": 1, "default": 0},
    "min_tokens": {**INT, "minimum": 0, "default": 0, "description": "end tokens are held back until this many"},
    "ignore_eos": {**BOOL, "default": False},
    "priority": {**INT, "default": 0, "description": "vLLM's: waiting for a slot, a lower number starts first"},
    "stop_token_ids": {"type": "array", "items": INT, "description": "token ids that end a choice"},
    "repetition_penalty": NUM,
    "repeat_penalty": {**NUM, "description": "llama.cpp's name for repetition_penalty"},
    "repeat_last_n": {**INT, "minimum": -1, "description": "the last tokens the penalty weighs; -1 (default): all"},
    **LLAMA_SAMPLERS,
    "presence_penalty": {**PENALTY, "description": "subtracted once from the logit of each token generated so far"},
    "frequency_penalty": {**PENALTY, "description": "subtracted from a token's logit per time it was generated"},
    "logit_bias": {
        "type": "object",
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {**NUM, "minimum": -100, "maximum": 100},
        "description": "token id → bias added to its logit",
    },
    "stop": STOP,
    "seed": INT,
    "n": {**INT, "minimum": 1, "maximum": 128},
    "stream": BOOL,
    "stream_options": {
        **obj({"include_usage": BOOL}),
        "description": "only with stream: true; include_usage true sends usage in one last chunk with no choices, "
        "false in none; absent, the last finish chunk carries it",
    },
    "response_format": {
        "oneOf": [
            obj({"type": {"const": "text"}}, ("type",)),
            obj({"type": {"const": "json_object"}, "schema": {"type": "object"}}, ("type",)),
            obj(
                {
                    "type": {"const": "json_schema"},
                    "json_schema": obj(
                        {"name": STR, "schema": {"type": ["object", "string"]}, "strict": BOOL},
                        (),
                    ),
                },
                ("type", "json_schema"),
            ),
        ],
        "description": "json_object: one JSON object; json_schema: JSON valid against the schema (constrained)",
    },
    "structured_outputs": {
        **obj(
            {
                "json": {"type": ["object", "string", "boolean"], "description": "a JSON schema, or its JSON text"},
                "json_object": {"const": True},
                "regex": STR,
                "choice": {"type": "array", "items": STR, "minItems": 1, "maxItems": 256},
                "grammar": {**STR, "description": "llguidance's Lark syntax, or GBNF"},
                "whitespace_pattern": {**STR, "description": "what may stand between JSON tokens"},
                "disable_any_whitespace": BOOL,
                "disable_fallback": BOOL,
                "disable_additional_properties": {"const": False},
            }
        ),
        "description": "vLLM's: exactly one of json, json_object, regex, choice, grammar; the output is held to it",
    },
    "guided_json": {"type": ["object", "string"], "description": "vLLM before 0.12: structured_outputs.json"},
    "guided_regex": STR,
    "guided_choice": {"type": "array", "items": STR},
    "guided_grammar": STR,
    "json_schema": {"type": "object", "description": "llama.cpp's: JSON valid against this schema"},
    "grammar": {**STR, "description": "llama.cpp's: a GBNF (or Lark) grammar the output follows"},
}
FINISH = {"enum": ["stop", "length"]}
CHAT_FINISH = {"enum": ["stop", "length", "tool_calls"]}

SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": STR, "code": STR}, ("error",)),
    "Detail": obj({"detail": STR}, ("detail",)),
    "Usage": USAGE,
    "ChatCompletionRequest": obj(
        {
            **OPENAI_SAMPLING,
            "messages": {"type": "array", "items": CHAT_MESSAGE, "minItems": 1},
            "tools": {"type": "array", "items": TOOL, "maxItems": 128},
            "tool_choice": {
                "oneOf": [
                    {"enum": ["none", "auto", "required"]},
                    obj(
                        {"type": {"const": "function"}, "function": obj({"name": STR}, ("name",))}, ("type", "function")
                    ),
                ],
                "description": "auto (the default with tools): the model decides; required or a named function: the "
                "output is held to valid calls",
            },
            "parallel_tool_calls": {**BOOL, "default": True},
            "logprobs": BOOL,
            "top_logprobs": {**INT, "maximum": 20},
            "prediction": {
                **obj({"type": {"const": "content"}, "content": {"oneOf": [STR, {"type": "array"}]}}, ("type",)),
                "description": "the expected answer (Predicted Outputs): drafted and verified, the same answer in "
                "fewer steps where it holds",
            },
            "add_generation_prompt": {**BOOL, "default": True},
            "continue_final_message": {
                **BOOL,
                "default": False,
                "description": "continue the last (assistant) message; needs add_generation_prompt: false",
            },
            "chat_template_kwargs": {"type": "object", "description": "extra variables for the chat template"},
            "chat_template": {
                **STR,
                "description": "a Jinja chat template for this request (vLLM's); needs --trust-request-chat-template",
            },
        },
        ("messages",),
    ),
    "ChatCompletion": obj(
        {
            "id": STR,
            "object": {"const": "chat.completion"},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj(
                    {
                        "index": INT,
                        "message": CHAT_MESSAGE,
                        "finish_reason": CHAT_FINISH,
                        "logprobs": {"type": ["object", "null"]},
                    }
                ),
            },
            "usage": ref("Usage"),
        }
    ),
    "ChatCompletionChunk": obj(
        {
            "id": STR,
            "object": {"const": "chat.completion.chunk"},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj(
                    {
                        "index": INT,
                        "delta": obj(
                            {
                                "role": STR,
                                "content": STR,
                                "tool_calls": {
                                    "type": "array",
                                    "items": {**TOOL_CALL, "properties": {"index": INT, **TOOL_CALL["properties"]}},
                                },
                            }
                        ),
                        "finish_reason": CHAT_FINISH,
                    }
                ),
            },
            "usage": ref("Usage"),
        }
    ),
    "CompletionRequest": obj(
        {
            **OPENAI_SAMPLING,
            "max_tokens": {**INT, "default": 16, "description": "clipped to the room left in the context"},
            "prompt": {"oneOf": [STR, {"type": "array", "items": STR}, {"type": "array", "items": INT}]},
            "echo": {**BOOL, "description": "with logprobs, the prompt's tokens are scored too (max_tokens may be 0)"},
            "suffix": {**STR, "description": "fill in the middle (a model with FIM tokens; else a 400)"},
            "best_of": {
                **INT,
                "minimum": 1,
                "maximum": 128,
                "description": "samples drawn per prompt, of which the n with the highest mean logprob are returned "
                "(default n; not streamed unless equal to n)",
            },
            "logprobs": {**INT, "maximum": 20},
        },
        ("prompt",),
    ),
    "Completion": obj(
        {
            "id": STR,
            "object": {"const": "text_completion"},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj(
                    {"index": INT, "text": STR, "finish_reason": FINISH, "logprobs": {"type": ["object", "null"]}}
                ),
            },
            "usage": ref("Usage"),
        }
    ),
    "EmbeddingRequest": obj(
        {
            "input": {
                "oneOf": [
                    STR,
                    {"type": "array", "items": STR, "maxItems": 2048},
                    {"type": "array", "items": INT},
                    {"type": "array", "items": {"type": "array", "items": INT}, "maxItems": 2048},
                ]
            },
            "model": {**STR, "description": "accepted and ignored: the served model answers"},
            "encoding_format": {"enum": ["float", "base64"], "default": "float"},
            "dimensions": {**INT, "description": "only the model's hidden size; any other value is a 400"},
            "normalize": {**BOOL, "default": True, "description": "vLLM's: false keeps the pooled vector's length"},
            "truncate_prompt_tokens": {**INT, "description": "vLLM's: keep each input's last k tokens (-1: context)"},
            "add_special_tokens": {**BOOL, "default": True},
            "priority": {**INT, "default": 0, "description": "vLLM's: waiting for a slot, a lower number starts first"},
            "user": STR,
        },
        ("input",),
    ),
    "EmbeddingList": obj(
        {
            "id": STR,
            "object": {"const": "list"},
            "created": INT,
            "model": STR,
            "data": {
                "type": "array",
                "items": obj(
                    {
                        "object": {"const": "embedding"},
                        "index": INT,
                        "embedding": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {**STR, "description": "base64 of little-endian float32"},
                            ]
                        },
                    }
                ),
            },
            "usage": obj({"prompt_tokens": INT, "total_tokens": INT}),
        }
    ),
    "TokenizeRequest": obj(
        {
            "prompt": {**STR, "description": "vLLM's: text (add_special_tokens defaults to true)"},
            "messages": {"type": "array", "description": "vLLM's: a chat, rendered as /v1/chat/completions would"},
            "content": {**STR, "description": "llama.cpp's: text (add_special defaults to false)"},
            "add_special_tokens": BOOL,
            "add_special": BOOL,
            "with_pieces": {**BOOL, "description": "llama.cpp's: tokens as {id, piece}"},
            "return_token_strs": {**BOOL, "description": "vLLM's: the tokens' vocabulary strings too"},
            "add_generation_prompt": BOOL,
            "continue_final_message": BOOL,
            "chat_template_kwargs": {"type": "object"},
            "chat_template": STR,
            "tools": {"type": "array"},
        }
    ),
    "Tokenized": obj(
        {
            "count": INT,
            "max_model_len": INT,
            "tokens": {"type": "array", "items": {"oneOf": [INT, obj({"id": INT, "piece": STR})]}},
            "token_strs": {"type": "array", "items": STR},
        }
    ),
    "DetokenizeRequest": obj({"tokens": {"type": "array", "items": INT}}, ("tokens",)),
    "Detokenized": obj({"prompt": STR, "content": STR}),
    "ApplyTemplateRequest": obj(
        {
            "messages": {"type": "array", "description": "chat turns as /v1/chat/completions takes them"},
            "tools": {"type": "array"},
            "add_generation_prompt": BOOL,
            "continue_final_message": BOOL,
            "chat_template_kwargs": {"type": "object"},
            "chat_template": STR,
        },
        ("messages",),
    ),
    "AppliedTemplate": obj({"prompt": STR}),
    "ResponseRequest": obj(
        {
            "input": {
                "oneOf": [STR, {"type": "array", "items": {"type": "object"}}],
                "description": "required unless conversation is given",
            },
            "instructions": STR,
            "previous_response_id": {**STR, "description": "not together with conversation"},
            "conversation": {
                "oneOf": [STR, obj({"id": STR}, ("id",))],
                "description": "a conversation's id: its items come before input, and the answer's are added to it",
            },
            "max_output_tokens": INT,
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "stream": BOOL,
            "store": {**BOOL, "default": True},
            "background": {**BOOL, "description": "answered by the server on its own; poll, stream or cancel by id"},
            "tools": {"type": "array", "items": {"type": "object"}, "description": "function tools only"},
            "tool_choice": {"oneOf": [STR, {"type": "object"}]},
            "parallel_tool_calls": BOOL,
            "text": {"type": "object", "description": "format: text, json_object or json_schema"},
            "include": {"type": "array", "items": {"const": "message.output_text.logprobs"}},
            "top_logprobs": INT,
            "metadata": {"type": "object"},
            "truncation": {"const": "disabled"},
        },
    ),
    "Response": obj(
        {
            "id": STR,
            "object": {"const": "response"},
            "created_at": INT,
            "status": {"enum": ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]},
            "background": BOOL,
            "output": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
            "error": {"type": ["object", "null"]},
            "incomplete_details": {"type": ["object", "null"]},
            "conversation": {"type": ["object", "null"], "properties": {"id": STR}},
        }
    ),
    "Model": obj({"id": STR, "object": STR, "created": INT, "owned_by": STR}),
    "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}),
}

"""Tool calling on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, and the
messages that carry calls (`assistant.tool_calls`) and their results (`tool`).

- The prompt: a chat template that reads `tools` gets them, as transformers passes them. Any other template gets them
  in a system message asking for Hermes-style calls, `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (the
  format of Qwen2.5's own template), and earlier calls and results are written into the messages in that format.
- `tool_choice: "required"` or a named function: the output is held to JSON calls of the given tools (a grammar
  built from their parameter schemas), so any model calls them, with valid arguments.
- `tool_choice: "auto"` (the default with tools): the model decides; calls are read from its text: Hermes
  `<tool_call>` blocks, or a whole answer that is a JSON call (or a list of them) as Llama 3 and Mistral write them.
  Text that is not a call of a given tool stays content.
- `tool_choice: "none"`: no tools in the prompt, plain text out.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cake_py.api.errors import ApiError
from cake_py.api.forced_calls import ForcedCalls, new_call_id
from cake_py.api.json_body import strict_loads
from cake_py.models.grammar import json_grammar

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's and Anthropic's rule
# A block, or a last one the answer ended in before its closing tag (cut at the end token, as vLLM's Hermes parser
# also reads it).
OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# How a whole answer that is a call may start (Llama 3.1's python tag, Mistral's marker, or JSON itself).
JSON_CALL_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")

_SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolRequest:
    """What a request asks of tools: the tools, and how the model must use them."""

    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's [{"type": "function", "function": {…}}]
    choice: str = "none"  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the named function of tool_choice {"type": "function", …}
    parallel: bool = True
    id_length: int | None = None  # the call ids the model's template requires (Mistral's: 9 characters)

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.tools}

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def tool_request(body: dict[str, Any], id_length: int | None = None) -> ToolRequest:
    """`tools`, `tool_choice` and `parallel_tool_calls`, checked; a 400 naming the bad value otherwise. `id_length`:
    the call ids the model's template requires (Tokenizer.tool_call_id_length)."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise ApiError(400, "functions and function_call are OpenAI's deprecated fields; send tools and tool_choice")
    raw_tools = body.get("tools")
    choice_value = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, f"parallel_tool_calls must be true or false, got {parallel!r}"[:300])
    if raw_tools is None or raw_tools == []:
        if choice_value not in (None, "none"):
            raise ApiError(400, f"tool_choice {choice_value!r} needs tools"[:300])
        return ToolRequest(id_length=id_length)
    if not isinstance(raw_tools, list) or len(raw_tools) > MAX_TOOLS:
        raise ApiError(400, f"tools must be a list of at most {MAX_TOOLS} function tools")
    tools = [_tool(index, tool) for index, tool in enumerate(raw_tools)]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ApiError(400, f"tools name the function {duplicate!r} twice")
    function = None
    if choice_value is None:
        choice = "auto"
    elif choice_value in ("none", "auto", "required"):
        choice = choice_value
    elif isinstance(choice_value, dict) and choice_value.get("type") == "function":
        named = choice_value.get("function")
        if not isinstance(named, dict):
            raise ApiError(400, f'tool_choice.function must be {{"name": …}}, got {named!r}'[:300])
        function = named.get("name")
        if function not in names:
            raise ApiError(400, f"tool_choice names the function {function!r}, which is not one of the tools")
        choice = "function"
    else:
        raise ApiError(
            400, f"tool_choice must be none, auto, required or a function to call, got {choice_value!r}"[:300]
        )
    return ToolRequest(tools, choice, function, parallel is not False, id_length)


def _tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ApiError(400, f'{where} must be {{"type": "function", "function": {{…}}}}, got {tool!r}'[:300])
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ApiError(400, f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}"[:300])
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ApiError(400, f"{where}.function.parameters must be a JSON schema of an object, got {parameters!r}"[:300])
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{where}.function.description must be a string, got {description!r}"[:300])
    clean: dict[str, Any] = {"name": name, "parameters": parameters}
    if description:
        clean["description"] = description
    return {"type": "function", "function": clean}


def calls_grammar(request: ToolRequest) -> str:
    """The grammar of the calls a forced tool_choice allows: one call of the named function, or (required) a JSON
    list of one or more calls (exactly one without parallel_tool_calls) of any of the tools."""

    definitions: dict[str, Any] = {}
    identifiers: set[str] = set()  # the tools' own $ids: one document may hold each once

    def call_schema(index: int, tool: dict[str, Any]) -> dict[str, Any]:
        function = tool["function"]
        # The tool's schema moves under the wrapper's $defs: its own references ("#/$defs/…", "#") are rebased
        # there, so they still point into it.
        arguments = {**function["parameters"], "type": "object"}
        identifier = arguments.get("$id")
        if isinstance(identifier, str) and not identifier.startswith("#"):
            if identifier in identifiers:
                # A second tool with the same $id (each schema stood alone): in one document both would be the one
                # resource, whose references resolved into the last one's (a call of the first had to write the
                # second's values). Without it, this one's references are rebased as any tool's are.
                del arguments["$id"]
            identifiers.add(identifier)
        if "properties" in arguments and "additionalProperties" not in arguments:
            # Only the declared arguments (OpenAI's strict mode requires this): a model may not invent others.
            arguments["additionalProperties"] = False
        name = f"tool{index}"
        definitions[name] = _rebased(arguments, f"#/$defs/{name}")
        return {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": {"$ref": f"#/$defs/{name}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    if request.choice == "function":
        index = next(i for i, tool in enumerate(request.tools) if tool["function"]["name"] == request.function)
        return json_grammar({**call_schema(index, request.tools[index]), "$defs": definitions})
    items = [call_schema(index, tool) for index, tool in enumerate(request.tools)]
    calls: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1, "$defs": definitions}
    if not request.parallel:
        calls["maxItems"] = 1
    return json_grammar(calls)


# Keywords whose values are JSON data, not schemas: a "$ref" key inside them is a value the output must hold.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose values map names (any name: "enum", "$ref") to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with its local pointer references ("#", "#/…") made relative to `base`, where it is moved. An
    anchor ("#name") names its place wherever that is, so it stays; so do the references of a schema with an `$id`."""
    if isinstance(schema, list):
        return [_rebased(value, base) for value in schema]
    if not isinstance(schema, dict):
        return schema
    identifier = schema.get("$id")
    if isinstance(identifier, str) and not identifier.startswith("#"):
        return schema  # a resource of its own ($id): its references are relative to it, wherever it sits
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            moved[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            moved[key] = {name: _rebased(item, base) for name, item in value.items()}
        else:
            moved[key] = _rebased(value, base)
    reference = schema.get("$ref")
    if isinstance(reference, str) and (reference == "#" or reference.startswith("#/")):
        moved["$ref"] = base + reference[1:]
    return moved


def prompt_messages(
    messages: list[dict[str, Any]], request: ToolRequest, template_reads_tools: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages to render and the template variables (tools) for them."""
    if request.id_length:
        messages = _template_ids(messages, request.id_length)
    if template_reads_tools:
        return [_for_template(message) for message in messages], ({"tools": request.tools} if request.active else {})
    rendered: list[dict[str, Any]] = []
    results: list[str] = []  # the tool results of the turn being gathered
    for message in messages:
        text = _as_text(message)
        if message["role"] == "tool":  # consecutive results go in one user turn, as Qwen2.5's template writes them
            if not results:
                rendered.append(text)
            results.append(text["content"])
            continue
        if len(results) > 1:  # joined once (adding each to the turn's text was quadratic)
            rendered[-1] = {**rendered[-1], "content": "\n".join(results)}
        results = []
        rendered.append(text)
    if len(results) > 1:
        rendered[-1] = {**rendered[-1], "content": "\n".join(results)}
    if request.active:
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in request.tools)
        instructions = _SYSTEM_PROMPT.format(tools=listing)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{instructions}"}
        else:
            rendered.insert(0, {"role": "system", "content": instructions})
    return rendered, {}


def _template_ids(messages: list[dict[str, Any]], length: int) -> list[dict[str, Any]]:
    """Call ids as a template that checks their length takes them: another server's (OpenAI's `call_…`) become
    `length` hex digits of their digest, each id the same wherever it appears (its call and its result)."""

    def short(call_id: str) -> str:
        if len(call_id) == length and call_id.isalnum():
            return call_id
        # A digest, not a cut: ids that differ anywhere stay different.
        return hashlib.sha256(call_id.encode()).hexdigest()[:length]

    converted = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{**call, "id": short(call["id"])} for call in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        if isinstance(message.get("tool_call_id"), str):
            message = {**message, "tool_call_id": short(message["tool_call_id"])}
        converted.append(message)
    return converted


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """Tool calls as templates read them (transformers' convention): arguments as an object, not JSON text."""
    if "tool_calls" not in message:
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        try:
            function["arguments"] = json.loads(function["arguments"])
        except (ValueError, RecursionError):
            pass  # not JSON: the template gets the text as it was sent
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    """A message for a template that knows nothing of tools: calls and results written in the Hermes format."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    if "tool_calls" not in message:
        return {"role": message["role"], "content": message["content"]}
    blocks = []
    for call in message["tool_calls"]:
        name, arguments = json.dumps(call["function"]["name"]), call["function"]["arguments"] or "{}"
        blocks.append(f'<tool_call>\n{{"name": {name}, "arguments": {arguments}}}\n</tool_call>')
    content = "\n".join(([message["content"]] if message["content"] else []) + blocks)
    return {"role": "assistant", "content": content}


@dataclass
class ParsedAnswer:
    content: str | None
    tool_calls: list[dict[str, Any]]


def parse_answer(text: str, request: ToolRequest) -> ParsedAnswer:
    """Split a finished answer into its content and the calls of the request's tools it makes (the first only,
    without parallel_tool_calls)."""
    if not request.active:
        return ParsedAnswer(text, [])
    if request.forced:  # read as a stream reads it: the same text for the calls, the same partial call if cut
        reader = ForcedCalls(listed=request.choice == "required", id_length=request.id_length)
        reader.feed(text)
        if reader.unordered:  # arguments written before the name
            calls = json_calls(text, request)
            return ParsedAnswer(None, calls[:1] if not request.parallel else calls) if calls else ParsedAnswer(text, [])
        calls = reader.tool_calls()
        return ParsedAnswer(None, calls[:1] if not request.parallel else calls)
    around, calls = blocks_and_calls(text, request)
    if not calls:
        stripped = text.strip()
        for prefix in JSON_CALL_PREFIXES:
            stripped = stripped.removeprefix(prefix).strip()
        calls = json_calls(stripped, request) if stripped[:1] in ("{", "[") else []
        around = "" if calls else text
    if not calls:
        return ParsedAnswer(text, [])
    return ParsedAnswer(around.strip() or None, calls if request.parallel else calls[:1])


def blocks_and_calls(text: str, request: ToolRequest) -> tuple[str, list[dict[str, Any]]]:
    """The `<tool_call>` blocks of `text` that call a given tool, and the text around them (blocks that are not
    such calls stay in it). A block ends at the first `</tool_call>` after which its JSON is a call (the tag may be
    text inside an argument's string); one never closed runs to the next block or to the end, as vLLM's Hermes
    parser reads it."""
    calls, kept, last, position = [], [], 0, 0
    while (start := text.find(OPEN_TAG, position)) >= 0:
        inner = start + len(OPEN_TAG)
        following = text.find(OPEN_TAG, inner)
        limit = following if following >= 0 else len(text)
        closes = [match.start() for match in re.finditer(re.escape(CLOSE_TAG), text[inner:limit])]
        closes = [inner + close for close in closes]
        found, end = [], limit
        for close in closes:
            found = json_calls(text[inner:close].strip(), request)
            if found:
                end = close + len(CLOSE_TAG)
                break
        if not closes:
            found = json_calls(text[inner:limit].strip(), request)
        if found:
            kept.append(text[last:start])
            calls += found
            last = position = end
        else:  # text: the next block starts after this one's first closing tag
            position = closes[0] + len(CLOSE_TAG) if closes else inner
    return "".join(kept) + text[last:], calls


def json_calls(text: str, request: ToolRequest) -> list[dict[str, Any]]:
    """OpenAI tool calls from JSON text holding one call or a list of calls, each `{"name", "arguments"}` (or
    Llama's "parameters"), every one of a given tool; [] if the text is anything else."""
    try:
        value = strict_loads(text)
    except (ValueError, RecursionError):
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in request.names:
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = strict_loads(arguments)
            except (ValueError, RecursionError):
                return []
        if not isinstance(arguments, dict):
            return []
        try:  # a number past a float's range (1E400) would come back as Infinity, which no JSON parser reads
            arguments_text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        except ValueError:
            return []
        calls.append(
            {
                "id": new_call_id(request.id_length),
                "type": "function",
                "function": {"name": item["name"], "arguments": arguments_text},
            }
        )
    return calls

"""Tool calls in a model's text: the grammar that forces one, and the parser that finds them.

Each ``ToolCallFormat`` is a syntax some family of chat templates teaches its models:

- ``hermes`` (Hermes, Qwen): ``<tool_call>{"name": .., "arguments": {..}}</tool_call>``, repeated;
- ``llama3``: ``{"name": .., "parameters": {..}}``, maybe after ``<|python_tag|>``;
- ``mistral``: ``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]``;
- ``generic`` (a template without tools, given them in a system message):
  ``{"tool_call": {..}}``, ``{"tool_calls": [..]}`` or ``{"response": "<text>"}``.

Whatever the format, a reply that opens with JSON holding a call to a known tool is read
as calls too (the generic fallback), so a model that mixes conventions still gets through.
The parser is incremental: text that cannot be markup streams out as content at once,
text that may be the start of markup is held until it is one or cannot be, and a call's
arguments stream out as they arrive once its name is known.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.engine.types import StructuredOutput, ToolCall, ToolCallFormat, ToolSpec

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
LLAMA3_MARK = "<|python_tag|>"
# Markers that switch the parser from content to a call, per format.
_MARKERS: dict[ToolCallFormat, tuple[str, ...]] = {
    "hermes": (HERMES_OPEN,),
    "llama3": (LLAMA3_MARK,),
    "mistral": (MISTRAL_MARK,),
    "generic": (),
}


def tool_call_constraint(
    fmt: ToolCallFormat, tools: Sequence[ToolSpec], *, parallel: bool
) -> StructuredOutput:
    """The output constraint that makes the model call one of ``tools`` in its own format,
    with arguments that match that tool's JSON schema."""
    arguments_key = "parameters" if fmt == "llama3" else "arguments"
    defs: dict[str, Any] = {}
    call = {
        "anyOf": [
            _call_schema(tool, arguments_key, defs, tag=f"tool-{i}") for i, tool in enumerate(tools)
        ]
    }
    schema: dict[str, Any]
    if fmt == "hermes" or fmt == "llama3":
        schema = call
    elif fmt == "mistral":
        # [TOOL_CALLS] is a control token whose text a grammar cannot match: the bare
        # array is forced, which the parser takes as calls all the same.
        schema = {"type": "array", "items": call, "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
    else:
        schema = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
        if parallel:
            # Both shapes the system message offers: a small model given only the list
            # tends to go on adding calls until max_tokens; one call is its own choice.
            calls = {"type": "array", "items": call, "minItems": 1}
            several = {"type": "object", "properties": {"tool_calls": calls}}
            schema = {"anyOf": [schema, {**several, "required": ["tool_calls"]}]}
    if defs:
        schema = {**schema, "$defs": defs}
    if fmt == "hermes":
        return StructuredOutput(
            "json_schema",
            json.dumps(schema),
            prefix=HERMES_OPEN + "\n",
            suffix="\n" + HERMES_CLOSE,
            repeat=parallel,
        )
    return StructuredOutput("json_schema", json.dumps(schema))


def _call_schema(
    tool: ToolSpec, arguments_key: str, defs: dict[str, Any], *, tag: str
) -> dict[str, Any]:
    parameters = dict(tool.parameters) or {"type": "object"}
    if _has_local_ref(parameters):
        # The tool's "#/..." references meant its own schema, which is now nested: keep a
        # copy under the root's $defs and point them there.
        parameters = _rebased(parameters, f"#/$defs/{tag}")
        defs[tag] = parameters
    return {
        "type": "object",
        # Name first: the grammar keeps this order, so the name streams before the arguments.
        "properties": {"name": {"const": tool.name}, arguments_key: parameters},
        "required": ["name", arguments_key],
    }


def _has_local_ref(node: Any) -> bool:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            return True
        return any(_has_local_ref(value) for value in node.values())
    if isinstance(node, list):
        return any(_has_local_ref(item) for item in node)
    return False


def _rebased(node: Any, base: str) -> Any:
    if isinstance(node, dict):
        return {
            key: base + value[1:]
            if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _rebased(value, base)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rebased(item, base) for item in node]
    return node


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class Content:
    """Text for the reply's content."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A tool call begins: its number (from 0, in the order made), id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    """The next fragment of call ``index``'s arguments (JSON text)."""

    index: int
    text: str


Piece = Content | CallStart | CallArguments

# The head of a call as the grammar (and most models) write it: the name, then the
# arguments object opening. Names are [A-Za-z0-9_-] by the request's own validation.
_CALL_HEAD = (
    r'\{\s*"name"\s*:\s*"(?P<name>[A-Za-z0-9_-]{1,64})"\s*,\s*'
    r'"(?:arguments|parameters)"\s*:\s*(?=\{)'
)
_FIRST_HEAD = re.compile(
    r'(?:\{\s*"tool_call"\s*:\s*|(?P<list>\{\s*"tool_calls"\s*:\s*\[\s*|\[\s*))?' + _CALL_HEAD
)
_NEXT_HEAD = re.compile(r"\}\s*,\s*" + _CALL_HEAD)  # after a call's arguments, in a list


@dataclass
class _OpenCall:
    id: str
    name: str
    arguments: list[str]


@dataclass
class _ValueScan:
    """How far the streaming of calls out of an unfinished JSON value has got."""

    position: int = 0
    in_arguments: bool = False
    in_list: bool = False
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    streamed: int = 0  # calls started from this value


class ToolCallParser:
    """Splits one sequence's text, as it arrives, into content and tool calls.

    A call is announced (``CallStart``) as soon as its name is complete, and its
    arguments follow as they are generated (``CallArguments``). A JSON value that turns
    out not to be a call once it closes is content.
    """

    def __init__(self, fmt: ToolCallFormat, tool_names: Sequence[str], *, parallel: bool) -> None:
        self._markers = _MARKERS[fmt]
        self._names = frozenset(tool_names)
        self._parallel = parallel
        self._buffer = ""
        self._mode = "text"  # text, json (a JSON value is arriving), or hermes (inside a call)
        self._at_start = True  # nothing but whitespace yet, since the start or the last call
        self._scan = _ValueScan()
        self._calls: list[_OpenCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls made so far (the last one's arguments may still be arriving)."""
        return [ToolCall(c.id, c.name, "".join(c.arguments)) for c in self._calls]

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Piece]:
        """What is left once the sequence has ended: held text, an unclosed call."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while True:
            if self._mode == "text":
                if not self._text_step(out, final):
                    break
            elif self._mode == "json":
                if not self._json_step(out, final):
                    break
            elif not self._hermes_step(out, final):
                break
        return out

    def _enter(self, mode: str, buffer: str) -> None:
        self._mode, self._buffer, self._scan = mode, buffer.lstrip(), _ValueScan()

    def _text_step(self, out: list[Piece], final: bool) -> bool:
        found = [(self._buffer.find(m), m) for m in self._markers if m in self._buffer]
        at, marker = min(found) if found else (-1, "")
        if self._at_start:
            stripped = self._buffer.lstrip()
            lead = len(self._buffer) - len(stripped)
            if not stripped:
                if final:
                    if not self._calls:
                        self._content(out, self._buffer)
                    self._buffer = ""
                return False
            if at == lead:
                self._buffer = stripped  # whitespace before a call is no content
                at = 0
            elif not final and _held_back(stripped, self._markers) == len(stripped):
                return False  # "[TOOL" may become a marker
            elif stripped[0] in "{[" and at < 0:
                self._enter("json", stripped)
                return True
        if marker:
            self._content(out, self._buffer[:at])
            self._at_start = False
            self._enter(
                "hermes" if marker == HERMES_OPEN else "json", self._buffer[at + len(marker) :]
            )
            return True
        keep = 0 if final else _held_back(self._buffer, self._markers)
        self._content(out, self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _json_step(self, out: list[Piece], final: bool) -> bool:
        self._buffer = self._buffer.lstrip()
        text = self._buffer
        if not text:
            return False
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            self._stream_calls(text, out)
            if not final:
                return False  # incomplete, or not JSON after all: the end will tell
            self._mode = "text"
            self._buffer = ""
            if not self._scan.streamed:
                self._content(out, text)
            return False
        self._stream_calls(text[:end], out)
        self._buffer = text[end:].lstrip(";")  # Llama 3 separates several calls with ';'
        self._mode = "text"
        self._settle(out, value, fallback=text[:end])
        return True

    def _hermes_step(self, out: list[Piece], final: bool) -> bool:
        self._buffer = self._buffer.lstrip()
        close = self._buffer.find(HERMES_CLOSE)
        body = self._buffer if close < 0 else self._buffer[:close]
        self._stream_calls(body, out)
        if close < 0 and not final:
            return False
        self._buffer = "" if close < 0 else self._buffer[close + len(HERMES_CLOSE) :]
        self._mode = "text"
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        # Not a call after all: the model's text, markup included, is its content.
        self._settle(out, value, fallback=HERMES_OPEN + body)
        return True

    def _stream_calls(self, text: str, out: list[Piece]) -> None:
        """Announce calls and pass on their arguments as far as ``text`` has them."""
        scan = self._scan
        while scan.position < len(text):
            if not scan.in_arguments:
                if scan.streamed and not scan.in_list:
                    return
                head = (_NEXT_HEAD if scan.streamed else _FIRST_HEAD).match(text, scan.position)
                if head is None or head["name"] not in self._names:
                    return
                if self._calls and not self._parallel:
                    return
                if not scan.streamed:
                    scan.in_list = bool(head.groupdict().get("list"))
                call = _OpenCall(new_call_id(), head["name"], [])
                out.append(CallStart(len(self._calls), call.id, call.name))
                self._calls.append(call)
                scan.streamed += 1
                scan.position, scan.in_arguments, scan.depth = head.end(), True, 0
                continue
            start = scan.position
            scan.position = _scan_json(text, scan)
            fragment = text[start : scan.position]
            if fragment:
                self._calls[-1].arguments.append(fragment)
                out.append(CallArguments(len(self._calls) - 1, fragment))

    def _settle(self, out: list[Piece], value: Any, *, fallback: str) -> None:
        """A JSON value (or call body) has closed: its calls, or its text as content."""
        streamed, self._scan = self._scan.streamed, _ValueScan()
        if streamed:
            self._at_start = True  # announced as they came; whitespace may precede another
            return
        if isinstance(value, dict) and set(value) == {"response"}:
            reply = value["response"]
            self._content(out, reply if isinstance(reply, str) else json.dumps(reply))
            return
        found = _calls_in(value)
        if not found or any(name not in self._names for name, _ in found):
            self._content(out, fallback)
            return
        for name, arguments in found:
            if self._calls and not self._parallel:
                break  # parallel_tool_calls false: the first call only
            call = _OpenCall(new_call_id(), name, [arguments])
            out.append(CallStart(len(self._calls), call.id, name))
            out.append(CallArguments(len(self._calls), arguments))
            self._calls.append(call)
        self._at_start = True  # whitespace between calls is no content

    def _content(self, out: list[Piece], text: str) -> None:
        if text:
            out.append(Content(text))
            if text.strip():
                self._at_start = False


def _scan_json(text: str, scan: _ValueScan) -> int:
    """Follow an arguments object from ``scan.position``; where it ends, or the text does."""
    for i in range(scan.position, len(text)):
        char = text[i]
        if scan.in_string:
            if scan.escaped:
                scan.escaped = False
            elif char == "\\":
                scan.escaped = True
            elif char == '"':
                scan.in_string = False
        elif char == '"':
            scan.in_string = True
        elif char in "{[":
            scan.depth += 1
        elif char in "}]":
            scan.depth -= 1
            if scan.depth == 0:
                scan.in_arguments = False
                return i + 1
    return len(text)


def _calls_in(value: Any) -> list[tuple[str, str]] | None:
    if isinstance(value, list):
        calls = [_one_call(item) for item in value]
        if not calls or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None]
    if isinstance(value, dict):
        if isinstance(value.get("tool_calls"), list) and len(value) == 1:
            return _calls_in(value["tool_calls"])
        if "tool_call" in value and len(value) == 1:
            value = value["tool_call"]
        one = _one_call(value)
        return None if one is None else [one]
    return None


def _one_call(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI's own shape, echoed back
        value = value["function"]
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters"))
    if not isinstance(name, str):
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _held_back(text: str, markers: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could begin a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-size:]):
                longest = max(longest, size)
                break
    return longest

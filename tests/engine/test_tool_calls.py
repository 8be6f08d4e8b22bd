"""Reading tool calls out of model text, per template format, and the constraint that forces one."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edge_agent.engine.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    Piece,
    ToolCallParser,
    tool_call_constraint,
)
from edge_agent.engine.types import ToolCallFormat, ToolSpec

NAMES = ["get_weather", "add"]
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}


def parse(
    fmt: ToolCallFormat, text: str, *, parallel: bool = True, by_char: bool = True
) -> list[Piece]:
    parser = ToolCallParser(fmt, NAMES, parallel=parallel)
    pieces: list[Piece] = []
    for part in list(text) if by_char else [text]:
        pieces += parser.feed(part)
    return pieces + parser.finish()


def content(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces if isinstance(p, Content))


def calls(pieces: list[Piece]) -> list[tuple[int, str, dict[str, object]]]:
    """The calls the pieces announce, their arguments reassembled from the fragments."""
    names = {p.index: p.name for p in pieces if isinstance(p, CallStart)}
    arguments = {i: "" for i in names}
    for piece in pieces:
        if isinstance(piece, CallArguments):
            arguments[piece.index] += piece.text
    return [(i, names[i], json.loads(arguments[i])) for i in sorted(names)]


CASES = [
    ("generic", json.dumps({"tool_call": WEATHER})),
    ("generic", json.dumps({"tool_calls": [WEATHER]})),
    ("hermes", f"<tool_call>\n{json.dumps(WEATHER)}\n</tool_call>"),
    ("llama3", json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}})),
    (
        "llama3",
        "<|python_tag|>" + json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}}),
    ),
    ("mistral", "[TOOL_CALLS]" + json.dumps([WEATHER])),
    ("mistral", json.dumps([WEATHER])),  # llama.cpp renders the control token as no text
]


@pytest.mark.parametrize(("fmt", "text"), CASES)
def test_each_format_reads_its_call(fmt: ToolCallFormat, text: str) -> None:
    pieces = parse(fmt, text)
    assert calls(pieces) == [(0, "get_weather", {"city": "Paris"})]
    assert content(pieces) == ""


@pytest.mark.parametrize(("fmt", "text"), CASES)
def test_streamed_text_parses_as_the_whole_does(fmt: ToolCallFormat, text: str) -> None:
    assert calls(parse(fmt, text, by_char=True)) == calls(parse(fmt, text, by_char=False))


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_the_generic_json_is_read_whatever_the_format(fmt: ToolCallFormat) -> None:
    assert calls(parse(fmt, json.dumps({"tool_call": WEATHER}))) == [
        (0, "get_weather", {"city": "Paris"})
    ]


def test_a_call_is_announced_before_its_arguments_are_complete() -> None:
    parser = ToolCallParser("generic", NAMES, parallel=True)
    pieces = parser.feed('{"tool_call": {"name": "get_weather", "arguments": {"ci')
    assert isinstance(pieces[0], CallStart) and pieces[0].name == "get_weather"
    assert pieces[1:] == [CallArguments(0, '{"ci')]
    assert parser.feed('ty": "Paris"}') == [CallArguments(0, 'ty": "Paris"}')]
    assert parser.feed("}}") == []
    assert parser.finish() == []
    [call] = parser.calls
    assert call.id == pieces[0].id and call.arguments == '{"city": "Paris"}'


def test_braces_inside_argument_strings_do_not_end_the_arguments() -> None:
    text = json.dumps({"tool_call": {"name": "add", "arguments": {"a": '}{]"', "b": 1}}})
    assert calls(parse("generic", text)) == [(0, "add", {"a": '}{]"', "b": 1})]


def test_parsers_calls_match_the_pieces() -> None:
    parser = ToolCallParser("hermes", NAMES, parallel=True)
    pieces = parser.feed(f"<tool_call>\n{json.dumps(WEATHER)}\n</tool_call>") + parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
        (name, args) for _, name, args in calls(pieces)
    ]


def test_plain_text_streams_out_at_once() -> None:
    parser = ToolCallParser("hermes", NAMES, parallel=True)
    assert parser.feed("Hello") == [Content("Hello")]


def test_text_that_may_begin_markup_is_held_until_it_cannot() -> None:
    parser = ToolCallParser("hermes", NAMES, parallel=True)
    assert parser.feed("It is <tool") == [Content("It is ")]
    assert parser.feed("s>") == [Content("<tools>")]


def test_text_before_a_call_is_content_and_markup_is_not() -> None:
    text = f"Let me look.\n<tool_call>\n{json.dumps(WEATHER)}\n</tool_call>"
    pieces = parse("hermes", text)
    assert content(pieces) == "Let me look.\n"
    assert "tool_call" not in content(pieces)
    assert len(calls(pieces)) == 1


def test_several_calls_are_numbered_in_order() -> None:
    add = {"name": "add", "arguments": {"a": 1, "b": 2}}
    text = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in (WEATHER, add))
    pieces = parse("hermes", text)
    assert calls(pieces) == [(0, "get_weather", {"city": "Paris"}), (1, "add", {"a": 1, "b": 2})]
    assert content(pieces) == ""


def test_without_parallel_calls_only_the_first_counts() -> None:
    text = json.dumps({"tool_calls": [WEATHER, {"name": "add", "arguments": {}}]})
    assert calls(parse("generic", text, parallel=False)) == [(0, "get_weather", {"city": "Paris"})]


def test_a_generic_response_is_the_content() -> None:
    pieces = parse("generic", json.dumps({"response": "It is sunny."}))
    assert content(pieces) == "It is sunny."
    assert calls(pieces) == []


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "unknown_tool", "arguments": {}}',  # a tool the request did not offer
        '{"answer": 42}',  # JSON, but no call
        '{"tool_call": {"name": "add"',  # cut off before it closed
        "no JSON here {",
    ],
)
def test_what_is_not_a_call_to_an_offered_tool_stays_content(text: str) -> None:
    pieces = parse("generic", text)
    assert calls(pieces) == []
    assert content(pieces) == text


def test_arguments_given_as_a_json_string_are_read() -> None:
    text = json.dumps({"name": "add", "arguments": json.dumps({"a": 1})})
    assert calls(parse("llama3", text)) == [(0, "add", {"a": 1})]


SPEC = ToolSpec(
    "get_weather",
    "weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def test_the_generic_constraint_is_the_reply_object_with_the_tools_schema() -> None:
    constraint = tool_call_constraint("generic", [SPEC], parallel=False)
    assert constraint.kind == "json_schema" and constraint.schema_json is not None
    schema = json.loads(constraint.schema_json)
    call = schema["properties"]["tool_call"]["anyOf"][0]
    assert call["properties"]["name"] == {"const": "get_weather"}
    assert call["properties"]["arguments"] == SPEC.parameters
    assert not constraint.prefix


def test_the_hermes_constraint_wraps_each_call_in_its_markup() -> None:
    constraint = tool_call_constraint("hermes", [SPEC], parallel=True)
    assert constraint.prefix.startswith("<tool_call>")
    assert constraint.suffix.endswith("</tool_call>")
    assert constraint.repeat


def test_the_llama3_constraint_names_the_arguments_parameters() -> None:
    constraint = tool_call_constraint("llama3", [SPEC], parallel=False)
    assert constraint.schema_json is not None
    call = json.loads(constraint.schema_json)["anyOf"][0]
    assert call["required"] == ["name", "parameters"]


def test_a_tools_own_references_still_resolve_inside_the_constraint() -> None:
    address = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    parameters = {
        "$defs": {"Address": address},
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Address"}},
        "required": ["home"],
    }
    constraint = tool_call_constraint(
        "generic", [ToolSpec("where", None, parameters)], parallel=False
    )
    assert constraint.schema_json is not None
    schema = json.loads(constraint.schema_json)
    good = {"tool_call": {"name": "where", "arguments": {"home": {"city": "Oslo"}}}}
    bad = {"tool_call": {"name": "where", "arguments": {"home": {"town": "Oslo"}}}}
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)

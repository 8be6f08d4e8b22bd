"""A chat request's tools, as the engine takes them: messages, tool specs, and the forced call.

``tool_choice`` (OpenAI's meanings): ``none`` renders no tools and parses no calls;
``auto`` (the default with tools) offers them and reads calls out of the reply;
``required`` and a named function also force a call with a grammar built from the
tools' schemas, so the arguments always match them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.engine.tool_calls import tool_call_constraint
from edge_agent.engine.types import (
    Backend,
    ChatMessage,
    StructuredOutput,
    ToolCall,
    ToolCallFormat,
    ToolSpec,
)
from edge_agent.errors import InvalidRequest
from edge_agent.protocol.openai import ChatCompletionRequest, Message, NamedToolChoice


@dataclass(frozen=True)
class ToolUse:
    """How one request's replies are read for calls, and what forces one."""

    format: ToolCallFormat
    tools: tuple[ToolSpec, ...]
    parallel: bool
    forced: StructuredOutput | None  # required or named: the grammar's constraint

    @property
    def names(self) -> list[str]:
        return [tool.name for tool in self.tools]


def chat_messages(conversation: Sequence[Message]) -> list[ChatMessage]:
    """The conversation for the engine; a tool result must say which call it answers."""
    messages: list[ChatMessage] = []
    for i, message in enumerate(conversation):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(
                f"messages[{i}].tool_call_id: required in a tool message",
                param=f"messages[{i}].tool_call_id",
            )
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(
                f"messages[{i}].tool_calls: only assistant messages make tool calls",
                param=f"messages[{i}].tool_calls",
            )
        calls = tuple(
            ToolCall(call.id, call.function.name, call.function.arguments)
            for call in message.tool_calls or ()
        )
        messages.append(
            ChatMessage(
                message.role,
                message.text(),
                tool_calls=calls,
                tool_call_id=message.tool_call_id,
                name=message.name,
            )
        )
    return messages


def tool_use(request: ChatCompletionRequest, backend: Backend) -> ToolUse | None:
    """The request's tool use, or None when it offers no tools (or ``tool_choice`` is none)."""
    choice = request.tool_choice
    if not request.tools:
        # "auto" with nothing to call is harmless (agent frameworks send it); a forced call is not.
        if choice not in (None, "none", "auto"):
            raise InvalidRequest(
                "tool_choice: a required or named call needs tools", param="tool_choice"
            )
        return None
    if choice == "none":
        return None
    fmt = backend.tool_call_format
    if fmt is None:
        raise InvalidRequest("tools: tool calling is not supported by this backend", param="tools")
    specs = tuple(
        ToolSpec(
            tool.function.name,
            tool.function.description,
            tool.function.parameters or {"type": "object", "properties": {}},
        )
        for tool in request.tools
    )
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique", param="tools")
    parallel = request.parallel_tool_calls is not False
    forced: StructuredOutput | None = None
    if isinstance(choice, NamedToolChoice):
        named = [spec for spec in specs if spec.name == choice.function.name]
        if not named:
            raise InvalidRequest(
                f"tool_choice: no tool named {choice.function.name!r} in tools",
                param="tool_choice",
            )
        forced = tool_call_constraint(fmt, named, parallel=False)
    elif choice == "required":
        forced = tool_call_constraint(fmt, specs, parallel=parallel)
    if forced is not None and request.response_format is not None:
        if request.response_format.type != "text":
            raise InvalidRequest(
                "response_format: cannot be combined with a required or named tool_choice",
                param="response_format",
            )
    return ToolUse(fmt, specs, parallel, forced)

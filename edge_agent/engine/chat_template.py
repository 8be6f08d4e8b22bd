"""A model's Jinja chat template: rendering conversations, with tools when there are any.

Templates that know tools (they read the ``tools`` variable) get them as Hugging Face's
``apply_chat_template`` and llama.cpp's server pass them: OpenAI-shaped function dicts,
and assistant turns' ``tool_calls`` with their arguments as objects. A template that
knows none (SmolLM2's ChatML) is given the tools in a system message instead, with the
reply shape the ``generic`` format parses; earlier calls and results are spelled in that
same JSON so the model sees its own convention in the history (llama.cpp's polyfill).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_agent.engine.types import (
    ChatMessage,
    ToolCall,
    ToolCallFormat,
    ToolSpec,
    UnsupportedFeature,
)

GENERIC_TOOL_PROMPT = (
    "You can call the following tools. To call one, reply with only a JSON object "
    '{{"tool_call": {{"name": "<tool name>", "arguments": {{<arguments>}}}}}}; '
    'to call several at once, {{"tool_calls": [<call>, ...]}}. '
    "Otherwise reply to the user in plain text.\n\nTools:\n{tools}"
)


class ChatTemplate:
    """One compiled chat template and what it says about tool calls."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        # Templates are written for transformers' tojson: plain JSON, non-ASCII kept.
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token
        self.knows_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        self.tool_call_format = tool_call_format_of(source) if self.knows_tools else "generic"

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        variables: dict[str, Any] = {
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        if self.knows_tools:
            turns = [_native_turn(m) for m in messages]
            if tools:
                variables["tools"] = [_function_dict(tool) for tool in tools]
        else:
            turns = _generic_turns(messages, tools)
        try:
            return self._template.render(messages=turns, **variables)
        except jinja2.TemplateError as exc:
            raise UnsupportedFeature("chat_template", f"the template refuses them: {exc}") from None


def tool_call_format_of(source: str) -> ToolCallFormat:
    """The tool-call syntax a tools-aware template teaches its model, by its markers."""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "generic"


def _function_dict(tool: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = dict(tool.parameters)
    return {"type": "function", "function": function}


def _arguments_object(call: ToolCall) -> Any:
    # Templates index and tojson the arguments: an object, unless the text is not JSON.
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def _native_turn(message: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments_object(call)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        turn["name"] = message.name
    return turn


def _generic_turns(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.tool_calls:
            calls = [
                {"id": c.id, "name": c.name, "arguments": _arguments_object(c)}
                for c in message.tool_calls
            ]
            reply = {"tool_calls": calls} if len(calls) > 1 else {"tool_call": calls[0]}
            content = _tojson(reply)
            if message.content:
                content = f"{message.content}\n{content}"
            turns.append({"role": "assistant", "content": content})
        elif message.role == "tool":
            # A template without tools has no tool role its model was trained on.
            result = {"tool_call_id": message.tool_call_id, "content": message.content}
            if message.name is not None:
                result["name"] = message.name
            turns.append({"role": "user", "content": _tojson({"tool_response": result})})
        else:
            turns.append({"role": message.role, "content": message.content})
    if tools:
        offer = GENERIC_TOOL_PROMPT.format(
            tools=_tojson([_function_dict(t)["function"] for t in tools], indent=2)
        )
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{offer}"}
        else:
            turns.insert(0, {"role": "system", "content": offer})
    return turns


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)

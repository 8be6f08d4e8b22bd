"""Chat templates and tools: passed to a template that knows them, else in a system message."""

from __future__ import annotations

import json

from edge_agent.engine.chat_template import ChatTemplate, tool_call_format_of
from edge_agent.engine.types import ChatMessage, ToolCall, ToolSpec

# SmolLM2's own template (ChatML that knows no tools).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The shape of Qwen 2.5's template: tools in the system turn, calls as <tool_call> JSON.
HERMES = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL = ToolSpec(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
HISTORY = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(CALL,)),
    ChatMessage("tool", "22 C, sunny", tool_call_id="call_1"),
]


def test_a_template_that_reads_tools_gets_them_and_its_format() -> None:
    template = ChatTemplate(HERMES)
    assert template.knows_tools
    assert template.tool_call_format == "hermes"
    text = template.render([ChatMessage("user", "hi")], tools=[TOOL])
    offered = json.loads(text.split("<tools>\n")[1].split("\n")[0])
    assert offered == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": dict(TOOL.parameters),
            "description": "Current weather in a city",
        },
    }


def test_a_tools_aware_template_gets_earlier_calls_with_object_arguments() -> None:
    text = ChatTemplate(HERMES).render(HISTORY)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\n22 C, sunny" in text


def test_a_template_without_tools_is_given_them_in_a_system_message() -> None:
    template = ChatTemplate(CHATML)
    assert not template.knows_tools
    assert template.tool_call_format == "generic"
    text = template.render([ChatMessage("user", "hi")], tools=[TOOL])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n")
    assert '"tool_call"' in system and '"get_weather"' in system
    assert "You are a helpful AI assistant" not in text  # the offer is the system turn now


def test_the_offer_joins_the_callers_own_system_message() -> None:
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")]
    text = ChatTemplate(CHATML).render(messages, tools=[TOOL])
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call")
    assert text.count("<|im_start|>system") == 1


def test_history_is_spelled_in_the_generic_reply_shape_for_a_template_without_tools() -> None:
    text = ChatTemplate(CHATML).render(HISTORY, tools=[TOOL])
    assert '<|im_start|>assistant\n{"tool_call": {"id": "call_1", "name": "get_weather"' in text
    turn = text.split("<|im_start|>user\n")[2].split("<|im_end|>")[0]
    assert json.loads(turn) == {
        "tool_response": {"tool_call_id": "call_1", "content": "22 C, sunny"}
    }


def test_without_tools_the_rendering_is_the_templates_own() -> None:
    text = ChatTemplate(CHATML).render([ChatMessage("user", "hi")])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_generation_prompt_can_be_left_out() -> None:
    text = ChatTemplate(CHATML).render([ChatMessage("user", "hi")], add_generation_prompt=False)
    assert not text.endswith("<|im_start|>assistant\n")


def test_formats_are_told_apart_by_their_markers() -> None:
    assert tool_call_format_of("... [TOOL_CALLS] ...") == "mistral"
    assert tool_call_format_of("... <tool_call> ...") == "hermes"
    assert tool_call_format_of("... <|python_tag|> ... ipython ...") == "llama3"
    assert tool_call_format_of("{{ tools }}") == "generic"

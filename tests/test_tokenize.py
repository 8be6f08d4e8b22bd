"""POST /tokenize and /detokenize against a real daemon: the counts clients trim history by."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.slow

CHAT = "/infer/openai/v1/chat/completions"
COMPLETIONS = "/infer/openai/v1/completions"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def ok(daemon: Daemon, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = daemon.post_json(path, body)
    assert status == 200, answer
    return answer


def test_a_prompt_counts_as_completions_counts_it(daemon: Daemon) -> None:
    tokens = ok(daemon, "/tokenize", {"prompt": "Once upon a time"})
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == 4096
    completion = ok(daemon, COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 1})
    assert completion["usage"]["prompt_tokens"] == tokens["count"]


@pytest.mark.parametrize("tools", [None, [TOOL]], ids=["plain", "with-tools"])
def test_messages_count_as_chat_completions_counts_them(
    daemon: Daemon, tools: list[dict[str, Any]] | None
) -> None:
    extra = {"tools": tools} if tools else {}
    tokens = ok(daemon, "/tokenize", {"messages": MESSAGES, **extra})
    chat = ok(daemon, CHAT, {"messages": MESSAGES, "max_tokens": 1, **extra})
    assert chat["usage"]["prompt_tokens"] == tokens["count"]


def test_offered_tools_take_room_in_the_prompt(daemon: Daemon) -> None:
    plain = ok(daemon, "/tokenize", {"messages": MESSAGES})["count"]
    assert ok(daemon, "/tokenize", {"messages": MESSAGES, "tools": [TOOL]})["count"] > plain


def test_the_generation_prompt_can_be_left_out(daemon: Daemon) -> None:
    opened = ok(daemon, "/tokenize", {"messages": MESSAGES})
    closed = ok(daemon, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert closed["count"] < opened["count"]
    assert opened["tokens"][: closed["count"]] == closed["tokens"]


def test_token_strings_spell_the_prompt(daemon: Daemon) -> None:
    answer = ok(
        daemon,
        "/tokenize",
        {"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True},
    )
    assert "".join(answer["token_strs"]) == "Hello world"


def test_detokenize_gives_back_the_text(daemon: Daemon) -> None:
    tokens = ok(daemon, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert ok(daemon, "/detokenize", {"tokens": tokens["tokens"]}) == {"prompt": "Hello world"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [99999999]}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/tokenize", {"add_special_tokens": True}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": "yes"}, None),
    ],
    ids=["outside-vocabulary", "not-a-list", "no-prompt", "no-messages", "string-flag"],
)
def test_bad_input_is_a_400_naming_the_field(
    daemon: Daemon, path: str, body: dict[str, Any], param: str | None
) -> None:
    status, answer = daemon.post_json(path, body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == (param or "add_generation_prompt")


def test_a_context_overflow_says_how_long_the_prompt_is(daemon: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{daemon.url}/infer/openai/v1", api_key="none", max_retries=0)
    long = [{"role": "user", "content": "hello " * 5000}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="", messages=long, max_tokens=4)  # type: ignore[arg-type]
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["code"] == "context_length_exceeded"
    assert error["n_ctx"] == 4096
    counted = ok(daemon, "/tokenize", {"messages": long})["count"]
    assert error["n_prompt_tokens"] == counted > 4096

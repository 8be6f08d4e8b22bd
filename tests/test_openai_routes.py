"""The OpenAI endpoints against the real model, in process (CONTRACT.md sections 2-3)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import RecordingSink

COMPLETIONS = "/infer/openai/v1/completions"
CHAT = "/infer/openai/v1/chat/completions"
MODEL = "smollm2-135m-instruct"


def chat_body(content: str = "Name three colors.", **extra: Any) -> dict[str, Any]:
    return {"model": "dummy", "messages": [{"role": "user", "content": content}], **extra}


async def test_completion_has_the_contract_shape_with_ttft_and_tps(client: Any) -> None:
    response = await client.post(
        COMPLETIONS, json={"model": "whatever", "prompt": "tell me a short story", "max_tokens": 8}
    )
    assert response.status == 200
    body = await response.json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["text"]
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 8
    assert 0 < usage["ttft"] < 30 and usage["tps"] > 0


async def test_chat_completion_has_the_contract_shape(client: Any) -> None:
    response = await client.post(CHAT, json=chat_body(max_tokens=8))
    assert response.status == 200
    body = await response.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["message"]["tool_calls"] == []
    assert choice["delta"] is None
    assert body["usage"]["ttft"] > 0 and body["usage"]["tps"] > 0


@pytest.mark.parametrize("model", ["dummy", "", None])
async def test_the_model_field_is_accepted_and_ignored(client: Any, model: str | None) -> None:
    body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 2}
    if model is not None:
        body["model"] = model
    response = await client.post(COMPLETIONS, json=body)
    assert response.status == 200
    assert (await response.json())["model"] == MODEL


async def test_max_tokens_ends_with_length(client: Any) -> None:
    body = {"prompt": "Count: one, two, three,", "max_tokens": 5, "temperature": 0}
    result = await (await client.post(COMPLETIONS, json=body)).json()
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5


async def test_max_completion_tokens_is_an_alias_in_chat(client: Any) -> None:
    body = chat_body("Tell me a long story.", max_completion_tokens=3, temperature=0)
    result = await (await client.post(CHAT, json=body)).json()
    assert result["usage"]["completion_tokens"] == 3
    assert result["choices"][0]["finish_reason"] == "length"


async def test_a_stop_string_ends_the_text_before_it(client: Any) -> None:
    base = {"prompt": "Count: one, two, three,", "max_tokens": 20, "temperature": 0}
    free = (await (await client.post(COMPLETIONS, json=base)).json())["choices"][0]["text"]
    stop = free.strip().split()[1]  # a word the model is known to produce
    result = await (await client.post(COMPLETIONS, json={**base, "stop": [stop]})).json()
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == stop
    assert stop not in choice["text"]
    assert free.startswith(choice["text"])


async def test_n_gives_that_many_choices(client: Any) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "n": 3, "seed": 7, "temperature": 1}
    result = await (await client.post(COMPLETIONS, json=body)).json()
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert all(c["text"] for c in result["choices"])
    assert result["usage"]["completion_tokens"] == sum(1 for _ in range(3)) * 4


async def test_a_list_of_prompts_gives_one_choice_each(client: Any) -> None:
    body = {"prompt": ["The sky is", "Water is"], "max_tokens": 3, "temperature": 0}
    result = await (await client.post(COMPLETIONS, json=body)).json()
    alone = await (await client.post(COMPLETIONS, json={**body, "prompt": "Water is"})).json()
    assert len(result["choices"]) == 2
    assert result["choices"][1]["text"] == alone["choices"][0]["text"]


async def test_token_id_prompts_are_accepted(client: Any) -> None:
    text = await (
        await client.post(
            COMPLETIONS, json={"prompt": "Hello world", "max_tokens": 3, "temperature": 0}
        )
    ).json()
    ids = await (
        await client.post(
            COMPLETIONS, json={"prompt": [19556, 905], "max_tokens": 3, "temperature": 0}
        )
    ).json()
    assert ids["usage"]["prompt_tokens"] == 2
    assert ids["choices"][0]["text"]
    assert text["choices"][0]["text"]


async def test_completion_logprobs(client: Any) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 3, "logprobs": 2, "temperature": 0}
    result = await (await client.post(COMPLETIONS, json=body)).json()
    logprobs = result["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 3 == len(logprobs["token_logprobs"])
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    # Greedy: the chosen token is the most likely one.
    for token, chosen, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert max(top.values()) == pytest.approx(chosen, abs=1e-6)
        assert token in top
    assert "".join(logprobs["tokens"]) == result["choices"][0]["text"]


async def test_chat_logprobs(client: Any) -> None:
    body = chat_body(max_tokens=3, logprobs=True, top_logprobs=3, temperature=0)
    result = await (await client.post(CHAT, json=body)).json()
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert all(len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0 for entry in content)


async def test_echo_prepends_the_prompt(client: Any) -> None:
    body = {"prompt": "Roses are red,", "max_tokens": 3, "echo": True, "temperature": 0}
    result = await (await client.post(COMPLETIONS, json=body)).json()
    assert result["choices"][0]["text"].startswith("Roses are red,")


async def test_json_object_response_format_gives_json(client: Any) -> None:
    body = chat_body(
        "Describe a cat as JSON.",
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    result = await (await client.post(CHAT, json=body)).json()
    choice = result["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: still a JSON object's beginning
        assert choice["message"]["content"].lstrip().startswith("{")


async def test_json_schema_response_format_follows_the_schema(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    body = chat_body(
        "Make up a person.",
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    result = await (await client.post(CHAT, json=body)).json()
    assert result["choices"][0]["finish_reason"] == "stop"
    person = json.loads(result["choices"][0]["message"]["content"])
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


async def test_logit_bias_forces_a_token(client: Any) -> None:
    # Token 28 is "," in SmolLM2's vocabulary: nothing in the prompt suggests it thrice.
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logit_bias": {"28": 100}}
    result = await (await client.post(COMPLETIONS, json=body)).json()
    assert result["choices"][0]["text"] == ",,,"


async def test_temperature_zero_repeats(client: Any) -> None:
    body = chat_body("Write a haiku about rain.", max_tokens=24, temperature=0)
    first = await (await client.post(CHAT, json=body)).json()
    second = await (await client.post(CHAT, json=body)).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


async def test_the_same_seed_repeats_at_temperature(client: Any) -> None:
    body = chat_body("Write a haiku about rain.", max_tokens=24, temperature=0.8, seed=1234)
    first = await (await client.post(CHAT, json=body)).json()
    second = await (await client.post(CHAT, json=body)).json()
    other = await (await client.post(CHAT, json={**body, "seed": 99})).json()
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]
    assert text != other["choices"][0]["message"]["content"]


async def test_model_defaults_apply_and_requests_override_them(
    make_client: Any, tmp_path: Any
) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink)
    await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
    await client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2, "temperature": 0.1})
    defaults, overridden = (record["params"] for record in sink.records)
    assert defaults["temperature"] == 0.7 and defaults["top_p"] == 0.95  # the manifest's
    assert overridden["temperature"] == 0.1 and overridden["top_p"] == 0.95


async def test_unknown_fields_are_ignored_and_logged(make_client: Any) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink)
    body = {"prompt": "Hi", "max_tokens": 2, "frobnicate": {"x": 1}}
    assert (await client.post(COMPLETIONS, json=body)).status == 200
    assert sink.records[0]["in"]["frobnicate"] == {"x": 1}


async def test_each_request_leaves_one_record(make_client: Any) -> None:
    sink = RecordingSink()
    client = await make_client(records=sink)
    ok = await (await client.post(CHAT, json=chat_body(max_tokens=2))).json()
    await client.post(CHAT, json={"messages": []})
    good, bad = sink.records
    assert good["status"] == "ok" and good["endpoint"] == "chat/completions"
    assert json.loads(good["out"]["json"]) == ok
    assert good["metrics"]["ttft"] == ok["usage"]["ttft"]
    assert good["metrics"]["tps"] == ok["usage"]["tps"]
    assert good["model"]["name"] == MODEL and len(good["model"]["sha"]) == 64
    assert bad["status"] == "error" and "messages" in bad["error"]

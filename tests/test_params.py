"""The parameter merge: the request over the model's defaults over the engine's, typed once."""

from __future__ import annotations

import json

import pytest

from edge_agent.engine.types import SamplingParams, StructuredOutput
from edge_agent.protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from edge_agent.server.params import effective_params, parse_defaults

MANIFEST = parse_defaults({"max_tokens": 256, "temperature": 0.7, "top_p": 0.95}, "test")
NONE = SamplingFields()
ENGINE = SamplingParams(max_tokens=1)
USER = [{"role": "user", "content": "Hi"}]


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate_json(json.dumps({"prompt": "Hi", **fields}))


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps({"messages": USER, **fields}))


def test_the_request_overrides_the_model_default() -> None:
    params = effective_params(completion(temperature=0.1), MANIFEST)
    assert params.temperature == 0.1 and params.top_p == 0.95 and params.max_tokens == 256


def test_the_model_default_applies_where_the_request_is_silent() -> None:
    params = effective_params(completion(), MANIFEST)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.7, 0.95, 256)


def test_the_engine_default_applies_where_both_are_silent() -> None:
    params = effective_params(completion(), NONE)
    assert params.temperature == ENGINE.temperature
    assert params.repetition_penalty == ENGINE.repetition_penalty
    assert params.max_tokens is None and params.n == 1 and params.stop == []


def test_chat_max_completion_tokens_is_max_tokens() -> None:
    assert effective_params(chat(max_completion_tokens=9), MANIFEST).max_tokens == 9
    assert effective_params(chat(max_tokens=5, max_completion_tokens=9), NONE).max_tokens == 5


def test_a_stop_string_is_a_list_of_one() -> None:
    assert effective_params(completion(stop="\n"), NONE).stop == ["\n"]
    assert effective_params(completion(stop=["a", "b"]), NONE).stop == ["a", "b"]


def test_each_choice_gets_its_own_repeatable_seed() -> None:
    params = effective_params(completion(seed=40, n=3), NONE)
    seeds = [params.sampling(max_tokens=4, logprobs=None, choice=c).seed for c in range(3)]
    assert seeds == [40, 41, 42]


def test_no_seed_stays_no_seed() -> None:
    params = effective_params(completion(), NONE)
    assert params.sampling(max_tokens=4, logprobs=None, choice=2).seed is None


@pytest.mark.parametrize("top_k", [-1, 0])
def test_top_k_off_is_zero_for_the_engine(top_k: int) -> None:
    params = effective_params(completion(top_k=top_k), NONE)
    assert params.sampling(max_tokens=4, logprobs=None, choice=0).top_k == 0


def test_logit_bias_keys_become_token_ids() -> None:
    params = effective_params(completion(logit_bias={"15": -100, "-1": 2}), NONE)
    assert params.sampling(max_tokens=4, logprobs=None, choice=0).logit_bias == {15: -100, -1: 2}


def test_response_formats_become_structured_outputs() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    as_schema = completion(
        response_format={"type": "json_schema", "json_schema": {"schema": schema}}
    )
    as_object = completion(response_format={"type": "json_object"})
    as_text = completion(response_format={"type": "text"})

    def structured(request: CompletionRequest) -> StructuredOutput | None:
        params = effective_params(request, NONE)
        return params.sampling(max_tokens=4, logprobs=None, choice=0).structured_output

    assert structured(as_schema) == StructuredOutput("json_schema", json.dumps(schema))
    assert structured(as_object) == StructuredOutput("json_object")
    assert structured(as_text) is None


def test_the_logged_params_are_the_effective_values_as_json() -> None:
    request = completion(temperature=0.2, stop="x", response_format={"type": "json_object"})
    logged = effective_params(request, MANIFEST).for_log()
    assert json.loads(json.dumps(logged)) == logged
    assert logged["temperature"] == 0.2 and logged["top_p"] == 0.95 and logged["stop"] == ["x"]
    assert logged["response_format"] == {"type": "json_object"}


def test_a_json_schema_is_logged_under_its_wire_name() -> None:
    request = completion(response_format={"type": "json_schema", "json_schema": {"schema": {}}})
    logged = effective_params(request, NONE).for_log()
    assert logged["response_format"]["json_schema"]["schema"] == {}


def test_a_default_a_request_could_not_carry_is_refused() -> None:
    with pytest.raises(ValueError, match=r"openai.chat_config: temperature"):
        parse_defaults({"temperature": 5}, "openai.chat_config")
    with pytest.raises(ValueError, match="top_p"):
        parse_defaults({"top_p": "high"}, "openai.chat_config")

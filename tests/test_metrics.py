"""GET /metrics (CONTRACT.md section 7): one request adds exactly its own ttft and tps."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

COMPLETIONS = "/infer/openai/v1/completions"
MODEL = "smollm2-135m-instruct"


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_one_request_adds_exactly_its_own_numbers(client: Any) -> None:
    before = await scrape(client)
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
    usage = (await (await client.post(COMPLETIONS, json=body)).json())["usage"]
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("edge_agent_requests_total", endpoint="completions", status="ok") == 1
    hist = {"endpoint": "completions", "model": MODEL}
    assert delta("edge_agent_ttft_seconds_count", **hist) == 1
    assert abs(delta("edge_agent_ttft_seconds_sum", **hist) - usage["ttft"]) < 1e-9
    assert delta("edge_agent_tps_count", **hist) == 1
    assert abs(delta("edge_agent_tps_sum", **hist) - usage["tps"]) < 1e-9
    assert delta("edge_agent_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("edge_agent_completion_tokens_total") == usage["completion_tokens"]


async def test_errors_are_counted_by_status(client: Any) -> None:
    before = await scrape(client)
    await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": -1})
    after = await scrape(client)
    labels = {"endpoint": "completions", "status": "error"}
    assert (
        value(after, "edge_agent_requests_total", **labels)
        - value(before, "edge_agent_requests_total", **labels)
        == 1
    )


async def test_gauges_and_logbook_series_are_exposed(client: Any) -> None:
    samples = await scrape(client)
    names = {name for name, _ in samples}
    assert {"edge_agent_requests_in_flight", "edge_agent_requests_queued"} <= names
    assert any(name.startswith("edge_agent_logbook_") for name in names), sorted(names)

"""Speculative decoding is exact: the same text as without it, alone or batched, and it
keeps drafting only where drafts are accepted."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.config import Settings
from edge_agent.engine.backends.llamacpp_batch import SequenceState, StepOutput
from edge_agent.engine.backends.llamacpp_engine import LlamaCppEngine
from edge_agent.engine.backends.llamacpp_ngram import NgramIndex
from edge_agent.engine.backends.llamacpp_sampling import SamplerChain, grammar_for
from edge_agent.engine.backends.llamacpp_speculation import (
    DraftPolicy,
    SpeculationOptions,
    VerifyCosts,
    costs_from_timings,
    linear_costs,
    verify,
)
from edge_agent.engine.types import (
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
)
from edge_agent.manifest import ModelManifest
from tests.engine.local_engine import engine_options

PARAGRAPH = (
    "The old lighthouse stood on the rocky point for more than a hundred years. Every night "
    "the keeper climbed the narrow stairs, lit the great lamp, and watched the ships pass "
    "safely through the dangerous channel."
)
COPY = "Repeat this text exactly, word for word:\n\n" + PARAGRAPH
CHAT = "Tell me a story about a robot who learns to paint."
CHATS = ["What is the capital of France?", "Write a poem about the sea.", "Name three fruits."]
# A fixed verify cost, about what a 2-core box measures for the default model, so the
# policy's choices (and these tests) do not depend on timing; drafts from two-token
# matches, so more are offered, and more refused, than with the default three.
SPECULATION = SpeculationOptions(mode="ngram", max_draft=8, min_ngram=2, verify_cost=0.6)
FREE_WRITING = ["Explain gravity to a child.", "Write a poem about the sea.", CHAT]


# --- the n-gram lookup ---------------------------------------------------------------


def test_a_draft_is_what_followed_the_last_tokens_before() -> None:
    index = NgramIndex([1, 2, 3, 4, 5, 6, 9, 2, 3], min_n=2, max_n=3)
    assert index.draft(3) == [4, 5, 6]


def test_the_longest_match_wins_over_a_more_recent_shorter_one() -> None:
    # "2 3" last came before 8, but "1 2 3" came before 4.
    index = NgramIndex([1, 2, 3, 4, 7, 2, 3, 8, 1, 2, 3], min_n=2, max_n=3)
    assert index.draft(2) == [4, 7]


def test_among_equal_matches_the_latest_is_taken() -> None:
    index = NgramIndex([5, 6, 1, 5, 6, 2, 5, 6], min_n=2, max_n=2)
    assert index.draft(1) == [2]


def test_no_match_of_the_shortest_size_gives_no_draft() -> None:
    index = NgramIndex([1, 2, 3, 4], min_n=2, max_n=3)
    assert index.draft(4) == []
    index.append(1)
    assert index.draft(4) == [], "one token in common is below min_n"


def test_appended_tokens_are_found_and_a_draft_stops_at_the_present() -> None:
    index = NgramIndex([7, 8], min_n=2, max_n=2)
    index.extend([9, 7, 8])
    assert index.draft(5) == [9, 7, 8]
    assert index.draft(0) == []


# --- the verify rule ----------------------------------------------------------------


def test_verify_draws_until_the_first_token_that_differs() -> None:
    drawn = [4, 5, 9, 1]
    calls: list[int] = []

    def draw(i: int) -> int:
        calls.append(i)
        return drawn[i]

    assert verify([4, 5, 6], draw) == 2
    assert calls == [0, 1, 2]


def test_verify_draws_one_past_a_fully_accepted_draft_and_stops_at_an_end() -> None:
    calls: list[int] = []

    def draw(i: int) -> int:
        calls.append(i)
        return [4, 5, 6][i]

    assert verify([4, 5], draw) == 2
    assert calls == [0, 1, 2]
    assert verify([4, 5], lambda i: None) == 0


# A target over four tokens, two steps deep: p(x1) and p(x2 | x1).
FIRST = np.array([0.5, 0.3, 0.15, 0.05])
SECOND = np.array(
    [[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]]
)
# The chi-squared value of 15 degrees of freedom that chance exceeds once in 10,000.
CHI2_15_P0001 = 42.6


def _two_tokens(draft: Sequence[int], rng: np.random.Generator, *, exact: bool) -> tuple[int, int]:
    """Two tokens of the target, drafted then verified; ``exact`` False is a broken rule
    (accept a draft token whenever it is the likeliest one), to show the test can fail."""
    out: list[int] = []

    def target(i: int) -> np.ndarray:
        return FIRST if i == 0 else SECOND[out[0]]

    def draw(i: int) -> int | None:
        p = target(i)
        if not exact and i < len(draft) and int(np.argmax(p)) == draft[i]:
            token = draft[i]
        else:
            token = int(rng.choice(4, p=p))
        out.append(token)
        return token if len(out) < 2 else None

    verify(draft, draw)
    while len(out) < 2:  # the rest without speculation
        out.append(int(rng.choice(4, p=target(len(out)))))
    return out[0], out[1]


def _chi2(draft: Sequence[int], *, exact: bool, n: int = 20_000) -> float:
    rng = np.random.default_rng(1234)
    counts = np.zeros((4, 4))
    for _ in range(n):
        a, b = _two_tokens(draft, rng, exact=exact)
        counts[a, b] += 1
    expected = n * FIRST[:, None] * SECOND
    mask = expected > 0
    assert counts[~mask].sum() == 0, "a token the target never gives was emitted"
    return float((((counts - expected) ** 2)[mask] / expected[mask]).sum())


@pytest.mark.parametrize("draft", [[0, 1], [1, 0], [3, 3], [2]])
def test_verified_drafts_leave_the_target_distribution_unchanged(draft: list[int]) -> None:
    assert _chi2(draft, exact=True) < CHI2_15_P0001


def test_the_distribution_test_catches_a_rule_that_favours_the_draft() -> None:
    assert _chi2([0, 1], exact=False) > CHI2_15_P0001


# --- the policy ----------------------------------------------------------------------


def test_costs_interpolate_between_timed_sizes_and_never_fall() -> None:
    costs = costs_from_timings({1: 0.010, 2: 0.018, 5: 0.016, 9: 0.050}, max_draft=8)
    assert costs[1] == 1.0
    assert costs[2] == pytest.approx(1.8)
    assert costs[5] == pytest.approx(1.8), "a faster larger batch is timing noise"
    assert costs[9] == pytest.approx(5.0)
    assert list(costs) == sorted(costs)
    assert linear_costs(0.5, 2) == (0.0, 1.0, 1.5, 2.0)


def test_costs_are_bounded_by_separate_decodes() -> None:
    """A box busy with other work can time a batch as slower than its tokens one by one."""
    costs = costs_from_timings({1: 0.010, 2: 0.050, 9: 0.300}, max_draft=8)
    assert costs[2] == 2.0 and costs[9] == 9.0
    assert DraftPolicy(VerifyCosts(costs)).length(8) == 0


def test_a_slow_loop_step_makes_verifying_relatively_cheaper() -> None:
    """Steps slower than the timed decodes pay the difference once per step."""

    def pays(costs: VerifyCosts) -> bool:
        policy = DraftPolicy(costs)
        policy.record(1, 0, rejected=True)  # about one drafted token in two accepted
        return policy.length(8) > 0

    costs = VerifyCosts(linear_costs(0.6, 8), one_token_s=0.010)
    costs.observe(0.010)
    assert costs.costs == pytest.approx(linear_costs(0.6, 8))
    assert not pays(costs), "at 0.6 of a step per token, this acceptance does not pay"
    for _ in range(60):
        costs.observe(0.020)  # the loop's steps take twice the timing: half is overhead
    assert costs.costs[9] == pytest.approx((5.8 + 1) / 2, rel=0.01)
    assert pays(costs)
    fixed = VerifyCosts(linear_costs(0.6, 8))
    fixed.observe(0.5)
    assert fixed.costs == linear_costs(0.6, 8), "costs from the settings stay as given"


def test_a_sequence_whose_drafts_are_accepted_drafts_further() -> None:
    policy = DraftPolicy(VerifyCosts(linear_costs(0.6, 8)))
    first = policy.length(8)
    assert 0 < first < 8
    for _ in range(5):
        policy.record(first, first, rejected=False)
    assert policy.length(8) > first


def test_a_sequence_whose_drafts_are_rejected_stops_drafting_then_retries_later() -> None:
    policy = DraftPolicy(VerifyCosts(linear_costs(0.6, 8)))
    drafted = policy.length(8)
    policy.record(drafted, 0, rejected=True)
    assert policy.length(8) == 0
    assert policy.pauses == 1
    waited = 1
    while policy.length(8) == 0:
        waited += 1
    assert waited > 8, "it pauses for a while"
    policy.record(1, 0, rejected=True)
    assert policy.length(8) == 0
    again = 1
    while policy.length(8) == 0:
        again += 1
    assert again > waited, "each failed retry waits longer"


def test_where_verifying_costs_a_full_decode_it_never_drafts() -> None:
    policy = DraftPolicy(VerifyCosts(linear_costs(1.0, 8)))
    assert policy.length(8) == 0


# --- the settings --------------------------------------------------------------------


def test_the_settings_section_is_validated_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().speculative.mode == "ngram"
    with pytest.raises(ValidationError, match="min_ngram"):
        Settings(speculative={"min_ngram": 5, "max_ngram": 4})
    with pytest.raises(ValidationError, match="mode"):
        Settings(speculative={"mode": "eagle"})
    monkeypatch.setenv("EDGE_AGENT_SPECULATIVE__MODE", "off")
    assert Settings().speculative.mode == "off"


# --- the engine, with the real model ---------------------------------------------------


@dataclass
class Engine:
    engine: LlamaCppEngine
    outputs: queue.SimpleQueue[StepOutput]

    @property
    def vocab(self) -> Any:
        return self.engine.vocab

    def prompt(self, text: str) -> list[int]:
        rendered = self.vocab.render_chat([ChatMessage("user", text)])
        return list(self.vocab.tokenize(rendered, add_special=False, parse_special=True))

    def run(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[tuple[list[TokenEvent], SequenceState]]:
        """Submit every prompt at once; each one's events, and its sequence."""
        assert self.engine.loop is not None
        vocab = self.vocab
        sequences = []
        for key, prompt in enumerate(prompts):
            sampler = SamplerChain(vocab.handle, vocab.n_vocab, params, grammar_for(params))
            request = GenerationRequest(f"r{key}", list(prompt), params)
            sequences.append(SequenceState(request=request, sampler=sampler, key=key))
        for sequence in sequences:
            self.engine.loop.submit(sequence)
        events: dict[int, list[TokenEvent]] = {s.key: [] for s in sequences}
        done = 0
        while done < len(sequences):
            for sequence, item in self.outputs.get(timeout=300):
                assert isinstance(item, list), item
                events[sequence.key].extend(item)
                done += item[-1].finish_reason is not None
        return [(events[s.key], s) for s in sequences]

    def one(self, prompt: Sequence[int], params: SamplingParams) -> list[TokenEvent]:
        return self.run([prompt], params)[0][0]


def _engine(manifest: ModelManifest, speculation: SpeculationOptions) -> Iterator[Engine]:
    engine = LlamaCppEngine(engine_options(manifest, speculation=speculation))
    engine.load()
    outputs: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
    engine.start_loop(outputs.put)
    try:
        yield Engine(engine, outputs)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def plain(manifest: ModelManifest) -> Iterator[Engine]:
    yield from _engine(manifest, SpeculationOptions())


@pytest.fixture(scope="module")
def speculating(manifest: ModelManifest) -> Iterator[Engine]:
    yield from _engine(manifest, SPECULATION)


def greedy(max_tokens: int = 96, **overrides: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **overrides)


def text_of(events: Sequence[TokenEvent]) -> tuple[str, list[int | None], str | None]:
    return "".join(e.text for e in events), [e.token_id for e in events], events[-1].finish_reason


@pytest.mark.parametrize("question", [COPY, CHAT])
def test_greedy_text_is_the_same_with_speculation(
    plain: Engine, speculating: Engine, question: str
) -> None:
    prompt = plain.prompt(question)
    [(events, sequence)] = speculating.run([prompt], greedy())
    assert text_of(events) == text_of(plain.one(prompt, greedy()))
    assert sequence.policy is not None and sequence.policy.drafted > 0


def test_a_copying_answer_has_most_drafted_tokens_accepted(speculating: Engine) -> None:
    [(events, sequence)] = speculating.run([speculating.prompt(COPY)], greedy())
    policy = sequence.policy
    assert policy is not None
    assert policy.accepted > 0.8 * policy.drafted > 0
    steps = sum(1 for e in events if e.token_id is not None) - policy.accepted
    assert steps < len(events) / 2, "most tokens came from accepted drafts"


def test_batched_with_others_each_gets_its_solo_text(plain: Engine, speculating: Engine) -> None:
    prompts = [plain.prompt(q) for q in [COPY, CHAT, *CHATS[:2]]]
    alone = [text_of(plain.one(p, greedy())) for p in prompts]
    together = speculating.run(prompts, greedy())
    assert [text_of(events) for events, _ in together] == alone


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 23])
def test_max_tokens_is_honoured_exactly(
    plain: Engine, speculating: Engine, max_tokens: int
) -> None:
    prompt = plain.prompt(COPY)
    events = speculating.one(prompt, greedy(max_tokens))
    assert sum(e.token_id is not None for e in events) == max_tokens
    assert events[-1].finish_reason == "length"
    assert text_of(events) == text_of(plain.one(prompt, greedy(max_tokens)))


def test_the_end_of_the_answer_ends_it_as_without_speculation(
    plain: Engine, speculating: Engine
) -> None:
    prompt = plain.prompt("Repeat exactly: the cat sat on the mat.")
    events = speculating.one(prompt, greedy(200))
    assert events[-1].finish_reason == "stop" and events[-1].token_id is None
    assert text_of(events) == text_of(plain.one(prompt, greedy(200)))


def test_the_context_end_is_honoured(plain: Engine, speculating: Engine) -> None:
    prompt = plain.prompt(COPY)
    filler = prompt[:-8] * (1000 // len(prompt))  # near the 1024-token context's end
    long_prompt = filler[: 1024 - len(prompt) - 20] + prompt
    events = speculating.one(long_prompt, greedy(500))
    assert events[-1].finish_reason in ("length", "stop")
    assert text_of(events) == text_of(plain.one(long_prompt, greedy(500)))


def test_a_follow_up_reusing_the_speculated_answer_keeps_the_text(
    plain: Engine, speculating: Engine
) -> None:
    """The slot's cells after speculation must be exactly the emitted tokens: the next
    turn reuses them as its prefix (rejected drafts' cells would poison it)."""
    first = plain.prompt(COPY)
    answer = [e.token_id for e in speculating.one(first, greedy(60)) if e.token_id is not None]
    follow = [
        *first,
        *answer,
        *plain.vocab.tokenize(" Now again.", add_special=False, parse_special=False),
    ]
    assert text_of(speculating.one(follow, greedy(60))) == text_of(plain.one(follow, greedy(60)))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=80, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=80, temperature=1.0, top_k=40, min_p=0.05, seed=11),
        greedy(80, repetition_penalty=1.3, frequency_penalty=0.2),
        greedy(80, logprobs=3),
        greedy(80, structured_output=StructuredOutput("json_object")),
    ],
    ids=["seeded-top-p", "seeded-top-k-min-p", "penalties", "logprobs", "json"],
)
def test_every_sampler_gives_the_same_tokens_with_speculation(
    plain: Engine, speculating: Engine, params: SamplingParams
) -> None:
    """The chain draws each emitted token once, in order, from the same logits."""
    prompt = plain.prompt(COPY + "\nAnswer as JSON if asked for JSON.")
    events = speculating.one(prompt, params)
    expected = plain.one(prompt, params)
    assert text_of(events) == text_of(expected)
    assert [(e.logprob, e.top_logprobs) for e in events] == [
        (e.logprob, e.top_logprobs) for e in expected
    ]


def test_a_sequence_whose_drafts_miss_stops_drafting(plain: Engine, speculating: Engine) -> None:
    """Free writing repeats a phrase of the prompt now and then, and rarely goes on as
    it did: drafts are offered and mostly refused, so drafting pauses. (A small model's
    free writing may also fall into repeating itself, where drafts pay again: which
    prompt does which depends on the CPU's kernels, so the test asks for one of each
    kind of answer only where it must.)"""
    prompts = [plain.prompt(q) for q in FREE_WRITING]
    results = [speculating.run([p], greedy(150))[0] for p in prompts]
    policies = [s.policy for _, s in results if s.policy is not None]
    refused = [p for p in policies if p.drafted and p.accepted < 0.5 * p.drafted]
    assert refused, "some free writing had most of its drafts refused"
    for policy in refused:
        assert policy.pauses > 0, "a sequence whose drafts were mostly refused paused"
    for prompt, (events, _) in zip(prompts, results, strict=True):
        assert text_of(events) == text_of(plain.one(prompt, greedy(150)))


# --- through the daemon --------------------------------------------------------------

CHAT_PATH = "/infer/openai/v1/chat/completions"


async def test_the_daemon_with_speculation_answers_as_without_it(make_client: Any) -> None:
    """The setting reaches the engine process; stop strings, usage and streams are as
    without speculation, though several tokens may arrive in one step."""
    cases: list[dict[str, Any]] = [
        {"max_tokens": 80},
        {"max_tokens": 80, "stop": ["lamp"]},
        {"max_tokens": 80, "stop": ["ships"], "stream": True},
    ]
    answers: dict[str, list[Any]] = {}
    for mode in ("off", "ngram"):
        client = await make_client(speculative={"mode": mode, "verify_cost": 0.6})
        answers[mode] = []
        for case in cases:
            body = {"messages": [{"role": "user", "content": COPY}], "temperature": 0, **case}
            response = await client.post(CHAT_PATH, json=body)
            assert response.status == 200
            if case.get("stream"):
                answers[mode].append(await response.text())
                continue
            answer = await response.json()
            choice, usage = answer["choices"][0], answer["usage"]
            answers[mode].append(
                (choice["message"]["content"], choice["finish_reason"], usage["completion_tokens"])
            )
        await client.close()
    assert answers["ngram"][1][1] == "stop"
    assert _stream_text(answers["ngram"][2]) == _stream_text(answers["off"][2])
    assert answers["ngram"][:2] == answers["off"][:2]


def _stream_text(stream: str) -> tuple[str, list[str]]:
    """A chat stream's text and finish reasons (ids and times differ between runs)."""
    text, reasons = "", []
    for line in stream.splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[len("data: ") :])
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    return text, reasons

"""Where a new sequence goes: busy slots kept in one run, cached prefixes reused when worth it.

llama.cpp decodes one token of each busy slot in a single pass only when the slots
form a consecutive run; these pin the rule that keeps them so (llamacpp_batch).
"""

from __future__ import annotations

from edge_agent.engine.backends.llamacpp_batch import RUN_COST_TOKENS, Slot, choose_slot

SYSTEM = list(range(100, 125))  # a shared chat prefix, 25 tokens


def slots(busy: set[int], cached: dict[int, list[int]] | None = None, n: int = 8) -> list[Slot]:
    cached = cached or {}
    return [Slot(i, list(cached.get(i, [])), i in busy) for i in range(n)]


def test_an_idle_engine_takes_the_longest_cached_prefix() -> None:
    prompt = [*SYSTEM, 1, 2, 3]
    slot, reuse = choose_slot(
        slots(set(), {2: SYSTEM[:10], 5: [*SYSTEM, 9]}), prompt, prefix_cache=True
    )
    assert (slot.index, reuse) == (5, len(SYSTEM))


def test_the_whole_prompt_cached_still_leaves_one_token_to_decode() -> None:
    prompt = [*SYSTEM, 1, 2]
    slot, reuse = choose_slot(slots(set(), {3: [*prompt, 7, 8]}), prompt, prefix_cache=True)
    assert (slot.index, reuse) == (3, len(prompt) - 1)


def test_a_new_sequence_joins_the_run_of_busy_slots() -> None:
    prompt = [*SYSTEM, 1]
    # Slot 6 holds the shared prefix, but taking it would split 0-1 and 6 into two passes.
    slot, reuse = choose_slot(slots({0, 1}, {6: SYSTEM}), prompt, prefix_cache=True)
    assert (slot.index, reuse) == (2, 0)


def test_a_hole_in_the_run_is_filled_first() -> None:
    slot, _ = choose_slot(slots({0, 1, 3, 4}), [1, 2, 3], prefix_cache=True)
    assert slot.index == 2


def test_a_long_cached_prefix_is_worth_an_extra_run() -> None:
    long_system = list(range(1000, 1000 + 2 * RUN_COST_TOKENS))
    prompt = [*long_system, 1]
    slot, reuse = choose_slot(slots({0}, {6: long_system}), prompt, prefix_cache=True)
    assert (slot.index, reuse) == (6, len(long_system))


def test_when_the_queue_fills_every_free_slot_only_the_prefix_counts() -> None:
    prompt = [*SYSTEM, 1]
    slot, reuse = choose_slot(
        slots({0, 1}, {6: SYSTEM}), prompt, prefix_cache=True, keep_runs=False
    )
    assert (slot.index, reuse) == (6, len(SYSTEM))


def test_without_prefix_cache_nothing_is_reused_and_runs_still_count() -> None:
    slot, reuse = choose_slot(slots({4}, {0: SYSTEM}), [*SYSTEM, 1], prefix_cache=False)
    assert (slot.index, reuse) == (3, 0)


def test_among_equals_the_emptiest_cache_is_taken() -> None:
    # No reuse anywhere, every free slot extends the run 2-3: keep the fuller caches.
    slot, _ = choose_slot(slots({2, 3}, {1: [5, 6, 7], 4: [8]}), [1, 2], prefix_cache=True)
    assert slot.index == 4


def test_a_short_shared_prefix_does_not_overwrite_a_long_cached_prompt() -> None:
    # Slot 0 holds a document asked about before; a new question shares only the chat
    # template's prefix with it. An empty slot costs 25 tokens of prefill more, and keeps
    # the document's 200 for when it is asked about again.
    document = [*SYSTEM, *range(2000, 2200)]
    slot, reuse = choose_slot(slots(set(), {0: document}), [*SYSTEM, 1, 2], prefix_cache=True)
    assert (slot.index, reuse) == (1, 0)


def test_a_follow_up_turn_still_reuses_its_conversation() -> None:
    # The next turn repeats the conversation so far and drops only what followed it.
    turn = [*SYSTEM, *range(2000, 2200)]
    cached = [*turn, *range(3000, 3040)]  # the answer, and the template's end of turn
    prompt = [*turn, *range(3000, 3030), 9, 9]
    slot, reuse = choose_slot(slots(set(), {3: cached}), prompt, prefix_cache=True)
    assert (slot.index, reuse) == (3, len(turn) + 30)

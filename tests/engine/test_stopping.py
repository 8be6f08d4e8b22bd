"""Stop strings: cut at the first stop, hold back only what could still start one."""

from __future__ import annotations

from edge_agent.engine.stopping import StopMatcher


def feed_all(matcher: StopMatcher, deltas: list[str]) -> str:
    return "".join(matcher.feed(d) for d in deltas)


def test_without_stops_text_passes_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc" and matcher.flush() == ""


def test_a_stop_inside_one_delta_cuts_there() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello END world") == "hello "
    assert matcher.matched == "END"


def test_a_stop_split_across_deltas_is_found() -> None:
    matcher = StopMatcher(["\n\n"])
    assert feed_all(matcher, ["one\n", "\ntwo"]) == "one"
    assert matcher.matched == "\n\n"


def test_a_possible_start_of_a_stop_is_held_then_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ab ST") == "ab "
    assert matcher.feed("ART") == "START"
    assert matcher.matched is None


def test_held_text_is_flushed_at_the_end() -> None:
    matcher = StopMatcher(["xyz"])
    assert matcher.feed("abcxy") == "abc"
    assert matcher.flush() == "xy"
    assert matcher.flush() == ""


def test_the_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.matched == "lo"


def test_nothing_is_sent_after_a_match() -> None:
    matcher = StopMatcher(["."])
    assert matcher.feed("a.b") == "a"
    assert matcher.feed("more") == ""

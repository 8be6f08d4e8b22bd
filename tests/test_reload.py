"""SIGHUP's rule, without a daemon: what changes at once and what waits for a restart."""

from __future__ import annotations

from edge_agent.config import Settings
from edge_agent.server.reload import plan_reload

RUNNING = Settings(port=8080, max_queue=64, auth_token=None, parallel=4)


def test_nothing_changed_is_nothing_to_do() -> None:
    plan = plan_reload(RUNNING, RUNNING.model_copy())
    assert (plan.applied, plan.needs_restart) == ([], [])
    assert plan.settings == RUNNING


def test_live_settings_apply_at_once() -> None:
    new = RUNNING.model_copy(
        update={"auth_token": "s3cret", "max_queue": 8, "request_timeout_s": 5.0}
    )
    plan = plan_reload(RUNNING, new)
    assert sorted(plan.applied) == ["auth_token", "max_queue", "request_timeout_s"]
    assert plan.needs_restart == []
    assert (plan.settings.auth_token, plan.settings.max_queue) == ("s3cret", 8)


def test_other_settings_keep_their_running_value_and_are_named() -> None:
    new = RUNNING.model_copy(update={"port": 9000, "parallel": 8, "shutdown_grace_s": 1.0})
    plan = plan_reload(RUNNING, new)
    assert plan.applied == ["shutdown_grace_s"]
    assert sorted(plan.needs_restart) == ["parallel", "port"]
    assert (plan.settings.port, plan.settings.parallel) == (8080, 4), "state stays truthful"


def test_the_running_settings_are_not_changed_in_place() -> None:
    plan_reload(RUNNING, RUNNING.model_copy(update={"max_queue": 1}))
    assert RUNNING.max_queue == 64


def test_a_new_model_is_applied_by_a_swap_not_a_restart() -> None:
    plan = plan_reload(RUNNING, RUNNING.model_copy(update={"model": "another-model"}))
    assert plan.applied == ["model"] and plan.needs_restart == []
    assert plan.settings.model == "another-model"

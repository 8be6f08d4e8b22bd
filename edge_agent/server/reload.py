"""SIGHUP: apply a reloaded configuration where that needs no restart, and say what does."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.config import Settings
from edge_agent.server.state import AppState

# Read per request (or per admission), so a new value takes effect at once.
_LIVE = frozenset(
    {
        "auth_token",
        "dashboard_access",
        "request_timeout_s",
        "max_queue",
        "shutdown_grace_s",
        "sse_ping_s",
        "logs_access",
        # Served by a model swap after the reload (server/model_swap.py).
        "model",
        "model_swap",
        "model_swap_access",
    }
)


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings  # the running settings with the live changes applied
    applied: list[str]
    needs_restart: list[str]


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """What a reload to ``new`` changes now, and what waits for a restart."""
    changed = [name for name in Settings.model_fields if getattr(old, name) != getattr(new, name)]
    applied = [name for name in changed if name in _LIVE]
    needs_restart = [name for name in changed if name not in _LIVE]
    # Keep the running values of what cannot change live, so state stays truthful.
    settings = old.model_copy(update={name: getattr(new, name) for name in applied})
    return ReloadPlan(settings, applied, needs_restart)


def apply_reload(state: AppState, new: Settings) -> tuple[list[str], list[str]]:
    """Swap in ``new`` for what can change live; return (applied, needing a restart)."""
    plan = plan_reload(state.settings, new)
    state.settings = plan.settings
    for served in state.all_served():
        served.scheduler.reconfigure(
            max_queue=state.settings.max_queue, request_timeout_s=state.settings.request_timeout_s
        )
    return plan.applied, plan.needs_restart

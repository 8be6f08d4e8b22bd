"""How an engine failure reads to a client: the one place engine errors become HTTP ones."""

from __future__ import annotations

from edge_agent.engine.types import BackendError, EngineRestarted, EngineUnavailable
from edge_agent.errors import ApiError, EngineRestarting, InternalError
from edge_agent.errors import EngineRestarted as EngineRestartedError


def api_error_for(exc: BackendError) -> ApiError:
    """503s a client may retry for an engine that died or is restarting; else a 500."""
    if isinstance(exc, EngineRestarted):
        return EngineRestartedError(str(exc))
    if isinstance(exc, EngineUnavailable):
        return EngineRestarting(str(exc))
    return InternalError(f"generation failed: {exc}")

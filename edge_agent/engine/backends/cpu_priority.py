"""CPU priority for an engine loading beside a serving one.

On a box whose cores the serving engine keeps busy, a second engine loading, probing
and self-checking at the same priority does more than share the cores: both engines'
threads meet at a barrier for every graph node, and a thread preempted by the other
engine stalls its whole step. A candidate model therefore loads at the lowest priority
(nice 19), taking only the cycles the serving engine leaves, and is raised to the
daemon's own priority when it takes over. Raising it needs the right to lower a nice
value: root, or ``LimitNICE=`` in the unit (systemd/edge-agent.service sets it).
"""

from __future__ import annotations

import os
from pathlib import Path

BACKGROUND_NICE = 19


def lower_own_priority() -> None:
    """Called first thing in an engine or probe process started in the background; the
    threads it starts later inherit it."""
    os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)


def raise_to_daemon_priority(pid: int) -> str | None:
    """Every thread of ``pid`` back to this process's nice value; why not, if refused."""
    target = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        tids = [int(name) for name in os.listdir(Path("/proc") / str(pid) / "task")]
    except OSError as exc:
        return f"cannot list the engine's threads: {exc}"
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
        except PermissionError:
            return (
                f"not allowed to raise the engine back to nice {target} (needs root or "
                "LimitNICE in the unit); it keeps serving at nice "
                f"{BACKGROUND_NICE}"
            )
    return None

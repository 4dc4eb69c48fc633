"""The errors a run met, by role and kind: `errors/<role>/<kind>` in each metrics line (counts over
the run so far, only those that happened), `keel_errors{role,kind}` on the controller's /metrics,
and a line of `keel status`.

Roles: rollout, reward, reference, learner. Kinds:
  lost          an actor died (killed, out of memory, its node gone)
  timeout       an actor gave no answer within its deadline (controller.*_timeout_s)
  unavailable   a reward server answered UNAVAILABLE or RESOURCE_EXHAUSTED (each failed try)
  exhausted     a call failed the supervisor's attempts and gave up (the run stops, or starts again)
  outage        a service stayed unreachable past its budget (the run stopped with a checkpoint)

Each error is counted once. One recovered in place (a worker replaced, a call sent again, a server
tried again) is counted where it is recovered. One that ends the controller (`RoleFailed`,
`RoleOutage`, which carry their role and kind) is counted by `RunRestarts`, which owns the tally,
so the counts go on across whole-run restarts. A resumed run counts from zero again.
"""

from __future__ import annotations

import threading

KINDS = ("lost", "timeout", "unavailable", "exhausted", "outage")


class ErrorTally:
    """Thread-safe counts by (role, kind); the reward and reference calls run on threads of their own."""

    def __init__(self):
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, role: str, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r} (one of {', '.join(KINDS)})")
        with self._lock:
            self._counts[role, kind] = self._counts.get((role, kind), 0) + 1

    def count(self, role: str, kind: str) -> int:
        with self._lock:
            return self._counts.get((role, kind), 0)

    def metrics(self) -> dict[str, float]:
        """`errors/<role>/<kind>` for every count above zero, in a stable order."""
        with self._lock:
            return {f"errors/{role}/{kind}": float(n) for (role, kind), n in sorted(self._counts.items())}


def role_of(who: str) -> str:
    """The role in a name such as "learner rank 1", "rollout worker 0" or "reward actor 2"."""
    return who.split()[0] if who else "run"

"""Fault injection for the flush (tests only): `crash_point(name)` hard-exits the process (os._exit(70): no
cleanup, no commit, no finally) when the environment variable AIKIT_CRASH_AT equals `name`. Tests run a flush in
a subprocess with it set and check that the next flush bills every token exactly once.

Points: after_read (a batch read from Redis, not stored), after_store (committed to Postgres, not yet removed
from Redis), after_ack, after_seal (reports sealed, nothing sent) and after_send (Stripe accepted an event, the
flush has not recorded it).
"""

from __future__ import annotations

import os

CRASH_ENV = "AIKIT_CRASH_AT"
CRASH_EXIT_CODE = 70
CRASH_POINTS = ("after_read", "after_store", "after_ack", "after_seal", "after_send")


def crash_point(name: str) -> None:
    """Hard-exit here when AIKIT_CRASH_AT names this point. Unset in production: one environment lookup per
    batch or report."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)

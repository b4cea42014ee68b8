"""Deterministic fault injection for tests of what a crash leaves behind.

    COE_DIST_FAULT="checkpoint.before_rename@step4:kill"   SIGKILL this process there, at step 4
    COE_DIST_FAULT="checkpoint.before_rename:sleep=30"      pause 30 s there (every time)

Several faults are separated by commas. Unset (the normal case), `fault_point` is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time


def fault_point(name: str, step: int | None = None) -> None:
    spec = os.environ.get("COE_DIST_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        point, _, at = where.partition("@")
        if point != name or (at and at != f"step{step}"):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep="):
            time.sleep(float(action.removeprefix("sleep=")))

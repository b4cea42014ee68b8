"""Deterministic fault injection for the reliability tests: real signals, real errors, at a chosen place.

    COE_DIST_FAULT="POINT[@stepN][@rankR][@restartK]:ACTION[,...]"

    checkpoint.before_rename@step4:kill      SIGKILL this process there, at step 4
    train.step@step5@rank1@restart0:kill     rank 1 dies at the start of step 5, only in the first attempt
                                             of a torchrun job (TORCHELASTIC_RESTART_COUNT=0)
    train.step@step3@rank1:stop              rank 1 SIGSTOPs itself (a hung rank)
    train.loss@step4@rank0:nan               the caller multiplies its loss by nan
    checkpoint.before_rename:raise=ENOSPC    OSError(ENOSPC) there: a full disk
    checkpoint.before_rename:sleep=30        pause 30 s there (every time)

Actions done here: kill, stop, sleep=SECONDS, raise=ERRNO_NAME, exit=CODE. Any other action (nan, inf,
corrupt) is returned to the caller, which applies it. `@stepN` compares with the step the caller passes,
or else with the step the training loop last announced through `set_step`. Points in the code:

    train.step        start of a training step, before the rank's heartbeat      (loop)
    train.loss        a micro-step's loss: nan | inf                               (loop)
    train.grad        a micro-step's gradient: inf (the loss stays finite)         (loop)
    dispatch.counts   the expert counts one rank sends: corrupt                    (parallel/dispatch)
    checkpoint.before_rename   a complete checkpoint, before it is renamed         (train/checkpoint)
    check.gemm        each timed GEMM call of `coe-dist check`: sleep=S (a slow rank)   (check/speed)
    check.layer       the device layer of `coe-dist check`: corrupt (a wrong layer)     (check/layer)

Unset (the normal case), `fault_point` is one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from coe_dist.errors import UserError

VAR = "COE_DIST_FAULT"
LOCAL_ACTIONS = ("kill", "stop")
VALUE_ACTIONS = ("nan", "inf", "corrupt")
_current_step: int | None = None


class FaultSpecError(UserError, ValueError):
    """COE_DIST_FAULT is malformed."""


def set_step(step: int | None) -> None:
    """The training loop announces the step it is in, for points that do not know it (dispatch)."""
    global _current_step
    _current_step = step


def restart_count() -> int:
    """How many times the launcher restarted this job: torchrun's or Slurm's requeue counter, else 0."""
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        raw = os.environ.get(var, "").strip()
        if raw.isdigit():
            return int(raw)
    return 0


def parse(spec: str) -> list[tuple[str, dict[str, int], str]]:
    """'p@step4@rank1:kill,q:sleep=2' -> [(p, {step: 4, rank: 1}, kill), (q, {}, sleep=2)]."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        where, sep, action = item.partition(":")
        point, *filters = where.split("@")
        if not sep or not point or not action:
            raise FaultSpecError(f"{VAR}={spec!r}: {item!r} is not POINT[@stepN][@rankR][@restartK]:ACTION; "
                                 "unset it, or write e.g. train.step@step5@rank1:kill")
        conds: dict[str, int] = {}
        for f in filters:
            key = next((k for k in ("step", "rank", "restart") if f.startswith(k) and f[len(k):].isdigit()), None)
            if key is None:
                raise FaultSpecError(f"{VAR}={spec!r}: filter '@{f}' is not stepN, rankR or restartK")
            conds[key] = int(f[len(key):])
        name, _, arg = action.partition("=")
        ok = (action in LOCAL_ACTIONS or action in VALUE_ACTIONS or (name == "sleep" and _is_number(arg))
              or (name == "exit" and arg.isdigit()) or (name == "raise" and isinstance(getattr(errno, arg, None), int)))
        if not ok:
            raise FaultSpecError(f"{VAR}={spec!r}: unknown action {action!r}; use kill, stop, sleep=S, exit=N, "
                                 f"raise=ERRNO (e.g. ENOSPC), {', '.join(VALUE_ACTIONS)}")
        out.append((point, conds, action))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_spec() -> None:
    """Fail at start-up, not at the fault point, when COE_DIST_FAULT is malformed."""
    spec = os.environ.get(VAR)
    if spec:
        parse(spec)


def fault_point(name: str, step: int | None = None) -> str | None:
    """Fire the faults configured for this point; return a value action (nan, inf, corrupt) for the caller."""
    spec = os.environ.get(VAR)
    if not spec:
        return None
    step = _current_step if step is None else step
    returned = None
    for point, conds, action in parse(spec):
        if point != name:
            continue
        if "step" in conds and conds["step"] != step:
            continue
        if "rank" in conds and conds["rank"] != int(os.environ.get("RANK", "0") or 0):
            continue
        if "restart" in conds and conds["restart"] != restart_count():
            continue
        kind, _, arg = action.partition("=")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif kind == "sleep":
            time.sleep(float(arg))
        elif kind == "exit":
            os._exit(int(arg))
        elif kind == "raise":
            code = getattr(errno, arg)
            raise OSError(code, f"{os.strerror(code)} (injected by {VAR} at {name})")
        else:
            returned = action
    return returned

"""What the training loop watches besides the loss: non-finite numbers, router collapse, and ranks that
stop answering.

    NonFiniteGuard   train.nan_policy: `stop` or `skip` a step whose loss or gradient norm is not finite;
                     with skip, stop after train.max_consecutive_nan skipped steps in a row
    CollapseWatch    warns when one expert's share of a (layer, iteration)'s tokens goes more than
                     log.collapse_share of the way from an even split to all of them, on log.collapse_steps
                     logging steps in a row
    Heartbeat        each rank writes the step it is starting into the rendezvous store; when a collective
                     fails, the survivors read them to name the rank that stopped answering
    collective_failure   turns a timed-out or broken collective into a one-line CollectiveError naming the
                     operation, the step and, where known, the rank
    set_group_timeouts   parallel.timeout_s for every process group, DeepSpeed's expert groups included
                     (torch gives groups made by new_group() without a timeout its 30-minute default)
"""

from __future__ import annotations

import atexit
import os
import re
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from coe_dist.errors import UserError


class NumericsError(UserError, RuntimeError):
    """Training stopped on non-finite loss or gradients; the message names the step and the saved state."""


class CollectiveError(UserError, RuntimeError):
    """A collective timed out or lost a peer; the message names the operation, the step and the rank."""


# ---------------------------------------------------------------- non-finite loss and gradients

@dataclass
class NonFiniteGuard:
    policy: str  # stop | skip
    max_consecutive: int
    skipped_total: int = 0  # over the whole run, resumes included (saved in checkpoints)
    streak: list[int] = field(default_factory=list)  # the steps skipped in a row, up to now

    def record(self, step: int, bad: bool) -> str:
        """'ok', 'skip' or 'stop' for a step whose loss or gradients were (not) finite."""
        if not bad:
            self.streak = []
            return "ok"
        self.skipped_total += 1
        self.streak.append(step)
        if self.policy == "stop" or len(self.streak) >= self.max_consecutive:
            return "stop"
        return "skip"


# ---------------------------------------------------------------- router collapse

_LOAD_TAG = re.compile(r"^moe/layer(\d+)/iter(\d+)/expert_load$")


class CollapseWatch:
    """Consecutive logging steps on which one expert's share of the tokens went more than `share` of the way from
    an even split to all of them, per (layer, iteration).

    Loads are token copies (top_k per token, distinct experts), so expert e's share of the tokens is
    load[e] * top_k / sum(load): 1.0 means every token went to e, top_k / num_experts is a perfect balance.
    The threshold is measured from that balance, not from 0: with top_k = num_experts (a dense control) every
    expert takes every token and nothing can collapse, and with top_k / num_experts near `share` a raw share
    would warn at a near-perfect balance.
    """

    def __init__(self, share: float, steps: int, top_k: int) -> None:
        self.share, self.steps, self.top_k = share, steps, top_k
        self.runs: dict[tuple[int, int], list[int]] = {}  # (layer, iteration) -> steps of the current run

    def update(self, step: int, hists: dict) -> tuple[dict[str, float], list[str]]:
        """(scalars to log, warnings) from this logging step's expert-load histograms."""
        scalars: dict[str, float] = {}
        warnings: list[str] = []
        for tag, counts in hists.items():
            m = _LOAD_TAG.match(tag)
            total = float(counts.sum())
            if m is None or total <= 0:
                continue
            layer, it = int(m.group(1)), int(m.group(2))
            top = int(counts.argmax())
            share = float(counts[top]) * self.top_k / total
            scalars[f"moe/layer{layer}/iter{it}/max_token_share"] = share
            even = self.top_k / len(counts)
            run = self.runs.setdefault((layer, it), [])
            if share <= even + self.share * (1 - even):
                run.clear()
                continue
            run.append(step)
            if len(run) == self.steps:  # once per run of collapsed steps
                warnings.append(
                    f"coe-dist: warning: router collapse in layer {layer} iteration {it}: expert {top} took "
                    f"{share:.0%} of the tokens (an even split is {even:.0%}; log.collapse_share={self.share:g}) "
                    f"on {len(run)} logging steps in a row (steps {run[0]}..{step}); raise moe.aux_loss_coef or "
                    "lower optim.lr")
        return scalars, warnings


# ---------------------------------------------------------------- hangs and dead peers

def _store_client(wait_s: float):
    """A client of the rendezvous store of its own (the agent's, or rank 0's TCPStore at MASTER_ADDR:PORT),
    with a short timeout: a stopped store host must not hold a heartbeat for parallel.timeout_s."""
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=wait_s))
    except Exception:  # no store to reach: the errors name no rank, that is all
        return None


class Heartbeat:
    """The step each rank last started, kept in the rendezvous store (torchrun's agent, or rank 0's TCPStore)."""

    def __init__(self, rank: int, world_size: int, restart: int, wait_s: float = 5.0) -> None:
        self.rank, self.world_size = rank, world_size
        self.prefix = f"coe-dist/heartbeat/{restart}/"  # a restarted job does not read the last attempt's beats
        self.store = _store_client(wait_s) if world_size > 1 else None
        self.unreachable = False

    def beat(self, step: int) -> None:
        if self.store is not None and not self.unreachable:
            try:
                self.store.set(f"{self.prefix}{self.rank}", str(step))
            except Exception:
                self.unreachable = True  # the store's host is gone: the next collective will fail and say so

    def laggards(self, step: int) -> str:
        """Which ranks are behind this one, in words; '' when nothing is known."""
        if self.store is None:
            return ""
        try:
            if self.unreachable:
                raise TimeoutError
            behind, missing = [], []
            for r in range(self.world_size):
                key = f"{self.prefix}{r}"
                if not self.store.check([key]):
                    missing.append(r)
                    continue
                last = int(self.store.get(key).decode())
                if last < step:
                    behind.append(f"rank {r} last started step {last}")
        except Exception:
            return ("the rendezvous store does not answer either (it lives in rank 0's process unless torchrun "
                    "hosts it): rank 0 stopped, died or already exited")
        if missing:
            behind.append(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never started a step")
        if not behind:
            return f"every rank started step {step}"
        return "; ".join(behind) + f" (this rank is at step {step}): stopped, dead or hung there"


# What gloo, NCCL and the TCPStore say when a peer is gone or silent (not: any error that mentions a backend).
_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "closed by peer", "broken pipe",
                  "connection refused", "read error", "write error", "socket", "remote process exited",
                  "network error", "watchdog")


# The expert all-to-alls are issued with async_op=True: a timeout or a lost peer surfaces in the wait, outside
# torch.distributed's own frames.
_ASYNC_WAITS = {("dispatch.py", "wait"): "all_to_all_single"}


def _operation(exc: BaseException) -> str | None:
    """The innermost torch.distributed collective in the traceback, e.g. all_to_all_single."""
    name = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.endswith("distributed_c10d.py") and not frame.name.startswith("_"):
            name = frame.name
        name = _ASYNC_WAITS.get((os.path.basename(frame.filename), frame.name), name)
    return name


def collective_failure(exc: BaseException, phase: str, step: int, rank: int, timeout_s: float,
                       heartbeat: Heartbeat | None) -> CollectiveError | None:
    """A one-line error for a collective that timed out or lost its peer; None for any other exception."""
    if isinstance(exc, UserError) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip()
    network = isinstance(exc, (getattr(dist, "DistNetworkError", ()), getattr(dist, "DistStoreError", ())))
    if not network and not any(w in text.lower() for w in _FAILURE_WORDS):
        return None
    op = _operation(exc)
    what = f"{op} in the {phase}" if op else f"a collective in the {phase}"
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    how = f"timed out after {timeout_s:g} s (parallel.timeout_s)" if timed_out else "lost a peer"
    detail = re.sub(r"\s+", " ", re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text))
    detail = detail.split(". ")[0].rstrip(".")[:300]  # gloo's first sentence, without its source location
    suspects = heartbeat.laggards(step) if heartbeat is not None else ""
    if suspects.startswith("every rank started"):
        suspects += ": the stall is inside the step" if timed_out else ": the peer failed inside the step"
    message = (f"rank {rank}: {what} {how} at step {step}"
               f"{': ' + suspects if suspects else ''} [{detail}]; check that rank's log and host; under "
               "torchrun --max-restarts the job restarts from the newest checkpoint")
    return CollectiveError(message)


def exit_without_teardown(code: int = 1) -> None:
    """After a broken collective, skip interpreter teardown at exit: gloo's threads would abort() it (exit 134)."""
    atexit.register(os._exit, code)


def set_group_timeouts(timeout_s: float) -> int:
    """Give every process group made so far the collective timeout; returns how many were set."""
    if not dist.is_initialized():
        return 0
    timeout = timedelta(seconds=timeout_s)
    groups = set()
    try:
        groups.update(dist.distributed_c10d._world.pg_map.keys())
    except Exception:
        groups.add(dist.group.WORLD)
    n = 0
    for group in groups:
        if group is None or not hasattr(group, "set_timeout"):
            continue
        try:
            group.set_timeout(timeout)
            n += 1
        except Exception:  # a backend without the setter keeps its own timeout
            pass
    return n

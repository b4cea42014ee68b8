"""What every `coe-dist` subcommand's argument parser shares: counts checked as they are parsed, and errors
that are one line.

    "--nproc 0" -> positive_int -> argparse error -> OneLineParser.error -> one line on stderr, exit 2
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one >= {minimum}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give a whole number >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (processes, tokens, batches, repeats, GPUs...)."""
    return _whole_number(text, 1)


def nonnegative_int(text: str) -> int:
    """A count that may be 0 (warm-up rounds)."""
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    """Seconds and other amounts that must be finite and above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one > 0, e.g. 60") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give a finite number > 0, e.g. 60")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before its error; this prints the error alone, naming --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)

"""The base of every error a user can fix (bad data, a bad launch, a bad checkpoint): the CLI prints
its message as one line, without a traceback, and exits 1. Bad configuration is `ConfigError` (exit 2)."""


class UserError(Exception):
    """A problem the user can fix; the message names the thing, the problem and the fix."""

"""The one exception type of the data package."""

from __future__ import annotations

from coe_dist.errors import UserError


class DataError(UserError, ValueError):
    """Bad data or tokenizer input. The message names the file, the problem and the fix."""

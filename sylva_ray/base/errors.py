"""The errors that are the user's to fix, by name: found again inside the text Ray makes of them.

A task's error reaches the caller as ``RayTaskError`` with the original as ``cause``; an actor's
failed constructor reaches it only as the *text* of an ``ActorDiedError``. Both the CLI (one line,
exit code 2, no traceback) and the driver (a client actor that could not start) read the last
named user error out of that text with ``named_user_error``.
"""

from __future__ import annotations

import re
from typing import Optional

#: Errors that are the user's to fix: reported as one clear message, exit code 2, no traceback.
USER_ERRORS = (
    "ConfigError",
    "PlacementError",
    "GPUMemoryError",
    "ActorStartError",
    "ModelSourceError",
    "PartitionError",
    "RunDirectoryError",
)
_NAMED_ERROR = re.compile(r"(?:^|\s|\.)(" + "|".join(USER_ERRORS) + r"): (.+)$", re.MULTILINE)


def named_user_error(text: str) -> Optional[tuple[str, str]]:
    """The last ``(error name, message)`` of a user error named in ``text``, or None."""
    matches = _NAMED_ERROR.findall(text)
    return (matches[-1][0], matches[-1][1].strip()) if matches else None

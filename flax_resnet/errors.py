"""The one error base class of the project.

Every failure a user can fix (missing data, a damaged checkpoint, weights that do not fit, a run that cannot
continue) is a ``FlaxResnetError`` whose message names the fix. The command line catches this class once and
prints the message as one paragraph with exit code 1; anything else is a bug and keeps its traceback.
Each layer defines its own subclass next to the code that raises it (``DataError``, ``PortError``, ...).
"""

from __future__ import annotations

__all__ = ["FlaxResnetError"]


class FlaxResnetError(Exception):
    """A failure the user can fix; the message says how."""

"""The one error base class of the project, and the check for optional dependencies.

Every failure a user can fix (missing data, a damaged checkpoint, weights that do not fit, a run that cannot
continue, a missing optional dependency) is a ``FlaxResnetError`` whose message names the fix. The command line
catches this class once and prints the message as one paragraph with exit code 1; anything else is a bug and keeps
its traceback. Each layer defines its own subclass next to the code that raises it (``DataError``, ``PortError``,
...).
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "FlaxResnetError", "MissingExtraError", "installed", "missing_extra", "require"]

# optional module -> the pip extra that installs it (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, str] = {"torch": "torch", "tensorflow_datasets": "data", "PIL": "data",
                          "importlib_resources": "data", "matplotlib": "plots"}


class FlaxResnetError(Exception):
    """A failure the user can fix; the message says how."""


class MissingExtraError(FlaxResnetError):
    """An optional dependency is not installed; the message names the ``pip install`` that brings it."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (torch alone takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without a spec
        return False


def require(module: str, purpose: str) -> None:
    """Raise ``MissingExtraError`` unless ``module`` (a key of ``EXTRAS``) is installed, before any work that needs
    it starts: ``purpose`` says what needs it (``"--framework torch"``)."""
    if not installed(module):
        raise missing_extra(module, purpose)


def missing_extra(module: str, purpose: str) -> MissingExtraError:
    """The error for ``module`` (a key of ``EXTRAS``) not installed: one line naming the pip extra."""
    return MissingExtraError(f"{purpose} needs {module}, which is not installed here: "
                             f"pip install 'flax-resnet[{EXTRAS[module]}]'")

"""The one error base class of the project, and the check for optional dependencies.

Every failure a user can fix (missing data, a damaged checkpoint, weights that do not fit, a missing optional
dependency, ...) is a ``FlaxResnetError`` whose message names the fix; the command line prints it as one paragraph
with exit code 1, and anything else is a bug that keeps its traceback. Each layer subclasses it next to the code
that raises it (``DataError``, ``PortError``, ...).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

__all__ = ["EXTRAS", "FlaxResnetError", "Note", "installed", "missing_extra", "require", "require_all"]

# optional module -> the pip extra that installs it (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, str] = {"torch": "torch", "tensorflow_datasets": "data", "PIL": "data",
                          "importlib_resources": "data", "matplotlib": "plots", "tensorboardX": "tensorboard"}


class FlaxResnetError(Exception):
    """A failure the user can fix; the message says how."""


class Note(UserWarning):
    """Something done on the user's behalf that they should know of (weights unwrapped or cast): a warning, so a
    caller can filter it; the command line prints it as one ``note:`` line."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (torch alone takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without a spec
        return False


def require(module: str, purpose: str) -> None:
    """Fail unless ``module`` (a key of ``EXTRAS``) is installed, before any work that needs it starts: ``purpose``
    says what needs it (``"--framework torch"``)."""
    if not installed(module):
        raise missing_extra(module, purpose)


def require_all(modules: Sequence[str], purpose: str) -> None:
    """``require`` for several modules at once: one error naming every missing one, so that the user installs
    what is needed in one go rather than learning of the next one after the first install."""
    if missing := [module for module in modules if not installed(module)]:
        raise missing_extra(missing, purpose)


def missing_extra(module: str | Sequence[str], purpose: str) -> FlaxResnetError:
    """The error for ``module`` (a key of ``EXTRAS``, or several) not installed: one line naming the pip extras."""
    modules = [module] if isinstance(module, str) else list(module)
    extras = ",".join(dict.fromkeys(EXTRAS[m] for m in modules))
    return FlaxResnetError(f"{purpose} needs {' and '.join(modules)}, which {'is' if len(modules) == 1 else 'are'} "
                           f"not installed here: pip install 'flax-resnet[{extras}]'")

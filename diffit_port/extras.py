"""Which optional dependencies a command needs, and the one line a runtime-only install prints instead of a
traceback when they are missing (torch-free: importable on any install)."""

from __future__ import annotations

import importlib.util
import sys

TORCH_EXTRA = 'pip install "diffit-port[torch]"'
DISTRIBUTIONS = {"sklearn": "scikit-learn"}   # import name -> what pip installs (where they differ)


def missing(*modules: str) -> list[str]:
    """The distributions of `modules` that this installation cannot import."""
    return [DISTRIBUTIONS.get(m, m) for m in modules if importlib.util.find_spec(m) is None]


def missing_message(command: str, names: list[str], extra: str = "torch") -> str:
    """The one line for `command` when `names` are missing (all of them come with the torch extra; `extra` is
    what the line calls it)."""
    return (f"{command} needs {' and '.join(names)}, which this installation lacks; install the {extra} extra: "
            f"{TORCH_EXTRA}")


def exit_if_missing(command: str, *modules: str) -> None:
    """For a command's entry point, before its imports: exit 2 with missing_message when a module is absent."""
    names = missing(*modules)
    if names:
        print(f"Error: {missing_message(command, names)}", file=sys.stderr)
        raise SystemExit(2)

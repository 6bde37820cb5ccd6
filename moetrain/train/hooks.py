"""Hooks into the training loop that code outside the package installs (the tests' fault injection).

A hook is any object with some of these methods; the loop calls each installed
hook's method at that point, on every rank:

* ``after_step(step, rank, world_size, checkpoints)``: a step and its checkpoint
  (if one was due) are done.
* ``before_publish(step, rank, world_size)``: this rank's files of the
  checkpoint of ``step`` are written; it is not yet published.

Nothing is installed in a real run; ``tests/helpers/fault_hooks.py`` installs the fault
injection that the reliability tests drive.
"""

from __future__ import annotations

from typing import Any

_installed: list[Any] = []


def install(hook: Any) -> Any:
    """Install ``hook`` (returned, so it can be uninstalled)."""
    _installed.append(hook)
    return hook


def uninstall(hook: Any) -> None:
    if hook in _installed:
        _installed.remove(hook)


def fire(event: str, **kwargs: Any) -> None:
    """Call ``event`` on every installed hook that defines it."""
    for hook in list(_installed):
        method = getattr(hook, event, None)
        if method is not None:
            method(**kwargs)

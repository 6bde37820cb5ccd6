"""Optional packages: one line naming the exact command that adds a missing one, never a traceback.

matplotlib and safetensors are default dependencies (``pyproject.toml``; the numbers that decided it are
in docs/getting-started.md), so the quickstart install runs every tool. An environment without them (an
older install, a trimmed image) still gets one line: ``moetrain-plot: matplotlib is missing: scripts/setup.sh
plot (a clone) or pip install -e '.[plot]'``, exit 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moetrain.config import ConfigError

EXTRA_OF = {"matplotlib": "plot", "safetensors": "transformers", "transformers": "transformers",
            "deepspeed": "deepspeed", "hydra_plugins.hydra_submitit_launcher": "slurm"}  # fmt: skip
"""The extra of ``pyproject.toml`` that installs each optional module."""


class MissingExtra(ConfigError):
    """An optional package is not installed (reported as one ``config error`` line with the command)."""


def install_hint(module: str) -> str:
    """The commands that add ``module``: a clone's ``scripts/setup.sh EXTRA`` or pip's editable install."""
    extra = EXTRA_OF.get(module, module)
    return f"scripts/setup.sh {extra} (a clone) or pip install -e '.[{extra}]' (pip install 'moetrain[{extra}]')"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra`: ``{module} is missing ({purpose}): {install_hint}``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is missing ({purpose}): {install_hint(module)}") from None

"""Hydra plugin: the ``torchrun`` launcher for moetrain sweeps (``hydra/launcher=torchrun``).

Hydra only instantiates launchers from the ``hydra_plugins`` namespace package;
the implementation lives in :mod:`moetrain.launch.torchrun`.
"""

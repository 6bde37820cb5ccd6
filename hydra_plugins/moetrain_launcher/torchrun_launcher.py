"""Registers ``hydra/launcher=torchrun``; Hydra instantiates launchers only from ``hydra_plugins``."""

from moetrain.launch.torchrun import TorchrunLauncherConf, TorchrunLauncherImpl, register


class TorchrunLauncher(TorchrunLauncherImpl):
    """See :mod:`moetrain.launch.torchrun`."""


register()

__all__ = ["TorchrunLauncher", "TorchrunLauncherConf"]

"""Registers ``hydra/launcher=torchrun``; Hydra instantiates launchers only from ``hydra_plugins``."""

from moetrain.launch.torchrun import TorchrunLauncherConf, TorchrunLauncherImpl, store_conf


class TorchrunLauncher(TorchrunLauncherImpl):
    """See :mod:`moetrain.launch.torchrun`."""


store_conf()  # Hydra's plugin scan imports this module; moetrain.launch.torchrun.register() does the rest

__all__ = ["TorchrunLauncher", "TorchrunLauncherConf"]

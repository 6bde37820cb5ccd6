"""Launching: the Hydra torchrun launcher for sweeps and the sweep summary."""

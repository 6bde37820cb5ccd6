"""Mixture-of-Experts: routing, balancing, capacity, experts, dispatch, the MoE layer, stats."""

from moetrain.moe.layer import MoELayer, MoEStats, Router
from moetrain.moe.stats import maxvio

__all__ = ["MoELayer", "MoEStats", "Router", "maxvio"]

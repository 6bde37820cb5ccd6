"""Trainer loop, optimizer and schedule, metric sinks, and the ``moetrain-train`` entry point."""

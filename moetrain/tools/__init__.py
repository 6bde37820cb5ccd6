"""The command-line tools around a run or a checkpoint: export, generate, inspect, plan, plot, report."""

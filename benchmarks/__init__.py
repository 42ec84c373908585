"""Measuring scripts: each runs as `python benchmarks/<name>.py` and writes its table to benchmarks/results/."""

"""Measured benchmarks that need a Ray cluster (each prints a ratio measured in one run)."""

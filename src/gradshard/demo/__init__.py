"""Demos and synthetic updates for demos and benchmarks."""

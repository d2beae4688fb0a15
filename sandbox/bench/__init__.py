"""Benchmarks behind ``sandbox bench``: training-step timing and data-loading throughput."""

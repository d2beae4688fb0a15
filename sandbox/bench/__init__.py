"""Benchmarks behind ``sandbox bench`` and ``sandbox plan``: training-step timing, data-loading throughput,
the memory and FLOPs traced on fake tensors. May import ``train`` and every package below it; nothing from
``sweep`` or ``cli``."""

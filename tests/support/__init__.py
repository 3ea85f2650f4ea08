"""Helpers shared by tests and benchmarks: the loopback fake provider."""

"""Benchmarks run as scripts (`python -m bench.overhead`); nothing here is imported by the gateway."""

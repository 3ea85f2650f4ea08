"""Routing: pure scoring and choice over a snapshot of backend stats. No I/O, no clock, no randomness."""

"""Backends: the `Backend` protocol and its cloud, openai-compatible, local-engine and edge implementations.

This package never imports `gateway` or `routing`.
"""

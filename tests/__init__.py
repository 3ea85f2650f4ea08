"""Test suites and their shared support code."""

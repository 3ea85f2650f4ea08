"""Integration tests against real PostgreSQL, SQLite and Redis."""

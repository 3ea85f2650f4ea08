"""Switchboard gateway: FastAPI app, auth, dispatch, ledger, metrics and CLI."""

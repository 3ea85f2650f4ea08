"""`python -m gateway.cli`: the `switchboard` command."""

from gateway.cli import main

main()

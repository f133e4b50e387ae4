"""`python -m clients.cli`: the `steer` command."""

from clients.cli.main import main

main()

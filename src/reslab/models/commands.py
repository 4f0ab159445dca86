"""`reslab` subcommands of this package: each builder adds one subparser (see reslab.cli)."""

COMMANDS: list = []

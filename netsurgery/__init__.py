"""The ``netsurgery`` command: a thin dispatcher whose subcommands import their package lazily."""

"""``netsurgery``: a thin argparse dispatcher over three groups of subcommands.

- :mod:`netsurgery.engine_cli`: compress, train-reference, pack, bench (dns_core only);
- :mod:`netsurgery.service_cli`: serve, demo, worker, migrate, admin (the service packages);
- :mod:`netsurgery.client_cli`: login, upload-model, upload-data, submit, jobs, watch, download (httpx).

Building the parser imports none of those packages: each subcommand imports what it needs when it runs,
so ``netsurgery compress`` never loads FastAPI or Celery.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dns_core import numerics
from dns_core.errors import InputError
from netsurgery.client_cli import add_client_commands
from netsurgery.common import CliError, DefaultsHelpFormatter, numerics_default
from netsurgery.engine_cli import add_engine_commands
from netsurgery.service_cli import add_service_commands

#: The extra (``pip install 'netsurgery[...]'``) that brings the packages of each command module.
EXTRAS = {"netsurgery.service_cli": "service", "netsurgery.client_cli": "client"}
OWN_PACKAGES = ("dns_core", "service", "api", "worker", "netsurgery")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsurgery", description="Dynamic Network Surgery: compress neural networks.")
    sub = p.add_subparsers(dest="command", required=True)
    add_engine_commands(sub)
    add_service_commands(sub)
    add_client_commands(sub)
    _state_defaults(p)
    return p


def _state_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's ``--help`` names each option's default (:class:`DefaultsHelpFormatter`), nested ones too."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _state_defaults(child)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # the commands that train (bench, demo, serve, worker) take --numerics; the environment names a
        # default, else the command's own does
        if hasattr(args, "numerics"):
            mode = args.numerics or os.environ.get(numerics.ENV_VAR)
            if mode is None:
                mode = numerics_default(args)
                if "torch" in sys.modules:
                    mode = numerics.current()  # called in a process that runs torch already: its numerics stand
            numerics.use(mode)  # before any command imports torch
            numerics.check()
        return int(args.func(args))
    except (CliError, InputError) as e:  # the user's to fix: one line, no traceback
        print(f"netsurgery: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get(getattr(args.func, "__module__", ""))
        if extra is None or e.name is None or e.name.partition(".")[0] in OWN_PACKAGES:
            raise
        print(f"netsurgery: {args.command} needs {e.name}, which comes with the [{extra}] extra: "
              f"pip install 'netsurgery[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("netsurgery: interrupted", file=sys.stderr)
        return 130

"""``netsurgery``: a thin argparse dispatcher over three groups of subcommands.

- :mod:`netsurgery.engine_cli`: compress, train-reference, pack, bench (dns_core only);
- :mod:`netsurgery.service_cli`: serve, demo, worker, migrate, admin (the service packages);
- :mod:`netsurgery.client_cli`: login, upload-model, upload-data, submit, jobs, watch, download (httpx).

Building the parser imports none of those packages: each subcommand imports what it needs when it runs,
so ``netsurgery compress`` never loads FastAPI or Celery.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from netsurgery.client_cli import add_client_commands
from netsurgery.common import CliError
from netsurgery.engine_cli import add_engine_commands
from netsurgery.service_cli import add_service_commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netsurgery", description="Dynamic Network Surgery: compress neural networks.")
    sub = p.add_subparsers(dest="command", required=True)
    add_engine_commands(sub)
    add_service_commands(sub)
    add_client_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"netsurgery: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netsurgery: interrupted", file=sys.stderr)
        return 130

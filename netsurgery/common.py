"""What the ``netsurgery`` subcommands share: the one error a person can act on, ``name=value`` lists,
data loading, the progress bar's columns and ``--numerics``. Light at import time: the standard library and
:mod:`dns_core.numerics` (which loads no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from dns_core import numerics

if TYPE_CHECKING:
    from rich.progress import Progress

    from dns_core.data import Dataset
    from dns_core.inputs import ModelInput

    #: what ``ArgumentParser.add_subparsers`` returns: each command module adds its subcommands to it
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class CliError(Exception):
    """An error a person can act on: printed as one line, exit status 2."""


def states_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should add the option's default to its text: it takes a value, has a default
    worth saying, and its text does not name it already."""
    if not action.option_strings or action.nargs == 0 or action.required:
        return False
    if action.default in (None, "", argparse.SUPPRESS) or isinstance(action.default, bool):
        return False
    return "default" not in (action.help or "")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that ends each option's text with ``(default: X)`` where the text does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is not None and text is not argparse.SUPPRESS and states_default(action):
            text += " (default: %(default)s)"
        return text


def parse_pairs(text: str | None, what: str) -> dict[str, float] | None:
    """Parse ``name=value,name=value``."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CliError(f"{what}: expected name=number, got {item!r}") from None
        if not sep:
            raise CliError(f"{what}: expected name=number, got {item!r}")
    return out


def load_data(
    args: argparse.Namespace, model_input: ModelInput | None = None
) -> tuple[Dataset, Dataset, Dataset | None]:
    """(train, validation, test or None) from a built-in name (adapted to ``model_input``, what the model
    takes) or the user's data files."""
    from dns_core.data import DataError, adapt_builtin, load_data_file, validation_split
    from dns_core.defaults import BUILTIN_SETS
    from dns_core.uploads import UploadError

    name = args.data
    targets = getattr(args, "targets", None)
    valid_file = getattr(args, "valid_data", None)
    if name in BUILTIN_SETS and not Path(name).exists():
        try:
            return adapt_builtin(name, model_input)
        except DataError as e:
            raise CliError(f"cannot use {name} with this model: {e}") from None
    if not Path(name).exists():
        raise CliError(f"--data {name}: no such file, and not a built-in set ({', '.join(BUILTIN_SETS)})")
    try:
        data = load_data_file(name, targets)
        valid = load_data_file(valid_file, getattr(args, "valid_targets", None)) if valid_file else None
        train, valid = validation_split(data, valid, fraction=getattr(args, "valid_fraction", 0.1),
                                        seed=getattr(args, "seed", 0))  # fmt: skip
    except (DataError, UploadError) as e:
        raise CliError(f"cannot use the data: {e}") from None
    return train, valid, None


def progress_bar(**options: Any) -> Progress:
    """A rich progress bar: description, bar, done/total, time left and a free ``status`` field."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))  # fmt: skip
    return Progress(*columns, **options)


def add_numerics(
    parser: argparse.ArgumentParser,
    default: str | Callable[[argparse.Namespace], str] = "native",
    default_help: str = "native",
) -> None:
    """``--numerics``: the CPU kernels' code path (:mod:`dns_core.numerics`), chosen before torch loads.

    ``default`` is the command's own choice when neither the option nor the environment names one (or a
    function of the parsed arguments that gives it), described by ``default_help``; a ``portable`` default
    falls back to native where the CPU cannot run it or a GPU trains (:func:`numerics.default`)."""
    parser.add_argument(
        "--numerics",
        choices=numerics.MODES,
        default=None,
        help="CPU kernels: native (the widest this CPU has) or portable (AVX2 everywhere: the same results on "
        f"every x86-64 machine; child processes inherit it) (default: ${numerics.ENV_VAR}, else {default_help})",
    )
    parser.set_defaults(numerics_default=default)


def numerics_default(args: argparse.Namespace) -> str:
    """The numerics a command runs with when neither ``--numerics`` nor the environment names them."""
    preferred = args.numerics_default
    return numerics.default(preferred(args) if callable(preferred) else preferred)

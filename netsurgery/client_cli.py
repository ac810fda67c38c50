"""The client commands: ``login``, ``upload-model``, ``upload-data``, ``submit``, ``jobs``, ``label``, ``logs``,
``watch``, ``download`` and the rest.

They talk to a running service over HTTP through :class:`netsurgery.client.Client`; nothing here loads
torch, FastAPI or Celery (httpx and rich load only when a command runs).

Where the service is, and the API key: ``netsurgery login`` checks them against the service and keeps
them in a JSON file readable only by its owner (0600, in a 0700 folder)::

    $NETSURGERY_CONFIG, else $XDG_CONFIG_HOME/netsurgery/config.json, else ~/.config/netsurgery/config.json

``NETSURGERY_URL`` and ``NETSURGERY_API_KEY`` override what the file holds. Every failure a person can
act on (service unreachable, key refused, file refused, unknown job …) is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dns_core.defaults import (
    ALLOCATIONS,
    BATCH_SIZE,
    BUILTIN_SETS,
    CODECS,
    EDGE_SHARE,
    FIRST_LAST,
    GAMMA,
    LR,
    METHODS,
    POWER,
    SEARCH_METHODS,
)
from netsurgery.common import CliError, parse_pairs, progress_bar

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.progress import Progress, TaskID

    from netsurgery.client import ApiError, Client
    from netsurgery.common import Subcommands

DEFAULT_URL = "http://127.0.0.1:8000"
NOT_LOGGED_IN = "not logged in: run `netsurgery login`"
POLL_SECONDS = 0.5
#: How long ``watch`` keeps polling through a service that stopped answering before it gives up.
RECONNECT_SECONDS = 30.0
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
_STATE_STYLE = {"queued": "dim", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}


# ------------------------------------------------------------------------------------------- config


def config_path() -> Path:
    """``$NETSURGERY_CONFIG``, else ``$XDG_CONFIG_HOME/netsurgery/config.json``, else ``~/.config/…``."""
    explicit = os.environ.get("NETSURGERY_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return _default_folder() / "config.json"


def _default_folder() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"  # the XDG spec ignores relative paths
    return base / "netsurgery"


def read_config(path: Path) -> dict[str, str]:
    """The saved ``url`` and ``key`` ({} when there is no file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CliError(f"cannot read the config file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise CliError(f"the config file {path} is not a netsurgery config: run `netsurgery login` again")
    return {k: data[k] for k in ("url", "key") if isinstance(data.get(k), str) and data[k]}


def write_config(path: Path, url: str, key: str) -> None:
    """Save ``url`` and ``key``: the file is 0600 from its first byte, its folder 0700.

    Written to a private temporary file beside it, then renamed over it, so an existing file of
    looser mode is replaced by a 0600 one and a crash never leaves half a file.
    """
    path = path.resolve()
    folder = path.parent
    try:
        if not folder.exists():
            folder.mkdir(parents=True, mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
        elif folder == _default_folder().resolve():
            os.chmod(folder, 0o700)  # our own folder: tighten it if someone loosened it
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            with os.fdopen(fd, "w") as f:
                json.dump({"url": url, "key": key}, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise CliError(f"cannot write the config file {path}: {e.strerror or e}") from None


def credentials() -> tuple[str, str]:
    """(url, key): ``NETSURGERY_URL`` / ``NETSURGERY_API_KEY``, else the config file."""
    url, key = os.environ.get("NETSURGERY_URL"), os.environ.get("NETSURGERY_API_KEY")
    if not (url and key):
        saved = read_config(config_path())
        url, key = url or saved.get("url"), key or saved.get("key")
    if not (url and key):
        raise CliError(NOT_LOGGED_IN)
    return url, key


# ------------------------------------------------------------------------------------------ helpers


def say(e: ApiError) -> str:
    """One line for a person from a client error."""
    if e.status == 404 and e.detail:
        return e.detail
    if e.status == 429 and e.detail:
        return f"{e.detail} (429: try again later)"
    return str(e)


@contextmanager
def _client() -> Iterator[Client]:
    from netsurgery.client import ApiError, Client

    url, key = credentials()
    with Client(url, key) as c:
        try:
            yield c
        except ApiError as e:
            raise CliError(say(e)) from None


#: what each kind of id names, and the command that lists them
_KINDS = {"job": ("jobs", "netsurgery jobs"), "model": ("models", "netsurgery models"),
          "dataset": ("datasets", "netsurgery datasets")}  # fmt: skip
#: the shortest id prefix taken (the dashboard shows 8 characters)
MIN_PREFIX = 4
#: rows per list request when resolving a prefix (the service's page limit)
MAX_LIST = 1000


def _id(text: str, what: str) -> str:
    """A whole id, or the one id of the caller's ``what`` (job, model, dataset) that starts with ``text``."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    kind, command = _KINDS[what]
    prefix = text.strip().lower()
    if len(prefix) < MIN_PREFIX or any(ch not in "0123456789abcdef-" for ch in prefix):
        raise CliError(
            f"{text!r} is not a {what} id nor the start of one ({MIN_PREFIX}+ hex characters; see `{command}`)"
        )
    found: list[str] = []
    with _client() as c:
        offset = 0
        while True:
            page = getattr(c, kind)(limit=MAX_LIST, offset=offset)
            found += [item["id"] for item in page["items"] if item["id"].startswith(prefix)]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                break
    if not found:
        raise CliError(f"no {what} of yours has an id starting with {prefix!r} (see `{command}`)")
    if len(found) > 1:
        shown = ", ".join(found[:5]) + (" …" if len(found) > 5 else "")
        raise CliError(f"{prefix!r} starts {len(found)} {kind} ids ({shown}): give more characters")
    return found[0]


def _local_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise CliError(f"{text}: no such file")
    if not path.is_file():
        raise CliError(f"{text}: not a file")
    return path


def _refused(path: Path, e: ApiError) -> CliError:
    """A refused upload names the file and keeps the service's reason; other errors read as usual."""
    if e.status in (413, 415, 422) and e.detail:
        return CliError(f"the service refused {path.name} ({e.status}): {e.detail}")
    return CliError(say(e))


def _out_console() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped or captured: full ids rather than 80 folded columns
    return console


def _err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


class _Transfers:
    """Rich byte-progress bars on stderr (shown only on a terminal), one per name."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = _err_console()
        self.progress: Progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Transfers:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)


def _count(text: str) -> int:
    """An argparse type: a whole number of rows, 1-1000 (the service's page limit)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 1000, got {text!r}")
    return n


def _offset(text: str) -> int:
    """An argparse type: how many rows to skip, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 up, got {text!r}")
    return n


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n:,} bytes"


# -------------------------------------------------------------------------------------------- login


def cmd_login(args: argparse.Namespace) -> int:
    from netsurgery.client import ApiError, Client

    path = config_path()
    try:
        saved = read_config(path)
    except CliError:
        saved = {}  # a broken file is about to be replaced
    default = os.environ.get("NETSURGERY_URL") or saved.get("url") or DEFAULT_URL
    url = args.url or (_ask(f"service URL [{default}]: ") if sys.stdin.isatty() else "") or default
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"{url!r} is not a service URL (like {DEFAULT_URL})")
    key = args.key if args.key is not None else _ask_key()
    key = key.strip()
    if not key:
        raise CliError("no API key given (type it at the prompt, pipe it in, or pass --key)")
    with Client(url, key, timeout=15) as c:
        try:
            c.jobs(limit=1)
        except ApiError as e:
            if e.status == 401:
                raise CliError(f"the service refused the API key (401): nothing was saved to {path}") from None
            raise CliError(f"{say(e)}; nothing was saved") from None
    write_config(path, url, key)
    print(f"logged in to {url}; the URL and key are saved in {path} (readable only by you)")
    for var in ("NETSURGERY_URL", "NETSURGERY_API_KEY"):
        if os.environ.get(var):
            print(f"note: {var} is set and overrides the saved value", file=sys.stderr)
    return 0


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        return ""


def _ask_key() -> str:
    """The key from a hidden prompt on a terminal, else the first line of stdin (``… | netsurgery login``)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline()
    import getpass

    try:
        return getpass.getpass("API key: ")
    except EOFError:
        return ""


# ------------------------------------------------------------------------------------------ uploads


def _upload(path: Path, send: Callable[[Callable[[int, int], None]], dict[str, Any]]) -> dict[str, Any]:
    """``send(progress)`` uploads ``path`` under a byte-progress bar; a refusal or an unreadable file is a
    :class:`CliError`."""
    from netsurgery.client import ApiError

    with _Transfers() as bars:
        try:
            return send(lambda done, total: bars.update(path.name, done, total))
        except ApiError as e:
            raise _refused(path, e) from None
        except OSError as e:
            raise CliError(f"cannot read {e.filename or path}: {e.strerror or e}") from None


def cmd_upload_model(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    if not path.is_dir():
        path = _local_file(args.file)
    config = None
    if args.config:
        try:
            config = json.loads(args.config)
        except ValueError as e:
            raise CliError(f"--config is not JSON: {e}") from None
        if not isinstance(config, dict):
            raise CliError("--config must be a JSON object, e.g. '{\"num_classes\": 10}'")
    with _client() as c:
        m = _upload(path, lambda progress: c.upload_model(path, architecture=args.arch, config=config,
                                                          name=args.name, progress=progress, new=args.new))  # fmt: skip
        created = c.last_upload_created
    if args.quiet:
        print(m["id"])
        return 0
    if created is False:
        print(f"model {m['id']}: you uploaded these bytes before, as {m['name']!r}; nothing new was stored "
              "(--new adds another entry)")  # fmt: skip
        return 0
    print(f"model {m['id']}")
    rows = [("name", m["name"]), ("format", m["format"]), ("architecture", m.get("architecture") or "-"),
            ("parameters", f"{m['parameter_count']:,}"), ("size", _size(m.get("size_bytes"))),
            ("sha256", m["sha256"])]  # fmt: skip
    for label, value in rows:
        print(f"  {label:<13} {value}")
    return 0


def cmd_upload_data(args: argparse.Namespace) -> int:
    if args.builtin and (args.file or args.targets):
        raise CliError("give either FILE (with --targets) or --builtin, not both")
    if not args.builtin and not args.file:
        raise CliError(f"give a data FILE, or --builtin {'|'.join(BUILTIN_SETS)}")
    path = _local_file(args.file) if args.file else Path()
    targets = _local_file(args.targets) if args.targets else None
    with _client() as c:
        if args.builtin:
            d = c.builtin_data(args.builtin, dataset_name=args.name)
        else:
            d = _upload(path, lambda progress: c.upload_data(path, targets=targets, name=args.name, progress=progress,
                                                             new=args.new))  # fmt: skip
        created = c.last_upload_created
    if args.quiet:
        print(d["id"])
        return 0
    if created is False:
        print(f"dataset {d['id']}: you uploaded this file before, as {d['name']!r}; nothing new was stored "
              "(--new adds another entry)")  # fmt: skip
        return 0
    print(f"dataset {d['id']}")
    rows = [("name", d["name"]), ("kind", d["kind"] if d["kind"] != "builtin" else f"built-in {d['builtin_name']}")]
    if d.get("n_examples") is not None:
        rows.append(("examples", f"{d['n_examples']:,}"))
    if d.get("input_shape"):
        rows.append(("input shape", " x ".join(str(n) for n in d["input_shape"])))
    if d["kind"] != "builtin":
        rows += [("targets", "yes" if d.get("has_targets") else "no"), ("size", _size(d.get("size_bytes"))),
                 ("sha256", d.get("sha256") or "-")]  # fmt: skip
    for label, value in rows:
        print(f"  {label:<13} {value}")
    return 0


# --------------------------------------------------------------------------------------------- jobs


def _patterns(text: str | None) -> list[str] | None:
    """A comma-separated list of layer names or glob patterns (None when not given)."""
    if text is None:
        return None
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise CliError(f"give at least one layer name or pattern, got {text!r}")
    return patterns


def cmd_submit(args: argparse.Namespace) -> int:
    from netsurgery.client import ApiError

    model_id, dataset_id = _id(args.model_id, "model"), _id(args.dataset_id, "dataset")
    layer_kept = parse_pairs(args.layer_kept, "--layer-kept")
    crates = parse_pairs(args.crates, "--crates")
    if args.method != "dns-fixed-crates" and args.target is None and not layer_kept and args.max_drop is None:
        raise CliError(
            f"--method {args.method} needs --target X (overall compression), --layer-kept name=fraction,… or "
            "--max-drop alone (the highest compression within that budget)"
        )
    with _client() as c:
        try:
            job = c.submit(model_id, dataset_id, method=args.method, compression=args.target, layer_kept=layer_kept,
                           max_drop=args.max_drop, iterations=args.iterations, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, codec=args.codec, crates=crates,
                           crate=args.crate, gamma=args.gamma, power=args.power, iter_stop=args.iter_stop,
                           allocation=args.allocation, first_last=args.first_last,
                           include=_patterns(args.include), exclude=_patterns(args.exclude),
                           name=args.name, tags=args.tag or None)  # fmt: skip
        except ApiError as e:
            if e.status == 422 and e.fields:
                said = "; ".join(f"{_flag(f.get('loc') or [])}: {_plain(str(f.get('msg', '')))}" for f in e.fields)
                raise CliError(f"the service refused the job ({e.status}): {said}") from None
            if e.status in (400, 422) and e.detail:
                raise CliError(f"the service refused the job ({e.status}): {e.detail}") from None
            raise
        if args.quiet:
            print(job["id"])
        else:
            print(f"job {job['id']} {job['state']}: {_describe(job)}")
            if not args.watch:
                print(f"follow it with `netsurgery watch {job['id']}`")
        if args.watch:
            return _watch(c, job["id"], shown_state=None if args.quiet else job["state"])
    return 0


#: the job body's fields that have a flag of another name
_FLAGS = {("target", "compression"): "--target", ("target", "max_accuracy_drop"): "--max-drop",
          ("target", "layer_kept"): "--layer-kept", ("model_id",): "MODEL_ID", ("dataset_id",): "DATASET_ID",
          ("method",): "--method"}  # fmt: skip


def _flag(loc: list[Any]) -> str:
    """The ``submit`` flag that set a field of the job's body (``["body", "settings", "iterations"]``)."""
    path = tuple(str(p) for p in loc[1:] if not isinstance(p, int))  # "body" first; list indices dropped
    if path in _FLAGS:
        return _FLAGS[path]
    if len(path) >= 2 and path[0] == "settings":
        return "--" + path[1].replace("_", "-")
    if len(path) >= 2 and path[0] == "target":
        return _FLAGS.get(path[:2], "--" + path[1].replace("_", "-"))
    return "the job" if not path else ".".join(path)


def _plain(message: str) -> str:
    """pydantic's message without its "Value error, " prefix."""
    return message.removeprefix("Value error, ")


def _describe(job: dict[str, Any]) -> str:
    target, settings = job.get("target") or {}, job.get("settings") or {}
    text = str(job["method"])
    if target.get("compression") is not None:
        text += f" to {target['compression']:g}x"
    elif target.get("layer_kept"):
        text += " keeping " + ", ".join(f"{k} {v:g}" for k, v in target["layer_kept"].items())
    elif target.get("max_accuracy_drop") is not None and job["method"] != "dns-fixed-crates":
        text += ", the highest compression"
    if target.get("max_accuracy_drop") is not None:
        text += f" within {target['max_accuracy_drop']:g} pp"
    total = job.get("total_iterations") or settings.get("iterations")
    return text + (f", {total:,} iterations" if total else "")


def _list_table(what: str, page: dict[str, Any], empty: str, columns: list[str], rows: list[list[str]]) -> int:
    """Print one page of the caller's ``what`` as a table (``columns``: names, ">name" right-aligned)."""
    from rich.table import Table

    console = _out_console()
    if not page["items"]:
        console.print(empty)
        return 0
    table = Table(title=f"{what} ({_shown(page)}, newest first)")
    for i, column in enumerate(columns):
        name = column.removeprefix(">")
        table.add_column(
            name, justify="right" if column.startswith(">") else "left", no_wrap=i in (0, len(columns) - 1)
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client() as c:
        page = c.models(limit=args.limit)
    rows = [[m["id"], m["name"], m["format"], m.get("architecture") or "-", f"{m['parameter_count']:,}",
             f"{m['size_bytes']:,}", _when(m.get("created_at"))] for m in page["items"]]  # fmt: skip
    columns = ["id", "name", "format", "architecture", ">parameters", ">bytes", "uploaded"]
    return _list_table("models", page, "no models: upload one with `netsurgery upload-model`", columns, rows)


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client() as c:
        page = c.datasets(limit=args.limit)
    rows = []
    for d in page["items"]:
        kind = f"built-in {d['builtin_name']}" if d["kind"] == "builtin" else d["kind"]
        examples = f"{d['n_examples']:,}" if d.get("n_examples") is not None else "-"
        shape = "x".join(str(n) for n in d["input_shape"]) if d.get("input_shape") else "-"
        rows.append([d["id"], d["name"], kind, examples, shape, "yes" if d["has_targets"] else "no",
                     _when(d.get("created_at"))])  # fmt: skip
    columns = ["id", "name", "kind", ">examples", "input shape", "labels", "added"]
    return _list_table("data sets", page, "no data sets: add one with `netsurgery upload-data`", columns, rows)


def _shown(page: dict[str, Any]) -> str:
    n = len(page["items"])
    return f"{n} of {page['total']}" if page["total"] > n else str(n)


def cmd_cancel(args: argparse.Namespace) -> int:
    from netsurgery.client import ApiError

    job_id = _id(args.job, "job")
    with _client() as c:
        try:
            job = c.cancel(job_id)
        except ApiError as e:
            if e.status == 409:
                raise CliError(f"job {job_id} has already ended: nothing to cancel") from None
            raise
    if job["state"] == "cancelled":
        print(f"job {job_id} cancelled")
    else:
        print(f"job {job_id} is {job['state']}: its worker stops it at its next check")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from netsurgery.client import ApiError

    what = "model" if args.model else "dataset" if args.dataset else "job"
    kind = _KINDS[what][0]
    ids = [_id(text, what) for text in args.ids]
    with _client() as c:
        for item_id in ids:
            try:
                c.delete(kind, item_id)
            except ApiError as e:
                if e.status == 409:
                    raise CliError(f"{what} {item_id} cannot be deleted: {e.detail}") from None
                raise
            print(f"deleted {what} {item_id}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rich.table import Table

    model_id = _id(args.model, "model") if args.model else None
    dataset_id = _id(args.dataset, "dataset") if args.dataset else None
    with _client() as c:
        page = c.jobs(state=args.state, method=args.method, model_id=model_id, dataset_id=dataset_id,
                      name=args.name, tag=args.tag, limit=args.limit, offset=args.offset)  # fmt: skip
    console = _out_console()
    items = page["items"]
    states = " or ".join(args.state or [])
    if not items:
        filtered = any((args.method, model_id, dataset_id, args.name, args.tag))
        console.print(f"no {states + ' ' if states else ''}jobs{' match' if filtered else ''}"
                      + (f" past the first {args.offset}" if args.offset else ""))  # fmt: skip
        return 0
    first, last = args.offset + 1, args.offset + len(items)
    shown = f"{first}-{last} of {page['total']}" if page["total"] > len(items) else f"{len(items)}"
    table = Table(title=f"{states + ' ' if states else ''}jobs ({shown}, newest first)")
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("name")
    table.add_column("state")
    table.add_column("method")
    table.add_column("iteration", justify="right")
    table.add_column("compression", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("drop", justify="right")
    table.add_column("tags")
    table.add_column("created", no_wrap=True)
    for j in items:
        total = j.get("total_iterations")
        result = j.get("result") or {}
        drop = result.get("val_drop")
        table.add_row(
            j["id"],
            j.get("name") or "-",
            f"[{_STATE_STYLE.get(j['state'], '')}]{j['state']}",
            j["method"],
            f"{j['iteration']:,}/{total:,}" if total else f"{j['iteration']:,}",
            f"{j['compression']:.1f}x" if j.get("compression") is not None else "-",
            f"{j['val_accuracy']:.2f}%" if j.get("val_accuracy") is not None else "-",
            f"{drop:+.2f}" if drop is not None else "-",
            ", ".join(j.get("tags") or []) or "-",
            _when(j.get("created_at")),
        )
    console.print(table)
    if page["total"] > last:
        console.print(f"more: `netsurgery jobs --offset {last}`" + (" with the same filters" if states else ""))
    return 0


def _tags(text: str) -> list[str]:
    """``--tags a,b``: the tags, in order, without repeats (an empty text: none)."""
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def cmd_label(args: argparse.Namespace) -> int:
    from netsurgery.client import UNSET, Unset

    if args.name is None and not args.clear_name and args.tags is None:
        raise CliError("give --name NAME, --clear-name or --tags a,b (--tags '' removes them all)")
    job_id = _id(args.job, "job")
    name: str | Unset | None = None if args.clear_name else args.name if args.name is not None else UNSET
    tags: list[str] | Unset = _tags(args.tags) if args.tags is not None else UNSET
    with _client() as c:
        job = c.label(job_id, name=name, tags=tags)
    print(f"job {job_id}: name {job.get('name') or '-'}, tags {', '.join(job.get('tags') or []) or '-'}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the job's log; with ``--follow``, keep printing new lines until the job has ended."""
    from netsurgery.client import TERMINAL

    job_id = _id(args.job, "job")
    after, printed = 0, 0
    with _client() as c:
        while True:
            job = c.job(job_id) if args.follow else None
            while True:
                page = c.logs(job_id, after=after)
                for line in page["items"]:
                    stamp = _when(line["at"]) if not args.utc else line["at"]
                    text = line["message"].replace("\n", "\n    ")
                    print(f"{stamp} {line['level']:<7} {text}", flush=True)
                    printed += 1
                after = page["next_after"]
                if not page["items"]:
                    break
            if job is None or job["state"] in TERMINAL:
                break
            time.sleep(POLL_SECONDS)
    if not printed:
        print(f"job {job_id} has no log lines yet", file=sys.stderr)
    return 0


def _when(text: str | None) -> str:
    if not text:
        return "-"
    try:
        return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return text


# -------------------------------------------------------------------------------------------- watch


class _JobView:
    """The live view of one job: a progress bar (iteration/total, ETA, loss, accuracy, compression) over
    a per-layer table (kept/total/%)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.progress = progress_bar()
        self.task: TaskID | None = None
        self.job: dict[str, Any] | None = None
        self.note = ""

    def update(self, job: dict[str, Any]) -> None:
        iteration, total = job["iteration"], job.get("total_iterations")
        style = _STATE_STYLE.get(job["state"], "")
        description = f"[{style}]{job['state']}[/]"
        if self.task is None:  # start at the job's iteration, so the ETA counts only what we see happen
            self.task = self.progress.add_task(description, total=total, completed=iteration, status="")
        elif self.job is not None and iteration < self.job["iteration"]:  # resumed from a checkpoint
            self.progress.reset(self.task, total=total, completed=iteration)
        parts = []
        if job.get("loss") is not None:
            parts.append(f"loss {job['loss']:.3f}")
        if job.get("val_accuracy") is not None:
            parts.append(f"val {job['val_accuracy']:.2f}%")
        if job.get("compression") is not None:
            parts.append(f"{job['compression']:.1f}x")
        if self.note:
            parts.append(self.note)
        self.progress.update(
            self.task, description=description, total=total, completed=iteration, status="  ".join(parts)
        )
        if job["state"] in ("succeeded", "failed", "cancelled"):
            self.progress.stop_task(self.task)
        self.job = job

    def render(self) -> RenderableType:
        from rich.console import Group
        from rich.table import Table

        snapshot = (self.job or {}).get("layers") or {}
        layers = snapshot.get("layers") or []
        if not layers:
            return self.progress
        table = Table(title=f"layers at iteration {snapshot.get('iteration', 0):,}", title_justify="left")
        table.add_column("layer")
        table.add_column("kept", justify="right")
        table.add_column("total", justify="right")
        table.add_column("kept %", justify="right")
        for layer in layers:
            kept, total = layer["kept"], layer["total"]
            table.add_row(layer["layer"], f"{kept:,}", f"{total:,}", f"{100 * kept / total:.2f}" if total else "-")
        return Group(self.progress, table)


def _transient(e: ApiError) -> bool:
    """Worth polling again: the service is unreachable, overloaded or restarting."""
    return e.status is None or e.status in (429, 502, 503, 504)


def _watch(c: Client, job_id: str, shown_state: str | None = None) -> int:
    """Follow the job until it ends: 0 when it succeeded, 1 when it failed or was cancelled.

    Follows the job's event stream; polls instead where the service has none (or it keeps failing).
    Each change of state is a line of its own (``shown_state``: the state already printed, if any).
    """
    from rich.live import Live

    from netsurgery.client import TERMINAL, ApiError

    console = _out_console()
    view = _JobView(job_id)
    job = c.job(job_id)  # an unknown job or an unreachable service fails here, at once
    view.update(job)
    piped = _ProgressLines(job_id) if not console.is_terminal else None
    try:
        with Live(get_renderable=view.render, console=console, refresh_per_second=4) as live:

            def show(latest: dict[str, Any]) -> None:
                nonlocal job
                if latest["state"] != job["state"]:
                    live.console.print(f"job {job_id} {latest['state']}")
                elif piped is not None and (line := piped.line(latest)):
                    live.console.print(line)
                job = latest
                view.update(job)

            if job["state"] != shown_state:
                live.console.print(f"job {job_id} {job['state']}")
            if job["state"] not in TERMINAL:
                with suppress(ApiError):  # no event stream (an older service), or it kept failing: poll instead
                    _follow_events(c, job_id, job, show)
            failing_since: float | None = None
            while job["state"] not in TERMINAL:
                time.sleep(POLL_SECONDS)
                try:
                    latest = c.job(job_id)
                except ApiError as e:
                    if not _transient(e):
                        raise
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > RECONNECT_SECONDS:
                        raise CliError(f"{say(e)} (gave up watching after {RECONNECT_SECONDS:.0f} s)") from None
                    view.note = "[yellow]reconnecting…"
                    view.update(job)
                    continue
                failing_since, view.note = None, ""
                show(latest)
            live.refresh()
        if not console.is_terminal:
            console.line()  # rich ends the last frame with a newline only on a terminal
    except KeyboardInterrupt:
        print(
            f"stopped watching; job {job_id} is still {job['state']} (it was not cancelled): "
            f"`netsurgery watch {job_id}` to follow it again",
            file=sys.stderr,
        )
        return 130
    return _outcome(job)


class _ProgressLines:
    """``watch`` with its output not a terminal (a pipe, a file, CI): the live view shows nothing until the
    end there, so each new validation accuracy is a plain line, and the progress at least every
    :attr:`SECONDS`."""

    SECONDS = 30.0

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.last_accuracy: float | None = None
        self.last_at = time.monotonic()

    def line(self, job: dict[str, Any]) -> str | None:
        accuracy, now = job.get("val_accuracy"), time.monotonic()
        if accuracy == self.last_accuracy and now - self.last_at < self.SECONDS:
            return None
        self.last_accuracy, self.last_at = accuracy, now
        total = job.get("total_iterations")
        parts = [f"iteration {job['iteration']:,}" + (f"/{total:,}" if total else "")]
        if job.get("compression") is not None:
            parts.append(f"{job['compression']:.2f}x")
        if accuracy is not None:
            parts.append(f"validation {accuracy:.2f}%")
        return f"job {self.job_id} " + ", ".join(parts)


def _follow_events(c: Client, job_id: str, job: dict[str, Any], show: Callable[[dict[str, Any]], None]) -> None:
    """Pass ``show`` the job as its events change it, from snapshot ``job`` on, until a terminal state
    (or the end of the stream). ``state`` events carry the whole job; ``progress`` events its iteration,
    loss, accuracy and compression; ``layers`` events its per-layer table."""
    from netsurgery.client import TERMINAL

    # resume after what the snapshot already shows (the state is sent again, as a fresh snapshot)
    layers = (job.get("layers") or {}).get("iteration", -1)
    cursor = f"{job['iteration'] if job['iteration'] > 0 else -1}:{layers}:"
    with closing(c.events(job_id, last_event_id=cursor)) as events:
        for kind, _, data in events:
            if kind == "state":
                job = data
            elif kind == "progress":
                summary = {k: data[k] for k in ("loss", "val_accuracy", "compression") if data.get(k) is not None}
                job = job | summary | {"iteration": data["iteration"]}
            else:
                job = job | {"layers": data}
            show(job)
            if job["state"] in TERMINAL:
                return


def _searched(job: dict[str, Any]) -> bool:
    """A dns, agp or han job with an accuracy budget: it climbed a ladder of judged compressions (a frontier)."""
    target = job.get("target") or {}
    return (
        target.get("layer_kept") is None and target.get("max_accuracy_drop") is not None
        and job["method"] in SEARCH_METHODS
    )  # fmt: skip


def _result_lines(result: dict[str, Any]) -> list[str]:
    """A succeeded job's verdict: accuracy before and after, the budget, the size on disk."""
    lines = []
    for split in ("val", "test"):
        ref, acc = result.get(f"reference_{split}_acc"), result.get(f"{split}_acc")
        if ref is not None and acc is not None:
            name = "validation" if split == "val" else "test"
            lines.append(f"  {name:<11} {ref:.2f}% → {acc:.2f}% ({acc - ref:+.2f} points)")
    budget, met = result.get("max_accuracy_drop"), result.get("budget_met")
    if budget is not None and met is not None:
        lines.append(f"  budget      {budget:g} points on validation: {'met' if met else 'NOT met'}")
    dense, sparse = result.get("dense_file_bytes"), result.get("sparse_file_bytes")
    if dense and sparse:
        lines.append(
            f"  on disk     {dense:,} → {sparse:,} bytes ({dense / sparse:.1f}x smaller, model.sparse.safetensors)"
        )
    return lines


def _outcome(job: dict[str, Any]) -> int:
    if job["state"] == "succeeded":  # the terminal snapshot (polled, or the stream's last state) has the result
        result = job.get("result") or {}
        if result.get("verdict"):
            print(result["verdict"])
        if _searched(job):
            print(f"the frontier and the other candidates: `netsurgery frontier {job['id']}`")
    if job["state"] == "succeeded":
        parts = []
        if job.get("compression") is not None:
            parts.append(f"{job['compression']:.1f}x")
        if job.get("val_accuracy") is not None:
            parts.append(f"validation accuracy {job['val_accuracy']:.2f}%")
        parts.append(f"{job['iteration']:,} iterations")
        if job.get("started_at") and job.get("finished_at"):
            took = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
            parts.append(f"in {took.total_seconds():.0f} s")
        print(f"job {job['id']} succeeded: {', '.join(parts)}")
        for line in _result_lines(job.get("result") or {}):
            print(line)
        print(f"download its files with `netsurgery download {job['id']}`")
        return 0
    if job["state"] == "failed":
        print(f"netsurgery: job {job['id']} failed: {job.get('error') or 'no reason given'}", file=sys.stderr)
    else:
        print(f"netsurgery: job {job['id']} was cancelled", file=sys.stderr)
    return 1


def cmd_frontier(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    job_id = _id(args.job, "job")
    with _client() as c:
        f = c.frontier(job_id)
    if args.json:
        print(json.dumps(f))
        return 0
    ref = f.get("reference_val_acc")
    title = f"job {job_id} ({f['state']}): the frontier within {f['max_accuracy_drop']:g} points"
    t = Table(title=title + (f" of {ref:.2f}% validation accuracy" if ref is not None else ""))
    for column in ("iteration", "compression", "val acc", "test acc", "within budget"):
        t.add_column(column, justify="right")
    for point in f["points"]:
        test = point.get("test_acc")
        t.add_row(str(point["iteration"]), f"{point['compression']:.1f}x", f"{point['val_acc']:.2f}",
                  "" if test is None else f"{test:.2f}", "yes" if point["within_budget"] else "no")  # fmt: skip
    console = Console()
    console.print(t)
    for candidate in f.get("candidates") or []:
        mark = "chosen" if candidate["chosen"] else "candidate"
        console.print(f"{mark}: {candidate['compression']:.1f}x in {candidate.get('file') or '?'}")
    if f.get("verdict"):
        console.print(f["verdict"])
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    job_id = _id(args.job, "job")
    with _client() as c:
        return _watch(c, job_id)


# ----------------------------------------------------------------------------------------- download


def cmd_download(args: argparse.Namespace) -> int:
    job_id = _id(args.job, "job")
    out = Path(args.out).expanduser() if args.out else Path(job_id)
    with _client() as c:
        job = c.job(job_id)
        state = job["state"]
        if state != "succeeded":
            if state == "failed":
                why = f"it failed ({job.get('error') or 'no reason given'}) and has no files"
            elif state == "cancelled":
                why = "it was cancelled and has no files"
            else:
                total = job.get("total_iterations")
                at = f"iteration {job['iteration']:,}" + (f" of {total:,}" if total else "")
                why = f"it is {state} ({at}): its files come when it has succeeded (`netsurgery watch {job_id}`)"
            raise CliError(f"cannot download job {job_id}: {why}")
        try:
            with _Transfers() as bars:
                files = c.download(job_id, out, progress=bars.update)
        except OSError as e:
            raise CliError(f"cannot write into {out}: {e.strerror or e}") from None
    width = max((len(str(path)) for path in files.values()), default=0)
    for path in files.values():
        print(f"{path!s:<{width}}  {path.stat().st_size:>12,} bytes  sha256 verified")
    if not files:
        print(f"job {job_id} has no files")
    return 0


# ------------------------------------------------------------------------------------------- parser


def add_client_commands(sub: Subcommands) -> None:
    """Register the client commands on the ``netsurgery`` subparsers."""
    login = sub.add_parser("login", help="check a service URL and API key, and save them for the commands below")
    login.add_argument("--url", default=None, help=f"the service (prompted; default {DEFAULT_URL})")
    login.add_argument("--key", default=None,
                       help="the API key (default: prompted without echo, or read from stdin; on the command line "
                            "it shows in `ps`)")  # fmt: skip
    login.set_defaults(func=cmd_login)

    m = sub.add_parser("upload-model", help="upload a model: ONNX, safetensors weights of an architecture, or a "
                                            "Hugging Face folder")  # fmt: skip
    m.add_argument("file", help="model.onnx, weights.safetensors, a model folder (Hugging Face: config.json + "
                                "model.safetensors; or model.onnx + model.onnx.data) or a zip/tar of one (judged "
                                "by content; pickles are refused)")  # fmt: skip
    m.add_argument("--arch", default=None, help="architecture of safetensors weights (default: the one the file "
                   "names in its header): built-in (e.g. lenet-300-100), "
                                                "torchvision:<name> or timm:<name>")  # fmt: skip
    m.add_argument("--config", default=None, help="JSON config of the architecture, e.g. '{\"num_classes\": 4}' "
                   "(default: the architecture's own)")  # fmt: skip
    m.add_argument("--name", default=None, help="a name (default: the file's)")
    m.add_argument("--new", action="store_true", help="add a new entry even if you uploaded these bytes before "
                   "(by default the service answers with the model you have)")  # fmt: skip
    m.add_argument("-q", "--quiet", action="store_true", help="print only the model's id")
    m.set_defaults(func=cmd_upload_model)

    d = sub.add_parser("upload-data", help="upload a data file, or register a built-in data set")
    d.add_argument("file", nargs="?", default=None, help=".npz or safetensors with inputs (and targets), or IDX inputs")
    d.add_argument("--targets", default=None, help="IDX labels for IDX inputs (default: none)")
    d.add_argument("--builtin", choices=BUILTIN_SETS, default=None, help="a built-in set instead of a file "
                   "(default: none)")  # fmt: skip
    d.add_argument("--name", default=None, help="a name (default: the file's or the set's)")
    d.add_argument("--new", action="store_true", help="add a new entry even if you uploaded this file before "
                   "(by default the service answers with the data set you have)")  # fmt: skip
    d.add_argument("-q", "--quiet", action="store_true", help="print only the data set's id")
    d.set_defaults(func=cmd_upload_data)

    s = sub.add_parser("submit", help="start a compression job on an uploaded model and data set")
    s.add_argument("model_id", metavar="MODEL_ID")
    s.add_argument("dataset_id", metavar="DATASET_ID")
    s.add_argument("--method", choices=METHODS, default="dns", help="compression method")
    goal = s.add_mutually_exclusive_group()
    goal.add_argument("--target", type=float, default=None,
                      help="overall compression (x), e.g. 40 (default: none); left out with --max-drop given, the "
                           "job searches for the highest compression within it")  # fmt: skip
    goal.add_argument("--layer-kept", default=None,
                      help="per-layer kept fractions instead: fc1=0.02,fc2=0.05 (default: none)")  # fmt: skip
    s.add_argument("--max-drop", type=float, default=None,
                   help="accuracy budget in percentage points of validation accuracy (default: none)")  # fmt: skip
    s.add_argument("--iterations", type=int, default=None,
                   help="training iterations (default: the service's, NETSURGERY_DEFAULT_ITERATIONS)")  # fmt: skip
    s.add_argument("--lr", type=float, default=None, help=f"peak learning rate of the fine-tuning (default {LR})")
    s.add_argument("--batch-size", type=int, default=None, help=f"examples per iteration (default {BATCH_SIZE})")
    s.add_argument("--seed", type=int, default=None, help="seed of the data order and the surgery's draws (default 0)")
    s.add_argument("--codec", choices=CODECS, default=None,
                   help="also a sparse file with compressed values (default: none)")  # fmt: skip
    s.add_argument(
        "--allocation", choices=ALLOCATIONS, default=None,
        help="kept weights shared by one ranking held in a band around the overall fraction per layer "
             "(balanced, the default), one global threshold (global), per layer relative to each layer's "
             "spread (layer), or the same fraction in every layer (uniform)",
    )  # fmt: skip
    s.add_argument("--include", default=None, help="Linear/Conv layer names or glob patterns to prune, "
                   "comma-separated (default: all)")  # fmt: skip
    s.add_argument("--exclude", default=None,
                   help="layer names or glob patterns to leave dense, comma-separated (default: none)")  # fmt: skip
    s.add_argument(
        "--first-last", choices=FIRST_LAST, default=None,
        help="the first convolution and the classifier head: dense, prune, or auto (the default: dense while they "
             f"take at most {EDGE_SHARE * 100:.0f}%% of the weights the target keeps)",
    )  # fmt: skip
    s.add_argument("--crates", default=None,
                   help="dns-fixed-crates: per-layer crates, conv1=1,fc1=4 (default: --crate for all)")  # fmt: skip
    s.add_argument("--crate", type=float, default=None, help="dns-fixed-crates: default crate")
    s.add_argument("--gamma", type=float, default=None,
                   help=f"dns-fixed-crates: surgery probability (1 + gamma*t)^-power (default {GAMMA})")  # fmt: skip
    s.add_argument("--power", type=float, default=None, help=f"dns-fixed-crates: see --gamma (default {POWER})")
    s.add_argument("--iter-stop", type=int, default=None,
                   help="masks stop changing after this iteration (default: the method's)")  # fmt: skip
    s.add_argument("--name", default=None, help="a name to find the job by (default: none)")
    s.add_argument("--tag", action="append", default=None, metavar="TAG",
                   help="a label to filter jobs by; repeat for more (default: none)")  # fmt: skip
    s.add_argument("--watch", action="store_true", help="follow the job until it ends (as `netsurgery watch`)")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the job's id")
    s.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="list your jobs, newest first")
    j.add_argument("--state", choices=STATES, action="append", default=None,
                   help="only jobs in this state; repeat for several (default: any)")  # fmt: skip
    j.add_argument("--method", choices=METHODS, default=None, help="only jobs of this method (default: any)")
    j.add_argument(
        "--model", default=None, metavar="MODEL", help="only jobs on this model: id or its start (default: any)"
    )
    j.add_argument(
        "--dataset", default=None, metavar="DATASET", help="only jobs on this data set: id or its start (default: any)"
    )
    j.add_argument("--name", default=None, help="only jobs whose name holds this, any case (default: any)")
    j.add_argument("--tag", default=None, help="only jobs with this tag (default: any)")
    j.add_argument("--limit", type=_count, default=20, help="at most this many (1-1000; default 20)")
    j.add_argument("--offset", type=_offset, default=0, help="skip this many of the newest first (default 0)")
    j.set_defaults(func=cmd_jobs)

    lb = sub.add_parser("label", help="rename or retag a job")
    lb.add_argument("job", metavar="JOB", help="its id, or the start of it (4+ characters)")
    naming = lb.add_mutually_exclusive_group()
    naming.add_argument("--name", default=None, help="the job's new name (default: unchanged)")
    naming.add_argument("--clear-name", action="store_true", help="remove the job's name")
    lb.add_argument("--tags", default=None, help="the job's tags, comma-separated; they replace the old ones ('' "
                    "removes them all; default: unchanged)")  # fmt: skip
    lb.set_defaults(func=cmd_label)

    lg = sub.add_parser("logs", help="print a job's log: what its worker did, and a failure's traceback")
    lg.add_argument("job", metavar="JOB", help="its id, or the start of it (4+ characters)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    lg.add_argument("--utc", action="store_true", help="print times as the service gives them (UTC, ISO 8601)")
    lg.set_defaults(func=cmd_logs)

    m = sub.add_parser("models", help="list your uploaded models, newest first")
    m.add_argument("--limit", type=_count, default=20, help="at most this many (1-1000; default 20)")
    m.set_defaults(func=cmd_models)

    ds = sub.add_parser("datasets", help="list your data sets, newest first")
    ds.add_argument("--limit", type=_count, default=20, help="at most this many (1-1000; default 20)")
    ds.set_defaults(func=cmd_datasets)

    x = sub.add_parser("cancel", help="cancel a queued or running job")
    x.add_argument("job", metavar="JOB", help="its id, or the start of it (4+ characters)")
    x.set_defaults(func=cmd_cancel)

    r = sub.add_parser("rm", help="delete finished jobs (their files too), or models and data sets no job uses")
    r.add_argument("ids", nargs="+", metavar="ID", help="ids, or the start of each (4+ characters)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--model", action="store_true", help="the ids are models'")
    which.add_argument("--dataset", action="store_true", help="the ids are data sets'")
    r.set_defaults(func=cmd_rm)

    w = sub.add_parser("watch", help="follow a job live; exit 0 when it succeeds, 1 when it fails or is cancelled")
    w.add_argument("job", metavar="JOB")
    w.set_defaults(func=cmd_watch)

    f = sub.add_parser(
        "frontier",
        help="the frontier of a dns, agp or han job with a budget: compression against accuracy, and candidates",
    )
    f.add_argument("job", metavar="JOB")
    f.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    f.set_defaults(func=cmd_frontier)

    g = sub.add_parser("download", help="download a finished job's files (each checked against its sha256)")
    g.add_argument("job", metavar="JOB")
    g.add_argument("--out", default=None, help="folder (default: ./<job id>)")
    g.set_defaults(func=cmd_download)

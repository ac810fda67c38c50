"""Blob storage for uploads, checkpoints and artifacts: a local folder, or any fsspec URL (s3://…).

Keys are relative paths (``models/<id>/model.onnx``). Writes are atomic: bytes go to a temporary
key first and are moved into place only when complete, so a reader (or a download) never sees a
partial file, and a writer killed midway leaves the previous version intact. On a local folder the
move is an ``os.replace``; on object stores a put is already all-or-nothing and the temporary key
is a plain upload followed by a copy.

A writer that dies without running its clean-up (SIGKILL, out of memory, a lost machine) leaves its
temporary key behind; :meth:`Storage.remove_temporaries` deletes those under a prefix once no
writer can be working there any more (the worker calls it when it takes over a job).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec

TEMPORARY_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{32}$")  # what writer() appends to a key


class StorageError(OSError):
    """A blob that is missing or cannot be written."""


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    sha256: str


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"bad storage key {key!r}")
    return key


class Storage:
    """A folder (``/srv/netsurgery``) or an fsspec URL (``s3://bucket/prefix``) holding blobs by key."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` on a local store (None for remote stores)."""
        return Path(self.path(key)) if self.local else None

    # --- writing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """Open ``key`` for writing; the blob appears atomically when the block exits without error."""
        final = self.path(key)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        if self.local:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            if self.local:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            else:
                self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    def put_file(self, key: str, source: str | os.PathLike[str]) -> Stored:
        """Copy a local file into the store under ``key`` (atomically) and return its size and sha256."""
        h = hashlib.sha256()
        size = 0
        with open(source, "rb") as src, self.writer(key) as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return Stored(key, size, h.hexdigest())

    # --- reading ---------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self.path(key)))
        except FileNotFoundError:
            raise StorageError(f"no stored blob {key!r}") from None

    def open(self, key: str) -> IO[bytes]:
        try:
            f: IO[bytes] = self.fs.open(self.path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"no stored blob {key!r}") from None
        return f

    @contextlib.contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        """A local file holding ``key``: the blob itself on a local store, a temporary copy otherwise."""
        local = self.local_path(key)
        if local is not None:
            if not local.exists():
                raise StorageError(f"no stored blob {key!r}")
            yield local
            return
        with tempfile.TemporaryDirectory(prefix="netsurgery-") as tmp:
            dest = Path(tmp) / Path(key).name
            with self.open(key) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            yield dest

    # --- deleting --------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key))

    def remove_temporaries(self, prefix: str) -> list[str]:
        """Delete the temporary blobs that writers killed midway left under ``prefix/``; their keys.

        Only for a prefix no live writer uses: a temporary being written would be lost with it.
        """
        base = self.path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        stale = [
            str(path)[len(self.root) + 1 :]
            for path in found
            if str(path).startswith(self.root + "/") and TEMPORARY_SUFFIX.search(str(path))
        ]
        for key in stale:
            self.delete(key)
        return stale

    def delete_prefix(self, prefix: str) -> None:
        """Remove every blob under ``prefix/`` (a model's, a dataset's or a job's folder)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(prefix), recursive=True)

"""Zip and tar archives from untrusted users, unpacked without trusting a byte of them.

:func:`extract_archive` writes only regular files and directories, only under ``dest``, with the
names normalised and checked by hand (and, for tar, by :func:`tarfile.data_filter` as a second
opinion). Refused, with :class:`~dns_core.uploads.InvalidFile`: absolute names, ``..``
components, drive letters, backslashes, control characters, symbolic and hard links, devices,
fifos, sparse tar members, encrypted zip entries, duplicate names and a file where a folder
should be (or the reverse). Refused, with :class:`~dns_core.uploads.FileTooLarge`: more entries
than ``max_entries``, more than ``max_expanded`` bytes in all, or an entry (for tar.gz: the whole
archive) that expands more than ``max_ratio`` times. The caps are checked against the headers
first and again against the bytes actually written, so an archive whose headers lie is stopped
as soon as it passes a cap.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

from .uploads import MAX_EXPANDED_BYTES, MAX_EXPANSION_RATIO, FileTooLarge, InvalidFile, is_tar_header

ArchiveKind = Literal["zip", "tar"]

#: Default caps of :func:`extract_archive` (a model folder: a few dozen files at most).
MAX_ENTRIES = 4096
MAX_EXPANDED = MAX_EXPANDED_BYTES
MAX_RATIO = MAX_EXPANSION_RATIO
#: Entries that expand to less than this are not held to the ratio cap: they cannot be a bomb,
#: and small text files (a config, a vocabulary) often compress more than 200 times.
RATIO_FLOOR = 1024 * 1024

_CHUNK = 1024 * 1024


def archive_kind(path: str | os.PathLike[str]) -> ArchiveKind | None:
    """``"zip"``, ``"tar"`` (plain or gzip-compressed) or None, judged by content, never by name."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(p, "rb") as g:
                head = g.read(512)
        except (OSError, EOFError, zlib.error):
            return None
    return "tar" if is_tar_header(head) else None


def _clean_name(raw: str, where: str) -> tuple[str, ...]:
    """The path components of an entry name, or InvalidFile; ``.`` and empty components are dropped."""
    if not raw:
        raise InvalidFile(f"{where}: an archive entry has an empty name")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise InvalidFile(f"{where}: archive entry {raw!r} has control characters in its name")
    if "\\" in raw:
        raise InvalidFile(f"{where}: archive entry {raw!r} has a backslash in its name (use / between folders)")
    if raw.startswith("/") or (len(raw) >= 2 and raw[1] == ":"):
        raise InvalidFile(f"{where}: archive entry {raw!r} has an absolute name; names must be relative")
    parts = tuple(c for c in raw.split("/") if c not in ("", "."))
    if ".." in parts:
        raise InvalidFile(f"{where}: archive entry {raw!r} points outside the archive (a '..' in its name)")
    if any(":" in c for c in parts):
        raise InvalidFile(f"{where}: archive entry {raw!r} has a ':' in its name (a drive letter or stream)")
    return parts


class _Writer:
    """Creates the checked entries under ``dest`` and keeps the counts against the caps."""

    def __init__(self, dest: Path, where: str, max_entries: int, max_expanded: int) -> None:
        self.dest, self.where = dest, where
        self.max_entries, self.max_expanded = max_entries, max_expanded
        self.entries = 0
        self.total = 0
        self.files: dict[tuple[str, ...], str] = {}
        self.dirs: set[tuple[str, ...]] = set()

    def count(self) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise FileTooLarge(f"{self.where}: more than the {self.max_entries:,} entries allowed in an archive")

    def announce(self, name: str, size: int) -> None:
        """Refuse on the header's word before reading an entry's data."""
        if size < 0:
            raise InvalidFile(f"{self.where}: archive entry {name!r} has a negative size")
        if self.total + size > self.max_expanded:
            raise FileTooLarge(
                f"{self.where}: the archive expands past the {self.max_expanded:,}-byte limit "
                f"(at entry {name!r}, {size:,} bytes)"
            )

    def directory(self, parts: tuple[str, ...], raw: str) -> None:
        if not parts:  # the archive's own root ("./")
            return
        self._check_parents(parts, raw)
        if parts in self.files:
            raise InvalidFile(f"{self.where}: archive entry {raw!r} is both a file and a folder")
        self.dirs.add(parts)
        (self.dest.joinpath(*parts)).mkdir(parents=True, exist_ok=True)

    def _check_parents(self, parts: tuple[str, ...], raw: str) -> None:
        for i in range(1, len(parts)):
            if parts[:i] in self.files:
                raise InvalidFile(f"{self.where}: archive entry {raw!r} lies under the file {'/'.join(parts[:i])!r}")

    def file(self, parts: tuple[str, ...], raw: str, size: int, stream: IO[bytes], ratio_of: int | None,
             max_ratio: float) -> None:  # fmt: skip
        """Write one regular file, counting its bytes against the header, the total and the ratio."""
        if not parts:
            raise InvalidFile(f"{self.where}: archive entry {raw!r} has no file name")
        self._check_parents(parts, raw)
        if parts in self.files or parts in self.dirs:
            raise InvalidFile(f"{self.where}: archive entry {raw!r} appears twice (duplicate names are refused)")
        self.announce(raw, size)
        self.files[parts] = raw
        target = self.dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(target, "xb") as out:
            while chunk := stream.read(_CHUNK):
                written += len(chunk)
                if written > size:
                    raise InvalidFile(f"{self.where}: archive entry {raw!r} holds more bytes than its header says")
                if self.total + written > self.max_expanded:
                    raise FileTooLarge(f"{self.where}: the archive expands past the {self.max_expanded:,}-byte limit")
                if ratio_of is not None and written > RATIO_FLOOR and written > max_ratio * max(ratio_of, 1):
                    raise FileTooLarge(
                        f"{self.where}: archive entry {raw!r} expands more than {max_ratio:.0f} times "
                        "(a compression bomb?)"
                    )
                out.write(chunk)
        if written != size:
            raise InvalidFile(f"{self.where}: archive entry {raw!r} holds {written:,} bytes, its header says {size:,}")
        self.total += written

    def names(self) -> list[str]:
        return sorted("/".join(p) for p in self.files)


_ZIP_MODES = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a fifo"),
    (stat.S_ISSOCK, "a socket"),
)


def _zip_mode_problem(info: zipfile.ZipInfo) -> str | None:
    """What kind of non-regular entry a zip member is, from its Unix mode (when the archiver set one)."""
    mode = info.external_attr >> 16
    if not mode or info.create_system != 3:  # no Unix mode recorded (Windows archivers): a file or a folder
        return None
    for test, what in _ZIP_MODES:
        if test(mode):
            return what
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a special file"
    return None


def _extract_zip(p: Path, w: _Writer, max_ratio: float) -> None:
    try:
        zf = zipfile.ZipFile(p)
    except Exception as e:  # zipfile fails in many ways on damaged input (BadZipFile, NotImplementedError, ...)
        raise InvalidFile(f"{w.where}: a damaged zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > w.max_entries:
            raise FileTooLarge(f"{w.where}: {len(infos):,} entries, more than the {w.max_entries:,} allowed")
        checked: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        total = 0
        for info in infos:  # everything the central directory says, checked before one byte is written
            parts = _clean_name(info.filename, w.where)
            if info.flag_bits & 0x41:  # bit 0: encrypted; bit 6: strong encryption
                raise InvalidFile(f"{w.where}: archive entry {info.filename!r} is encrypted; upload it unencrypted")
            what = _zip_mode_problem(info)
            if what is not None:
                raise InvalidFile(f"{w.where}: archive entry {info.filename!r} is {what}; only files and folders")
            if not info.is_dir():
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > RATIO_FLOOR and ratio > max_ratio:
                    raise FileTooLarge(f"{w.where}: archive entry {info.filename!r} expands {ratio:.0f} times, "
                                       f"more than the {max_ratio:.0f} allowed (a compression bomb?)")  # fmt: skip
                total += info.file_size
            checked.append((info, parts))
        if total > w.max_expanded:
            raise FileTooLarge(f"{w.where}: the archive expands to {total:,} bytes, more than the "
                               f"{w.max_expanded:,}-byte limit")  # fmt: skip
        for info, parts in checked:
            w.count()
            if info.is_dir():
                w.directory(parts, info.filename)
                continue
            try:
                with zf.open(info) as stream:
                    w.file(parts, info.filename, info.file_size, stream, info.compress_size, max_ratio)
            except (InvalidFile, FileTooLarge):
                raise
            except Exception as e:  # bad CRC, unsupported compression, truncated data, name mismatch
                raise InvalidFile(f"{w.where}: archive entry {info.filename!r} cannot be read ({e})") from None


_TAR_TYPES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
    tarfile.CONTTYPE: "a contiguous file",
}


@contextmanager
def _open_tar(p: Path, where: str) -> Iterator[tarfile.TarFile]:
    """A tar opened as a stream (``r|*``): members are read in order, never by seeking back."""
    try:
        tf = tarfile.open(p, mode="r|*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InvalidFile(f"{where}: a damaged tar archive ({e})") from None
    with tf:
        yield tf


def _tar_members(tf: tarfile.TarFile, where: str) -> Iterable[tarfile.TarInfo]:
    while True:
        try:
            member = tf.next()
        except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
            raise InvalidFile(f"{where}: a damaged tar archive ({e})") from None
        if member is None:
            return
        yield member


def _extract_tar(p: Path, w: _Writer, max_ratio: float) -> None:
    compressed = p.stat().st_size
    with open(p, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    dest = str(w.dest)
    with _open_tar(p, w.where) as tf:
        for member in _tar_members(tf, w.where):
            w.count()
            name = member.name
            parts = _clean_name(name, w.where)
            what = _TAR_TYPES.get(member.type)
            if what is None and not (member.isreg() or member.isdir()):
                what = f"a special entry (type {member.type!r})"
            if what is not None:
                raise InvalidFile(f"{w.where}: archive entry {name!r} is {what}; only files and folders")
            try:  # a second opinion: Python's own rules for unpacking untrusted tars
                tarfile.data_filter(member, dest)
            except tarfile.FilterError as e:
                raise InvalidFile(f"{w.where}: archive entry {name!r} is refused ({e})") from None
            if member.isdir():
                w.directory(parts, name)
                continue
            w.announce(name, member.size)
            if gzipped and w.total + member.size > RATIO_FLOOR and w.total + member.size > max_ratio * compressed:
                raise FileTooLarge(f"{w.where}: the archive expands more than {max_ratio:.0f} times its "
                                   f"{compressed:,} bytes (a compression bomb?)")  # fmt: skip
            try:
                stream = tf.extractfile(member)
                assert stream is not None  # a regular file always has a stream
                w.file(parts, name, member.size, stream, None, max_ratio)
            except (InvalidFile, FileTooLarge):
                raise
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise InvalidFile(f"{w.where}: archive entry {name!r} cannot be read ({e})") from None


def extract_archive(
    path: str | os.PathLike[str],
    dest: Path,
    *,
    max_entries: int = MAX_ENTRIES,
    max_expanded: int = MAX_EXPANDED,
    max_ratio: float = MAX_RATIO,
) -> list[str]:
    """Unpack a zip or tar (plain or gzip) into ``dest`` (an existing, empty folder).

    Returns the relative names (POSIX, sorted) of the regular files written; folders are
    created as needed. Raises :class:`~dns_core.uploads.InvalidFile` or
    :class:`~dns_core.uploads.FileTooLarge` (see the module's docstring); on a refusal, ``dest``
    may hold part of the archive and is the caller's to remove.
    """
    p, dest = Path(path), Path(dest)
    where = p.name
    if not dest.is_dir() or any(dest.iterdir()):
        raise ValueError(f"{dest}: extract_archive needs an existing, empty folder")
    w = _Writer(dest, where, max_entries, max_expanded)
    kind = archive_kind(p)
    if kind == "zip":
        _extract_zip(p, w, max_ratio)
    elif kind == "tar":
        _extract_tar(p, w, max_ratio)
    else:
        raise InvalidFile(f"{where}: not a zip or tar archive")
    return w.names()


def common_root(names: Iterable[str]) -> str | None:
    """The single top-level folder that holds every name (``bert-tiny`` for ``bert-tiny/config.json``,
    ``bert-tiny/vocab.txt``), or None when names lie at the top or in several top-level folders."""
    roots: set[str] = set()
    for name in names:
        parts = [c for c in name.split("/") if c not in ("", ".")]
        if len(parts) < 2:
            return None
        roots.add(parts[0])
        if len(roots) > 1:
            return None
    return roots.pop() if roots else None

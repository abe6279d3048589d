"""The adapter store on disk: one `<name>.safetensors` per adapter in one folder.

Names are checked against a strict pattern before any path is built, so no request can reach a
file outside the folder. Uploads stream into a temp file in the folder and are renamed into place
once validated (fsync, rename, fsync the folder): a crash leaves either the old file or the new
one under the final name, never half of one.

A store may be shared by several servers (replicas, on one machine or on a mount every node
sees). Each rename makes a new file, so a file's identity (inode, size, modification time: one
`stat`) tells a server whether the adapter it holds is still the one under the name, and its
content hash (SHA-256) is the adapter's version.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from neuroada.format import replace_durably

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUFFIX = ".safetensors"


class InvalidAdapterName(ValueError):
    pass


@dataclass(frozen=True)
class FileIdentity:
    """Which file is under a name: a replacement (a rename onto the name) changes it."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StoredFile:
    """One adapter file's bytes, read through one open file, with what identifies them."""

    data: bytes
    identity: FileIdentity
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
        )
    return name


class AdapterStore:
    # In a shared store another server may be writing a temp file right now: only old ones are
    # left over from a crash (an upload is bounded in size, so none takes this long).
    SHARED_STALE_TEMP_S = 3600

    def __init__(self, folder: Path, shared: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Temp files of writes a crash interrupted: never under a final name, safe to drop.
        cutoff = time.time() - self.SHARED_STALE_TEMP_S if shared else float("inf")
        for stale in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()
            except FileNotFoundError:  # another server committed or dropped it meanwhile
                pass

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        """Adapters on disk: regular files only (a symlink could point outside the store)."""
        found = []
        for p in sorted(self.folder.glob(f"*{SUFFIX}")):
            name = p.name[: -len(SUFFIX)]
            if p.is_file() and not p.is_symlink() and NAME_PATTERN.fullmatch(name):
                found.append(name)
        return found

    def source(self, name: str) -> Path:
        """The file to read an adapter from: a regular file in the store, never a symlink."""
        path = self.path(name)
        if path.is_symlink():
            raise InvalidAdapterName(f"adapter {name!r} is a symlink; the store serves regular files only")
        return path

    def identity(self, name: str) -> FileIdentity | None:
        """The file under `name` now (one `lstat`), or None if there is none (or not a regular file)."""
        try:
            st = os.lstat(self.path(name))
        except FileNotFoundError:
            return None
        return FileIdentity.of(st) if stat.S_ISREG(st.st_mode) else None

    def read(self, name: str) -> StoredFile:
        """The whole file under `name`, its identity and hash taken from the same open file, so a
        replacement racing the read cannot mix two versions. Raises OSError (FileNotFoundError
        once deleted) or InvalidAdapterName."""
        fd = os.open(self.source(name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            identity = FileIdentity.of(os.fstat(fd))
            data = f.read()
        return StoredFile(data, identity, hashlib.sha256(data).hexdigest())

    def incoming(self, name: str) -> Path:
        """A new empty temp file in the store for an upload to stream into; `commit` or unlink it.
        Its name is one the start-up sweep removes, should the server die before either."""
        fd, tmp = tempfile.mkstemp(prefix=f".{check_name(name)}{SUFFIX}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        return Path(tmp)

    def commit(self, tmp: Path, name: str) -> bool:
        """Move a fully written `incoming` file into place atomically; True if it replaced an adapter."""
        path = self.path(name)
        existed = path.exists()
        replace_durably(tmp, path)
        return existed

    def delete(self, name: str) -> bool:
        path = self.path(name)
        if not path.exists():
            return False
        path.unlink()
        return True

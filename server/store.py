"""The adapter store on disk: one `<name>.safetensors` per adapter in one folder.

Names are checked against a strict pattern before any path is built, so no request can reach a
file outside the folder. Uploads stream into a temp file in the folder and are renamed into place
once validated (fsync, rename, fsync the folder): a crash leaves either the old file or the new
one under the final name, never half of one.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from neuroada.format import replace_durably

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUFFIX = ".safetensors"


class InvalidAdapterName(ValueError):
    pass


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
        )
    return name


class AdapterStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Temp files of writes a crash interrupted: never under a final name, safe to drop.
        for stale in self.folder.glob(f".*{SUFFIX}.*.tmp"):
            stale.unlink(missing_ok=True)

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

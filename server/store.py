"""The adapter store on disk: one `<name>.safetensors` per adapter in one folder.

Names are checked against a strict pattern before any path is built, so no request can reach a
file outside the folder. Writes are atomic (temp file, fsync, rename): a crash leaves either the
old file or the new one under the final name, never half of one.
"""

from __future__ import annotations

import re
from pathlib import Path

from neuroada.format import write_atomic

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

    def read(self, name: str) -> bytes:
        path = self.path(name)
        if path.is_symlink():
            raise InvalidAdapterName(f"adapter {name!r} is a symlink; the store serves regular files only")
        return path.read_bytes()

    def write(self, name: str, data: bytes) -> bool:
        """Persist atomically; True if it replaced an existing adapter."""
        path = self.path(name)
        existed = path.exists()
        write_atomic(path, data)
        return existed

    def delete(self, name: str) -> bool:
        path = self.path(name)
        if not path.exists():
            return False
        path.unlink()
        return True

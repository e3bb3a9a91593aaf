"""One way to notice that files changed: their inode, mtime and size.

The inode counts: Kubernetes mounts Secrets and projected tokens through a symlink swap, so a
rotated file can keep its size and even its mtime but never its inode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Stamp = tuple[tuple[int, int, int] | None, ...]


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of ``path``; None when there is no path or no file."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatch:
    """Runs a loader when any of its files changed since the last successful load."""

    def __init__(self, *paths: Path | None) -> None:
        self.paths = paths
        self._loaded: Stamp | None = None

    def stamp(self) -> Stamp:
        return tuple(file_stamp(p) for p in self.paths)

    def changed(self) -> bool:
        """Whether the files differ from what the last successful load read."""
        return self.stamp() != self._loaded

    def load(self, loader: Callable[[], T]) -> T:
        """Run ``loader`` and remember the files' stamp; an exception leaves it unremembered."""
        stamp = self.stamp()
        result = loader()
        self._loaded = stamp
        return result

    def reload(self, loader: Callable[[], T]) -> T | None:
        """``load`` when the files changed, else None."""
        return self.load(loader) if self.changed() else None

"""Decode-once cache of image folders: uint8 ``.npy`` arrays plus a small JSON manifest.

An image folder is decoded the first time it is used and stored as one ``images.npy``
(uint8, N x H x W x C) and one ``labels.npy`` (int64) per split, so later runs open the
images with ``np.load(mmap_mode="r")`` in milliseconds instead of decoding thousands of
files again.

The cache entry is keyed by a hash of the folder's content listing (relative path, size
and modification time of every file) plus the decode options, so a file that is added,
removed or touched gives a new key and a stale cache is never read. Entries are written
into a temporary directory that is renamed into place with ``os.replace``: a reader sees
either a complete entry or none, and two processes decoding the same folder at once
cannot corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CACHE_VERSION",
    "default_cache_dir",
    "folder_listing",
    "cache_key",
    "CacheEntry",
    "read_entry",
    "raise_unreadable",
]

# Bump when the decode rules or the on-disk layout change, so old entries are ignored.
CACHE_VERSION = 1

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$RESLAB_CACHE`` if set, else ``~/.cache/reslab``."""
    env = os.environ.get("RESLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reslab"


def folder_listing(root: Path, subdirs: list[str] | None = None) -> list[tuple[str, int, int]]:
    """Every non-hidden file under ``root`` (or under the given sub-folders of it) as
    ``(relative posix path, size in bytes, mtime in ns)``, sorted by path.

    This is what the cache key hashes: adding, removing or touching any file changes it.
    """
    entries: list[tuple[str, int, int]] = []
    root_str = os.path.join(str(root), "")
    tops = [os.path.join(root_str, s) for s in subdirs] if subdirs else [root_str]
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=raise_unreadable):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root_str).replace(os.sep, "/")
            prefix = "" if rel_dir == "." else rel_dir + "/"
            for name in filenames:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:  # a dangling link: listed with size -1, skipped at decode
                    size, mtime = -1, 0
                entries.append((prefix + name, size, mtime))
    entries.sort()
    return entries


def raise_unreadable(err: OSError) -> None:
    """``os.walk`` error handler: an unreadable folder must not silently drop its images from the data."""
    if isinstance(err, PermissionError):
        raise PermissionError(f"cannot read folder {err.filename}: permission denied; make it readable "
                              "(chmod -R a+rX) or move it out of the data folder") from err
    raise err


def cache_key(listing: list[tuple[str, int, int]], options: dict[str, Any]) -> str:
    """A short hex digest of the content listing plus the decode options."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    for rel, size, mtime in listing:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:20]


class CacheEntry:
    """Builds one cache entry in a temporary directory and publishes it atomically.

    Usage::

        with CacheEntry(cache_dir, name) as entry:
            images = entry.allocate("train", n, (h, w, c))   # a writable np.memmap
            ...fill images...
            entry.finish_split("train", labels, files, n_written)
            entry.commit(manifest)
    """

    def __init__(self, cache_dir: Path, name: str):
        self.final = Path(cache_dir) / name
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.final.parent))
        self._arrays: dict[str, np.memmap] = {}

    def __enter__(self) -> "CacheEntry":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)  # no-op after a successful commit

    def allocate(self, split: str, n: int, shape: tuple[int, int, int]) -> np.memmap:
        """A writable uint8 ``.npy`` memmap for up to ``n`` images of ``shape``."""
        arr = np.lib.format.open_memmap(
            self.tmp / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(n, *shape)
        )
        self._arrays[split] = arr
        return arr

    def finish_split(self, split: str, labels: np.ndarray, files: list[str], n_written: int) -> None:
        """Flush the images (shrinking the file if some were skipped) and write labels/files."""
        arr = self._arrays.pop(split)
        path = self.tmp / f"{split}_images.npy"
        if n_written < arr.shape[0]:
            # Skipped files leave unused rows at the end; copy into an exact-size array
            # (rare, so a copy is simpler than patching the .npy header in place).
            part = self.tmp / f"{split}_images.part.npy"
            out = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(n_written, *arr.shape[1:]))
            step = 4096
            for i in range(0, n_written, step):
                out[i : i + step] = arr[i : min(i + step, n_written)]
            out.flush()
            del out, arr
            os.replace(part, path)
        else:
            arr.flush()
            del arr
        np.save(self.tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        with open(self.tmp / f"{split}_files.json", "w") as f:
            json.dump(list(files), f)

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest last and rename the directory into place."""
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump({"version": CACHE_VERSION, **manifest}, f, indent=1)
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            # Another process published the same key first; its entry is equivalent.
            if read_entry(self.final) is None:
                raise
        return self.final


def read_entry(path: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache entry, or None if absent/incomplete/old."""
    try:
        with open(Path(path) / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("version") != CACHE_VERSION:
        return None
    return manifest


def load_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images memmap, labels, files)`` of one split of a cache entry."""
    path = Path(path)
    images = np.load(path / f"{split}_images.npy", mmap_mode="r")
    labels = np.load(path / f"{split}_labels.npy")
    with open(path / f"{split}_files.json") as f:
        files = json.load(f)
    return images, labels, files

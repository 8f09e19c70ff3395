"""Atomic writes: a file or folder is either absent, the old one, or the complete new one.

Files: written to a uniquely named temporary file beside the target (``.NAME.<random>.tmp``),
flushed and fsynced, renamed over the target with ``os.replace``, then the parent folder is
fsynced so the rename itself survives a power loss. Folders: written under a temporary name,
every file and folder fsynced, renamed into place, parent fsynced. On any error the temporary
is removed and the target is untouched.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "a.txt", "hello\\n")
>>> (d / "a.txt").read_text()
'hello\\n'
>>> with atomic_path(d / "b.bin") as tmp:
...     _ = tmp.write_bytes(b"xy")
>>> sorted(p.name for p in d.iterdir())
['a.txt', 'b.bin']
>>> remove_tree(d); d.exists()
False
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "remove_tree",
    "replace_dir",
    "temp_sibling",
]

TMP_SUFFIX = ".tmp"


def temp_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh, unique temporary name beside ``path`` (``.NAME.<8 hex>.tmp``)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync one file's data (opened read-only; works on frozen files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder, so the names created or renamed in it are durable (no-op where the
    platform cannot open folders, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str], *, skip: Collection[str] = ()) -> None:
    """fsync every file and folder under ``root`` (files first, folders bottom-up), except the
    paths in ``skip`` (``os.path.normpath`` form): those the caller fsynced after their last
    change (the unit writer's shard files, :func:`cellcurate.datasets.shards.write_shard`)."""
    for dirpath, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or (skip and os.path.normpath(p) in skip):
                continue
            fsync_file(p)
        if not (skip and os.path.normpath(dirpath) in skip):
            fsync_dir(dirpath)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error the file written
    there is fsynced and renamed over ``path`` (and the folder fsynced); otherwise it is removed.

    For writers that want a file name (``np.save``, ``to_parquet``, ``tifffile.imwrite``). The
    parent folder is created when missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fh)`` on a binary file handle, atomically replacing ``path`` (``torch.save``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Replace ``path`` with ``obj`` as JSON (a trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def replace_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """fsync the complete folder ``tmp`` and rename it to ``final`` (which must not exist as a
    non-empty folder), then fsync the parent so the new name is durable."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _make_writable(root: Path) -> None:
    for dirpath, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            p = os.path.join(dirpath, name)
            try:
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IRUSR | (
                        stat.S_IXUSR if name in dirs else 0))
            except OSError:
                pass


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a folder (or file) and everything in it, best effort, never raising.

    Works on Python 3.11 (no ``shutil.rmtree(onexc=)``) and on frozen trees (read-only files and
    folders are made writable first). Used to clean up temporaries after a failure, so it must not
    hide the original error by raising one of its own.
    """
    p = Path(path)
    if p.is_symlink() or p.is_file():
        try:
            p.unlink()
        except OSError:
            pass
        return
    if not p.exists():
        return
    try:
        os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
    except OSError:
        pass
    _make_writable(p)
    shutil.rmtree(p, ignore_errors=True)

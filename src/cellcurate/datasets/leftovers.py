"""Temporary folders of writers that may be killed (store creation, release export).

A writer makes its folder with :func:`locked_tempdir`, which holds an exclusive ``flock`` on the
folder itself until :func:`release_tempdir`. The lock dies with the process, so a folder whose lock
can be taken belongs to a writer that is gone (SIGKILL, power loss, full disk): the next writer or
``curate verify`` finds it with :func:`stale_tempdirs` and removes it with
:func:`remove_stale_tempdirs`, naming what it removed. A live writer's folder is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path

from ..core.atomic import remove_tree


def locked_tempdir(parent: Path, prefix: str) -> tuple[Path, int]:
    """Create ``parent/<prefix><token>`` and lock it; return the folder and the lock's descriptor."""
    for _ in range(10):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # removed by a cleaner in the instant before we locked it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not path.is_dir():  # removed between mkdir and flock: start again
            os.close(fd)
            continue
        return path, fd
    raise FileExistsError(parent / f"{prefix}*")


def release_tempdir(fd: int) -> None:
    """Drop the lock taken by :func:`locked_tempdir` (after the folder was renamed or removed)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def _writer_is_gone(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live writer holds it
    except OSError:
        return True  # no locking on this file system: treat as stale only because nothing can hold it
    finally:
        os.close(fd)
    return True


def stale_tempdirs(parent: Path, prefix: str) -> list[Path]:
    """Folders ``parent/<prefix>*`` whose writer is gone (sorted)."""
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()
            and _writer_is_gone(p)]


def remove_stale_tempdirs(parent: Path, prefix: str) -> tuple[list[Path], list[str]]:
    """Remove the stale folders ``parent/<prefix>*``; return (removed, problems): a folder that
    cannot be removed (read-only media) is a problem naming it, not an exception."""
    removed: list[Path] = []
    problems: list[str] = []
    for p in stale_tempdirs(parent, prefix):
        try:
            remove_tree(p)
        except OSError as exc:
            problems.append(f"{p}: left by a killed writer and cannot be removed ({exc.strerror or exc})")
            continue
        if p.exists():
            problems.append(f"{p}: left by a killed writer and cannot be removed")
        else:
            removed.append(p)
    return removed, problems

"""Is a folder self-contained? (``curate verify`` of a store or a release, and export's own check.)

A release or store must hold its data itself: a symbolic link (to a file or a folder, inside or
outside), a hard link shared with a file outside the folder, a special file (FIFO, socket, device)
or a manifest path that leaves the folder makes the bytes depend on something the hashes or the
ledger do not cover. Every such entry is a problem naming it; nothing is followed or read through.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path, PurePosixPath


def containment_problems(root: str | Path, *, what: str = "release") -> list[str]:
    """Symlinks, special files and hard links to outside under ``root`` (walked without following
    links), as problems ``"<relative path>: <what is wrong>"``."""
    root = Path(root)
    problems: list[str] = []
    linked: dict[tuple[int, int], tuple[str, int]] = {}
    seen: Counter[tuple[int, int]] = Counter()
    for dirpath, dirs, names in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in sorted([*dirs, *names]):
            p = here / name
            rel = p.relative_to(root).as_posix()
            try:
                st = os.lstat(p)
            except OSError as exc:
                problems.append(f"{rel}: cannot be read ({exc.strerror or exc})")
                continue
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(p)
                except OSError:
                    target = "?"
                problems.append(f"{rel}: is a symbolic link (to {target}); a {what} must hold its files itself")
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: is not a regular file (a FIFO, socket or device)")
            elif st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                seen[key] += 1
                linked.setdefault(key, (rel, st.st_nlink))
    for key, (rel, nlink) in sorted(linked.items(), key=lambda kv: kv[1][0]):
        outside = nlink - seen[key]
        if outside > 0:
            problems.append(f"{rel}: is hard-linked to {outside} file(s) outside the {what}")
    return problems


def unsafe_relative_path(rel: object) -> str | None:
    """Why ``rel`` (a path from a manifest or catalog) may not name a file inside the folder, or None:
    not a string, empty, absolute, a ``..`` part, a backslash or a NUL."""
    if not isinstance(rel, str) or not rel:
        return "is not a relative path"
    if "\x00" in rel or "\\" in rel:
        return "holds a NUL or a backslash"
    pp = PurePosixPath(rel)
    if pp.is_absolute() or rel.startswith("~"):
        return "is an absolute path"
    if any(part == ".." for part in pp.parts):
        return "leaves the folder (a '..' part)"
    return None


def resolves_inside(root: str | Path, rel: str) -> bool:
    """``root/rel`` resolves (through any links) to a path inside ``root``."""
    base = Path(root).resolve()
    try:
        (base / rel).resolve().relative_to(base)
    except (ValueError, OSError, RuntimeError):
        return False
    return True

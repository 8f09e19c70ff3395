"""`curate download NAME --to DIR`: fetch a source's release zips, verify them, unpack them.

What is fetched is the ``downloads`` of the source's registry entry
(:class:`~cellcurate.datasets.sources.DownloadFile`: URL, pinned SHA-256, unpack folder).

* **Resumable**: bytes go to ``DIR/.downloads/<file>.part``; a later run asks the server for the
  rest (``Range: bytes=<have>-``) and appends when it answers 206 (it restarts from zero on 200).
  A cut connection leaves the ``.part`` file and a one-line error saying to run again.
* **Verified**: the whole file's SHA-256 must equal the pinned one (or ``--sha256`` for entries
  whose checksum is not published). A mismatch deletes the download and unpacks nothing. An entry
  without a pinned checksum is refused unless the user gives one: nothing unverified is unpacked.
* **Unpacked atomically**: the zip is extracted into ``DIR/.tmp-unpack-*`` (member paths checked:
  no absolute paths, no ``..``, no links), then each top-level entry is renamed into place; a
  failure removes the temporary folder, so nothing half-unpacked is left. A target that already
  exists is refused (remove it or unpack elsewhere).
* The verified zip is kept in ``DIR/.downloads/``; running again skips files already verified.

Dimensions: bytes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError, InputFormatError, StateError
from .sources import DownloadFile, SourceSpec, get_source

CHUNK = 1 << 16


@dataclass
class DownloadResult:
    source: str
    to: Path
    files: list[dict[str, Any]] = field(default_factory=list)
    unpacked: list[str] = field(default_factory=list)
    layout_ok: bool = False


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(spec: SourceSpec, parts: list[str] | None) -> list[DownloadFile]:
    if not spec.downloads:
        raise ConfigError(f"source {spec.name!r} has no downloads in its registry entry")
    names = list(spec.downloads) if not parts else parts
    unknown = [p for p in names if p not in spec.downloads]
    if unknown:
        raise ConfigError(f"{spec.name} has no download part {', '.join(unknown)}; parts: {', '.join(spec.downloads)}")
    return [f for p in names for f in spec.downloads[p]]


def fetch(file: DownloadFile, dest: Path, *, progress: bool | Callable[..., Any] = True, timeout: float = 60.0) -> dict[str, Any]:
    """Download ``file.url`` to ``dest`` (resuming ``dest.part``); returns what happened.

    Raises StateError on a connection problem (the ``.part`` file stays for the next run).
    """
    import http.client
    import urllib.error
    import urllib.request

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(file.url, headers={"User-Agent": "cellcurate", **({"Range": f"bytes={have}-"} if have else {})})
    info: dict[str, Any] = {"file": file.filename, "resumed_from": have, "bytes_fetched": 0}
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the .part is complete
            os.replace(part, dest)
            return info
        raise StateError(f"{file.url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StateError(f"{file.url}: cannot connect ({getattr(exc, 'reason', exc)})") from None
    with resp:
        status = getattr(resp, "status", 200)
        if have and status != 206:
            have = 0  # the server ignored Range: start over
            info["resumed_from"] = 0
        length = resp.headers.get("Content-Length")
        total = (int(length) + have) if length is not None else file.size
        bar = _bar(progress, total=total, initial=have, desc=file.filename)
        try:
            with open(part, "ab" if have else "wb") as out:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                        raise StateError(f"{file.url}: connection lost after {have + info['bytes_fetched']:,} bytes "
                                         f"({type(exc).__name__}); run the command again to resume") from None
                    if not block:
                        break
                    out.write(block)
                    info["bytes_fetched"] += len(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        finally:
            bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        raise StateError(f"{file.url}: connection lost after {got:,} of {total:,} bytes; run the command again to resume")
    os.replace(part, dest)
    return info


def _bar(progress: bool | Callable[..., Any], **kw: Any) -> Any:
    if callable(progress):
        return progress(**kw)
    from tqdm.auto import tqdm

    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=None if progress else True, **kw)


def _safe_members(zf: zipfile.ZipFile, archive: Path, strip: int) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    out = []
    for info in zf.infolist():
        p = PurePosixPath(info.filename)
        if p.is_absolute() or ".." in p.parts or info.filename.startswith(("/", "\\")) or ":" in p.parts[0]:
            raise InputFormatError(archive, f"unsafe member path {info.filename!r}; not unpacking")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise InputFormatError(archive, f"member {info.filename!r} is a symbolic link; not unpacking")
        if p.parts and p.parts[0] == "__MACOSX":
            continue
        rel = PurePosixPath(*p.parts[strip:]) if len(p.parts) > strip else None
        if rel is None or not rel.parts:
            continue
        out.append((info, rel))
    return out


def unpack(archive: Path, target: Path, *, strip: int = 0) -> list[str]:
    """Extract ``archive`` into ``target`` atomically per top-level entry; returns those entries."""
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".tmp-unpack-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputFormatError(archive, f"not a readable zip file ({exc})") from None
        with zf:
            members = _safe_members(zf, archive, strip)
            tops = sorted({m[1].parts[0] for m in members})
            clash = [t for t in tops if (target / t).exists()]
            if clash:
                raise StateError(f"{target}: {', '.join(clash)} already exist(s); remove them or unpack elsewhere")
            for info, rel in members:
                dest = tmp.joinpath(*rel.parts)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise InputFormatError(archive, f"member {info.filename!r} is damaged ({exc})") from None
        for t in tops:
            os.replace(tmp / t, target / t)
        return tops
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str | SourceSpec, to: str | Path, *, parts: list[str] | None = None, sha256: str | None = None,
             progress: bool | Callable[..., Any] = True) -> DownloadResult:
    """Fetch, verify and unpack the downloads of a source into ``to`` (see the module doc)."""
    spec = name if isinstance(name, SourceSpec) else get_source(name)
    files = _files(spec, parts)
    if sha256 is not None and len(files) != 1:
        raise ConfigError(f"--sha256 names one file's checksum; {spec.name} has {len(files)} files here (pick a part)")
    for f in files:
        if f.sha256 is None and sha256 is None:
            raise ConfigError(
                f"{spec.name}: no published SHA-256 is pinned for {f.filename} ({f.url}); check the file with its "
                "provider and pass --sha256 HEX (nothing unverified is unpacked)"
            )
    to = Path(to)
    cache = to / ".downloads"
    cache.mkdir(parents=True, exist_ok=True)
    result = DownloadResult(spec.name, to)
    for f in files:
        expected = (sha256 or f.sha256 or "").lower()
        dest = cache / f.filename
        info: dict[str, Any] = {"file": f.filename, "resumed_from": 0, "bytes_fetched": 0}
        if not (dest.exists() and sha256_of(dest) == expected):
            if dest.exists():
                dest.unlink()
            info = fetch(f, dest, progress=progress)
            digest = sha256_of(dest)
            if digest != expected:
                dest.unlink()
                raise InputFormatError(dest, f"SHA-256 {digest} does not match the pinned {expected}; the download "
                                             "was deleted and nothing was unpacked")
        info["sha256"] = expected
        result.files.append(info)
        done = cache / f"{f.filename}.unpacked"
        if not done.exists():
            result.unpacked += unpack(dest, to / f.unpack_to, strip=f.strip)
            done.write_text(expected + "\n")
    result.layout_ok = spec.looks_like(to)
    return result
